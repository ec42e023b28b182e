"""Image metrics of every job, cached under ``SWEEP/analysis/`` (never in a job directory).

``display.<metric>`` is :mod:`featsweep.metrics` on ``image.png`` / 255 (what the notes looked
at); ``raw.<metric>`` on ``image.npy`` as stored: pixel space, *unclipped* — values outside
[0, 1] are what an unclamped run does, and the metrics stay finite on them; a non-finite image
(a diverged run) gives NaN metrics.

The cache (``SWEEP/analysis/metrics_cache.json``, one file for the sweep) is keyed by each job's
path relative to the sweep and each image file's mtime and size (and the metric names), so
collecting a finished sweep again reads no image. ``artifacts`` stays the only writer of job
directories; a read-only sweep is analysed without a cache.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from featsweep.analysis.jobs import Job
from featsweep.metrics import METRICS, image_stats_batch

__all__ = ["CACHE_FILE", "IMAGES", "cache_path", "image_metrics"]

CACHE_FILE = "metrics_cache.json"  # in SWEEP/analysis/
CACHE_VERSION = 2  # 2: raw.* on the unclipped image
IMAGES: dict[str, str] = {"display": "image.png", "raw": "image.npy"}  # column prefix -> file
_PENDING_VALUES = 1 << 25  # floats of images loaded before their metrics are computed (128 MB)


def cache_path(sweep_dir: Path) -> Path:
    """Where the metric cache of the sweep ``sweep_dir`` lives."""
    return Path(sweep_dir) / "analysis" / CACHE_FILE


def _file_key(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def _load_display(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return arr / np.float32(255.0)


def _load_raw(path: Path) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3) or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"holds an array of shape {arr.shape} and dtype {arr.dtype}, "
                         f"expected H×W×3 (or H×W×1 grayscale) float")
    if arr.shape[-1] == 1:
        # A grayscale model's image: measured as the grey RGB image it is (luma = the channel,
        # colourfulness 0), as image.png is (PIL's convert("RGB") replicates the channel).
        arr = np.repeat(arr, 3, axis=-1)
    return arr.astype(np.float32, copy=False)


_LOADERS = {"display": _load_display, "raw": _load_raw}


def _read_cache(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION \
            or data.get("metrics") != list(METRICS) or not isinstance(data.get("jobs"), dict):
        return {}
    return data["jobs"]


def _write_cache(path: Path, jobs: dict[str, Any]) -> None:
    from featsweep.artifacts import atomic_write

    text = json.dumps({"version": CACHE_VERSION, "metrics": list(METRICS), "jobs": jobs},
                      indent=0, allow_nan=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    except OSError:
        pass  # a read-only sweep is still analysed, just without a cache


def _key_of(job: Job, root: Path) -> str:
    try:
        return job.path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(job.path.resolve())


def image_metrics(jobs: Sequence[Job], cache: Path | None) -> list[dict[str, float]]:
    """``display.*`` and ``raw.*`` of every job (cached; computed in batches of equal shape).

    Args:
        jobs: the jobs (:func:`featsweep.analysis.jobs.read_job`); unreadable images add an
            error to ``job.errors``.
        cache: the cache file (:func:`cache_path`), or None for no cache.

    Returns:
        One dict per job, ``{prefix.metric: float}`` (NaN where there is no value).
    """
    root = cache.parent.parent if cache is not None else Path(".")
    stored_all = _read_cache(cache)
    values: list[dict[str, float]] = [{} for _ in jobs]
    fresh_all: list[dict[str, Any]] = []
    todo: dict[tuple[str, tuple[int, ...]], list[tuple[int, np.ndarray]]] = {}
    pending = 0

    def flush() -> None:
        # Images wait here until _PENDING_VALUES floats are loaded, so memory stays bounded
        # however large the sweep, while image_stats_batch still sees whole batches.
        nonlocal pending
        for (prefix, _shape), items in todo.items():
            stats = image_stats_batch(np.stack([image for _, image in items]))
            for row, (index, _) in enumerate(items):
                fresh_all[index][prefix]["values"] = {
                    m: (float(stats[m][row]) if np.isfinite(stats[m][row]) else None)
                    for m in METRICS
                }
        todo.clear()
        pending = 0

    for index, job in enumerate(jobs):
        stored = stored_all.get(_key_of(job, root), {})
        fresh: dict[str, Any] = {}
        fresh_all.append(fresh)
        for prefix, name in IMAGES.items():
            path = job.path / name
            key = _file_key(path)
            if key is None:
                continue  # no image (yet): NaN metrics, nothing to cache
            entry = stored.get(prefix) if isinstance(stored, dict) else None
            if isinstance(entry, dict) and entry.get("key") == key:
                fresh[prefix] = entry
                continue
            try:
                image = _LOADERS[prefix](path)
            except Exception as exc:  # any broken file: say what, never raise
                fresh[prefix] = {"key": key,
                                 "error": f"{name}: not readable ({' '.join(str(exc).split())[:200]})"}
                continue
            fresh[prefix] = {"key": key, "values": None}
            if not np.isfinite(image).all() or min(image.shape[:2]) < 3:
                continue  # NaN metrics (a diverged image, a tiny one): not an error
            todo.setdefault((prefix, image.shape), []).append((index, image))
            pending += image.size
            if pending >= _PENDING_VALUES:
                flush()
    flush()

    new_cache: dict[str, Any] = {}
    for index, job in enumerate(jobs):
        fresh = fresh_all[index]
        for prefix in IMAGES:
            entry = fresh.get(prefix, {})
            got = entry.get("values") or {}
            for m in METRICS:
                value = got.get(m)
                values[index][f"{prefix}.{m}"] = math.nan if value is None else float(value)
            if entry.get("error"):
                job.errors.append(entry["error"])
        if fresh:
            new_cache[_key_of(job, root)] = fresh
    if cache is not None and new_cache != stored_all:  # unchanged (re-collecting): no write
        _write_cache(cache, new_cache)
    return values
