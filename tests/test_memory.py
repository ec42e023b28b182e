"""Pre-flight memory check (``featsweep.memory``): refuse an image that cannot fit before
anything is allocated, split up front a batch that cannot fit, and never count ``steps``.

``FEATSWEEP_MEMORY_BUDGET_MB`` lowers the budget so the tests need no big machine.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import featsweep
from featsweep import memory
from featsweep.errors import ConfigError
from featsweep.spec import from_config
from hydra_plugins.featsweep_batched_launcher import _plan as plan

from _cli import run_module

CONF = str(Path(featsweep.__file__).resolve().parent / "conf")
pytestmark = pytest.mark.usefixtures("hydra_restore_singletons")


def spec(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny", "device=cpu", "image.size=32",
                                           "steps=5", *overrides])
    return from_config(cfg)


def test_a_huge_image_is_a_config_error_within_seconds(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = run_module("featsweep", "model=tiny", "device=cpu", "image.size=100000",
                      "hydra.run.dir=out", cwd=tmp_path)
    took = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert "bad config value image.size=100000: one 100000 x 100000 px image needs an " \
           "estimated" in err and " TB " in err and "use a smaller image.size (about" in err
    assert "allocate" not in err and "Traceback" not in err
    assert took < 60, took  # a fresh Python with torch, then arithmetic: no allocation
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["status"] == "not_started" and "image.size=100000" in res["error"]


def test_the_estimate_grows_with_the_image_and_the_batch_but_not_with_steps() -> None:
    base = memory.estimate([spec()])
    assert memory.estimate([spec("image.size=64")]).images == 4 * base.images
    assert memory.estimate([spec("image.size=64")]).activations == pytest.approx(
        4 * base.activations, rel=0.01)
    assert memory.estimate([spec()] * 3).total == pytest.approx(3 * base.total, rel=0.01)
    huge = memory.estimate([spec(f"steps={10**12}")])
    assert huge.trace < 16 * 2**20  # the engine's trace is bounded; so is its estimate
    memory.check_batch([spec(f"steps={10**12}")])  # fits: nothing proportional to steps


def test_one_image_over_the_budget_names_image_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(memory.BUDGET_ENV, "0.05")
    with pytest.raises(ConfigError, match=r"image.size=32: one 32 x 32 px image needs an "
                                          r"estimated .* and 51.2 KB available "
                                          r"\(FEATSWEEP_MEMORY_BUDGET_MB=0.05"):
        memory.check_batch([spec()])


def test_a_batch_over_the_budget_is_split_before_it_starts(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    one = memory.estimate([spec()]).total
    # Room (85% of the budget) for 2 images but not 3.
    monkeypatch.setenv(memory.BUDGET_ENV, str(2.5 * one / memory._SAFETY / 2**20))
    jobs = [plan.Job(i, [f"seed={i}"], OmegaConf.create({}), dataclasses.replace(spec(), seed=i))
            for i in range(5)]
    calls = []
    monkeypatch.setattr("featsweep.engine.run_batch",
                        lambda specs, **_: calls.append(len(specs)) or [None] * len(specs))
    batches = plan.fit_memory([jobs])
    assert [[j.idx for j in b] for b in batches] == [[0, 1], [2, 3], [4]]
    assert calls == []  # decided before any run
    assert "a batch of 5 images at 32 px would not fit (5 > 2 that fit); running it as " \
           "2 + 2 + 1" in caplog.text
