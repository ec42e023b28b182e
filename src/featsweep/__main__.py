"""``python -m featsweep [overrides]`` (add ``-m`` for a sweep, ``--dry-run`` to list its jobs).

featsweep's own errors (``UserError``, and Hydra's compact ones such as a bad override) print as
one paragraph on stderr and exit 1: no "Error executing job with overrides" line, no
"Set the environment variable HYDRA_FULL_ERROR=1" hint, no traceback. ``HYDRA_FULL_ERROR=1``
still gives Hydra's full traceback, as for any Hydra app.

A run that ends well ends without the interpreter's teardown (:func:`_exit_without_teardown`).
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from featsweep.app import task

CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")
_MULTIRUN = ("-m", "--multirun")
_ONE_RUN_ONLY = {"--cfg": "--cfg", "-c": "--cfg", "--info": "--info", "-i": "--info"}


def cli_task(cfg: DictConfig) -> Any:
    """The task Hydra runs for ``python -m featsweep``: :func:`featsweep.app.task`, with a user
    error printed as one paragraph and ended with exit status 1 (SystemExit passes through
    Hydra's ``run_job``, which would otherwise add its own "Error executing job" line)."""
    from featsweep.errors import UserError

    try:
        return task(cfg)
    except UserError as exc:
        if os.environ.get("FEATSWEEP_USER_FULL_ERROR") == "1":
            raise
        _print_error(exc)
        raise SystemExit(1) from None


# The batched launcher runs the engine for jobs of this task itself (see hydra_plugins).
cli_task.featsweep_batchable = True  # type: ignore[attr-defined]

main_hydra = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")(cli_task)


def _print_error(exc: BaseException) -> None:
    """One paragraph on stderr. Hydra's own messages (a bad override, a missing config group)
    come in several paragraphs and tab-indented lists: joined into one paragraph here."""
    from featsweep.errors import UserError

    text = str(exc).strip()
    if not isinstance(exc, UserError):
        text = re.sub(r":?\s*\n\t", lambda m: ": " if m.group(0).startswith(":") else ", ", text)
        text = " ".join(text.split())
        text = text.split(" Config search path:")[0]  # Hydra's internals, not the user's
    cause = exc.__cause__
    if cause is not None and type(cause).__module__.startswith("omegaconf"):
        text += " " + " ".join(str(cause).split())
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _rewrite(argv: list[str]) -> list[str]:
    """``hydra.sweeper.params.KEY=VALUE`` -> ``KEY=VALUE`` (see
    ``featsweep.search.params_as_overrides``); ``--dry-run`` -> a multirun with
    ``hydra.launcher.dry_run=true``; ``--cfg``/``--info`` with ``-m`` (which Hydra refuses
    with a traceback) -> a clear message (SystemExit 2)."""
    from featsweep.search import params_as_overrides

    argv = params_as_overrides(argv)  # hydra.sweeper.params.K=interval(...) -> K=interval(...)
    multirun = any(a in _MULTIRUN for a in argv)
    for flag, name in _ONE_RUN_ONLY.items():
        if flag in argv and multirun:
            sys.stderr.write(
                f"featsweep: {name} shows one run's configuration and cannot be combined with "
                "-m/--multirun. To see what a sweep will run (each job's overrides and how the "
                "jobs are batched), use --dry-run with the same arguments; to see one job's full "
                f"config, drop -m and give one value per swept key (python -m featsweep {name} "
                f"{'job ' if name == '--cfg' else ''}seed=0 ...).\n")
            raise SystemExit(2)
    if "--dry-run" in argv:
        argv = [a for a in argv if a != "--dry-run"]
        if not multirun:
            argv.insert(0, "-m")
        argv.append("hydra.launcher.dry_run=true")
    return argv


def _exit_without_teardown() -> None:
    """End the process now, status 0, as the interpreter would but without its teardown: after
    torch is imported that teardown (freeing modules, static destructors) takes ~0.4 s on the
    project's 2-core CPU, every command (measured: BENCHMARKS.md). What is registered with
    ``atexit`` runs first (logging's flush, the sweep directory's lock release) and stdout and
    stderr are flushed; the job files are already closed and renamed (featsweep.artifacts). With
    another non-daemon thread still running, the interpreter's own exit waits for it instead."""
    if any(t is not threading.main_thread() and not t.daemon and t.is_alive()
           for t in threading.enumerate()):
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(*, end_process: bool = True) -> None:
    """Entry point: Hydra's main with featsweep's error printing (see the module docstring).
    It ends the process when the run went well, unless ``end_process`` is false (a caller that
    goes on afterwards in the same process, such as a profiler)."""
    sys.argv = [sys.argv[0], *_rewrite(sys.argv[1:])]
    user_full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    # Let Hydra raise instead of printing its own wrapper lines; print one paragraph here.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    if user_full:
        os.environ["FEATSWEEP_USER_FULL_ERROR"] = "1"
    try:
        main_hydra()
    except CompactHydraException as exc:
        if user_full:
            raise
        _print_error(exc)
        raise SystemExit(1) from None
    finally:
        if not user_full:
            os.environ.pop("HYDRA_FULL_ERROR", None)
    if end_process:
        _exit_without_teardown()


if __name__ == "__main__":
    main()
