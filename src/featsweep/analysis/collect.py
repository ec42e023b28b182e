"""From job directories to one tidy table: one row per job (see docs/CONTRACTS.md).

===================  =========================================================================
columns              from
===================  =========================================================================
job.num, job.dir,    ``.hydra/hydra.yaml`` (``hydra.job.num``), the job's absolute path,
job.sweep,           its sweep relative to the analysed folder (``.`` for the folder itself;
job.overrides        :mod:`.sweeps`), and ``.hydra/overrides.yaml`` joined by spaces
<config leaves>      ``.hydra/config.yaml``, flattened with dotted names; lists as repr strings
choice.<group>       ``hydra.runtime.choices`` (``hydra/*`` groups left out), sorted by group
status, activation   ``result.json`` (ok, diverged, failed, interrupted, not_started);
                     ``running``/``incomplete`` when it is missing, ``corrupt`` when a file
                     cannot be read (then ``result.error`` says which and why)
result.<key>         every other ``result.json`` field (the CONTRACTS fields always present)
trace.act@0 …        ``trace.csv``: activation at step 0 and at 10 %, 50 %, 100 % of the last
                     recorded step; ``trace.gain_last10%`` and ``trace.converged`` (:mod:`.jobs`)
display.<metric>     :mod:`featsweep.metrics` on ``image.png`` / 255 (what the notes looked at)
raw.<metric>         the same on ``image.npy`` as stored, unclipped (:mod:`.metric_cache`)
===================  =========================================================================

Reading one job: :mod:`.jobs`; image metrics and their cache in ``SWEEP/analysis/``:
:mod:`.metric_cache`; sweeps and their planned jobs: :mod:`.sweeps`. Nothing about one job's
files makes :func:`collect` raise: a job is never dropped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from featsweep.analysis.jobs import (
    CONVERGENCE_COLUMNS,
    STALE_AFTER_S,
    TRACE_COLUMNS,
    CollectError,
    _scalar,
    find_jobs,
    read_job,
    read_trace,
)
from featsweep.analysis.metric_cache import CACHE_FILE, IMAGES, cache_path, image_metrics
from featsweep.analysis.sweeps import sweep_of
from featsweep.metrics import METRICS

__all__ = [
    "CACHE_FILE",
    "CONVERGENCE_COLUMNS",
    "CollectError",
    "RESULT_KEYS",
    "TRACE_COLUMNS",
    "collect",
    "find_jobs",
    "read_trace",
]

# result.json fields of docs/CONTRACTS.md (besides status and activation): always columns, so the
# table's schema does not depend on which jobs have finished. Other fields follow, sorted.
RESULT_KEYS: tuple[str, ...] = (
    "activation_start", "steps", "steps_requested", "seconds", "device", "diverged_at", "error",
    "batch_size", "featsweep_version", "torch_version",
)


def _union(keys: Iterator[list[str]]) -> list[str]:
    seen: dict[str, None] = {}
    for group in keys:
        for key in group:
            seen.setdefault(key, None)
    return list(seen)


def _column(values: list[Any]) -> pd.Series:
    """One column from cells: pandas' inference, but all-missing stays object, ints stay ints."""
    series = pd.Series(values, dtype=object)
    present = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return series
    if all(isinstance(v, (bool, np.bool_)) for v in present):
        return series if len(present) < len(values) else series.astype(bool)
    if all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
           for v in present):
        if len(present) == len(values) and all(isinstance(v, (int, np.integer)) for v in present):
            return series.astype("int64")
        return pd.to_numeric(series, errors="coerce").astype(float)
    return series


def collect(sweep_dir: str | Path, *, stale_after: float = STALE_AFTER_S,
            cache: bool = True) -> pd.DataFrame:
    """One row per job under ``sweep_dir`` (a sweep, a dir of sweeps, or one job dir).

    Args:
        sweep_dir: directory searched recursively (sorted) for job dirs (``.hydra/config.yaml``).
        stale_after: seconds; a job without ``result.json`` whose newest file is younger than
            this is ``running``, older ``incomplete``.
        cache: keep image metrics in ``SWEEP_DIR/analysis/metrics_cache.json`` (never when
            ``sweep_dir`` is itself a job directory: only ``artifacts`` writes job dirs).

    Returns:
        Columns in this fixed order: ``job.num``, ``job.dir``, ``job.sweep``, ``job.overrides``;
        config leaves (first-seen order); ``choice.<group>`` (sorted); ``status``, ``activation``;
        ``result.<key>`` (:data:`RESULT_KEYS`, then other fields sorted); ``trace.act@0``,
        ``trace.act@10%``, ``trace.act@50%``, ``trace.act@100%``, ``trace.gain_last10%``,
        ``trace.converged`` (bool; None without a trace); ``display.<metric>`` and
        ``raw.<metric>`` in :data:`featsweep.metrics.METRICS` order. Rows sorted by ``job.num``
        (then ``job.dir``), index 0..n-1. ``status`` is result.json's (ok, diverged, failed,
        interrupted, not_started), or ``running``/``incomplete`` without result.json, or ``corrupt`` when a
        file is unreadable (``result.error`` then starts with the file's name).

    Raises:
        CollectError: the directory is missing or holds no job.
    """
    root = Path(sweep_dir)
    paths = find_jobs(root)
    if not paths:
        raise CollectError(
            f"featsweep.analysis: no featsweep jobs under {str(root)!r} (a job directory holds "
            f".hydra/config.yaml; give the sweep directory, e.g. multirun/DATE/TIME)."
        )
    now = time.time()
    jobs = [read_job(p, i, now, stale_after) for i, p in enumerate(paths)]
    is_job = bool(paths) and paths[0].resolve() == root.resolve()
    metrics = image_metrics(jobs, cache_path(root) if cache and not is_job else None)
    sweeps = []
    for job in jobs:
        where = sweep_of(job.path, root)
        rel = where.relative_to(root.resolve()).as_posix() if where != root.resolve() else "."
        sweeps.append(rel)

    config_keys = _union(iter(j.config.keys() for j in jobs))
    choice_keys = sorted(_union(iter(j.choices.keys() for j in jobs)))
    extra = sorted(set(_union(iter(list(j.result) for j in jobs)))
                   - {"status", "activation", *RESULT_KEYS})
    result_keys = list(RESULT_KEYS) + extra

    for job in jobs:
        if job.errors:
            job.row["status"] = "corrupt"
            previous = job.result.get("error")
            job.result = {**job.result, "error": "; ".join(
                ([str(previous)] if previous else []) + job.errors)}

    columns: dict[str, pd.Series] = {}
    columns["job.num"] = _column([j.row["job.num"] for j in jobs])
    columns["job.dir"] = _column([j.row["job.dir"] for j in jobs])
    columns["job.sweep"] = _column(sweeps)
    columns["job.overrides"] = _column([j.row["job.overrides"] for j in jobs])
    for key in config_keys:
        columns[key] = _column([j.config.get(key) for j in jobs])
    for key in choice_keys:
        columns[key] = _column([j.choices.get(key) for j in jobs])
    columns["status"] = _column([j.row["status"] for j in jobs])
    columns["activation"] = pd.Series([j.row["activation"] for j in jobs], dtype=float)
    for key in result_keys:
        columns[f"result.{key}"] = _column([_scalar(j.result.get(key)) for j in jobs])
    for name in TRACE_COLUMNS:
        columns[name] = pd.Series([j.row[name] for j in jobs], dtype=float)
    columns["trace.gain_last10%"] = pd.Series([j.row["trace.gain_last10%"] for j in jobs], dtype=float)
    columns["trace.converged"] = _column([j.row["trace.converged"] for j in jobs])
    for prefix in IMAGES:
        for m in METRICS:
            name = f"{prefix}.{m}"
            columns[name] = pd.Series([v[name] for v in metrics], dtype=float)
    df = pd.DataFrame(columns)
    df = df.sort_values(["job.num", "job.dir"], kind="stable").reset_index(drop=True)
    df.attrs["sweep_dir"] = str(root.resolve())
    return df
