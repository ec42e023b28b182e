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
import re
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
    from featsweep.errors import UserError
    from featsweep.jobs import Verdict
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
    verdict: "Verdict | None" = None  # resume decision (featsweep.jobs.judge)
    any_version: bool = False  # resume_any_version of this job's config
    # "run" (from step 0), "state" (continue from its saved state), "companion" (finished: run
    # again only to keep its batch as planned, not written).
    role: str = "run"
    state: dict | None = None  # the saved state passed back to the engine
    batch: "list[_Job] | None" = None  # the engine batch it ran in (itself included)
    status: str | None = None  # the status written into its result.json
    out: Path | None = None  # its job directory (computed once: see _job_dir)


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
        return [_run(launcher, job, launcher.task_function) for job in jobs]
    return _launch_batched(launcher, jobs)


def _launch_batched(launcher: "BatchedLauncher", jobs: list[_Job]) -> list[JobReturn]:
    batches = _prepare(launcher, jobs)
    todo = sum(1 for b in batches for j in b if j.role != "companion")
    if launcher.dry_run:
        _print_plan(launcher, jobs, batches)
        return []
    if todo or not jobs:
        where = "" if launcher.backend == "local" else f", each as one {launcher.backend} task"
        log.info(f"Batched {todo} jobs into {len(batches)} batch(es) of at most "
                 f"{launcher.max_batch}{where}: " + "; ".join(_describe(b) for b in batches))
    if launcher.backend == "local":
        returns = _run_here(launcher, batches)
    else:
        returns = _submit(launcher, batches)
    for job in jobs:
        if job.idx not in returns:  # kept by resume: not run, not touched
            returns[job.idx] = _done_return(job)
    _report_failures(jobs, returns)
    return [returns[job.idx] for job in jobs]


def _describe(batch: Sequence[_Job]) -> str:
    ids = (f"#{batch[0].idx}-#{batch[-1].idx}" if len(batch) > 1 and [j.idx for j in batch] ==
           list(range(batch[0].idx, batch[-1].idx + 1)) else " ".join(f"#{j.idx}" for j in batch))
    n_comp = sum(j.role == "companion" for j in batch)
    comp = f", {n_comp} finished job(s) rerun unwritten to keep the batch as planned" \
        if n_comp else ""
    return f"{ids} ({len(batch)} images{comp})" if len(batch) > 1 else f"{ids}{comp}"


def _print_plan(launcher: "BatchedLauncher", jobs: list[_Job], batches: list[list[_Job]]) -> None:
    """--dry-run: the jobs and how they would be batched, on stdout; nothing runs or is written."""
    assert launcher.config is not None
    where = "here" if launcher.backend == "local" else f"as {launcher.backend} tasks"
    lines = [f"featsweep dry run: {len(jobs)} job(s) into {len(batches)} batch(es) of at most "
             f"{launcher.max_batch}, run {where}; sweep dir {_sweep_dir(launcher)}"]
    for job in jobs:
        over = " ".join(filter_overrides(job.overrides)) or "(no overrides)"
        verdict = f"  [resume: {job.verdict.kind}]" if job.verdict is not None and \
            job.verdict.kind != "missing" else ""
        lines.append(f"  #{job.idx}: {over}{verdict}")
    for n, batch in enumerate(batches, 1):
        spec = batch[0].spec
        assert spec is not None
        kinds = "/".join(sorted({j.spec.param.kind for j in batch if j.spec is not None}))
        lines.append(f"  batch {n}: {_describe(batch)}; {spec.model.label} {spec.image.size}px, "
                     f"param {kinds}, image.space {spec.image.space} on {spec.device}")
    lines.append("  (no model was loaded: the memory check may still split a batch when the "
                 "sweep runs)")
    print("\n".join(lines), flush=True)


def _problem_report(problems: list[tuple[str, _Job]]) -> UserError:
    """One paragraph per distinct message, with the jobs it concerns (a sweep whose 12 jobs all
    miss the same weights prints the message once, with "12 jobs")."""
    from featsweep.errors import UserError

    by_message: dict[str, list[_Job]] = {}
    for message, job in problems:
        by_message.setdefault(message, []).append(job)
    parts = []
    for message, group in list(by_message.items())[:_MAX_LISTED]:
        if len(group) == 1:
            who = f"job #{group[0].idx} ({' '.join(filter_overrides(group[0].overrides))})"
        else:
            ids = " ".join(f"#{j.idx}" for j in group[:_MAX_LISTED])
            more = f" ... ({len(group) - _MAX_LISTED} more)" if len(group) > _MAX_LISTED else ""
            who = f"{len(group)} jobs ({ids}{more})"
        text = message.removeprefix("featsweep: ")
        parts.append(f"{who}: {text}")
    if len(by_message) > _MAX_LISTED:
        parts.append(f"... and {len(by_message) - _MAX_LISTED} more distinct error(s)")
    if len(parts) == 1:
        return UserError(f"featsweep: the sweep was not started: {parts[0]}")
    return UserError("featsweep: the sweep was not started:\n  " + "\n  ".join(parts))


def _prepare(launcher: "BatchedLauncher", jobs: list[_Job]) -> list[list[_Job]]:
    """Specs, config fingerprints and resume decisions for every job; then the model checks
    and the memory check for the jobs that will run. Every user error of every job is raised
    at once, before any optimization. Returns the batches to run, in order."""
    from featsweep.errors import UserError
    from featsweep.jobs import Verdict, any_version, config_hash, resume_requested
    from featsweep.search import check as check_search
    from featsweep.spec import from_config

    problems: list[tuple[str, _Job]] = []
    resume = False
    for job in jobs:
        try:
            job.spec = from_config(job.config)
            check_search(job.config)  # optimized_metric: the value returned to the sweeper
            resume = resume_requested(job.config) or resume
            job.any_version = any_version(job.config)
        except UserError as exc:
            problems.append((str(exc), job))
            continue
        job.digest = config_hash(job.config)
    if problems:
        raise _problem_report(problems)
    from featsweep.spec import check_batch_groups

    # Rules across jobs (a diversity group of one, or one that mixes models or layers).
    check_batch_groups([job.spec for job in jobs], [f"#{job.idx}" for job in jobs])
    for job in jobs:
        job.verdict = Verdict("missing")
    if resume:
        _resume(launcher, jobs)
    todo = [job for job in jobs if job.verdict is not None and job.verdict.kind != "done"]
    if todo and not launcher.dry_run:
        from featsweep.engine import validate  # torch: only once the configs are known good
        from featsweep.memory import check_batch

        # Job by job (to name the bad ones), group by group (one model load per group). The
        # memory check first: it allocates nothing in proportion to image.size or steps.
        for job in (job for group in _groups(todo, launcher.max_batch) for job in group):
            try:
                if launcher.backend == "local":
                    check_batch([_checkable(launcher, job)])
                validate([_checkable(launcher, job)], groups=False)
            except UserError as exc:
                problems.append((str(exc), job))
    if problems:
        raise _problem_report(problems)
    batches = _plan(jobs, launcher.max_batch)
    if batches and not launcher.dry_run and launcher.backend == "local":
        batches = _fit_memory(batches)
    return batches


def _checkable(launcher: "BatchedLauncher", job: _Job) -> "RunSpec":
    """The spec to check here: with a submitit backend, layers and channels are checked on the
    CPU (the GPU may live on the cluster only); the device itself is checked inside the task."""
    assert job.spec is not None
    if launcher.backend == "local":
        return job.spec
    return dataclasses.replace(job.spec, device="cpu", precision="fp32")


def _resume(launcher: "BatchedLauncher", jobs: list[_Job]) -> None:
    """resume=true: put each earlier result under its job's number (matched by config_hash),
    then judge every job directory; log what is kept, continued, changed and rerun."""
    from featsweep.jobs import judge
    from featsweep.sweepdir import arrange, config_diff, old_config

    sweep = Path(_sweep_dir(launcher))
    dirs = {job.idx: _job_dir(job) for job in jobs}
    if all(d.parent == sweep for d in dirs.values()):
        moved = arrange(sweep, [(dirs[j.idx].name, str(j.digest)) for j in jobs])
        if moved:
            shown = ", ".join(f"{a} -> {b}" for a, b in list(moved.items())[:_MAX_LISTED])
            log.info(f"resume: {len(moved)} job director(ies) renamed to the number of the job "
                     f"with the same config: {shown}")
    kept, cont, changed, rerun = [], [], [], []
    for job in jobs:
        assert job.digest is not None
        job.verdict = verdict = judge(dirs[job.idx], job.digest, job.any_version)
        if verdict.kind == "done":
            job.done = verdict.result
            kept.append(job)
            if verdict.reason:
                log.info(f"resume: job #{job.idx} {verdict.reason}")
        elif verdict.kind == "resumable":
            cont.append(job)
        elif verdict.kind == "changed":
            old = old_config(dirs[job.idx])
            from featsweep.jobs import task_config

            from featsweep.jobs import BOOKKEEPING_KEYS

            if old is not None:
                old = {k: v for k, v in old.items() if k not in BOOKKEEPING_KEYS}
            diff = config_diff(old, task_config(job.config)) if old is not None else ""
            changed.append(f"#{job.idx} ({diff or 'config differs'})")
        elif verdict.kind == "rerun":
            rerun.append(f"#{job.idx} ({verdict.reason})")
    if kept:
        ids = " ".join(f"#{j.idx}" for j in kept[:_MAX_LISTED])
        more = f" ... ({len(kept) - _MAX_LISTED} more)" if len(kept) > _MAX_LISTED else ""
        log.info(f"resume: {len(kept)} of {len(jobs)} jobs already finished ok for the same "
                 f"config (left untouched): {ids}{more}")
    if cont:
        log.info(f"resume: {len(cont)} interrupted job(s) continue from their saved state: "
                 + " ".join(f"#{j.idx} ({j.verdict.reason})" for j in cont[:_MAX_LISTED]
                            if j.verdict is not None))
    if changed:
        log.info(f"resume: {len(changed)} job(s) changed since the earlier run, rerun: "
                 + "; ".join(changed[:_MAX_LISTED]))
    if rerun:
        log.info(f"resume: {len(rerun)} job(s) rerun: " + "; ".join(rerun[:_MAX_LISTED]))


def _plan(jobs: Sequence[_Job], max_batch: int) -> list[list[_Job]]:
    """The batches to run. Grouping is computed over the WHOLE sweep, finished jobs included, so
    a job runs with the batch-mates an uninterrupted run gives it (batch composition changes the
    rounding, and the optimization amplifies rounding: see README, Reproducibility). A batch
    that a crash left half written (a finished job's result.json lists an unfinished job among
    its batch members) runs again whole: its finished jobs come along as "companions", computed
    but not written. Other unfinished jobs (new, changed, failed) run without the finished ones.
    """
    batches = []
    for group in _groups(jobs, max_batch):
        needed = [j for j in group if j.verdict is None or j.verdict.kind != "done"]
        if not needed:
            continue
        ran_with = set()
        for job in group:
            if job.verdict is not None and job.verdict.kind == "done" and job.verdict.result:
                ran_with.update(job.verdict.result.get("batch_members") or ())
        recover = bool(ran_with) and all(_short(j.digest) in ran_with for j in needed)
        batch = group if recover else needed
        for job in batch:
            kind = job.verdict.kind if job.verdict is not None else "missing"
            job.role = {"done": "companion", "resumable": "state"}.get(kind, "run")
        batches.append(batch)
    return batches


def _short(digest: str | None) -> str:
    """The 12 hex digits of a config_hash kept in result.json's batch_members."""
    return (digest or "")[:12]


def _fit_memory(batches: list[list[_Job]]) -> list[list[_Job]]:
    """Split up front each batch that the memory check says cannot fit (featsweep.memory); a
    single image that cannot fit has already been refused with a config error."""
    from featsweep.memory import max_fitting

    out = []
    for batch in batches:
        specs = [j.spec for j in batch]
        fit = max_fitting(specs)  # type: ignore[arg-type]
        if fit >= len(batch):
            out.append(batch)
            continue
        parts = _chunks(_units(batch), fit)
        log.warning(f"memory: a batch of {len(batch)} images at {specs[0].image.size} px "  # type: ignore[union-attr]
                    f"would not fit ({len(batch)} > {fit} that fit); running it as "
                    f"{' + '.join(str(len(p)) for p in parts)}")
        out.extend(parts)
    return out


def _job_dir(job: _Job) -> Path:
    """The job's directory, resolved once per job (resolving it swaps Hydra's config in)."""
    if job.out is None:
        job.out = _output_dir(job.config)
    return job.out


_INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")


def _needs_hydra_singleton(config: DictConfig, key: str, depth: int = 0) -> bool:
    """Whether resolving ``key`` may reach the ``${hydra:...}`` resolver, which reads Hydra's
    singleton rather than ``config`` (so it must hold this job's config). Plain interpolations
    are followed; any resolver but ``now`` (cached from the sweep's start) counts as yes."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    if not isinstance(node, DictConfig) or depth > 8:
        return True
    raw = OmegaConf.to_container(node, resolve=False).get(leaf)
    if isinstance(raw, (dict, list)):
        return True
    for ref in _INTERPOLATION.findall(raw) if isinstance(raw, str) else ():
        if ":" in ref:
            if not ref.startswith("now:"):
                return True
        elif ref.startswith(".") or _needs_hydra_singleton(config, ref, depth + 1):
            return True
    return False


def _output_dir(config: DictConfig) -> Path:
    """The job directory run_job will use for `config` (hydra.sweep.dir / hydra.sweep.subdir)."""
    keys = ("hydra.sweep.dir", "hydra.sweep.subdir")
    if not any(_needs_hydra_singleton(config, key) for key in keys):
        # The usual case (Hydra's defaults: multirun/${now:...}, ${hydra.job.num}): the config
        # resolves it alone.
        out, sub = (str(OmegaConf.select(config, key)) for key in keys)
        return Path(os.path.abspath(os.path.join(out, sub)))
    # A ${hydra:...} in them: resolve as run_job will, with this job's config in the singleton.
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
    """The JobReturn run_job would give for a job resume kept, built without writing."""
    config = job.config
    instance = HydraConfig.instance()
    orig = instance.cfg
    try:
        out = _job_dir(job)
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
        ret.return_value = _task_return(config, job.done, out)
        return ret
    finally:
        instance.cfg = orig  # type: ignore[assignment]


def _task_return(cfg: DictConfig, result: dict | None, where: Path) -> Any:
    """What the task returns for a job's result: its ``optimized_metric`` value(s), the value a
    Hydra sweeper optimizes (``featsweep.search.job_value``)."""
    from featsweep import search

    return search.job_value(cfg, result, where)


def _sweep_dir(launcher: "BatchedLauncher") -> str:
    assert launcher.config is not None
    return str(Path(str(launcher.config.hydra.sweep.dir)).resolve())


def _run_here(launcher: "BatchedLauncher", batches: list[list[_Job]]) -> dict[int, JobReturn]:
    """backend=local: the batches one after another in this process, each job written as soon
    as its batch ends. SIGINT/SIGTERM: see the module docstring."""
    from featsweep.jobs import InterruptGuard

    returns: dict[int, JobReturn] = {}
    statuses: dict[int, str] = {}
    not_started = 0
    with InterruptGuard(_sweep_dir(launcher)) as guard:
        for n, batch in enumerate(batches, 1):
            if guard.requested():
                not_started += sum(j.role != "companion" for j in batch)
                continue
            log.info(f"Batch {n}/{len(batches)}: {len(batch)} job(s) as one batch")
            for job, ret in zip(batch, _run_batch(launcher, batch, guard.requested)):
                if job.role != "companion":
                    returns[job.idx] = ret
                    statuses[job.idx] = job.status or "failed"
    _raise_if_interrupted(launcher, guard.signame, statuses, not_started)
    return returns


def _run_batch(launcher: "BatchedLauncher", jobs: list[_Job],
               should_stop: Callable[[], bool]) -> list[JobReturn]:
    """One batch, start to finish, wherever it runs (here or inside a submitit task): read the
    saved states of interrupted jobs, clear the jobs' previous files, optimize the jobs that
    have no error as one engine batch, then run_job each job with its writer (companions are
    not written). Returns the JobReturns in the jobs' order."""
    from featsweep.artifacts import clear_job, read_state

    ready = [job for job in jobs if job.error is None]
    for job in ready:
        if job.role == "state":
            job.state = read_state(_job_dir(job))
            if job.state is None:  # unreadable: start again from step 0
                job.role = "run"
    for job in ready:  # a rerun never leaves an old result.json beside new work
        if job.role != "companion":
            clear_job(_job_dir(job))
    if ready:
        _optimize(ready, should_stop)
    returns = []
    for job in jobs:
        if job.role == "companion":
            returns.append(_done_return(job))
        else:
            returns.append(_run(launcher, job, _writer(job)))
        job.outcome = job.state = None  # written: don't hold images and state for the sweep
    return returns


def _raise_if_interrupted(launcher: "BatchedLauncher", signame: str | None,
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
    stop_sweep(resume_message(signame or "a signal sent to a task", _sweep_dir(launcher), detail),
               signame)


class _QuietReturn(JobReturn):
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


def _report_failures(jobs: Sequence[_Job], returns: dict[int, JobReturn]) -> None:
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
             f"{' '.join(f'#{i}' for i in ids[:_MAX_LISTED])}"
             f"{' ...' if len(ids) > _MAX_LISTED else ''}: {text.removeprefix('featsweep: ')}"
             for text, ids in by_error.items()]
    error = UserError(f"featsweep: {len(failed)} of {len(jobs)} job(s) failed (the other jobs' "
                      "results are written; each failed job's result.json holds its error): "
                      + "; ".join(parts))
    for job, ret in failed:
        quiet = _QuietReturn(**{f.name: getattr(ret, f.name) for f in dataclasses.fields(ret)})
        quiet.return_value = error
        returns[job.idx] = quiet


def _diversity_group(job: _Job) -> Any:
    return getattr(job.spec.target, "diversity_group", None) if job.spec is not None else None


def _units(jobs: Sequence[_Job]) -> list[list[_Job]]:
    """Jobs in first-seen order, those of one non-null target.diversity_group as one unit (they
    always share a batch: their objective couples them)."""
    units: list[list[_Job]] = []
    index: dict[Any, list[_Job]] = {}
    for job in jobs:
        group = _diversity_group(job)
        if group is None:
            units.append([job])
        elif group in index:
            index[group].append(job)
        else:
            index[group] = [job]
            units.append(index[group])
    return units


def _chunks(units: list[list[_Job]], max_batch: int) -> list[list[_Job]]:
    """Cut units into as few chunks of at most max_batch jobs as possible, of near-equal sizes,
    never cutting a unit (a unit larger than max_batch is a chunk of its own)."""
    total = sum(len(u) for u in units)
    n_chunks = max(1, -(-total // max(1, max_batch)))
    chunks: list[list[_Job]] = []
    current: list[_Job] = []
    remaining = total
    for unit in units:
        left = n_chunks - len(chunks)
        goal = -(-remaining // left) if left > 0 else max_batch  # near-equal share of the rest
        if current and len(current) + len(unit) > min(goal, max_batch):
            chunks.append(current)
            remaining -= len(current)
            current = []
        current = current + unit
    if current:
        chunks.append(current)
    return chunks


def _groups(jobs: Sequence[_Job], max_batch: int) -> list[list[_Job]]:
    """Jobs with equal batch keys, in first-seen order, cut into as few chunks of at most
    max_batch as possible, of near-equal sizes (130 jobs at 64 -> 44 + 43 + 43, not 64 + 64 + 2:
    a batch costs its steps whatever its size, so a tiny last batch wastes a whole run). A
    target.diversity_group is never cut."""
    by_key: dict[tuple, list[_Job]] = {}
    for job in jobs:
        assert job.spec is not None
        by_key.setdefault(job.spec.batch_key(), []).append(job)
    chunks = []
    for group in by_key.values():
        chunks.extend(_chunks(_units(group), max_batch))
    return chunks


def _is_oom(exc: BaseException) -> bool:
    import torch

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: cuda's
    text = str(exc).lower()
    return isinstance(exc, oom) or "out of memory" in text or "can't allocate memory" in text


def _optimize(batch: list[_Job], should_stop: Callable[[], bool] | None = None) -> None:
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
    units = _units(batch)
    if not _is_oom(failure) or len(units) == 1:
        for job in batch:
            job.error = failure
        who = f"job #{batch[0].idx}" if len(batch) == 1 else \
            f"batch of {len(batch)} (#{batch[0].idx}-#{batch[-1].idx})"
        log.error(f"{who} failed: {failure!r}")
        return
    import torch

    torch.cuda.empty_cache()
    halves = _chunks(units, -(-len(batch) // 2))
    log.warning(f"batch of {len(batch)} ran out of memory ({failure}); retrying as "
                f"{' + '.join(str(len(h)) for h in halves)}")
    for half in halves:
        _optimize(half, should_stop)


def _writer(job: _Job) -> Callable[[DictConfig], Any]:
    """The task run_job executes for `job`: write its precomputed outcome (or record its error)."""
    from featsweep import search
    from featsweep.jobs import job_dir, write_error, write_outcome

    def write(cfg: DictConfig) -> Any:
        if job.error is not None:
            job.status = "failed"
            failed = write_error(job.error, cfg, job.spec, job.digest)
            if search.in_search():  # a search goes on: the trial returns None (Optuna: FAIL)
                return search.job_value(cfg, failed)
            raise job.error
        assert job.outcome is not None
        mates = job.batch or [job]
        result = write_outcome(job.outcome, cfg, job.spec, job.digest,
                               batch=[j.idx for j in mates],
                               members=[_short(j.digest) for j in mates])
        job.status = str(result["status"])
        return _task_return(cfg, result, job_dir())

    return write


# ------------------------------------------------------------------------------ submitit backends


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
        with InterruptGuard(_sweep_dir(launcher), extra=extra) as guard:
            Singleton.set_state(singleton_state)
            setup_globals()
            assert launcher.config is not None  # progress lines go to the task's stdout log
            configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
            job_id = env.job_id
            jobs = []
            for overrides, idx in group:
                job = _Job(idx, list(overrides), _compose(launcher, overrides, idx, job_id))
                try:
                    job.spec = from_config(job.config)
                    job.digest = config_hash(job.config)
                    job.verdict = judge(_job_dir(job), job.digest,
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
            returns = _run_batch(launcher, jobs, guard.requested)
        if timeout is not None and guard.signame == timeout[1].name:
            requeue(*timeout)  # exits the process when submitit requeues the task
        return [(ret, job.status or ("kept" if job.role == "companion" else "failed"))
                for ret, job in zip(returns, jobs)]


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
    from featsweep.errors import UserError
    from featsweep.jobs import InterruptGuard

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
    _raise_if_interrupted(launcher, guard.signame, statuses, not_started)
    return returns
