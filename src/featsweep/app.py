"""The Hydra task: one job's config -> RunSpec -> engine -> job directory.

Kept thin: validation lives in ``featsweep.spec``, the loop in ``featsweep.engine``, files in
``featsweep.artifacts``, and what this task shares with the batched launcher (interrupt guard,
config fingerprint, writing outcomes, resume decisions) in ``featsweep.jobs``. The batched
launcher recognises :func:`task` and runs many jobs' engine work as one batch, then writes each
job's outcome inside its normal Hydra run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from featsweep.errors import UserError
# Re-exported: older code and tests import these from featsweep.app.
from featsweep.jobs import (  # noqa: F401
    InterruptGuard,
    Interrupted,
    any_version,
    config_hash,
    job_dir,
    judge,
    resume_message,
    resume_requested,
    stop_sweep,
    write_error,
    write_not_started,
    write_outcome,
)
from featsweep.spec import RunSpec, from_config

log = logging.getLogger("featsweep")

# hydra.launcher._target_ of Hydra's basic launcher (jobs one after another in this process).
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def task(cfg: DictConfig) -> Any:
    """Run one job: validate, (with resume=true: skip it if done, continue it from its saved
    state if interrupted), check its memory, optimize one image, write files.

    A config refused before the run (a bad value, a layer that does not exist, an image that
    cannot fit in memory) leaves result.json with status "not_started" and the error, then
    raises it. SIGINT/SIGTERM while it runs: the image is written as ``interrupted`` with its
    state; under Hydra's basic launcher the whole sweep then stops (SystemExit with the resume
    line: no later job starts), under other launchers (one job per submitit task) this job ends
    with :class:`Interrupted`; inside a submitit task, submitit's pre-timeout signal (USR2) does
    the same and then requeues the task, which continues from the saved state.

    Returns the job's ``optimized_metric`` value(s) for Hydra's sweepers (``featsweep.search``).
    """
    from featsweep import search

    where = job_dir()
    try:
        spec: RunSpec = from_config(cfg)
        search.check(cfg)  # optimized_metric: the value returned to the sweeper
        resume = resume_requested(cfg)
        keep_any = any_version(cfg)
    except UserError as exc:
        write_not_started(exc, where)
        raise
    digest = config_hash(cfg)
    submitit_task = _submitit_handler()
    verdict = judge(where, digest, keep_any) if resume or submitit_task is not None else None
    if verdict is not None and verdict.kind == "done":
        log.info("resume: %s already finished ok for this config; skipped", where)
        return search.job_value(cfg, verdict.result, where)
    from featsweep.artifacts import clear_job, read_state
    from featsweep.engine import run_batch, validate
    from featsweep.memory import check_batch

    state = read_state(where) if verdict is not None and verdict.kind == "resumable" else None
    if state is not None:
        log.info("resume: %s continues from its saved state (%s)", where, verdict.reason)
    try:
        check_batch([spec])  # first: it allocates nothing in proportion to image.size or steps
        validate([spec])
    except UserError as exc:  # a config mistake found with the model: nothing ran
        write_not_started(exc, where)
        raise
    clear_job(where)  # a rerun (resume of a changed or unfinished job) starts clean
    sweep_dir = _sweep_dir()
    extra = (submitit_task[1],) if submitit_task is not None else ()
    with InterruptGuard(sweep_dir, extra=extra) as guard:
        try:
            kwargs: dict[str, Any] = {"states": [state]} if state is not None else {}
            (outcome,) = run_batch([spec], should_stop=guard.requested, **kwargs)
        except UserError as exc:  # a config mistake found by the engine: nothing ran
            write_not_started(exc, where)
            raise
        except Exception as exc:  # a job that raises leaves a failed result.json, then fails
            log.error("job failed: %r", exc)
            failed = write_error(exc, cfg, spec, digest, where=where)
            if search.in_search():  # a search goes on: the trial returns None (Optuna: FAIL)
                return search.job_value(cfg, failed)
            raise
    result = write_outcome(outcome, cfg, spec, digest, batch=[_job_num()], where=where,
                           members=[digest[:12]])
    if guard.signame is not None:
        if submitit_task is not None and guard.signame == submitit_task[1].name:
            from featsweep.jobs import requeue

            requeue(submitit_task[0], submitit_task[1])  # exits the process when requeued
        message = resume_message(guard.signame, sweep_dir,
                                 f"This job stopped after {outcome.steps_done} of {spec.steps} "
                                 "steps.")
        if _launcher_target() == BASIC_LAUNCHER:
            stop_sweep(message, guard.signame)  # here: run_job would go on to the next job
        raise Interrupted(message)
    return search.job_value(cfg, result, where)


# The batched launcher runs the engine for jobs of this task itself (see hydra_plugins).
task.featsweep_batchable = True  # type: ignore[attr-defined]


def _hydra_cfg() -> DictConfig | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _sweep_dir() -> str | None:
    from hydra.types import RunMode

    hc = _hydra_cfg()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    return str(Path(str(hc.sweep.dir)).resolve())


def _launcher_target() -> str | None:
    hc = _hydra_cfg()
    return None if hc is None else OmegaConf.select(hc, "launcher._target_")


def _submitit_handler() -> tuple[Any, Any] | None:
    """Inside a submitit task (Hydra's submitit launcher): (submitit's signal handler, its
    pre-timeout signal), created now so that submitit measures the run time from here."""
    if "SUBMITIT_FOLDER" not in os.environ:
        return None
    from featsweep.jobs import submitit_handler

    return submitit_handler()


def _job_num() -> int:
    hc = _hydra_cfg()
    num = OmegaConf.select(hc, "job.num", default=0) if hc is not None else 0
    return int(num) if isinstance(num, int) else 0
