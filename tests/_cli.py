"""Run featsweep's command-line entry points (``python -m MODULE ...``) from the tests.

The child's environment drops ``HYDRA_FULL_ERROR`` (so the tests see the clean error messages a
user sees, not Hydra's full traceback) and, by default, pins torch to one intra-op thread with
``OMP_NUM_THREADS=1`` and ``MKL_NUM_THREADS=1``: on a small shared machine torch's default of one
thread per core can make these tiny steps 10-100x slower when the cores are busy. Numbers are
compared between runs made the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping


def cli_env(*, one_thread: bool = True) -> dict[str, str]:
    """This process's environment without ``HYDRA_FULL_ERROR``; one torch thread if `one_thread`."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    if one_thread:
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_module(module: str, *args: str, cwd: Path, timeout: float = 600,
               env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m MODULE ARGS`` in `cwd`, output captured as text; `env` defaults to cli_env()."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd,
                          env=cli_env() if env is None else dict(env),
                          capture_output=True, text=True, timeout=timeout)
