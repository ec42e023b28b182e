"""Running batches: one batch start to finish (here or inside a submitit task), and the local
backend's loop over the batches.

A batch reads the saved states of its interrupted jobs, clears its jobs' old files, runs the
engine once for all its jobs (:func:`optimize`: a job that raises, diverges or runs out of
memory costs only itself), then writes each job inside a Hydra job run whose task is the job's
:func:`writer`. For featsweep's writer that run is :func:`job_run.run_job` (Hydra's bookkeeping
without its per-job deep copies); with ``hydra.launcher.run_job=hydra``, a callback that acts per
job, or a ``${hydra:...}`` resolver in the config, it is Hydra's own ``run_job``.

Through featsweep's run_job, a job's five files are written by one background thread while the
next job's Hydra bookkeeping goes on (their five fsyncs are ~2-4 ms of waiting per job); jobs'
files land in job order, and the batch returns only once all of them are written: a job whose
files could not be written is failed with that error, as if its task had raised it. Under Hydra's
own run_job (a callback may read the files when the job ends), and when the job's returned value
is an image metric (``optimized_metric``), they are written in the job's run.

SIGINT/SIGTERM (:func:`run_here`): the running batch ends at once and its jobs are written as
``interrupted`` with their state; batches not started get nothing written; the sweep then ends
with one line saying how to resume (:func:`raise_if_interrupted`).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job
from omegaconf import DictConfig

from hydra_plugins.featsweep_batched_launcher import _job_run as job_run  # noqa: I001
from hydra_plugins.featsweep_batched_launcher._plan import (
    Job,
    job_dir,
    near_equal_chunks,
    short,
    sweep_dir,
    units_of,
)

if TYPE_CHECKING:
    from hydra_plugins.featsweep_batched_launcher.batched_launcher import BatchedLauncher

log = logging.getLogger(__name__)


def run_hydra_job(launcher: "BatchedLauncher", job: Job, task: Callable[[DictConfig], Any]
                  ) -> JobReturn:
    """`job` through Hydra's own ``run_job`` with `task` (as the basic launcher runs a job)."""
    assert launcher.hydra_context is not None and launcher.config is not None
    ret = run_job(hydra_context=launcher.hydra_context, task_function=task, config=job.config,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    return ret


def write_job(launcher: "BatchedLauncher", job: Job, files: ThreadPoolExecutor
              ) -> tuple[JobReturn, "Future[None] | None"]:
    """Write `job`'s outcome (or error) inside its Hydra job run (module docstring); return its
    JobReturn and, when the job's files went to the `files` writer, the future of their write.
    Through featsweep's run_job the job's logging stays configured afterwards (the next job of
    the batch reuses it: ``job_run.JobLogging``); :func:`run_batch` gives Hydra's logging back
    once its jobs are written."""
    assert launcher.config is not None
    ret = None
    written: list[Future[None]] = []
    if launcher.run_job == "featsweep" and not job_run.per_job_callbacks(launcher.hydra_context):
        def submit(write: Callable[[], None]) -> None:
            written.append(files.submit(write))

        ret = job_run.run_job(job.config, job_dir(job), writer(job, submit), launcher.yaml_files,
                              launcher.job_logging)
        if ret is not None:
            return ret, written[0] if written else None
    # Hydra's run_job was asked for, or the job needs Hydra's config singleton
    return run_hydra_job(launcher, job, writer(job)), None


def kept_return(job: Job) -> JobReturn:
    """The JobReturn run_job would give for a job resume kept, built without writing (and
    without Hydra's config singleton)."""
    out = job_dir(job)
    job_run.set_output_dir(job.config, out)
    return job_run.job_return(job.config, out, JobStatus.COMPLETED,
                              task_return(job.config, job.done, out))


def task_return(cfg: DictConfig, result: dict | None, where: Path) -> Any:
    """What the task returns for a job's result: its ``optimized_metric`` value(s), the value a
    Hydra sweeper optimizes (``featsweep.search.job_value``)."""
    from featsweep import search

    return search.job_value(cfg, result, where)


def run_here(launcher: "BatchedLauncher", batches: list[list[Job]]) -> dict[int, JobReturn]:
    """backend=local: the batches one after another in this process, each job written as soon
    as its batch ends. SIGINT/SIGTERM: see the module docstring."""
    from featsweep.jobs import InterruptGuard

    returns: dict[int, JobReturn] = {}
    statuses: dict[int, str] = {}
    not_started = 0
    with InterruptGuard(sweep_dir(launcher)) as guard:
        for n, batch in enumerate(batches, 1):
            if guard.requested():
                not_started += sum(j.role != "companion" for j in batch)
                continue
            log.info(f"Batch {n}/{len(batches)}: {len(batch)} job(s) as one batch")
            for job, ret in zip(batch, run_batch(launcher, batch, guard.requested)):
                if job.role != "companion":
                    returns[job.idx] = ret
                    statuses[job.idx] = job.status or "failed"
    raise_if_interrupted(launcher, guard.signame, statuses, not_started)
    return returns


def run_batch(launcher: "BatchedLauncher", jobs: list[Job],
               should_stop: Callable[[], bool]) -> list[JobReturn]:
    """One batch, start to finish, wherever it runs (here or inside a submitit task): read the
    saved states of interrupted jobs, clear the jobs' previous files, optimize the jobs that
    have no error as one engine batch, then run_job each job with its writer (companions are
    not written). Returns the JobReturns in the jobs' order."""
    from featsweep.artifacts import clear_job, read_state

    ready = [job for job in jobs if job.error is None]
    for job in ready:
        if job.role == "state":
            job.state = read_state(job_dir(job))
            if job.state is None:  # unreadable: start again from step 0
                job.role = "run"
    for job in ready:  # a rerun never leaves an old result.json beside new work
        if job.role != "companion":
            clear_job(job_dir(job))
    if ready:
        optimize(ready, should_stop)
    returns = []
    written: list[tuple[Job, JobReturn, Future[None]]] = []
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="featsweep-files") as files:
            for job in jobs:
                if job.role == "companion":
                    returns.append(kept_return(job))
                else:
                    ret, future = write_job(launcher, job, files)
                    returns.append(ret)
                    if future is not None:
                        written.append((job, ret, future))
                job.outcome = job.state = None  # handed on: don't hold images for the sweep
        # (leaving the with block waited for every job's files)
    finally:
        assert launcher.config is not None
        configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    for job, ret, future in written:
        failure = future.exception()
        if failure is not None:  # as if the job's task had raised it
            log.error(f"job #{job.idx}: its files could not be written: {failure!r}")
            ret.status, ret.return_value, job.status = JobStatus.FAILED, failure, "failed"
    return returns


def raise_if_interrupted(launcher: "BatchedLauncher", signame: str | None,
                          statuses: dict[int, str], not_started: int) -> None:
    """End the sweep with one line when a signal stopped it (here or inside a task): exit
    status 130/143 (SIGINT/SIGTERM here), 1 (a task was stopped by a signal sent to it)."""
    from featsweep.jobs import resume_message, stop_sweep

    stopped = [idx for idx, status in statuses.items() if status == "interrupted"]
    if signame is None and not stopped:
        return
    finished = len(statuses) - len(stopped)
    detail = (f"{finished} job(s) finished, {len(stopped)} written as interrupted, "
              f"{not_started} not started.")
    stop_sweep(resume_message(signame or "a signal sent to a task", sweep_dir(launcher), detail),
               signame)


def is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: cuda's
    text = str(exc).lower()
    return isinstance(exc, oom) or "out of memory" in text or "can't allocate memory" in text


def optimize(batch: list[Job], should_stop: Callable[[], bool] | None = None) -> None:
    """Fill each job's outcome (or error), one engine call per batch. Out of memory: split the
    batch in halves (never cutting a diversity group) and retry, so the images that fit still
    run. Any other error is deterministic (a retry would raise it again): the batch's jobs are
    marked failed with it at once, and the sweep goes on. `should_stop` is the engine's
    interruption flag (the running images end as "interrupted", with their state)."""
    import traceback

    from featsweep.engine import run_batch

    states = [j.state for j in batch]
    kwargs: dict[str, Any] = {"should_stop": should_stop}
    if any(s is not None for s in states):
        kwargs["states"] = states
    try:
        outcomes = run_batch([j.spec for j in batch], **kwargs)
    except Exception as exc:  # isolate: never lose the group
        # The traceback's frames hold the failed batch's tensors (images, optimizer state,
        # activations): drop them, or the retry (and the rest of the sweep) runs without that
        # memory. The exception keeps its type and message.
        traceback.clear_frames(exc.__traceback__)
        failure = exc
    else:
        for job, outcome in zip(batch, outcomes):
            job.outcome = outcome
            job.batch = batch
        return
    # Outside the except block, so nothing of the failed run is referenced any more.
    units = units_of(batch)
    if not is_oom(failure) or len(units) == 1:
        for job in batch:
            job.error = failure
        who = f"job #{batch[0].idx}" if len(batch) == 1 else \
            f"batch of {len(batch)} (#{batch[0].idx}-#{batch[-1].idx})"
        log.error(f"{who} failed: {failure!r}")
        return
    import torch

    torch.cuda.empty_cache()
    halves = near_equal_chunks(units, -(-len(batch) // 2))
    log.warning(f"batch of {len(batch)} ran out of memory ({failure}); retrying as "
                f"{' + '.join(str(len(h)) for h in halves)}")
    for half in halves:
        optimize(half, should_stop)


def writer(job: Job, submit: Callable[[Callable[[], None]], None] | None = None
           ) -> Callable[..., Any]:
    """The task of `job`'s Hydra run: write its precomputed outcome (or record its error) into
    `where` (``job_run.run_job`` passes it; under Hydra's ``run_job``, the running job's
    directory). `submit`: who writes the outcome's files (``featsweep.artifacts.write_job``);
    by default, the task itself."""
    from featsweep import search
    from featsweep.jobs import job_dir as running_job_dir
    from featsweep.jobs import write_error, write_outcome

    def write(cfg: DictConfig, where: Path | None = None) -> Any:
        where = running_job_dir() if where is None else where
        if job.error is not None:
            job.status = "failed"
            failed = write_error(job.error, cfg, job.spec, job.digest, where=where)
            if search.in_search(cfg):  # a search goes on: the trial returns None (Optuna: FAIL)
                return search.job_value(cfg, failed)
            raise job.error
        assert job.outcome is not None
        mates = job.batch or [job]
        # An image metric as the returned value reads the files: written here, before it.
        result = write_outcome(job.outcome, cfg, job.spec, job.digest,
                               batch=[j.idx for j in mates],
                               members=[short(j.digest) for j in mates], where=where,
                               submit=None if search.reads_job_files(cfg) else submit)
        job.status = str(result["status"])
        return task_return(cfg, result, where)

    return write
