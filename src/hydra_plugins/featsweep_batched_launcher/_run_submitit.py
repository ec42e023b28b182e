"""``backend=submitit_local`` / ``submitit_slurm``: each batch is ONE submitit task (a SLURM
array task).

Inside a task :class:`GroupTask` does what Hydra's submitit launcher does per job
(``Singleton.set_state`` -> ``setup_globals`` -> ``load_sweep_config`` -> ``run_job``), for every
job of the batch after one engine run (:func:`._run_local.run_batch`, exactly as ``backend=local``
runs a batch). The JobReturns travel back pickled. A signal here is passed on to the running
tasks (SLURM: ``scancel``, which also drops pending ones).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals

from hydra_plugins.featsweep_batched_launcher._plan import Job, compose, job_dir, sweep_dir
from hydra_plugins.featsweep_batched_launcher._run_local import raise_if_interrupted, run_batch

if TYPE_CHECKING:
    from hydra_plugins.featsweep_batched_launcher.batched_launcher import BatchedLauncher

log = logging.getLogger(__name__)

# submitit.AutoExecutor's generic parameters (every cluster), then what only SLURM takes
# (passed as slurm_<name>); "setup" is understood by both executors.
_GENERIC = ("timeout_min", "cpus_per_task", "gpus_per_node", "mem_gb", "name", "stderr_to_stdout")
_SLURM = ("partition", "qos", "comment", "constraint", "exclude", "gres", "cpus_per_gpu",
          "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s",
          "additional_parameters", "array_parallelism")
_POLL_S = 0.5  # seconds between checks of running submitit tasks


class GroupTask:
    """The picklable callable of one submitit task: one batch of jobs, start to finish.

    Inside the task it follows Hydra's submitit launcher (``BaseSubmititLauncher.__call__``):
    restore Hydra's singletons, ``setup_globals``, compose each job's config with
    ``load_sweep_config`` (``hydra.job.id`` = the submitit job id, ``hydra.job.num`` = the job's
    index); then runs the batch through the engine once and each job through ``run_job`` with
    its writer, exactly as backend=local does. Returns (JobReturn, status) per job, in order.

    Each job's role is read from its directory (:func:`featsweep.jobs.judge`), so a task that
    submitit requeues continues its interrupted jobs from their saved states.

    Time limits: submitit's pre-timeout signal (USR2 on SLURM, ``--signal=USR2@signal_delay_s``)
    stops the batch like SIGTERM does: finished jobs are written, running ones written
    ``interrupted`` with their state; then the task asks submitit to requeue it
    (:meth:`checkpoint`, within ``max_num_timeout``), and the requeued task resumes them.
    """

    def __init__(self, launcher: "BatchedLauncher") -> None:
        self.launcher = launcher

    def checkpoint(self, group: Sequence[tuple[list[str], int]], singleton_state: dict) -> Any:
        """submitit's requeue hook: run the same batch again (it resumes from the job dirs)."""
        import submitit

        return submitit.helpers.DelayedSubmission(GroupTask(self.launcher), group,
                                                  singleton_state)

    def __call__(self, group: Sequence[tuple[list[str], int]],
                 singleton_state: dict) -> list[tuple[JobReturn, str]]:
        import submitit

        from featsweep.jobs import (InterruptGuard, any_version, config_hash, judge, requeue,
                                    submitit_handler)
        from featsweep.spec import from_config

        launcher = self.launcher
        env = submitit.JobEnvironment()
        timeout = submitit_handler()  # now: submitit measures the task's age from here
        extra = (timeout[1],) if timeout is not None else ()
        # First: a signal (preemption, scancel, the time limit) while the model loads still
        # writes the jobs.
        with InterruptGuard(sweep_dir(launcher), extra=extra) as guard:
            Singleton.set_state(singleton_state)
            setup_globals()
            assert launcher.config is not None  # progress lines go to the task's stdout log
            configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
            job_id = env.job_id
            jobs = []
            for overrides, idx in group:
                job = Job(idx, list(overrides), compose(launcher, overrides, idx, job_id))
                try:
                    job.spec = from_config(job.config)
                    job.digest = config_hash(job.config)
                    job.verdict = judge(job_dir(job), job.digest,
                                        any_version(job.config))
                    job.role = {"done": "companion", "resumable": "state"}.get(
                        job.verdict.kind, "run")
                    job.done = job.verdict.result if job.role == "companion" else None
                except Exception as exc:  # checked before submission; kept to itself anyway
                    job.error = exc
                jobs.append(job)
            log.info(f"submitit task {job_id} (PID {os.getpid()}): "
                     f"{sum(j.error is None for j in jobs)} job(s) as one batch: "
                     + " ".join(f"#{j.idx}{'' if j.role == 'run' else f' ({j.role})'}"
                                for j in jobs))
            returns = run_batch(launcher, jobs, guard.requested)
        if timeout is not None and guard.signame == timeout[1].name:
            requeue(*timeout)  # exits the process when submitit requeues the task
        return [(ret, job.status or ("kept" if job.role == "companion" else "failed"))
                for ret, job in zip(returns, jobs)]


def make_executor(launcher: "BatchedLauncher") -> Any:
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


def forward_interrupt(tasks: Sequence[Any]) -> None:
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


def submit(launcher: "BatchedLauncher", batches: list[list[Job]]) -> dict[int, JobReturn]:
    """backend=submitit_*: each batch as one submitit task; wait; collect the JobReturns."""
    from featsweep.errors import UserError
    from featsweep.jobs import InterruptGuard

    returns: dict[int, JobReturn] = {}
    if not batches:
        return returns
    assert launcher.config is not None
    groups = [[(job.overrides, job.idx) for job in batch] for batch in batches]
    try:
        executor = make_executor(launcher)
        tasks = executor.map_array(GroupTask(launcher), groups,
                                   [Singleton.get_state()] * len(groups))
    except Exception as exc:  # no SLURM here, or sbatch refused (partition, account, limits)
        text = " ".join(str(exc).split())
        raise UserError(f"featsweep: submitting {len(groups)} batch(es) with "
                        f"{launcher.backend} failed: {text[:2000]}") from None
    log.info(f"Submitted {len(tasks)} {launcher.backend} task(s): "
             + ", ".join(f"{t.job_id} (#{b[0].idx}-#{b[-1].idx})" for t, b in zip(tasks, batches)))
    with InterruptGuard(sweep_dir(launcher)) as guard:
        forwarded = False
        while not all(task.done() for task in tasks):
            if guard.requested() and not forwarded:
                forward_interrupt(tasks)
                forwarded = True
            time.sleep(_POLL_S)
    not_started = 0
    statuses: dict[int, str] = {}
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
                if job.role == "companion":
                    continue
                ret = JobReturn(overrides=job.overrides, status=JobStatus.FAILED)
                ret.return_value = error
                returns[job.idx] = ret
                statuses[job.idx] = "failed"
            continue
        for job, (ret, status) in zip(batch, task_returns):
            if job.role != "companion" and status != "kept":
                returns[job.idx] = ret
                statuses[job.idx] = status
    # After a signal here (jobs of cancelled tasks have no JobReturn: the sweep ends), or when a
    # task wrote its jobs as interrupted (a signal sent to the task itself).
    raise_if_interrupted(launcher, guard.signame, statuses, not_started)
    return returns
