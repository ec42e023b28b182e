"""Analysis of a sweep: collect the jobs into a table, test claims, write a report.

    from featsweep.analysis import collect
    df = collect("multirun/2024-01-01/12-00-00")   # one row per job (docs/CONTRACTS.md)

``python -m featsweep.analysis SWEEP_DIR`` writes tables, pictures and the verdicts of the
notes' claims to ``SWEEP_DIR/analysis/``. Modules: :mod:`.collect` (job dirs -> table),
:mod:`.claims` (claims -> verdicts), :mod:`.report` (pictures, markdown, the CLI's work).
"""

from __future__ import annotations

from featsweep.analysis.collect import CollectError, collect, find_jobs, read_trace

__all__ = ["CollectError", "collect", "find_jobs", "read_trace"]
