"""Grouping, batching and per-job writing for the batched launcher.

Keeps the basic launcher's contract job by job: each job's config is composed with
``load_sweep_config`` and gets ``hydra.job.id/num``; each job then goes through Hydra's
``run_job`` (its own directory, ``.hydra/`` files, log file, callbacks, JobReturn status); the
returns come back in input order. Only the engine work moves: jobs that share a batch key are
optimized together first, and their ``run_job`` task just writes the precomputed outcome.
Each batch's jobs are written as soon as the batch finishes, so a later failure loses nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, open_dict

if TYPE_CHECKING:
    from featsweep.engine import JobOutcome
    from featsweep.spec import RunSpec
    from hydra_plugins.featsweep_batched_launcher.batched_launcher import BatchedLauncher

log = logging.getLogger(__name__)


@dataclass
class _Job:
    idx: int  # hydra.job.num
    overrides: list[str]
    config: DictConfig
    spec: "RunSpec | None" = None
    outcome: "JobOutcome | None" = None
    error: BaseException | None = None


def _compose(launcher: "BatchedLauncher", overrides: Sequence[str], idx: int) -> DictConfig:
    assert launcher.hydra_context is not None and launcher.config is not None
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = idx
        cfg.hydra.job.num = idx
    return cfg


def _run(launcher: "BatchedLauncher", job: _Job, task: Callable[[DictConfig], Any]) -> JobReturn:
    assert launcher.hydra_context is not None and launcher.config is not None
    ret = run_job(hydra_context=launcher.hydra_context, task_function=task, config=job.config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    return ret


def launch(launcher: "BatchedLauncher", job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> list[JobReturn]:
    setup_globals()
    assert launcher.config is not None and launcher.task_function is not None
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

    jobs = []
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        jobs.append(_Job(idx, list(overrides), _compose(launcher, overrides, idx)))

    if not getattr(launcher.task_function, "featsweep_batchable", False):
        log.info(f"Launching {len(jobs)} jobs one at a time (not a featsweep task)")
        return [_run(launcher, job, launcher.task_function) for job in jobs]
    return _launch_batched(launcher, jobs)


def _launch_batched(launcher: "BatchedLauncher", jobs: list[_Job]) -> list[JobReturn]:
    from featsweep.engine import validate
    from featsweep.errors import UserError
    from featsweep.spec import from_config

    # Every user error of every job, before any optimization starts.
    problems = []
    for job in jobs:
        try:
            job.spec = from_config(job.config)
        except UserError as exc:
            problems.append(f"job #{job.idx} ({' '.join(filter_overrides(job.overrides))}): {exc}")
    if not problems:
        for group in _groups(jobs, launcher.max_batch):
            try:
                validate([j.spec for j in group])
            except UserError as exc:
                problems.append(str(exc))
    if problems:
        raise UserError("featsweep: the sweep was not started:\n  " + "\n  ".join(problems))

    batches = _groups(jobs, launcher.max_batch)
    log.info(f"Batched {len(jobs)} jobs into {len(batches)} batch(es) of at most "
             f"{launcher.max_batch}: " + "; ".join(
                 f"#{b[0].idx}-#{b[-1].idx} ({len(b)} images)" if len(b) > 1 else f"#{b[0].idx}"
                 for b in batches))
    returns: dict[int, JobReturn] = {}
    for n, batch in enumerate(batches, 1):
        log.info(f"Batch {n}/{len(batches)}: {len(batch)} job(s) as one batch")
        _optimize(batch)
        for job in batch:
            returns[job.idx] = _run(launcher, job, _writer(job))
    return [returns[job.idx] for job in jobs]


def _groups(jobs: Sequence[_Job], max_batch: int) -> list[list[_Job]]:
    """Jobs with equal batch keys, in first-seen order, cut into chunks of at most max_batch."""
    by_key: dict[tuple, list[_Job]] = {}
    for job in jobs:
        assert job.spec is not None
        by_key.setdefault(job.spec.batch_key(), []).append(job)
    return [group[i:i + max_batch] for group in by_key.values()
            for i in range(0, len(group), max(1, max_batch))]


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _optimize(batch: list[_Job]) -> None:
    """Fill each job's outcome (or error). A batch that fails is split and retried, so one bad
    job (or an out-of-memory batch) costs only itself."""
    from featsweep.engine import run_batch

    try:
        outcomes = run_batch([j.spec for j in batch])
    except Exception as exc:  # isolate: retry smaller, never lose the group
        if len(batch) == 1:
            batch[0].error = exc
            log.error(f"job #{batch[0].idx} failed: {exc!r}")
            return
        if _is_oom(exc):
            import torch

            torch.cuda.empty_cache()
        half = len(batch) // 2
        log.warning(f"batch of {len(batch)} failed ({type(exc).__name__}: {exc}); "
                    f"retrying as {half} + {len(batch) - half}")
        _optimize(batch[:half])
        _optimize(batch[half:])
        return
    for job, outcome in zip(batch, outcomes):
        job.outcome = outcome


def _writer(job: _Job) -> Callable[[DictConfig], Any]:
    """The task run_job executes for `job`: write its precomputed outcome (or record its error)."""
    from featsweep.app import job_dir, write_outcome
    from featsweep.artifacts import write_failure

    def write(cfg: DictConfig) -> Any:
        if job.error is not None:
            write_failure(job_dir(), f"{type(job.error).__name__}: {job.error}")
            raise job.error
        assert job.outcome is not None
        return write_outcome(job.outcome)

    return write
