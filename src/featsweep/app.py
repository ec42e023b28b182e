"""The Hydra task: one job's config -> RunSpec -> engine -> job directory.

Kept thin: validation lives in ``featsweep.spec``, the loop in ``featsweep.engine``, files in
``featsweep.artifacts``. The batched launcher recognises :func:`task` and runs many jobs' engine
work as one batch, then calls :func:`write_outcome` inside each job's normal Hydra run.

Also here, because both this task and the batched launcher need them:

- resume (``resume=true``): :func:`config_hash` fingerprints a job's config; a job whose directory
  already holds an ``ok`` result of the same fingerprint is skipped (``artifacts.completed``).
- interruption: :class:`InterruptGuard` turns SIGINT/SIGTERM into a flag that the engine polls
  (``run_batch(should_stop=...)``); the running images are written as ``interrupted`` with their
  last image, and the sweep ends with one line saying how to resume (:func:`stop_sweep`).

Heavy imports (torch, via the engine) happen inside functions, so a mistyped override is reported
before torch is even loaded.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Mapping, NoReturn

from omegaconf import DictConfig, OmegaConf

from featsweep.errors import UserError, config_error
from featsweep.spec import RunSpec, from_config

if TYPE_CHECKING:
    from featsweep.engine import JobOutcome

log = logging.getLogger("featsweep")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# hydra.launcher._target_ of Hydra's basic launcher (jobs one after another in this process).
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


class Interrupted(UserError):
    """The sweep was stopped by SIGINT/SIGTERM; the message says how to resume it."""


def resume_message(signame: str, sweep_dir: str | None, detail: str = "") -> str:
    """The one line printed when a sweep stops on a signal."""
    where = f" hydra.sweep.dir={sweep_dir}" if sweep_dir else " and the same output directory"
    detail = f" {detail.strip()}" if detail.strip() else ""
    return (f"featsweep: interrupted by {signame}.{detail} Finished jobs are kept; to finish the "
            f"sweep, run the same command again with resume=true{where}")


def stop_sweep(message: str, signame: str | None) -> NoReturn:
    """End the process: `message` (one line) on stderr, exit status 128 + the signal's number
    (130 for SIGINT, 143 for SIGTERM, as a shell reports a process killed by it), else 1."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    code = 128 + int(getattr(signal, signame)) if signame in ("SIGINT", "SIGTERM") else 1
    raise SystemExit(code)


class InterruptGuard:
    """Context manager: while active, SIGINT and SIGTERM set a flag instead of killing the process.

    ``guard.requested()`` is the engine's ``should_stop``. A second signal stops at once
    (SystemExit; files are still whole: every write is atomic). On exit the previous handlers
    are restored. Outside the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self, sweep_dir: str | None = None) -> None:
        self.sweep_dir = sweep_dir
        self.signame: str | None = None
        self._old: dict[int, Any] = {}

    def requested(self) -> bool:
        return self.signame is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signame is not None:  # second signal: stop now
            self._restore()
            stop_sweep(resume_message(name, self.sweep_dir, "Stopped at once (second signal)."),
                       name)
        self.signame = name
        log.warning("%s received: finishing the current step, writing the running jobs as "
                    "interrupted, starting nothing new (send it again to stop at once)", name)

    def _restore(self) -> None:
        for signum, old in self._old.items():
            signal.signal(signum, old)
        self._old = {}

    def __enter__(self) -> "InterruptGuard":
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._old[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()


def job_dir() -> Path:
    """The running Hydra job's output directory."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def resume_requested(cfg: Mapping[str, Any]) -> bool:
    """The top-level ``resume`` flag (false when the config has none); must be true or false."""
    value = cfg.get("resume", False)
    if not isinstance(value, bool):
        raise config_error("resume", value, "must be true or false (resume=true skips the jobs "
                                            "of hydra.sweep.dir that already finished ok)")
    return value


def config_hash(cfg: DictConfig) -> str:
    """Fingerprint of a job's resolved config without ``hydra`` and ``resume`` (see
    ``featsweep.artifacts.config_hash``). Hydra's own node is dropped before resolving, exactly
    as Hydra hands the config to the task, so the launcher and the task agree."""
    from featsweep.artifacts import config_hash as digest

    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "resume")])
    try:
        container = OmegaConf.to_container(body, resolve=True)
    except Exception:  # an interpolation into the dropped hydra node: hash the text of it
        container = OmegaConf.to_container(body, resolve=False)
    assert isinstance(container, dict)
    return digest(container)


def job_record(cfg: DictConfig, spec: RunSpec | None, digest: str | None = None,
               device: str | None = None) -> dict[str, Any]:
    """result.json fields beside the outcome: config_hash, steps_requested and provenance."""
    from featsweep.artifacts import provenance

    return {"steps_requested": spec.steps if spec is not None else None,
            "config_hash": digest if digest is not None else config_hash(cfg),
            **provenance(device)}


def write_outcome(outcome: "JobOutcome", cfg: DictConfig | None = None,
                  spec: RunSpec | None = None, digest: str | None = None) -> dict[str, Any]:
    """Write `outcome` into the current Hydra job directory; return result.json's content.

    With the job's `cfg` (and `spec`), result.json also records the config fingerprint that
    resume compares, ``steps_requested`` and where and with what the job ran.
    """
    from featsweep.artifacts import write_job

    extra = job_record(cfg, spec, digest, outcome.device) if cfg is not None else None
    result = write_job(job_dir(), outcome, extra)
    act = result["activation"]
    log.info("%s: activation %s -> %s after %d steps; files in %s", result["status"],
             _fmt(result["activation_start"]), _fmt(act), result["steps"], job_dir())
    return result


def write_error(error: BaseException, cfg: DictConfig | None = None, spec: RunSpec | None = None,
                digest: str | None = None) -> dict[str, Any]:
    """Record a job that raised: result.json with status "failed" and the error text."""
    from featsweep.artifacts import write_failure

    extra = job_record(cfg, spec, digest) if cfg is not None else None
    return write_failure(job_dir(), f"{type(error).__name__}: {error}", extra)


def skip_if_done(cfg: DictConfig, digest: str) -> dict[str, Any] | None:
    """With ``resume=true``: the job's existing result when it already finished ok for this
    config (then nothing is written), else None."""
    from featsweep.artifacts import completed

    if not resume_requested(cfg):
        return None
    return completed(job_dir(), digest)


def task(cfg: DictConfig) -> dict[str, Any]:
    """Run one job: validate, (with resume=true: skip it if done), optimize one image, write files.

    SIGINT/SIGTERM while it runs: the image is written as ``interrupted``; under Hydra's basic
    launcher the whole sweep then stops (SystemExit with the resume line: no later job starts),
    under other launchers (one job per submitit task) this job ends with :class:`Interrupted`.
    Either way result.json says "interrupted"; a resume reruns the job.
    """
    spec: RunSpec = from_config(cfg)
    digest = config_hash(cfg)
    done = skip_if_done(cfg, digest)
    if done is not None:
        log.info("resume: %s already finished ok for this config; skipped", job_dir())
        return done
    from featsweep.artifacts import clear_job
    from featsweep.engine import run_batch

    clear_job(job_dir())  # a rerun (resume of a changed or unfinished job) starts clean
    sweep_dir = _sweep_dir()
    with InterruptGuard(sweep_dir) as guard:
        try:
            (outcome,) = run_batch([spec], should_stop=guard.requested)
        except UserError:  # a config mistake found with the model: nothing ran, nothing written
            raise
        except Exception as exc:  # a job that raises leaves a failed result.json, then fails
            log.error("job failed: %r", exc)
            write_error(exc, cfg, spec, digest)
            raise
    result = write_outcome(outcome, cfg, spec, digest)
    if guard.signame is not None:
        message = resume_message(guard.signame, sweep_dir,
                                 f"This job stopped after {outcome.steps_done} of {spec.steps} "
                                 "steps.")
        if _launcher_target() == BASIC_LAUNCHER:
            stop_sweep(message, guard.signame)  # here: run_job would go on to the next job
        raise Interrupted(message)
    return result


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


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"
