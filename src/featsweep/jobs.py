"""Services shared by the Hydra task (``featsweep.app``) and the batched launcher.

- interruption: :class:`InterruptGuard` turns SIGINT/SIGTERM (and, inside a submitit task,
  submitit's pre-timeout signal USR2) into a flag that the engine polls
  (``run_batch(should_stop=...)``); the running images are written as ``interrupted`` with their
  state, and the sweep ends with one line saying how to resume (:func:`stop_sweep`).
- the config fingerprint (:func:`config_hash`) that resume compares;
- writing a job's outcome, its failure or its rejection (:func:`write_outcome`,
  :func:`write_error`, :func:`write_not_started`), with the reproducibility record, the batch it
  ran in, and a flag when its activation did not rise (:func:`outcome_flag`);
- resume decisions (:func:`judge`): whether a job directory holds this config's finished result,
  a saved state to continue from, or nothing usable.

Heavy imports (torch) happen inside functions, so a mistyped override is reported before torch
is even loaded.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Mapping, NoReturn, Sequence

from omegaconf import DictConfig, OmegaConf

from featsweep.errors import UserError, config_error

if TYPE_CHECKING:
    from featsweep.engine import JobOutcome
    from featsweep.spec import RunSpec

log = logging.getLogger("featsweep")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Top-level keys that steer bookkeeping, not the optimization: not part of a job's fingerprint.
BOOKKEEPING_KEYS = ("hydra", "resume", "resume_any_version", "optimized_metric")


class Interrupted(UserError):
    """The sweep was stopped by a signal; the message says how to resume it."""


def resume_message(signame: str, sweep_dir: str | None, detail: str = "") -> str:
    """The one line printed when a sweep stops on a signal."""
    where = f" hydra.sweep.dir={sweep_dir}" if sweep_dir else " and the same output directory"
    detail = f" {detail.strip()}" if detail.strip() else ""
    return (f"featsweep: interrupted by {signame}.{detail} Finished jobs are kept and interrupted "
            f"ones continue from their saved state; to finish the sweep, run the same command "
            f"again with resume=true{where}")


def stop_sweep(message: str, signame: str | None) -> NoReturn:
    """End the process: `message` (one line) on stderr, exit status 128 + the signal's number
    (130 for SIGINT, 143 for SIGTERM, as a shell reports a process killed by it), else 1."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    code = 128 + int(getattr(signal, signame)) if signame in ("SIGINT", "SIGTERM") else 1
    raise SystemExit(code)


class InterruptGuard:
    """Context manager: while active, SIGINT and SIGTERM (and `extra` signals) set a flag instead
    of killing the process.

    ``guard.requested()`` is the engine's ``should_stop``. A second SIGINT/SIGTERM stops at once
    (SystemExit; files are still whole: every write is atomic). On exit the previous handlers
    are restored. Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self, sweep_dir: str | None = None,
                 extra: Sequence[signal.Signals] = ()) -> None:
        self.sweep_dir = sweep_dir
        self.signame: str | None = None
        self.extra = tuple(extra)
        self._old: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signame is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signame is not None and signum in SIGNALS:  # second signal: stop now
            self._restore()
            stop_sweep(resume_message(name, self.sweep_dir, "Stopped at once (second signal)."),
                       name)
        if self.signame is not None:
            return
        self.signame = name
        log.warning("%s received: finishing the current step, writing the running jobs as "
                    "interrupted with their state, starting nothing new%s", name,
                    "" if signum not in SIGNALS else " (send it again to stop at once)")

    def _restore(self) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old = {}

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in (*SIGNALS, *self.extra):
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


# ------------------------------------------------------------------------------ config

def resume_requested(cfg: Mapping[str, Any]) -> bool:
    """The top-level ``resume`` flag (false when the config has none); must be true or false."""
    value = cfg.get("resume", False)
    if not isinstance(value, bool):
        raise config_error("resume", value, "must be true or false (resume=true keeps the jobs "
                                            "of hydra.sweep.dir that already finished ok)")
    return value


def any_version(cfg: Mapping[str, Any]) -> bool:
    """``resume_any_version``: keep results written by another featsweep version on resume."""
    value = cfg.get("resume_any_version", False)
    if not isinstance(value, bool):
        raise config_error("resume_any_version", value,
                           "must be true or false (true keeps, on resume, results computed by "
                           "another featsweep version)")
    return value


def task_config(cfg: DictConfig) -> dict[str, Any]:
    """A job's resolved config as plain containers, without the bookkeeping keys. Hydra's own
    node is dropped before resolving, exactly as Hydra hands the config to the task, so the
    launcher and the task agree."""
    plain = plain_task_config(cfg)
    if plain is not None:
        return plain
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in BOOKKEEPING_KEYS])
    try:
        container = OmegaConf.to_container(body, resolve=True)
    except Exception:  # an interpolation into the dropped hydra node: hash the text of it
        container = OmegaConf.to_container(body, resolve=False)
    assert isinstance(container, dict)
    return container  # type: ignore[return-value]


def plain_task_config(cfg: DictConfig) -> dict[str, Any] | None:
    """:func:`task_config` for a config with no interpolation outside the bookkeeping keys (the
    usual case: featsweep's own config has none), read without copying the config; None when
    there is one (resolving it without Hydra's node is what decides its value then)."""
    out: dict[str, Any] = {}
    for key in cfg:
        if key in BOOKKEEPING_KEYS:
            continue
        if OmegaConf.is_interpolation(cfg, key) or OmegaConf.is_missing(cfg, key):
            return None
        value = cfg[key]
        out[str(key)] = OmegaConf.to_container(value, resolve=False) if OmegaConf.is_config(value) else value
    return None if _has_interpolation(out) else out


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    if isinstance(value, dict):
        return any(_has_interpolation(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_interpolation(v) for v in value)
    return False


def config_hash(cfg: DictConfig) -> str:
    """Fingerprint of a job's resolved config without ``hydra``, ``resume`` and
    ``resume_any_version`` (see ``featsweep.artifacts.config_hash``)."""
    from featsweep.artifacts import config_hash as digest

    return digest(task_config(cfg))


# ------------------------------------------------------------------------------ writing

def job_dir() -> Path:
    """The running Hydra job's output directory."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def job_record(cfg: DictConfig, spec: "RunSpec | None", digest: str | None = None,
               device: str | None = None) -> dict[str, Any]:
    """result.json fields beside the outcome: config_hash, steps_requested and provenance."""
    from featsweep.artifacts import provenance

    return {"steps_requested": spec.steps if spec is not None else None,
            "config_hash": digest if digest is not None else config_hash(cfg),
            **provenance(device)}


# Why an activation that did not rise, and what to try (shown in result.json and the log).
_DEAD = ("the target channel's activation is exactly 0 from start to end: a dead channel (the "
         "ReLU after it is 0 everywhere, so there is no gradient to follow)")
_FELL = "the activation did not rise: the optimization went the wrong way or nowhere"


def _what_to_try(spec: "RunSpec | None") -> str:
    """The remedies that apply to this job (all three when its settings are unknown)."""
    target = getattr(spec, "target", None)
    blur = getattr(spec, "blur", None)
    tries = []
    if target is None or getattr(target, "relu", "post") == "post":
        tries.append("target.relu=pre (the tensor before the ReLU has a gradient)")
    if target is None or getattr(target, "relu_gradient", None) != "redirect":
        tries.append("target.relu_gradient=redirect (a ReLU that passes the gradient where it "
                     "is 0)")
    if blur is None or (blur.kind != "none" and blur.k > 1):
        k = getattr(blur, "k", 5)
        tries.append(f"a smaller blur (blur.k={max(1, k - 2)} or blur=none)")
    if not tries:
        tries.append("another channel or layer, a larger optimizer.lr, or optimizer=adam")
    return "try " + ", or ".join(tries)


def outcome_flag(result: Mapping[str, Any], spec: "RunSpec | None" = None
                 ) -> dict[str, str] | None:
    """{"flag", "flag_message"} when a finished job's activation did not rise, else None.

    ``dead_channel``: start and end exactly 0 (the channel never fired); ``not_rising``: the
    final activation is not above the start's (it fell or stayed). Both are still written; the
    message says the likely cause and what to try for this job's settings.
    """
    if result.get("status") not in ("ok", "interrupted"):
        return None
    start, end = result.get("activation_start"), result.get("activation")
    if start is None or end is None:
        return None
    if start == 0 and end == 0:
        return {"flag": "dead_channel", "flag_message": f"{_DEAD}; {_what_to_try(spec)}"}
    if end <= start and result.get("status") == "ok":
        return {"flag": "not_rising",
                "flag_message": f"{_FELL} ({start:.4g} -> {end:.4g}); {_what_to_try(spec)}"}
    return None


def write_outcome(outcome: "JobOutcome", cfg: DictConfig | None = None,
                  spec: "RunSpec | None" = None, digest: str | None = None,
                  batch: Sequence[int] | None = None, where: Path | None = None,
                  members: Sequence[str] | None = None,
                  submit: Callable[[Callable[[], None]], Any] | None = None) -> dict[str, Any]:
    """Write `outcome` into the current Hydra job directory (or `where`); return result.json.

    With the job's `cfg` (and `spec`), result.json also records the config fingerprint that
    resume compares, ``steps_requested`` and where and with what the job ran; `batch` the job
    numbers of the engine batch it ran in (``batch_size`` is its length; one job alone: [num]),
    `members` the first 12 hex digits of their config hashes (resume uses them to re-form a batch
    a crash left half written).
    An interrupted job's state (``outcome.state``) is saved beside it, so resume continues it.
    `submit`: who writes the files (``featsweep.artifacts.write_job``); by default, this call.
    """
    from featsweep.artifacts import write_job

    where = job_dir() if where is None else where
    extra = job_record(cfg, spec, digest, outcome.device) if cfg is not None else {}
    if batch is not None:
        extra.update(batch_size=len(batch), batch_jobs=list(batch))
    if members is not None:
        extra["batch_members"] = list(members)
    state = getattr(outcome, "state", None) if outcome.status == "interrupted" else None
    result = write_job(where, outcome, extra, flag=lambda r: outcome_flag(r, spec), state=state,
                       submit=submit)
    act = result["activation"]
    log.info("%s: activation %s -> %s after %d steps; files in %s", result["status"],
             _fmt(result["activation_start"]), _fmt(act), result["steps"], where)
    if result.get("flag"):
        log.warning("%s: %s", where, result["flag_message"])
    return result


def write_error(error: BaseException, cfg: DictConfig | None = None,
                spec: "RunSpec | None" = None, digest: str | None = None,
                where: Path | None = None) -> dict[str, Any]:
    """Record a job that raised: result.json with status "failed" and the error text."""
    from featsweep.artifacts import write_failure

    extra = job_record(cfg, spec, digest) if cfg is not None else None
    return write_failure(job_dir() if where is None else where,
                         f"{type(error).__name__}: {error}", extra)


def write_not_started(error: BaseException, where: Path | None = None) -> dict[str, Any]:
    """Record a run refused before it started (a config error): status "not_started"."""
    from featsweep.artifacts import write_failure

    return write_failure(job_dir() if where is None else where, str(error),
                         status="not_started")


# ------------------------------------------------------------------------------ resume

@dataclass
class Verdict:
    """What a job directory holds for a job of fingerprint `digest` (see :func:`judge`).

    kind: "done" (finished ok for this config: keep), "resumable" (interrupted, with a saved
    state: continue it), "missing" (nothing finished: no result.json, or files missing),
    "changed" (a result of another config), "rerun" (failed, diverged, not started, or
    written by another featsweep version). `reason` says why, for the log.
    """

    kind: str
    reason: str = ""
    result: dict | None = None


def _version_note(result: Mapping[str, Any]) -> tuple[bool, bool, str]:
    """(other version, other git commit, "featsweep 0.1.0 -> 0.2.0, git commit a -> b")."""
    from featsweep import __version__
    from featsweep.artifacts import git_commit

    old_v, old_c, new_c = result.get("featsweep_version"), result.get("git_commit"), git_commit()
    other_commit = old_c != new_c and bool(old_c or new_c)
    commit = (f", git commit {(old_c or 'none')[:10]} -> {(new_c or 'none')[:10]}"
              if other_commit else "")
    return old_v != __version__, other_commit, f"featsweep {old_v} -> {__version__}{commit}"


def judge(where: Path, digest: str, accept_any_version: bool = False) -> Verdict:
    """The resume decision for one job directory. Reads only; touches nothing."""
    from featsweep.artifacts import FILES, STATE, read_result

    where = Path(where)
    result = read_result(where)
    if result is None:
        return Verdict("missing", "no result")
    if result.get("config_hash") != digest:
        return Verdict("changed", "another config", result)
    status = result.get("status")
    other_version, other_commit, note = _version_note(result)
    if other_version and not accept_any_version:
        return Verdict("rerun", f"written by another version ({note}); resume_any_version=true "
                                "keeps such results", result)
    if status == "ok":
        if not all((where / name).is_file() for name in FILES):
            return Verdict("missing", "a file is missing", result)
        return Verdict("done", f"kept ({note})" if other_version or other_commit else "", result)
    if status == "interrupted" and (where / STATE).is_file():
        return Verdict("resumable", f"interrupted after {result.get('steps')} steps", result)
    return Verdict("rerun", str(status), result)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


# ------------------------------------------------------------------------------ submitit


def submitit_handler() -> tuple[Any, signal.Signals] | None:
    """Inside a submitit task: (submitit's SignalHandler for this task, its pre-timeout signal,
    USR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise), else None. Create it when the task
    starts: submitit decides "timed out" (count a requeue) versus "preempted" from its age."""
    try:
        import submitit
        from submitit.core.job_environment import SignalHandler
        from submitit.core.utils import DelayedSubmission
    except ImportError:
        return None
    env = submitit.JobEnvironment()
    if not env.activated() or not env.paths.submitted_pickle.exists():
        return None
    delayed = DelayedSubmission.load(env.paths.submitted_pickle)
    return SignalHandler(env, env.paths, delayed), env._usr_sig()


def requeue(handler: Any, signum: signal.Signals) -> None:
    """After the pre-timeout signal, once every job is written: let submitit checkpoint (the
    submitted callable's ``checkpoint``) and requeue the task; returns (with a log line) when
    submitit will not requeue it (no timeouts left, or nothing to checkpoint)."""
    from submitit.core.utils import UncompletedJobError

    log.warning("%s before the time limit: jobs written, asking submitit to requeue this task",
                signum.name)
    try:
        handler.checkpoint_and_try_requeue(signum)  # exits the process when requeued
    except UncompletedJobError as exc:
        log.warning("not requeued (%s); resume=true continues the interrupted jobs", exc)
