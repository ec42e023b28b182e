"""End to end with networks named by config (issue 10): sweeps of a custom network featsweep does
not know, torchvision classifiers by name, a grayscale network, ViT token layers, timm.

Tiny sizes and a few steps: these check that the run works and the objective moves the right
way, not what the pictures look like.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from hydra import compose
from PIL import Image

from _cli import cli_env, run_module
from _hydra import SMALL_NET, TINY_VIT, featsweep_conf
from featsweep.engine import run_batch
from featsweep.metrics import image_stats
from featsweep.spec import RunSpec, from_config

pytestmark = pytest.mark.usefixtures("hydra_restore_singletons")

TESTS = Path(__file__).resolve().parent
RISE = ["optimizer=adam", "optimizer.lr=0.05", "blur=none", "device=cpu", "log_every=100"]


@pytest.fixture(scope="module")
def hydra_conf() -> Iterator[None]:
    with featsweep_conf():
        yield


def specs(common: list[str], *jobs: list[str]) -> list[RunSpec]:
    return [from_config(compose("config", overrides=[*common, *job])) for job in jobs]


def sweep(tmp_path: Path, *args: str) -> list[dict]:
    """``python -m featsweep -m ARGS`` with the test networks importable; the jobs' result.json."""
    env = cli_env()
    env["PYTHONPATH"] = str(TESTS) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = run_module("featsweep", "-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}",
                      cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"), key=lambda p: int(p.name))
    return [json.loads((job / "result.json").read_text()) for job in jobs]


def test_custom_network_sweep_is_one_batch_pre_and_post(tmp_path: Path) -> None:
    """A network from a package featsweep does not know, 4 jobs (2 layers x pre/post ReLU,
    module and functional ReLUs) in ONE batch; every job's channel rises."""
    results = sweep(tmp_path, *SMALL_NET, *RISE, "steps=5", "target.channel=1",
                    "target.layer=block_a,features.3", "target.relu=pre,post")
    assert len(results) == 4
    assert all(r["status"] == "ok" and r["batch_size"] == 4 for r in results), results
    assert {tuple(r["batch_jobs"]) for r in results} == {(0, 1, 2, 3)}
    for r in results:
        assert r["activation"] > r["activation_start"], r


@pytest.mark.usefixtures("hydra_conf")
@pytest.mark.parametrize("arch, layer", [("resnet18", "layer2"), ("mobilenet_v3_small", "features.3")])
def test_torchvision_classifier_by_name(arch: str, layer: str) -> None:
    jobs = specs(["model=torchvision", f"model.arch={arch}", "model.weights=random",
                  f"target.layer={layer}", "image.size=32", "steps=2", *RISE],
                 ["target.channel=0"], ["target.channel=3", "target.relu=pre"]
                 if arch == "resnet18" else ["target.channel=3"])
    assert jobs[0].batch_key() == jobs[1].batch_key()
    outcomes = run_batch(jobs)
    assert [o.status for o in outcomes] == ["ok", "ok"]
    assert all(np.isfinite(o.activation) and o.pixels.shape == (32, 32, 3) for o in outcomes)


def test_grayscale_network_writes_grayscale_artifacts_and_metrics(tmp_path: Path) -> None:
    """in_channels=1: the image is (H, W, 1) end to end; image.png is an 8-bit grayscale PNG;
    the analysis measures it as the grey image it is (luma = the channel, no colour)."""
    # The network comes from the user's own config file (model/small_gray.yaml: defaults custom,
    # in_channels 1, its normalization), found through hydra.searchpath.
    conf = TESTS / "featsweep_testnets" / "conf"
    results = sweep(tmp_path, f"hydra.searchpath=[file://{conf}]", "model=small_gray", *RISE,
                    "steps=4", "target.layer=block_b", "target.channel=2", "seed=0,1")
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert all(r["activation"] > r["activation_start"] for r in results)
    from featsweep.analysis import collect

    table = collect(tmp_path / "sweep").sort_values("job.num")
    for num in (0, 1):
        job = tmp_path / "sweep" / str(num)
        raw = np.load(job / "image.npy")
        assert raw.shape == (32, 32, 1) and raw.dtype == np.float32
        png = Image.open(job / "image.png")
        assert png.mode == "L" and png.size == (32, 32)
        row = table[table["job.num"] == num].iloc[0]
        assert row["raw.brightness"] == pytest.approx(float(raw.mean()), abs=1e-6)
        assert row["raw.contrast"] == pytest.approx(float(raw.std()), rel=1e-4)
        assert row["raw.colorfulness"] == pytest.approx(0.0, abs=1e-9)
        display = np.asarray(png, dtype=np.float64) / 255
        expected = image_stats(np.repeat(display[..., None], 3, axis=-1))
        for metric in ("brightness", "contrast", "sharpness", "hf_energy"):
            assert row[f"display.{metric}"] == pytest.approx(expected[metric], rel=1e-5, abs=1e-9)
        assert row["display.colorfulness"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.usefixtures("hydra_conf")
def test_vit_channel_and_token_neuron_rise() -> None:
    """A random-weight ViT (torchvision's VisionTransformer, 2 blocks, 32 px = 16 patches + the
    class token): one encoder block's feature as a channel (mean over tokens) and as one token's
    neuron, in one batch; both rise."""
    layer = "target.layer=encoder.layers.encoder_layer_1"
    jobs = specs([*TINY_VIT, layer, "steps=8", "target.channel=5", *RISE],
                 ["target.kind=channel"], ["target.kind=neuron", "target.token=3"])
    outcomes = run_batch(jobs)
    assert [o.status for o in outcomes] == ["ok", "ok"]
    for o in outcomes:
        assert o.activation > o.activation_start + 0.05, (o.activation_start, o.activation)


@pytest.mark.usefixtures("hydra_conf")
def test_torchvision_vit_b_16_at_32_px() -> None:
    """torchvision's vit_b_16 by name, random weights, built for 32 px (+model.image_size: 4
    patches + the class token); the forward stops after encoder block 3 of 12. Channel and
    token neuron both rise."""
    jobs = specs(["model=torchvision", "model.arch=vit_b_16", "model.weights=random",
                  "+model.image_size=32", "target.layer=encoder.layers.encoder_layer_3",
                  "target.channel=5", "steps=3", *RISE],
                 ["target.kind=channel"], ["target.kind=neuron", "target.token=2"])
    assert jobs[0].image.size == 32 and jobs[0].batch_key() == jobs[1].batch_key()
    outcomes = run_batch(jobs)
    assert [o.status for o in outcomes] == ["ok", "ok"]
    for o in outcomes:
        assert o.activation > o.activation_start + 1.0, (o.activation_start, o.activation)


@pytest.mark.usefixtures("hydra_conf")
def test_timm_vit_runs() -> None:
    """timm (the timm extra), random weights: a tiny ViT at 32 px, a token neuron rises."""
    pytest.importorskip("timm")
    jobs = specs(["model=timm", "model.arch=vit_tiny_patch16_224", "model.weights=random",
                  "+model.img_size=32", "target.layer=blocks.1", "target.channel=7", "steps=6",
                  *RISE], ["target.kind=neuron", "target.token=1"], ["target.kind=channel"])
    assert jobs[0].image.size == 32
    outcomes = run_batch(jobs)
    assert [o.status for o in outcomes] == ["ok", "ok"]
    assert all(o.activation > o.activation_start for o in outcomes)


@pytest.mark.usefixtures("hydra_conf")
def test_four_channel_network(tmp_path: Path) -> None:
    """in_channels=4 (e.g. RGB + infrared): a (H, W, 4) image; image.png shows the 4 channels
    side by side as one grayscale strip."""
    from featsweep.artifacts import write_job

    (job,) = specs([*SMALL_NET[:2], "model.mean=[0.5,0.5,0.5,0.5]", "model.std=[0.25,0.25,0.25,0.25]",
                    "model.in_channels=4", "model.size=32", "target.layer=block_a", "steps=2", *RISE],
                   [])
    (outcome,) = run_batch([job])
    assert outcome.status == "ok" and outcome.pixels.shape == (32, 32, 4)
    write_job(tmp_path, outcome)
    png = Image.open(tmp_path / "image.png")
    assert png.mode == "L" and png.size == (4 * 32, 32)
    strip = np.asarray(png)
    optimized = outcome.optimized
    lo, hi = optimized.min(), optimized.max()
    expected = np.rint((optimized[..., 1] - lo) / (hi - lo) * 255)
    assert np.abs(strip[:, 32:64].astype(float) - expected).max() <= 1


@pytest.mark.usefixtures("hydra_conf")
@pytest.mark.parametrize("channels", [1, 4])
def test_fourier_parameterization_follows_the_channels(channels: int) -> None:
    """param=fft builds a C-channel image for a C-channel network (colour decorrelation is
    RGB-only and refused otherwise); the pre-ReLU channel rises."""
    norm = ",".join(["0.5"] * channels)
    (job,) = specs([*SMALL_NET[:2], f"model.mean=[{norm}]", f"model.std=[{norm}]",
                    f"model.in_channels={channels}", "model.size=32", "target.layer=block_a",
                    "target.relu=pre", "param=fft", "param.decorrelate=false", "steps=3", *RISE],
                   [])
    (outcome,) = run_batch([job])
    assert outcome.status == "ok" and outcome.pixels.shape == (32, 32, channels)
    assert outcome.activation > outcome.activation_start
