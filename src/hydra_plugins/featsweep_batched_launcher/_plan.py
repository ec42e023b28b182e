"""Planning a batched sweep: every job composed, checked and judged, then cut into batches.

Nothing here runs the optimization or writes a job directory:

- :func:`compose`: a job's config (``load_sweep_config``, then ``hydra.job.id/num``), the way
  Hydra's launchers compose it;
- :func:`prepare`: specs, config fingerprints and resume decisions for every job, the model and
  memory checks of the jobs that will run; every user error of every job is raised at once,
  before any work (:func:`problem_report`);
- :func:`judge_resume` (``resume=true``): which jobs are kept, continued from their saved state,
  or rerun;
- :func:`plan_batches`: jobs with equal batch keys, in first-seen order, cut into near-equal
  batches of at most ``max_batch`` (:func:`batch_groups`), a ``target.diversity_group`` never cut,
  and split up front where the memory check says a batch cannot fit (:func:`fit_memory`);
- :func:`print_plan`: ``--dry-run``'s listing.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import filter_overrides
from omegaconf import DictConfig, OmegaConf, open_dict

if TYPE_CHECKING:
    from featsweep.engine import JobOutcome
    from featsweep.errors import UserError
    from featsweep.jobs import Verdict
    from featsweep.spec import RunSpec
    from hydra_plugins.featsweep_batched_launcher.batched_launcher import BatchedLauncher

log = logging.getLogger(__name__)

BACKENDS = ("local", "submitit_local", "submitit_slurm")


MAX_LISTED = 20  # jobs named one by one in an error or log line


@dataclass
class Job:
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
    batch: "list[Job] | None" = None  # the engine batch it ran in (itself included)
    status: str | None = None  # the status written into its result.json
    out: Path | None = None  # its job directory (computed once: see job_dir)


def check_settings(launcher: "BatchedLauncher") -> None:
    """The launcher's own settings, checked before any job is composed."""
    from featsweep.errors import config_error

    if isinstance(launcher.max_batch, bool) or not isinstance(launcher.max_batch, int) \
            or launcher.max_batch < 1:
        raise config_error("hydra.launcher.max_batch", launcher.max_batch,
                           "must be an integer >= 1 (images per engine batch)")
    from hydra_plugins.featsweep_batched_launcher._job_run import RUN_JOB_MODES

    if launcher.run_job not in RUN_JOB_MODES:
        raise config_error("hydra.launcher.run_job", launcher.run_job,
                           f"allowed values are {', '.join(RUN_JOB_MODES)}")
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


def compose(launcher: "BatchedLauncher", overrides: Sequence[str], idx: int,
             job_id: Any = None) -> DictConfig:
    assert launcher.hydra_context is not None and launcher.config is not None
    loader = launcher.hydra_context.config_loader
    take = getattr(loader, "take", None)  # sweep_loader: the sweeper's check composed it already
    cfg = (take or loader.load_sweep_config)(launcher.config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = idx if job_id is None else job_id
        cfg.hydra.job.num = idx
    return cfg


def describe(batch: Sequence[Job]) -> str:
    ids = (f"#{batch[0].idx}-#{batch[-1].idx}" if len(batch) > 1 and [j.idx for j in batch] ==
           list(range(batch[0].idx, batch[-1].idx + 1)) else " ".join(f"#{j.idx}" for j in batch))
    n_comp = sum(j.role == "companion" for j in batch)
    comp = f", {n_comp} finished job(s) rerun unwritten to keep the batch as planned" \
        if n_comp else ""
    return f"{ids} ({len(batch)} images{comp})" if len(batch) > 1 else f"{ids}{comp}"


def print_plan(launcher: "BatchedLauncher", jobs: list[Job], batches: list[list[Job]]) -> None:
    """--dry-run: the jobs and how they would be batched, on stdout; nothing runs or is written."""
    assert launcher.config is not None
    where = "here" if launcher.backend == "local" else f"as {launcher.backend} tasks"
    lines = [f"featsweep dry run: {len(jobs)} job(s) into {len(batches)} batch(es) of at most "
             f"{launcher.max_batch}, run {where}; sweep dir {sweep_dir(launcher)}"]
    for job in jobs:
        over = " ".join(filter_overrides(job.overrides)) or "(no overrides)"
        verdict = f"  [resume: {job.verdict.kind}]" if job.verdict is not None and \
            job.verdict.kind != "missing" else ""
        lines.append(f"  #{job.idx}: {over}{verdict}")
    for n, batch in enumerate(batches, 1):
        spec = batch[0].spec
        assert spec is not None
        kinds = "/".join(sorted({j.spec.param.kind for j in batch if j.spec is not None}))
        lines.append(f"  batch {n}: {describe(batch)}; {spec.model.label} {spec.image.size}px, "
                     f"param {kinds}, image.space {spec.image.space} on {spec.device}")
    lines.append("  (no model was loaded: the memory check may still split a batch when the "
                 "sweep runs)")
    print("\n".join(lines), flush=True)


def problem_report(problems: list[tuple[str, Job]]) -> UserError:
    """One paragraph per distinct message, with the jobs it concerns (a sweep whose 12 jobs all
    miss the same weights prints the message once, with "12 jobs")."""
    from featsweep.errors import UserError

    by_message: dict[str, list[Job]] = {}
    for message, job in problems:
        by_message.setdefault(message, []).append(job)
    parts = []
    for message, group in list(by_message.items())[:MAX_LISTED]:
        if len(group) == 1:
            who = f"job #{group[0].idx} ({' '.join(filter_overrides(group[0].overrides))})"
        else:
            ids = " ".join(f"#{j.idx}" for j in group[:MAX_LISTED])
            more = f" ... ({len(group) - MAX_LISTED} more)" if len(group) > MAX_LISTED else ""
            who = f"{len(group)} jobs ({ids}{more})"
        text = message.removeprefix("featsweep: ")
        parts.append(f"{who}: {text}")
    if len(by_message) > MAX_LISTED:
        parts.append(f"... and {len(by_message) - MAX_LISTED} more distinct error(s)")
    if len(parts) == 1:
        return UserError(f"featsweep: the sweep was not started: {parts[0]}")
    return UserError("featsweep: the sweep was not started:\n  " + "\n  ".join(parts))


def prepare(launcher: "BatchedLauncher", jobs: list[Job]) -> list[list[Job]]:
    """Specs, config fingerprints and resume decisions for every job; then the model checks
    and the memory check for the jobs that will run. Every user error of every job is raised
    at once, before any optimization. Returns the batches to run, in order."""
    from featsweep.artifacts import config_hash as digest_of
    from featsweep.errors import UserError
    from featsweep.jobs import Verdict, any_version, config_hash, plain_task_config, resume_requested
    from featsweep.search import check as check_search
    from featsweep.spec import from_config

    problems: list[tuple[str, Job]] = []
    resume = False
    for job in jobs:
        # One plain copy of the job's settings for its spec and its fingerprint (reading a
        # DictConfig key by key costs ~10x more); a config with interpolations is read as is.
        body = plain_task_config(job.config)
        try:
            job.spec = from_config(job.config if body is None else body)
            check_search(job.config)  # optimized_metric: the value returned to the sweeper
            resume = resume_requested(job.config) or resume
            job.any_version = any_version(job.config)
        except UserError as exc:
            problems.append((str(exc), job))
            continue
        job.digest = config_hash(job.config) if body is None else digest_of(body)
    if problems:
        raise problem_report(problems)
    from featsweep.spec import check_batch_groups

    # Rules across jobs (a diversity group of one, or one that mixes models or layers).
    check_batch_groups([job.spec for job in jobs], [f"#{job.idx}" for job in jobs])
    for job in jobs:
        job.verdict = Verdict("missing")
    if resume:
        judge_resume(launcher, jobs)
    todo = [job for job in jobs if job.verdict is not None and job.verdict.kind != "done"]
    if todo and not launcher.dry_run:
        from featsweep.engine import validate  # torch: only once the configs are known good
        from featsweep.memory import check_batch

        # Job by job (to name the bad ones), group by group (one model load per group). The
        # memory check first: it allocates nothing in proportion to image.size or steps.
        for job in (job for group in batch_groups(todo, launcher.max_batch) for job in group):
            try:
                if launcher.backend == "local":
                    check_batch([checkable(launcher, job)])
                validate([checkable(launcher, job)], groups=False)
            except UserError as exc:
                problems.append((str(exc), job))
    if problems:
        raise problem_report(problems)
    batches = plan_batches(jobs, launcher.max_batch)
    if batches and not launcher.dry_run and launcher.backend == "local":
        batches = fit_memory(batches)
    return batches


def checkable(launcher: "BatchedLauncher", job: Job) -> "RunSpec":
    """The spec to check here: with a submitit backend, layers and channels are checked on the
    CPU (the GPU may live on the cluster only); the device itself is checked inside the task."""
    assert job.spec is not None
    if launcher.backend == "local":
        return job.spec
    return dataclasses.replace(job.spec, device="cpu", precision="fp32")


def judge_resume(launcher: "BatchedLauncher", jobs: list[Job]) -> None:
    """resume=true: put each earlier result under its job's number (matched by config_hash),
    then judge every job directory; log what is kept, continued, changed and rerun."""
    from featsweep.jobs import BOOKKEEPING_KEYS, judge, task_config
    from featsweep.sweepdir import arrange, config_diff, old_config

    sweep = Path(sweep_dir(launcher))
    dirs = {job.idx: job_dir(job) for job in jobs}
    if all(d.parent == sweep for d in dirs.values()):
        moved = arrange(sweep, [(dirs[j.idx].name, str(j.digest)) for j in jobs])
        if moved:
            shown = ", ".join(f"{a} -> {b}" for a, b in list(moved.items())[:MAX_LISTED])
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
            if old is not None:
                old = {k: v for k, v in old.items() if k not in BOOKKEEPING_KEYS}
            diff = config_diff(old, task_config(job.config)) if old is not None else ""
            changed.append(f"#{job.idx} ({diff or 'config differs'})")
        elif verdict.kind == "rerun":
            rerun.append(f"#{job.idx} ({verdict.reason})")
    if kept:
        ids = " ".join(f"#{j.idx}" for j in kept[:MAX_LISTED])
        more = f" ... ({len(kept) - MAX_LISTED} more)" if len(kept) > MAX_LISTED else ""
        log.info(f"resume: {len(kept)} of {len(jobs)} jobs already finished ok for the same "
                 f"config (left untouched): {ids}{more}")
    if cont:
        log.info(f"resume: {len(cont)} interrupted job(s) continue from their saved state: "
                 + " ".join(f"#{j.idx} ({j.verdict.reason})" for j in cont[:MAX_LISTED]
                            if j.verdict is not None))
    if changed:
        log.info(f"resume: {len(changed)} job(s) changed since the earlier run, rerun: "
                 + "; ".join(changed[:MAX_LISTED]))
    if rerun:
        log.info(f"resume: {len(rerun)} job(s) rerun: " + "; ".join(rerun[:MAX_LISTED]))


def plan_batches(jobs: Sequence[Job], max_batch: int) -> list[list[Job]]:
    """The batches to run. Grouping is computed over the WHOLE sweep, finished jobs included, so
    a job runs with the batch-mates an uninterrupted run gives it (batch composition changes the
    rounding, and the optimization amplifies rounding: see README, Reproducibility). A batch
    that a crash left half written (a finished job's result.json lists an unfinished job among
    its batch members) runs again whole: its finished jobs come along as "companions", computed
    but not written. Other unfinished jobs (new, changed, failed) run without the finished ones.
    """
    batches = []
    for group in batch_groups(jobs, max_batch):
        needed = [j for j in group if j.verdict is None or j.verdict.kind != "done"]
        if not needed:
            continue
        ran_with = set()
        for job in group:
            if job.verdict is not None and job.verdict.kind == "done" and job.verdict.result:
                ran_with.update(job.verdict.result.get("batch_members") or ())
        recover = bool(ran_with) and all(short(j.digest) in ran_with for j in needed)
        batch = group if recover else needed
        for job in batch:
            kind = job.verdict.kind if job.verdict is not None else "missing"
            job.role = {"done": "companion", "resumable": "state"}.get(kind, "run")
        batches.append(batch)
    return batches


def short(digest: str | None) -> str:
    """The 12 hex digits of a config_hash kept in result.json's batch_members."""
    return (digest or "")[:12]


def fit_memory(batches: list[list[Job]]) -> list[list[Job]]:
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
        parts = near_equal_chunks(units_of(batch), fit)
        log.warning(f"memory: a batch of {len(batch)} images at {specs[0].image.size} px "  # type: ignore[union-attr]
                    f"would not fit ({len(batch)} > {fit} that fit); running it as "
                    f"{' + '.join(str(len(p)) for p in parts)}")
        out.extend(parts)
    return out


def job_dir(job: Job) -> Path:
    """The job's directory, resolved once per job (see :func:`output_dir`)."""
    if job.out is None:
        job.out = output_dir(job.config)
    return job.out


_INTERPOLATION = re.compile(r"\$\{([^${}]*)\}")


def needs_hydra_singleton(config: DictConfig, key: str, depth: int = 0) -> bool:
    """Whether resolving ``key`` may reach the ``${hydra:...}`` resolver, which reads Hydra's
    singleton rather than ``config`` (so it must hold this job's config). Plain interpolations
    are followed; a resolver counts as yes when ``_job_run.may_read_singleton`` says so (any
    but ``now`` and OmegaConf's ``oc.*``)."""
    from hydra_plugins.featsweep_batched_launcher._job_run import may_read_singleton

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    if not isinstance(node, DictConfig) or depth > 8:
        return True
    raw = OmegaConf.to_container(node, resolve=False).get(leaf)
    if isinstance(raw, (dict, list)):
        return True
    for ref in _INTERPOLATION.findall(raw) if isinstance(raw, str) else ():
        if ":" in ref:
            if may_read_singleton(ref.split(":", 1)[0].strip()):
                return True
        elif ref.startswith(".") or needs_hydra_singleton(config, ref, depth + 1):
            return True
    return False


def output_dir(config: DictConfig) -> Path:
    """The job directory run_job will use for `config` (hydra.sweep.dir / hydra.sweep.subdir)."""
    keys = ("hydra.sweep.dir", "hydra.sweep.subdir")
    if not any(needs_hydra_singleton(config, key) for key in keys):
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


def sweep_dir(launcher: "BatchedLauncher") -> str:
    assert launcher.config is not None
    return str(Path(str(launcher.config.hydra.sweep.dir)).resolve())


def _diversity_group(job: Job) -> Any:
    return getattr(job.spec.target, "diversity_group", None) if job.spec is not None else None


def units_of(jobs: Sequence[Job]) -> list[list[Job]]:
    """Jobs in first-seen order, those of one non-null target.diversity_group as one unit (they
    always share a batch: their objective couples them)."""
    units: list[list[Job]] = []
    index: dict[Any, list[Job]] = {}
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


def near_equal_chunks(units: list[list[Job]], max_batch: int) -> list[list[Job]]:
    """Cut units into as few chunks of at most max_batch jobs as possible, of near-equal sizes,
    never cutting a unit (a unit larger than max_batch is a chunk of its own)."""
    total = sum(len(u) for u in units)
    n_chunks = max(1, -(-total // max(1, max_batch)))
    chunks: list[list[Job]] = []
    current: list[Job] = []
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


def batch_groups(jobs: Sequence[Job], max_batch: int) -> list[list[Job]]:
    """Jobs with equal batch keys, in first-seen order, cut into as few chunks of at most
    max_batch as possible, of near-equal sizes (130 jobs at 64 -> 44 + 43 + 43, not 64 + 64 + 2:
    a batch costs its steps whatever its size, so a tiny last batch wastes a whole run). A
    target.diversity_group is never cut."""
    by_key: dict[tuple, list[Job]] = {}
    for job in jobs:
        assert job.spec is not None
        by_key.setdefault(job.spec.batch_key(), []).append(job)
    chunks = []
    for group in by_key.values():
        chunks.extend(near_equal_chunks(units_of(group), max_batch))
    return chunks
