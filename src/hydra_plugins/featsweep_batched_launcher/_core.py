"""Grouping, batching and per-job writing for the batched launcher.

Keeps the basic launcher's contract job by job: each job's config is composed with
``load_sweep_config`` and gets ``hydra.job.id/num``; each job then goes through Hydra's
``run_job`` (its own directory, ``.hydra/`` files, log file, callbacks, JobReturn status); the
returns come back in input order. Only the engine work moves: jobs that share a batch key are
optimized together first, and their ``run_job`` task just writes the precomputed outcome.
Each batch's jobs are written as soon as the batch finishes, so a later failure loses nothing.

Where batches run (``hydra.launcher.backend``):

- ``local``: in this process, one after another.
- ``submitit_local`` / ``submitit_slurm``: each batch is ONE submitit task (a SLURM array task);
  inside it :class:`GroupTask` does what Hydra's submitit launcher does per job
  (``Singleton.set_state`` -> ``setup_globals`` -> ``load_sweep_config`` -> ``run_job``), for
  every job of the batch after one engine run. The JobReturns travel back pickled.

Resume (``resume=true``): a job whose directory already holds an ``ok`` result.json with the
same config fingerprint is not run and not touched (no ``run_job``: its JobReturn is built here).

Faults: SIGINT/SIGTERM set a flag (``featsweep.app.InterruptGuard``) that the engine polls every
step. The running batch ends at once and its jobs are written with status ``interrupted`` and
their last image; batches not started are not run and get nothing written (no directory), so a
resume runs them like any missing job; the process then prints one line (how to resume) and
exits with status 128 + the signal number (``featsweep.app.stop_sweep``). With a submitit
backend the signal is passed on to the running tasks (SLURM: ``scancel``, which also drops
pending ones). A job that raises, diverges or runs out of memory costs only itself
(:func:`_optimize`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    run_job,
    setup_globals,
)
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

if TYPE_CHECKING:
    from featsweep.engine import JobOutcome
    from featsweep.spec import RunSpec
    from hydra_plugins.featsweep_batched_launcher.batched_launcher import BatchedLauncher

log = logging.getLogger(__name__)

BACKENDS = ("local", "submitit_local", "submitit_slurm")
# submitit.AutoExecutor's generic parameters (every cluster), then what only SLURM takes
# (passed as slurm_<name>); "setup" is understood by both executors.
_GENERIC = ("timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb", "name", "stderr_to_stdout")
_SLURM = ("partition", "qos", "comment", "constraint", "exclude", "gres", "cpus_per_gpu",
          "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s",
          "additional_parameters", "array_parallelism")
_POLL_S = 0.5  # seconds between checks of running submitit tasks
_MAX_LISTED = 20  # jobs named one by one in an error or log line


@dataclass
class _Job:
    idx: int  # hydra.job.num
    overrides: list[str]
    config: DictConfig
    spec: "RunSpec | None" = None
    outcome: "JobOutcome | None" = None
    error: BaseException | None = None
    digest: str | None = None  # config fingerprint (result.json's config_hash)
    done: dict | None = None  # resume: result.json of a job already finished ok (not rerun)


def check_settings(launcher: "BatchedLauncher") -> None:
    """The launcher's own settings, checked before any job is composed."""
    from featsweep.errors import config_error

    if isinstance(launcher.max_batch, bool) or not isinstance(launcher.max_batch, int) \
            or launcher.max_batch < 1:
        raise config_error("hydra.launcher.max_batch", launcher.max_batch,
                           "must be an integer >= 1 (images per engine batch)")
    if launcher.backend not in BACKENDS:
        raise config_error("hydra.launcher.backend", launcher.backend,
                           f"allowed values are {', '.join(BACKENDS)}")
    if launcher.backend != "local":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise config_error("hydra.launcher.backend", launcher.backend,
                               "needs submitit: pip install 'featsweep[cluster]'") from None
    if launcher.backend == "submitit_slurm" and not launcher.submitit.get("partition"):
        raise config_error("hydra.launcher.partition", launcher.submitit.get("partition"),
                           "the SLURM partition for the batches is required: "
                           "hydra.launcher.partition=NAME (`sinfo -s` lists them)")
    timeout = launcher.submitit.get("timeout_min", 60)
    if launcher.backend != "local" and (isinstance(timeout, bool) or not isinstance(timeout, int)
                                        or timeout < 1):
        raise config_error("hydra.launcher.timeout_min", timeout,
                           "must be a whole number of minutes >= 1")


def _compose(launcher: "BatchedLauncher", overrides: Sequence[str], idx: int,
             job_id: Any = None) -> DictConfig:
    assert launcher.hydra_context is not None and launcher.config is not None
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = idx if job_id is None else job_id
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
        if launcher.backend != "local":
            from featsweep.errors import config_error

            raise config_error("hydra.launcher.backend", launcher.backend,
                               "batches on submitit run featsweep's own task only; for another "
                               "app use hydra/launcher=submitit_local or submitit_slurm")
        log.info(f"Launching {len(jobs)} jobs one at a time (not a featsweep task)")
        return [_run(launcher, job, launcher.task_function) for job in jobs]
    return _launch_batched(launcher, jobs)


def _launch_batched(launcher: "BatchedLauncher", jobs: list[_Job]) -> list[JobReturn]:
    todo = _prepare(launcher, jobs)
    batches = _groups(todo, launcher.max_batch)
    if todo or not jobs:
        where = "" if launcher.backend == "local" else f", each as one {launcher.backend} task"
        log.info(f"Batched {len(todo)} jobs into {len(batches)} batch(es) of at most "
                 f"{launcher.max_batch}{where}: " + "; ".join(
                     f"#{b[0].idx}-#{b[-1].idx} ({len(b)} images)" if len(b) > 1
                     else f"#{b[0].idx}" for b in batches))
    if launcher.backend == "local":
        returns = _run_here(launcher, batches)
    else:
        returns = _submit(launcher, batches)
    for job in jobs:
        if job.done is not None:
            returns[job.idx] = _done_return(job)
    return [returns[job.idx] for job in jobs]


def _prepare(launcher: "BatchedLauncher", jobs: list[_Job]) -> list[_Job]:
    """Specs, config fingerprints and resume decisions for every job; then the model checks
    for the jobs that will run. Every user error of every job is raised at once, before any
    optimization. Returns the jobs to run (all of them unless resume=true skipped some)."""
    from featsweep.app import config_hash, resume_requested
    from featsweep.artifacts import completed
    from featsweep.errors import UserError
    from featsweep.spec import from_config

    problems = []
    for job in jobs:
        try:
            job.spec = from_config(job.config)
            resume = resume_requested(job.config)
        except UserError as exc:
            problems.append(f"job #{job.idx} ({' '.join(filter_overrides(job.overrides))}): {exc}")
            continue
        job.digest = config_hash(job.config)
        if resume:
            job.done = completed(_output_dir(job.config), job.digest)
    todo = [job for job in jobs if job.done is None]
    if not problems and todo:
        from featsweep.engine import validate  # torch: only once the configs are known good

        # Job by job (to name the bad ones), group by group (one model load per group).
        for job in (job for group in _groups(todo, launcher.max_batch) for job in group):
            assert job.spec is not None
            spec = job.spec
            if launcher.backend != "local":
                # Layers and channels are checked here on the CPU (the GPU may live on the
                # cluster only); the device itself is checked inside the task.
                spec = dataclasses.replace(spec, device="cpu", precision="fp32")
            try:
                validate([spec])
            except UserError as exc:
                problems.append(f"job #{job.idx} ({' '.join(filter_overrides(job.overrides))}): "
                                f"{exc}")
    if problems:
        shown = problems[:_MAX_LISTED]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more job(s)")
        raise UserError("featsweep: the sweep was not started:\n  " + "\n  ".join(shown))
    skipped = [job.idx for job in jobs if job.done is not None]
    if skipped:
        ids = " ".join(f"#{i}" for i in skipped[:_MAX_LISTED])
        more = f" ... ({len(skipped) - _MAX_LISTED} more)" if len(skipped) > _MAX_LISTED else ""
        log.info(f"resume: {len(skipped)} of {len(jobs)} jobs already finished ok for the same "
                 f"config (left untouched): {ids}{more}")
    return todo


def _output_dir(config: DictConfig) -> Path:
    """The job directory run_job will use for `config` (hydra.sweep.dir / hydra.sweep.subdir)."""
    instance = HydraConfig.instance()
    orig = instance.cfg
    try:
        instance.set_config(config)
        out = str(OmegaConf.select(config, "hydra.sweep.dir"))
        sub = str(OmegaConf.select(config, "hydra.sweep.subdir"))
        return Path(os.path.abspath(os.path.join(out, sub)))
    finally:
        instance.cfg = orig  # type: ignore[assignment]


def _done_return(job: _Job) -> JobReturn:
    """The JobReturn run_job would give for a job resume skipped, built without writing."""
    config = job.config
    instance = HydraConfig.instance()
    orig = instance.cfg
    try:
        out = _output_dir(config)
        with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(out)
        instance.set_config(config)
        task_cfg = copy.deepcopy(config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        overrides = OmegaConf.to_container(config.hydra.overrides.task)
        assert isinstance(overrides, list)
        ret = JobReturn(overrides=overrides, cfg=task_cfg,
                        hydra_cfg=copy.deepcopy(instance.cfg), working_dir=os.getcwd(),
                        task_name=str(config.hydra.job.name), status=JobStatus.COMPLETED)
        ret.return_value = job.done
        return ret
    finally:
        instance.cfg = orig  # type: ignore[assignment]


def _sweep_dir(launcher: "BatchedLauncher") -> str:
    assert launcher.config is not None
    return str(Path(str(launcher.config.hydra.sweep.dir)).resolve())


def _run_here(launcher: "BatchedLauncher", batches: list[list[_Job]]) -> dict[int, JobReturn]:
    """backend=local: the batches one after another in this process, each job written as soon
    as its batch ends. SIGINT/SIGTERM: see the module docstring."""
    from featsweep.app import InterruptGuard

    returns: dict[int, JobReturn] = {}
    not_started = 0
    with InterruptGuard(_sweep_dir(launcher)) as guard:
        for n, batch in enumerate(batches, 1):
            if guard.requested():
                not_started += len(batch)
                continue
            log.info(f"Batch {n}/{len(batches)}: {len(batch)} job(s) as one batch")
            for job, ret in zip(batch, _run_batch(launcher, batch, guard.requested)):
                returns[job.idx] = ret
    _raise_if_interrupted(launcher, guard.signame, returns, not_started)
    return returns


def _run_batch(launcher: "BatchedLauncher", jobs: list[_Job],
               should_stop: Callable[[], bool]) -> list[JobReturn]:
    """One batch, start to finish, wherever it runs (here or inside a submitit task): clear the
    jobs' previous files, optimize the jobs that have no error as one engine batch, then
    run_job each job with its writer. Returns the JobReturns in the jobs' order."""
    from featsweep.artifacts import clear_job

    ready = [job for job in jobs if job.error is None]
    for job in ready:  # a rerun never leaves an old result.json beside new work
        clear_job(_output_dir(job.config))
    if ready:
        _optimize(ready, should_stop)
    returns = []
    for job in jobs:
        returns.append(_run(launcher, job, _writer(job)))
        job.outcome = None  # written: don't hold its images and trace for the whole sweep
    return returns


def _status(ret: JobReturn) -> str:
    value = ret._return_value
    if ret.status == JobStatus.COMPLETED and isinstance(value, dict):
        return str(value.get("status"))
    return "failed"


def _raise_if_interrupted(launcher: "BatchedLauncher", signame: str | None,
                          returns: dict[int, JobReturn], not_started: int) -> None:
    """End the sweep with one line when a signal stopped it (here or inside a task): exit
    status 130/143 (SIGINT/SIGTERM here), 1 (a task was stopped by a signal sent to it)."""
    from featsweep.app import resume_message, stop_sweep

    stopped = [idx for idx, ret in returns.items() if _status(ret) == "interrupted"]
    if signame is None and not stopped:
        return
    finished = len(returns) - len(stopped)
    detail = (f"{finished} job(s) finished, {len(stopped)} written as interrupted, "
              f"{not_started} not started.")
    stop_sweep(resume_message(signame or "a signal sent to a task", _sweep_dir(launcher), detail),
               signame)


def _groups(jobs: Sequence[_Job], max_batch: int) -> list[list[_Job]]:
    """Jobs with equal batch keys, in first-seen order, cut into as few chunks of at most
    max_batch as possible, of near-equal sizes (130 jobs at 64 -> 44 + 43 + 43, not 64 + 64 + 2:
    a batch costs its steps whatever its size, so a tiny last batch wastes a whole run)."""
    by_key: dict[tuple, list[_Job]] = {}
    for job in jobs:
        assert job.spec is not None
        by_key.setdefault(job.spec.batch_key(), []).append(job)
    chunks = []
    for group in by_key.values():
        n_chunks = -(-len(group) // max(1, max_batch))
        size, extra = divmod(len(group), n_chunks)
        start = 0
        for i in range(n_chunks):
            end = start + size + (i < extra)
            chunks.append(group[start:end])
            start = end
    return chunks


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: cuda's
    return isinstance(exc, oom) or "out of memory" in str(exc).lower()


def _optimize(batch: list[_Job], should_stop: Callable[[], bool] | None = None) -> None:
    """Fill each job's outcome (or error). A batch that fails is split and retried, so one bad
    job (or an out-of-memory batch) costs only itself. `should_stop` is the engine's
    interruption flag (the running images end as "interrupted")."""
    import traceback

    from featsweep.engine import run_batch

    try:
        outcomes = run_batch([j.spec for j in batch], should_stop=should_stop)
    except Exception as exc:  # isolate: retry smaller, never lose the group
        # The traceback's frames hold the failed batch's tensors (images, optimizer state,
        # activations): drop them, or the retry (and the rest of the sweep) runs without that
        # memory. The exception keeps its type and message.
        traceback.clear_frames(exc.__traceback__)
        failure = exc
    else:
        for job, outcome in zip(batch, outcomes):
            job.outcome = outcome
        return
    # Outside the except block, so nothing of the failed run is referenced any more.
    if len(batch) == 1:
        batch[0].error = failure
        log.error(f"job #{batch[0].idx} failed: {failure!r}")
        return
    if _is_oom(failure):
        import torch

        torch.cuda.empty_cache()
    half = len(batch) // 2
    log.warning(f"batch of {len(batch)} failed ({type(failure).__name__}: {failure}); "
                f"retrying as {half} + {len(batch) - half}")
    _optimize(batch[:half], should_stop)
    _optimize(batch[half:], should_stop)


def _writer(job: _Job) -> Callable[[DictConfig], Any]:
    """The task run_job executes for `job`: write its precomputed outcome (or record its error)."""
    from featsweep.app import write_error, write_outcome

    def write(cfg: DictConfig) -> Any:
        if job.error is not None:
            write_error(job.error, cfg, job.spec, job.digest)
            raise job.error
        assert job.outcome is not None
        return write_outcome(job.outcome, cfg, job.spec, job.digest)

    return write


# ------------------------------------------------------------------------------ submitit backends


class GroupTask:
    """The picklable callable of one submitit task: one batch of jobs, start to finish.

    Inside the task it follows Hydra's submitit launcher (``BaseSubmititLauncher.__call__``):
    restore Hydra's singletons, ``setup_globals``, compose each job's config with
    ``load_sweep_config`` (``hydra.job.id`` = the submitit job id, ``hydra.job.num`` = the job's
    index); then runs the batch through the engine once and each job through ``run_job`` with
    its writer, exactly as backend=local does. Returns the JobReturns in the batch's order.
    """

    def __init__(self, launcher: "BatchedLauncher") -> None:
        self.launcher = launcher

    def __call__(self, group: Sequence[tuple[list[str], int]],
                 singleton_state: dict) -> list[JobReturn]:
        import submitit

        from featsweep.app import InterruptGuard, config_hash
        from featsweep.spec import from_config

        launcher = self.launcher
        # First: a SIGTERM (preemption, scancel) while the model loads still writes the jobs.
        with InterruptGuard(_sweep_dir(launcher)) as guard:
            Singleton.set_state(singleton_state)
            setup_globals()
            assert launcher.config is not None  # progress lines go to the task's stdout log
            configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
            job_id = submitit.JobEnvironment().job_id
            jobs = []
            for overrides, idx in group:
                job = _Job(idx, list(overrides), _compose(launcher, overrides, idx, job_id))
                try:
                    job.spec = from_config(job.config)
                    job.digest = config_hash(job.config)
                except Exception as exc:  # checked before submission; kept to itself anyway
                    job.error = exc
                jobs.append(job)
            log.info(f"submitit task {job_id}: {sum(j.error is None for j in jobs)} job(s) as one "
                     "batch: " + " ".join(f"#{j.idx}" for j in jobs))
            return _run_batch(launcher, jobs, guard.requested)


def _executor(launcher: "BatchedLauncher") -> Any:
    """A submitit.AutoExecutor for the backend, parameters as Hydra's submitit launcher passes
    them (generic names as they are, SLURM-only ones as slurm_<name>)."""
    import submitit

    cluster = launcher.backend.removeprefix("submitit_")
    params = {k: v for k, v in launcher.submitit.items() if v is not None}
    folder = params.pop("submitit_folder", "${hydra.sweep.dir}/.submitit/%j")
    executor = submitit.AutoExecutor(
        folder=folder, cluster=cluster,
        **{f"{cluster}_max_num_timeout": int(params.pop("max_num_timeout", 0))})
    update = {k: params[k] for k in _GENERIC if k in params}
    update["nodes"], update["tasks_per_node"] = 1, 1  # one batch = one process
    if "setup" in params:
        update[f"{cluster}_setup"] = params["setup"]
    if cluster == "slurm":
        update.update({f"slurm_{k}": params[k] for k in _SLURM if k in params})
    executor.update_parameters(**update)
    return executor


def _forward_interrupt(tasks: Sequence[Any]) -> None:
    """Pass a stop request on to unfinished tasks: submitit_local -> SIGTERM to the task's
    controller (which forwards it to the task); SLURM -> scancel (SIGTERM to running tasks,
    pending ones never start)."""
    for task in tasks:
        if task.done():
            continue
        process = getattr(task, "_process", None)
        try:
            if process is not None:
                process.send_signal(signal.SIGTERM)
            else:
                task.cancel(check=False)
        except Exception as exc:  # a task that just ended, or scancel missing
            log.warning(f"could not stop submitit task {task.job_id}: {exc}")


def _submit(launcher: "BatchedLauncher", batches: list[list[_Job]]) -> dict[int, JobReturn]:
    """backend=submitit_*: each batch as one submitit task; wait; collect the JobReturns."""
    from featsweep.app import InterruptGuard
    from featsweep.errors import UserError

    returns: dict[int, JobReturn] = {}
    if not batches:
        return returns
    assert launcher.config is not None
    groups = [[(job.overrides, job.idx) for job in batch] for batch in batches]
    try:
        executor = _executor(launcher)
        tasks = executor.map_array(GroupTask(launcher), groups,
                                   [Singleton.get_state()] * len(groups))
    except Exception as exc:  # no SLURM here, or sbatch refused (partition, account, limits)
        text = " ".join(str(exc).split())
        raise UserError(f"featsweep: submitting {len(groups)} batch(es) with "
                        f"{launcher.backend} failed: {text[:2000]}") from None
    log.info(f"Submitted {len(tasks)} {launcher.backend} task(s): "
             + ", ".join(f"{t.job_id} (#{b[0].idx}-#{b[-1].idx})" for t, b in zip(tasks, batches)))
    with InterruptGuard(_sweep_dir(launcher)) as guard:
        forwarded = False
        while not all(task.done() for task in tasks):
            if guard.requested() and not forwarded:
                _forward_interrupt(tasks)
                forwarded = True
            time.sleep(_POLL_S)
    not_started = 0
    for task, batch in zip(tasks, batches):
        try:
            (task_returns,) = task.results()
        except Exception as exc:  # the task died (killed, cancelled, node failure): its jobs fail
            text = str(exc).strip().splitlines()
            error = UserError(f"featsweep: submitit task {task.job_id} (jobs "
                              f"#{batch[0].idx}-#{batch[-1].idx}) did not finish: "
                              f"{text[0] if text else type(exc).__name__}; its log: "
                              f"{task.paths.stderr}")
            log.error(str(error))
            if guard.requested():
                not_started += len(batch)
                continue
            for job in batch:
                ret = JobReturn(overrides=job.overrides, status=JobStatus.FAILED)
                ret.return_value = error
                returns[job.idx] = ret
            continue
        for job, ret in zip(batch, task_returns):
            returns[job.idx] = ret
    # After a signal here (jobs of cancelled tasks have no JobReturn: the sweep ends), or when a
    # task wrote its jobs as interrupted (a signal sent to the task itself).
    _raise_if_interrupted(launcher, guard.signame, returns, not_started)
    return returns
