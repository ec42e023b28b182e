"""Honest outcomes and the reproducibility record (``featsweep.jobs``).

A job whose activation did not rise is still written, and flagged in result.json and the log with
the likely cause and what to try; the last progress line shows the final values; result.json
records the batch a job ran in (its size and the job numbers), which is what reproducing it
exactly needs (README, Reproducibility).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from featsweep.jobs import outcome_flag

from _cli import run_module


def test_flags_name_the_cause_and_what_to_try() -> None:
    dead = outcome_flag({"status": "ok", "activation_start": 0.0, "activation": 0.0})
    assert dead is not None and dead["flag"] == "dead_channel"
    assert "exactly 0 from start to end: a dead channel" in dead["flag_message"]
    for remedy in ("target.relu=pre", "target.relu_gradient=redirect", "a smaller blur"):
        assert remedy in dead["flag_message"]
    fell = outcome_flag({"status": "ok", "activation_start": 0.0259, "activation": 0.0197})
    assert fell is not None and fell["flag"] == "not_rising"
    assert "(0.0259 -> 0.0197)" in fell["flag_message"]
    assert outcome_flag({"status": "ok", "activation_start": 0.1, "activation": 3.0}) is None
    assert outcome_flag({"status": "diverged", "activation_start": 0.0, "activation": 0.0}) is None
    # An interrupted job has not finished rising: only a dead channel is flagged.
    assert outcome_flag({"status": "interrupted", "activation_start": 0.2,
                         "activation": 0.1}) is None


@pytest.mark.slow
def test_dead_channel_of_the_pretrained_default_is_flagged(tmp_path: Path) -> None:
    """The pretrained default network at _blocks.10._bn1 channel 7, post-ReLU (96 px, Adam lr
    0.05, no blur): the channel is 0 everywhere, so the image cannot change it. Written (ok),
    flagged, with remedies that fit these settings (no blur to shrink)."""
    proc = run_module("featsweep", "target.layer=_blocks.10._bn1", "target.channel=7",
                      "target.relu=post", "image.size=96", "optimizer=adam", "optimizer.lr=0.05",
                      "blur=none", "steps=20", "log_every=10", "device=cpu", "hydra.run.dir=out",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "out" / "result.json").read_text())
    assert res["status"] == "ok" and res["activation"] == 0.0 and res["activation_start"] == 0.0
    assert res["flag"] == "dead_channel"
    assert "target.relu=pre" in res["flag_message"]
    assert "blur" not in res["flag_message"].split("try ", 1)[1]  # there is no blur here
    out = proc.stdout + proc.stderr
    assert "a dead channel" in out and "WARNING" in out  # the log says it too
    assert (tmp_path / "out" / "image.npy").is_file()


def test_last_progress_line_and_the_batch_record(tmp_path: Path) -> None:
    """A 2-job sweep at 7 steps, progress every 3: the last progress line is step 7/7 and shows
    the final activations; each result.json names its batch (size 2, jobs [0, 1])."""
    sweep = tmp_path / "sweep"
    proc = run_module("featsweep", "-m", "model=tiny", "image.size=32", "device=cpu", "steps=7",
                      "log_every=3", "optimizer=adam", "seed=0,1", f"hydra.sweep.dir={sweep}",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [line for line in (proc.stdout + proc.stderr).splitlines() if " step " in line
             and "/7 [" in line]
    assert "step 7/7" in steps[-1], steps
    results = [json.loads((sweep / str(i) / "result.json").read_text()) for i in (0, 1)]
    final = [r["activation"] for r in results]
    shown = re.search(r"act mean (\S+) min (\S+) max (\S+)", steps[-1])
    assert shown is not None
    assert float(shown.group(2)) == pytest.approx(min(final), rel=1e-2)
    assert float(shown.group(3)) == pytest.approx(max(final), rel=1e-2)
    for r in results:
        assert r["batch_size"] == 2 and r["batch_jobs"] == [0, 1]
        assert len(r["batch_members"]) == 2


def test_a_saved_state_round_trips_with_arrays_and_tensors(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from featsweep.artifacts import read_state, write_state

    state = {"step": 7, "params": torch.arange(6.0).view(2, 3), "trace": np.eye(2),
             "optimizer": {"buf": torch.ones(2)}, "param_kind": "pixel"}
    write_state(tmp_path, state)
    back = read_state(tmp_path)
    assert back is not None and back["step"] == 7 and back["param_kind"] == "pixel"
    assert torch.equal(back["params"], state["params"])
    assert np.array_equal(np.asarray(back["trace"]), state["trace"])  # as the engine reads it
    assert torch.equal(back["optimizer"]["buf"], torch.ones(2))
    (tmp_path / "state.pt").write_bytes(b"truncated")
    assert read_state(tmp_path) is None  # unreadable: the job starts again from step 0


@pytest.mark.parametrize("overrides", [
    [], ["optimizer=adam", "blur.k=5", "seed=3"], ["experiment=claims"],
    ["param=fft", "transform=standard", "regularizer.tv=0.05"], ["model=tiny", "target.layer=block2"],
    ["+model.note='${seed}'"], ["+extra=${steps}"], ["target.layer=${model.name}"],
], ids=["default", "sweep", "claims", "fft", "tiny", "nested-interp", "top-interp", "leaf-interp"])
def test_plain_task_config_is_the_resolved_copy_or_none(overrides: list[str]) -> None:
    """The launcher's cheap read of a job's settings (one plain copy for its spec and its
    fingerprint) equals Hydra's resolved copy without the bookkeeping keys, and gives up (None:
    the slow path decides) when any value interpolates."""
    from hydra import compose
    from omegaconf import OmegaConf

    from featsweep.artifacts import config_hash as digest_of
    from featsweep.jobs import BOOKKEEPING_KEYS, config_hash, plain_task_config
    from featsweep.spec import from_config

    from _hydra import featsweep_conf

    with featsweep_conf():
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    plain = plain_task_config(cfg)
    if any("${" in o for o in overrides):
        assert plain is None
        return
    body = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in BOOKKEEPING_KEYS])
    assert plain == OmegaConf.to_container(body, resolve=True)
    assert digest_of(plain) == config_hash(cfg)
    assert from_config(plain) == from_config(cfg)
