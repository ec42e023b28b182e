"""From job directories to one tidy table: one row per job (see docs/CONTRACTS.md).

:func:`collect` walks a directory in sorted order (like tbparse's ``SummaryReader``), takes every
directory that holds ``.hydra/config.yaml`` as a job, and reads what the job wrote:

===================  =========================================================================
columns              from
===================  =========================================================================
job.num, job.dir,    ``.hydra/hydra.yaml`` (``hydra.job.num``), the job's absolute path, and
job.overrides        ``.hydra/overrides.yaml`` joined by spaces
<config leaves>      ``.hydra/config.yaml``, flattened with dotted names; lists as repr strings
choice.<group>       ``hydra.runtime.choices`` (``hydra/*`` groups left out), sorted by group
status, activation   ``result.json``; ``running``/``incomplete`` when it is missing, ``corrupt``
                     when a file cannot be read (then ``result.error`` says which and why)
result.<key>         every other ``result.json`` field (the CONTRACTS fields always present)
trace.act@0 …        ``trace.csv``: activation at step 0 and at 10 %, 50 %, 100 % of the last
                     recorded step (the last recorded step at or before that point)
display.<metric>     :mod:`featsweep.metrics` on ``image.png`` / 255 (what the notes looked at)
raw.<metric>         the same on ``image.npy`` clipped to [0, 1] (NaN if it holds NaN)
===================  =========================================================================

Image metrics are cached per job in ``.featsweep_metrics.json``, keyed by each image file's
mtime and size (and the metric names), so collecting a finished sweep again reads no image.
Nothing about one job's files makes :func:`collect` raise: a job is never dropped.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from featsweep.errors import UserError
from featsweep.metrics import METRICS, image_stats_batch

__all__ = [
    "CACHE_FILE",
    "CollectError",
    "RESULT_KEYS",
    "TRACE_COLUMNS",
    "collect",
    "find_jobs",
    "read_trace",
]

CACHE_FILE = ".featsweep_metrics.json"
CACHE_VERSION = 1
IMAGES: dict[str, str] = {"display": "image.png", "raw": "image.npy"}  # column prefix -> file
# result.json fields of docs/CONTRACTS.md (besides status and activation): always columns, so the
# table's schema does not depend on which jobs have finished. Other fields follow, sorted.
RESULT_KEYS: tuple[str, ...] = (
    "activation_start", "steps", "steps_requested", "seconds", "device", "diverged_at", "error",
    "batch_size", "featsweep_version", "torch_version",
)
TRACE_POINTS: tuple[tuple[str, float], ...] = (
    ("trace.act@0", 0.0), ("trace.act@10%", 0.1), ("trace.act@50%", 0.5), ("trace.act@100%", 1.0),
)
TRACE_COLUMNS: tuple[str, ...] = tuple(name for name, _ in TRACE_POINTS)
# A job without result.json whose newest file is younger than this is "running", else
# "incomplete" (killed, or its sweep was interrupted).
STALE_AFTER_S = 900.0
_PENDING_VALUES = 1 << 25  # floats of images loaded before their metrics are computed (128 MB)


class CollectError(UserError):
    """The sweep directory is missing or holds no featsweep job."""


# --------------------------------------------------------------------------------------------
# Finding jobs


def find_jobs(sweep_dir: str | Path) -> list[Path]:
    """Job directories under ``sweep_dir`` (itself included), in sorted walk order.

    A job directory is one holding ``.hydra/config.yaml``; its subdirectories are not searched.
    Hidden directories (``.hydra``, ``.git``, ...) are skipped.

    Raises:
        CollectError: if ``sweep_dir`` does not exist or is not a directory.
    """
    root = Path(sweep_dir)
    if not root.exists():
        raise CollectError(f"featsweep.analysis: sweep directory {str(root)!r} does not exist.")
    if not root.is_dir():
        raise CollectError(
            f"featsweep.analysis: {str(root)!r} is not a directory; give the sweep directory "
            f"(e.g. multirun/DATE/TIME) that holds the job directories."
        )
    return list(_walk(root))


def _walk(directory: Path) -> Iterator[Path]:
    if (directory / ".hydra" / "config.yaml").is_file():
        yield directory
        return
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        yield from _walk(Path(entry.path))


# --------------------------------------------------------------------------------------------
# Reading one job


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML (libyaml when present) with YAML 1.2 floats: ``1e-5`` is a float, as in OmegaConf.

    Copies the resolvers first so that adding one does not change PyYAML's own loaders.
    """

    yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _read_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    elif isinstance(node, (list, tuple, Mapping)):
        out[prefix] = repr(list(node) if isinstance(node, tuple) else node)
    else:
        out[prefix] = node


def _read_config(path: Path) -> dict[str, Any]:
    """Config leaves of ``.hydra/config.yaml``, dotted; interpolations resolved where possible."""
    data = _read_yaml(path)
    if "${" in path.read_text(encoding="utf-8"):
        from omegaconf import OmegaConf

        try:
            data = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
        except Exception:  # an interpolation needing Hydra's runtime: keep the text
            pass
    out: dict[str, Any] = {}
    if isinstance(data, Mapping):
        _flatten(data, "", out)
    return out


def _scalar(value: Any) -> Any:
    """A result.json value as a table cell: scalars as they are, lists and dicts as repr text."""
    if isinstance(value, (list, dict)):
        return repr(value)
    return value


def _num(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def _file_key(path: Path) -> list[int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return [st.st_mtime_ns, st.st_size]


def _newest_mtime(job: Path) -> float:
    newest = 0.0
    for directory in (job, job / ".hydra"):
        try:
            for entry in os.scandir(directory):
                if entry.name.startswith((CACHE_FILE, f".{CACHE_FILE}")):
                    continue  # written by collect itself, not by the job
                try:
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
                except OSError:
                    pass
        except OSError:
            pass
    return newest


def read_trace(job_dir: str | Path) -> pd.DataFrame:
    """``trace.csv`` of a job as a frame with float columns ``step`` and ``activation``.

    Empty frame if the file is missing. Raises ValueError (saying why) if it is unreadable.
    """
    path = Path(job_dir) / "trace.csv"
    if not path.is_file():
        return pd.DataFrame({"step": pd.Series(dtype=float), "activation": pd.Series(dtype=float)})
    try:
        frame = pd.read_csv(path)
    except Exception as exc:  # pandas raises several types for broken CSV
        raise ValueError(f"trace.csv: not readable as CSV ({' '.join(str(exc).split())})") from None
    if list(frame.columns) != ["step", "activation"]:
        raise ValueError(f"trace.csv: header is {','.join(map(str, frame.columns))!r}, "
                         f"expected 'step,activation'")
    out = frame.apply(pd.to_numeric, errors="coerce").astype(float)
    if out["step"].isna().any():
        raise ValueError("trace.csv: a step is not a number")
    return out


def _trace_points(trace: pd.DataFrame) -> dict[str, float]:
    """Activation at step 0 and at 10/50/100 % of the last recorded step."""
    if trace.empty:
        return {name: math.nan for name in TRACE_COLUMNS}
    trace = trace.sort_values("step", kind="stable")
    steps = trace["step"].to_numpy()
    acts = trace["activation"].to_numpy()
    first, last = steps[0], steps[-1]
    out: dict[str, float] = {}
    for name, share in TRACE_POINTS:
        if share == 0.0:
            out[name] = float(acts[0]) if first == 0 else math.nan
            continue
        at = share * last
        i = int(np.searchsorted(steps, at + 1e-9 * max(1.0, abs(at)), side="right")) - 1
        out[name] = float(acts[i]) if i >= 0 else math.nan
    return out


@dataclass
class _Job:
    path: Path
    row: dict[str, Any]
    config: dict[str, Any]
    choices: dict[str, Any]
    result: dict[str, Any]
    errors: list[str] = field(default_factory=list)


def _read_job(path: Path, order: int, now: float, stale_after: float) -> _Job:
    errors: list[str] = []
    hydra: Any = None
    try:
        hydra = _read_yaml(path / ".hydra" / "hydra.yaml")
    except (OSError, yaml.YAMLError):
        pass  # a job without hydra.yaml still counts; its number falls back to the dir name
    hydra_node = hydra.get("hydra", {}) if isinstance(hydra, dict) else {}
    job_node = hydra_node.get("job", {}) if isinstance(hydra_node, dict) else {}
    num: Any = job_node.get("num") if isinstance(job_node, dict) else None
    if not isinstance(num, int) or isinstance(num, bool):
        num = int(path.name) if path.name.isdigit() else order
    runtime = hydra_node.get("runtime", {}) if isinstance(hydra_node, dict) else {}
    raw_choices = runtime.get("choices", {}) if isinstance(runtime, dict) else {}
    choices = {
        f"choice.{group}": value
        for group, value in sorted((raw_choices or {}).items(), key=lambda kv: str(kv[0]))
        if not str(group).startswith("hydra/")
    } if isinstance(raw_choices, dict) else {}

    overrides: list[str] = []
    try:
        loaded = _read_yaml(path / ".hydra" / "overrides.yaml")
        if isinstance(loaded, list):
            overrides = [str(o) for o in loaded]
    except (OSError, yaml.YAMLError):
        pass
    try:
        config = _read_config(path / ".hydra" / "config.yaml")
    except (OSError, yaml.YAMLError) as exc:
        config = {}
        errors.append(f".hydra/config.yaml: not readable ({' '.join(str(exc).split())[:200]})")

    result_path = path / "result.json"
    result: dict[str, Any] = {}
    if result_path.is_file():
        try:
            loaded = json.loads(result_path.read_text(encoding="utf-8"))
            if not isinstance(loaded, dict):
                raise ValueError(f"holds a {type(loaded).__name__}, not an object")
            if "status" not in loaded:
                raise ValueError("has no 'status' field")
            result = loaded
            status = str(loaded["status"])
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            errors.append(f"result.json: not readable ({' '.join(str(exc).split())[:200]})")
            status = "corrupt"
    else:
        status = "running" if now - _newest_mtime(path) < stale_after else "incomplete"

    row: dict[str, Any] = {
        "job.num": num,
        "job.dir": str(path.resolve()),
        "job.overrides": " ".join(overrides),
        "status": status,
        "activation": _num(result.get("activation")),
    }
    try:
        row.update(_trace_points(read_trace(path)))
    except ValueError as exc:
        errors.append(str(exc))
        row.update({name: math.nan for name in TRACE_COLUMNS})
    return _Job(path=path, row=row, config=config, choices=choices, result=result, errors=errors)


# --------------------------------------------------------------------------------------------
# Image metrics, cached per job


def _load_display(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    return arr / np.float32(255.0)


def _load_raw(path: Path) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 3 or arr.shape[-1] != 3 or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"holds an array of shape {arr.shape} and dtype {arr.dtype}, "
                         f"expected H×W×3 float")
    return np.clip(arr.astype(np.float32, copy=False), 0.0, 1.0)


_LOADERS = {"display": _load_display, "raw": _load_raw}


def _read_cache(job: Path) -> dict[str, Any]:
    try:
        data = json.loads((job / CACHE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION \
            or data.get("metrics") != list(METRICS) or not isinstance(data.get("images"), dict):
        return {}
    return data["images"]


def _write_cache(job: Path, images: dict[str, Any]) -> None:
    from featsweep.artifacts import atomic_write

    text = json.dumps({"version": CACHE_VERSION, "metrics": list(METRICS), "images": images},
                      indent=1, allow_nan=False)
    try:
        atomic_write(job / CACHE_FILE, lambda f: f.write(text.encode("utf-8")))
    except OSError:
        pass  # a read-only sweep is still analysed, just without a cache


def _metrics(jobs: list[_Job]) -> list[dict[str, float]]:
    """display.* and raw.* columns of every job (cached; computed in batches of equal size)."""
    values: list[dict[str, float]] = [{} for _ in jobs]
    caches: list[dict[str, Any]] = []
    stored: list[dict[str, Any]] = []
    todo: dict[tuple[str, tuple[int, ...]], list[tuple[int, np.ndarray]]] = {}
    pending = 0

    def flush() -> None:
        # Images wait here until _PENDING_VALUES floats are loaded, so memory stays bounded
        # however large the sweep, while image_stats_batch still sees whole batches.
        nonlocal pending
        for (prefix, _shape), items in todo.items():
            stats = image_stats_batch(np.stack([image for _, image in items]))
            for row, (index, _) in enumerate(items):
                caches[index][prefix]["values"] = {
                    m: (float(stats[m][row]) if np.isfinite(stats[m][row]) else None)
                    for m in METRICS
                }
        todo.clear()
        pending = 0

    for index, job in enumerate(jobs):
        cache = _read_cache(job.path)
        stored.append(cache)
        fresh: dict[str, Any] = {}
        caches.append(fresh)
        for prefix, name in IMAGES.items():
            path = job.path / name
            key = _file_key(path)
            if key is None:
                continue  # no image (yet): NaN metrics, nothing to cache
            entry = cache.get(prefix)
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

    for index, job in enumerate(jobs):
        fresh = caches[index]
        for prefix in IMAGES:
            entry = fresh.get(prefix, {})
            got = entry.get("values") or {}
            for m in METRICS:
                value = got.get(m)
                values[index][f"{prefix}.{m}"] = math.nan if value is None else float(value)
            if entry.get("error"):
                job.errors.append(entry["error"])
        if fresh and fresh != stored[index]:  # unchanged (re-collecting): no write
            _write_cache(job.path, fresh)
    return values


def job_metrics(job_dir: str | Path) -> dict[str, float]:
    """``display.<metric>`` and ``raw.<metric>`` of one job directory: the numbers :func:`collect`
    puts in that job's row (NaN where it would), through the same per-job cache. Used by
    ``featsweep.search`` for ``optimized_metric``; never raises for a broken file (NaN)."""
    job = _Job(path=Path(job_dir), row={}, config={}, choices={}, result={})
    return _metrics([job])[0]


# --------------------------------------------------------------------------------------------
# The table


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


def collect(sweep_dir: str | Path, *, stale_after: float = STALE_AFTER_S) -> pd.DataFrame:
    """One row per job under ``sweep_dir`` (a sweep, a dir of sweeps, or one job dir).

    Args:
        sweep_dir: directory searched recursively (sorted) for job dirs (``.hydra/config.yaml``).
        stale_after: seconds; a job without ``result.json`` whose newest file is younger than
            this is ``running``, older ``incomplete``.

    Returns:
        Columns in this fixed order: ``job.num``, ``job.dir``, ``job.overrides``; config leaves
        (first-seen order); ``choice.<group>`` (sorted); ``status``, ``activation``;
        ``result.<key>`` (:data:`RESULT_KEYS`, then other fields sorted); ``trace.act@0``,
        ``trace.act@10%``, ``trace.act@50%``, ``trace.act@100%``; ``display.<metric>`` and
        ``raw.<metric>`` in :data:`featsweep.metrics.METRICS` order. Rows sorted by ``job.num``
        (then ``job.dir``), index 0..n-1. ``status`` is result.json's (ok, diverged, failed,
        interrupted), or ``running``/``incomplete`` without result.json, or ``corrupt`` when a
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
    jobs = [_read_job(p, i, now, stale_after) for i, p in enumerate(paths)]
    metrics = _metrics(jobs)

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
    for prefix in IMAGES:
        for m in METRICS:
            name = f"{prefix}.{m}"
            columns[name] = pd.Series([v[name] for v in metrics], dtype=float)
    df = pd.DataFrame(columns)
    df = df.sort_values(["job.num", "job.dir"], kind="stable").reset_index(drop=True)
    df.attrs["sweep_dir"] = str(root.resolve())
    return df
