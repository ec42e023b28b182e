"""The chaos test: a 12-job, 4-batch CPU sweep SIGKILLed at random moments 5 times and resumed
each time ends bit-identical to an uninterrupted run, every job ok exactly once
(``benchmarks/chaos.py`` at CI size; run the script for longer runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "chaos.py"


def load_chaos():  # -> the benchmarks/chaos.py module
    spec = importlib.util.spec_from_file_location("featsweep_chaos", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sigkill_five_times_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    chaos = load_chaos()
    report = chaos.run(tmp_path, jobs=12, batches=4, kills=5, steps=100, seed=1234,
                       log=lambda _: None)
    assert report.problems == [], report.problems
    assert report.runs == 6 and len(report.kills) == 5
    # The kills really interrupted the sweep: it was not finished before the last one.
    assert min(report.ok_after_kill) < 12, report.ok_after_kill
