"""Analysis of a sweep: collect the jobs into a table, test claims, write a report.

    from featsweep.analysis import collect
    df = collect("multirun/2024-01-01/12-00-00")   # one row per job (docs/CONTRACTS.md)

``python -m featsweep.analysis SWEEP_DIR`` writes tables, pictures and the verdicts of the
notes' claims to ``SWEEP_DIR/analysis/``. Modules, in import order:

- the table: :mod:`.jobs` (one job dir -> one record), :mod:`.metric_cache` (image metrics,
  cached in ``SWEEP/analysis/``), :mod:`.sweeps` (sweeps in a folder, planned vs on disk),
  :mod:`.collect` (the table), :mod:`.columns` (which columns are config leaves);
- the claims: :mod:`.values` (one spelling of a value), :mod:`.claim` (schema and file),
  :mod:`.pairing` (jobs -> paired groups), :mod:`.stats` (hierarchical bootstrap, Holm, floor),
  :mod:`.claims` (the public face: verdicts);
- the report: :mod:`.factors` (swept overrides), :mod:`.figures` (pictures), :mod:`.report`
  (markdown).
"""

from __future__ import annotations

from featsweep.analysis.collect import CollectError, collect, find_jobs, read_trace

__all__ = ["CollectError", "collect", "find_jobs", "read_trace"]
