"""What a job returns to Hydra: its ``optimized_metric``, the number a search sweeper optimizes.

``optimized_metric`` (top-level key, default ``activation``; the lightning-hydra-template
convention) names it:

- ``activation``: result.json's final channel mean;
- ``display.<metric>`` / ``raw.<metric>`` (``<metric>`` one of :data:`featsweep.metrics.METRICS`):
  that image metric of the job's final image, exactly the analysis table's column of the same
  name, computed by the analysis' own code (``featsweep.analysis.metric_cache``) from image.png
  / image.npy;
- a list of those names: a multi-objective search; the job returns a list of floats, in order.
  A list of one name returns a plain float, as a single-objective sweeper wants.

Both launchers return :func:`job_value` as the task's return value (``JobReturn.return_value``),
so any Hydra sweeper can use it; with ``hydra/sweeper=optuna`` the batched launcher receives each
round's ``n_jobs`` trials at once and runs them as one batch.

A trial that did not finish ``ok`` (diverged, failed, or interrupted) returns **None**, which
Hydra's Optuna sweeper records as a FAIL trial and then goes on with the search. The alternatives
were tried with hydra-optuna-sweeper 1.3.0 / optuna 2.10.1 and rejected: NaN makes ``study.tell``
raise twice (once as COMPLETE, then again as FAIL with values), which ends the whole sweep; a
±inf penalty breaks the default TPE sampler in multi-objective mode ("probabilities contain
NaN"); a finite penalty has no scale that suits every metric. Optuna's samplers leave FAIL trials
out of their model, which is what a diverged image deserves. Under a search sweeper (one with a
``direction``, :func:`in_search`) a job that raised therefore also returns :func:`job_value` of
its failed result (None) rather than raising, so one bad trial never kills the search; a grid
sweep (Hydra's basic sweeper) still sees the job fail.

Everything here that checks a config imports no torch: a mistyped name is reported before any
model is loaded (:func:`check`).
"""

from __future__ import annotations

import difflib
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from featsweep.errors import config_error
from featsweep.metrics import METRICS

log = logging.getLogger(__name__)

KEY = "optimized_metric"
DEFAULT = "activation"
# Column prefixes of the analysis table's image metrics (featsweep.analysis.collect.IMAGES).
IMAGE_PREFIXES: tuple[str, ...] = ("display", "raw")
OBJECTIVES: tuple[str, ...] = (DEFAULT,) + tuple(
    f"{prefix}.{metric}" for prefix in IMAGE_PREFIXES for metric in METRICS)
DIRECTIONS: tuple[str, ...] = ("maximize", "minimize")

Value = float | list[float] | None


def _allowed() -> str:
    return (f"allowed: {DEFAULT}, or display.<metric> / raw.<metric> with <metric> one of "
            f"{', '.join(METRICS)} (the analysis table's columns), or a list of them for a "
            f"multi-objective search, e.g. {KEY}=[activation,display.hf_energy]")


def objective_names(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The validated names of ``cfg.optimized_metric`` (one name, or several for a list).

    Raises:
        ConfigError: not a name or a non-empty list of names, an unknown name (with the closest
            known one), or a name given twice.
    """
    value = cfg.get(KEY, DEFAULT) if hasattr(cfg, "get") else DEFAULT
    if value is None:
        value = DEFAULT
    if isinstance(value, str):
        names: list[Any] = [value]
    elif isinstance(value, Sequence) or _is_list_config(value):
        names = list(value)
        if not names:
            raise config_error(KEY, [], "an empty list names nothing to optimize; " + _allowed())
    else:
        raise config_error(KEY, value, _allowed())
    shown = value if isinstance(value, str) else names
    for name in names:
        if not isinstance(name, str):
            raise config_error(KEY, shown, f"{name!r} is not a metric name; " + _allowed())
        if name not in OBJECTIVES:
            close = difflib.get_close_matches(name, OBJECTIVES, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise config_error(KEY, shown, f"unknown metric {name!r}; {hint}" + _allowed())
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise config_error(KEY, shown, f"{', '.join(twice)} is named more than once: each "
                                       "objective once")
    return tuple(names)


def _is_list_config(value: Any) -> bool:
    from omegaconf import ListConfig

    return isinstance(value, ListConfig)


def sweeper_directions(cfg: Mapping[str, Any] | None = None) -> list[str] | None:
    """``hydra.sweeper.direction`` as a list of ``maximize``/``minimize``, or None when the
    sweeper has no direction (Hydra's basic sweeper: a grid, not a search).

    Read from ``cfg.hydra`` when the config still holds it (the launcher's job configs), else from
    the running Hydra job (a task's config has no ``hydra`` node)."""
    from omegaconf import OmegaConf

    hydra_node: Any = None
    if cfg is not None and OmegaConf.is_config(cfg) and "hydra" in cfg:
        hydra_node = cfg["hydra"]
    else:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            hydra_node = HydraConfig.get()
    if hydra_node is None:
        return None
    direction = OmegaConf.select(hydra_node, "sweeper.direction", default=None)
    if direction is None:
        return None
    if isinstance(direction, str) or not (isinstance(direction, Sequence)
                                          or _is_list_config(direction)):
        direction = [direction]
    # Optuna's config holds Direction enum members (their .name) or plain strings.
    return [str(getattr(d, "name", d)) for d in direction]


def in_search(cfg: Mapping[str, Any] | None = None) -> bool:
    """Whether a search sweeper (one with a ``direction``, such as Optuna) runs this job."""
    return sweeper_directions(cfg) is not None


def check(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """Everything about ``optimized_metric`` that can be wrong, before any work: the names
    (:func:`objective_names`) and, under a search sweeper, one direction per name.

    Returns the names. Raises ConfigError naming the key, the value and what is allowed.
    """
    names = objective_names(cfg)
    directions = sweeper_directions(cfg)
    if directions is not None:
        for d in directions:
            if d not in DIRECTIONS:
                raise config_error("hydra.sweeper.direction", d,
                                   f"each direction is {' or '.join(DIRECTIONS)}")
        if len(directions) != len(names):
            example = ",".join(["maximize"] + ["minimize"] * (len(names) - 1))
            fix = (f"hydra.sweeper.direction=[{example}]" if len(names) > 1
                   else "hydra.sweeper.direction=maximize")
            raise config_error(
                "hydra.sweeper.direction", directions if len(directions) > 1 else directions[0],
                f"{KEY} names {len(names)} metric(s) ({', '.join(names)}) but the sweeper has "
                f"{len(directions)} direction(s): give one per metric, e.g. {fix}")
    return names


def reads_job_files(cfg: Mapping[str, Any]) -> bool:
    """Whether :func:`job_value` reads the job's image files (an image metric among the
    ``optimized_metric`` names): they must be written before it is asked."""
    return any(name != DEFAULT for name in objective_names(cfg))


def job_value(cfg: Mapping[str, Any], result: Mapping[str, Any] | None,
              job_dir: str | Path | None = None) -> Value:
    """The task's return value: the job's ``optimized_metric`` value(s).

    Args:
        cfg: the job's config (``optimized_metric`` is read from it).
        result: the job's result.json content (as written, or read back on resume).
        job_dir: the job directory holding image.png / image.npy; needed only for image metrics.

    Returns:
        A float for one name, a list of floats (in ``optimized_metric`` order) for several;
        None when the job did not finish ``ok`` or a value is not finite (see the module
        docstring: Optuna records that as a FAIL trial and goes on).
    """
    names = objective_names(cfg)
    if result is None or result.get("status") != "ok":
        return None
    values: dict[str, float] = {}
    if DEFAULT in names:
        activation = result.get("activation")
        values[DEFAULT] = math.nan if activation is None else float(activation)
    if reads_job_files(cfg):
        if job_dir is None:
            raise ValueError(f"{KEY}={list(names)} needs the job directory for image metrics")
        from featsweep.analysis.jobs import Job
        from featsweep.analysis.metric_cache import image_metrics

        # The analysis table's own computation for one job (no cache: the analysis keeps its
        # cache under SWEEP/analysis/, and a job's images are read once here).
        job = Job(path=Path(job_dir), row={}, config={}, choices={}, result={})
        values.update(image_metrics([job], None)[0])
    out = [values[name] for name in names]
    if not all(math.isfinite(v) for v in out):
        log.warning("%s: %s is not finite (%s); returning None (a failed trial)", KEY,
                    ", ".join(n for n, v in zip(names, out) if not math.isfinite(v)), out)
        return None
    return out[0] if len(out) == 1 else out



_PARAMS_PREFIX = "hydra.sweeper.params."


def params_as_overrides(argv: list[str]) -> list[str]:
    """Command-line ``hydra.sweeper.params.KEY=VALUE`` -> ``KEY=VALUE``.

    Hydra 1.3 refuses a sweep value on any ``hydra.*`` key ("Sweeping over Hydra's configuration
    is not supported"), and a dotted KEY would be read as a nested path, so the spelling
    ``'hydra.sweeper.params.optimizer.lr=interval(0.001,0.1)'`` cannot reach the sweeper. Both of
    Hydra's sweepers (basic and Optuna) build their search space from ``hydra.sweeper.params``
    followed by the command-line sweep overrides, the later winning, so passing it on as the
    override ``optimizer.lr=interval(0.001,0.1)`` means the same. Everything else is unchanged.
    """
    out = []
    for arg in argv:
        if arg.startswith(_PARAMS_PREFIX) and "=" in arg[len(_PARAMS_PREFIX):]:
            key, value = arg[len(_PARAMS_PREFIX):].split("=", 1)
            if key:
                arg = f"{key}={value}"
        out.append(arg)
    return out
