"""The Hydra task: one job's config -> RunSpec -> engine -> job directory.

Kept thin: validation lives in ``featsweep.spec``, the loop in ``featsweep.engine``, files in
``featsweep.artifacts``. The batched launcher recognises :func:`task` and runs many jobs' engine
work as one batch, then calls :func:`write_outcome` inside each job's normal Hydra run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from featsweep.artifacts import write_job
from featsweep.engine import JobOutcome, run_batch
from featsweep.spec import RunSpec, from_config

log = logging.getLogger("featsweep")


def job_dir() -> Path:
    """The running Hydra job's output directory."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def write_outcome(outcome: JobOutcome) -> dict[str, Any]:
    """Write `outcome` into the current Hydra job directory; return result.json's content."""
    result = write_job(job_dir(), outcome)
    act = result["activation"]
    log.info("%s: activation %s -> %s after %d steps; files in %s", result["status"],
             _fmt(result["activation_start"]), _fmt(act), result["steps"], job_dir())
    return result


def task(cfg: DictConfig) -> dict[str, Any]:
    """Run one job: validate, optimize one image, write its files."""
    spec: RunSpec = from_config(cfg)
    (outcome,) = run_batch([spec])
    return write_outcome(outcome)


# The batched launcher runs the engine for jobs of this task itself (see hydra_plugins).
task.featsweep_batchable = True  # type: ignore[attr-defined]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"
