"""One job directory -> one record: config leaves, Hydra's choices, result.json, trace summary.

:func:`find_jobs` walks a directory in sorted order (like tbparse's ``SummaryReader``) and takes
every directory that holds ``.hydra/config.yaml`` as a job; :func:`read_job` reads what the job
wrote without ever raising on its files (a broken file becomes status ``corrupt`` and an error
text). Image metrics are not read here (:mod:`.metric_cache`).

Status: result.json's (ok, diverged, failed, interrupted, not_started — a run rejected at
validation); without result.json ``running`` while the job's newest file is younger than
``stale_after`` seconds, else ``incomplete`` (killed, or its sweep interrupted).

Convergence (:func:`trace_summary`): ``trace.gain_last10%`` is the activation gained over the
last 10 % of the recorded steps relative to the final activation,
(a(L) − a(0.9·L)) / max(|a(L)|, 1e-12), with a(s) the last recorded activation at or before step
s; ``trace.converged`` is gain < 1 %.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from featsweep.errors import UserError

__all__ = [
    "CONVERGED_GAIN", "CONVERGENCE_COLUMNS", "CollectError", "Job", "STALE_AFTER_S", "TRACE_COLUMNS",
    "find_jobs", "read_job", "read_trace", "trace_summary",
]

TRACE_POINTS: tuple[tuple[str, float], ...] = (
    ("trace.act@0", 0.0), ("trace.act@10%", 0.1), ("trace.act@50%", 0.5), ("trace.act@100%", 1.0),
)
TRACE_COLUMNS: tuple[str, ...] = tuple(name for name, _ in TRACE_POINTS)
CONVERGENCE_COLUMNS: tuple[str, ...] = ("trace.gain_last10%", "trace.converged")
CONVERGED_GAIN = 0.01  # relative gain over the last 10 % of steps below which a run has converged
STALE_AFTER_S = 900.0
# Files collect itself once wrote into job directories (older featsweep): not the job's own.
_LEGACY_CACHE = ".featsweep_metrics.json"


class CollectError(UserError):
    """The sweep directory is missing or holds no featsweep job."""


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


def _newest_mtime(job: Path) -> float:
    newest = 0.0
    for directory in (job, job / ".hydra"):
        try:
            for entry in os.scandir(directory):
                if entry.name.startswith((_LEGACY_CACHE, f".{_LEGACY_CACHE}")):
                    continue  # written by an older collect, not by the job
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


def trace_summary(trace: pd.DataFrame) -> dict[str, Any]:
    """Activation at step 0 and at 10/50/100 % of the last recorded step, and convergence.

    Returns :data:`TRACE_COLUMNS` (floats, NaN without a trace) and :data:`CONVERGENCE_COLUMNS`
    (``trace.gain_last10%`` float, ``trace.converged`` bool, None without two recorded steps).
    """
    out: dict[str, Any] = {name: math.nan for name in TRACE_COLUMNS}
    out.update({"trace.gain_last10%": math.nan, "trace.converged": None})
    if trace.empty:
        return out
    trace = trace.sort_values("step", kind="stable")
    steps = trace["step"].to_numpy()
    acts = trace["activation"].to_numpy()
    first, last = steps[0], steps[-1]

    def at(share: float) -> float:
        point = share * last
        i = int(np.searchsorted(steps, point + 1e-9 * max(1.0, abs(point)), side="right")) - 1
        return float(acts[i]) if i >= 0 else math.nan

    for name, share in TRACE_POINTS:
        out[name] = (float(acts[0]) if first == 0 else math.nan) if share == 0.0 else at(share)
    if len(steps) >= 2 and last > first:
        end, before = float(acts[-1]), at(0.9)
        if math.isnan(before):
            before = float(acts[0])
        if math.isfinite(end) and math.isfinite(before):
            gain = (end - before) / max(abs(end), 1e-12)
            out["trace.gain_last10%"] = gain
            out["trace.converged"] = bool(gain < CONVERGED_GAIN)
    return out


@dataclass
class Job:
    """What :func:`read_job` found: the table row's own cells (``job.*``, ``status``,
    ``activation``, ``trace.*``), config leaves, group choices, result.json, and problems."""

    path: Path
    row: dict[str, Any]
    config: dict[str, Any]
    choices: dict[str, Any]
    result: dict[str, Any]
    errors: list[str] = field(default_factory=list)


def read_job(path: Path, order: int, now: float, stale_after: float = STALE_AFTER_S) -> Job:
    """Read one job directory (never raises on its files; problems go to ``Job.errors``).

    Args:
        path: the job directory. order: its position in the walk (the job number when neither
            hydra.yaml nor the directory name gives one). now: the current time (s since the
            epoch). stale_after: see the module docstring.
    """
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
        row.update(trace_summary(read_trace(path)))
    except ValueError as exc:
        errors.append(str(exc))
        row.update(trace_summary(pd.DataFrame({"step": [], "activation": []})))
    return Job(path=path, row=row, config=config, choices=choices, result=result, errors=errors)


