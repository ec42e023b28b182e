"""The batched launcher's ``launch``: plan the sweep, run its batches (here or on submitit),
give Hydra one JobReturn per job, in input order.

Keeps the basic launcher's contract job by job: each job's config is composed as Hydra composes
it and gets ``hydra.job.id/num``; each job gets its own directory, ``.hydra/`` files, log file and
JobReturn status. Only the engine work moves: jobs that share a batch key are optimized together
first, then each job's Hydra run writes its precomputed outcome; each batch's jobs are written as
soon as the batch finishes, so a later failure loses nothing. Task functions other than
featsweep's run one job at a time through Hydra's ``run_job``.

The rooms: :mod:`._plan` (compose, check, resume, batches), :mod:`._run_local` (one batch start to
finish; ``backend=local``), :mod:`._run_submitit` (``backend=submitit_*``: one submitit task per
batch), :mod:`._job_run` (a job's Hydra bookkeeping), :mod:`.sweep_loader` (composition).
Resume (``resume=true``): a job whose directory already holds an ``ok`` result.json with the
same config fingerprint is not run and not touched (its JobReturn is built without writing).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals

from hydra_plugins.featsweep_batched_launcher._plan import (
    MAX_LISTED,
    Job,
    compose,
    describe,
    prepare,
    print_plan,
)
from hydra_plugins.featsweep_batched_launcher._run_local import kept_return, run_here, run_hydra_job

if TYPE_CHECKING:
    from hydra_plugins.featsweep_batched_launcher.batched_launcher import BatchedLauncher

log = logging.getLogger(__name__)


def launch(launcher: "BatchedLauncher", job_overrides: Sequence[Sequence[str]],
           initial_job_idx: int) -> list[JobReturn]:
    """The jobs' JobReturns, in input order (module docstring). The jobs' configs and what
    planning makes are kept out of the cycle collector's full passes (``gc.freeze`` once each is
    made; see :mod:`.sweep_loader`) until the launch ends: they live until then anyway, and
    walking them again pass after pass cost ~3 ms per job at 1,000 jobs."""
    try:
        return _launch(launcher, job_overrides, initial_job_idx)
    finally:
        gc.unfreeze()


def _launch(launcher: "BatchedLauncher", job_overrides: Sequence[Sequence[str]],
            initial_job_idx: int) -> list[JobReturn]:
    setup_globals()
    assert launcher.config is not None and launcher.task_function is not None
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    Path(str(launcher.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)

    jobs = []
    for i, overrides in enumerate(job_overrides):
        idx = initial_job_idx + i
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
        jobs.append(Job(idx, list(overrides), compose(launcher, overrides, idx)))
    forget = getattr(launcher.hydra_context.config_loader, "forget", None)
    if forget is not None:  # sweep_loader: configs the sweeper's check composed and no job took
        forget()
    gc.freeze()  # the jobs' configs

    if not getattr(launcher.task_function, "featsweep_batchable", False):
        if launcher.dry_run:
            for job in jobs:
                print(f"  #{job.idx}: {' '.join(filter_overrides(job.overrides))}", flush=True)
            return []
        if launcher.backend != "local":
            from featsweep.errors import config_error

            raise config_error("hydra.launcher.backend", launcher.backend,
                               "batches on submitit run featsweep's own task only; for another "
                               "app use hydra/launcher=submitit_local or submitit_slurm")
        log.info(f"Launching {len(jobs)} jobs one at a time (not a featsweep task)")
        return [run_hydra_job(launcher, job, launcher.task_function) for job in jobs]
    return launch_batched(launcher, jobs)


def launch_batched(launcher: "BatchedLauncher", jobs: list[Job]) -> list[JobReturn]:
    batches = prepare(launcher, jobs)
    gc.freeze()  # the jobs' specs, the model's modules
    todo = sum(1 for b in batches for j in b if j.role != "companion")
    if launcher.dry_run:
        print_plan(launcher, jobs, batches)
        return []
    if todo or not jobs:
        where = "" if launcher.backend == "local" else f", each as one {launcher.backend} task"
        log.info(f"Batched {todo} jobs into {len(batches)} batch(es) of at most "
                 f"{launcher.max_batch}{where}: " + "; ".join(describe(b) for b in batches))
    if launcher.backend == "local":
        returns = run_here(launcher, batches)
    else:
        from hydra_plugins.featsweep_batched_launcher._run_submitit import submit

        returns = submit(launcher, batches)
    for job in jobs:
        if job.idx not in returns:  # kept by resume: not run, not touched
            returns[job.idx] = kept_return(job)
    report_failures(jobs, returns)
    return [returns[job.idx] for job in jobs]


class QuietReturn(JobReturn):
    """A failed job's JobReturn whose error is raised without Hydra's "Error executing job with
    overrides" line: the error itself (one paragraph for the whole sweep) says it all."""

    @property  # type: ignore[override]
    def return_value(self) -> Any:
        if self.status == JobStatus.COMPLETED:
            return self._return_value
        raise self._return_value

    @return_value.setter
    def return_value(self, value: Any) -> None:
        self._return_value = value


def report_failures(jobs: Sequence[Job], returns: dict[int, JobReturn]) -> None:
    """Replace the failed jobs' errors with one UserError for the sweep: each distinct error once,
    with the jobs it hit (their result.json hold it too). The other jobs' results are written."""
    from featsweep.errors import UserError

    failed = [(job, returns[job.idx]) for job in jobs if returns[job.idx].status == JobStatus.FAILED]
    if not failed:
        return
    by_error: dict[str, list[int]] = {}
    for job, ret in failed:
        err = ret._return_value
        text = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
        by_error.setdefault(" ".join(text.split())[:1000], []).append(job.idx)
    parts = [f"{'job' if len(ids) == 1 else f'{len(ids)} jobs'} "
             f"{' '.join(f'#{i}' for i in ids[:MAX_LISTED])}"
             f"{' ...' if len(ids) > MAX_LISTED else ''}: {text.removeprefix('featsweep: ')}"
             for text, ids in by_error.items()]
    error = UserError(f"featsweep: {len(failed)} of {len(jobs)} job(s) failed (the other jobs' "
                      "results are written; each failed job's result.json holds its error): "
                      + "; ".join(parts))
    for job, ret in failed:
        quiet = QuietReturn(**{f.name: getattr(ret, f.name) for f in dataclasses.fields(ret)})
        quiet.return_value = error
        returns[job.idx] = quiet
