"""Tests for featsweep.engine: activation rises, batching changes nothing, divergence is local."""

from __future__ import annotations

import copy
import math
from typing import Any

import cv2
import numpy as np
import pytest
import torch

from featsweep.blur import batch_kernels, blur_batch
from featsweep.engine import JobOutcome, run_batch
from featsweep.errors import ConfigError
from featsweep.models import build_model
from featsweep.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, RunSpec, from_config

SIZE = 32  # tiny model, 32 px: milliseconds per step
MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
STD = np.array(IMAGENET_STD, dtype=np.float32)


def spec(**changes: Any) -> RunSpec:
    """A tiny-model RunSpec; dotted keys change the base config."""
    cfg: dict[str, Any] = {
        "model": {"name": "tiny", "weights": "random"},
        "target": {"layer": "block3", "channel": 3, "relu": "post"},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0, "nesterov": False,
                      "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
        "regularizer": {"clamp": True, "clamp_range": [0.0, 1.0], "clamp_space": None},
        "blur": {"kind": "box", "k": 1, "sigma": None, "every": 1},
        "image": {"size": SIZE, "space": "pixel"},
        "steps": 20, "seed": 0, "device": "cpu", "log_every": 10,
    }
    cfg = copy.deepcopy(cfg)
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return from_config(cfg)


def run(*specs: RunSpec, **kwargs: Any) -> list[JobOutcome]:
    return run_batch(list(specs), emit=lambda line: None, **kwargs)


def assert_same_outcome(a: JobOutcome, b: JobOutcome, atol: float = 1e-5) -> None:
    assert a.status == b.status
    assert a.steps_done == b.steps_done
    assert a.diverged_at == b.diverged_at
    np.testing.assert_allclose(a.optimized, b.optimized, rtol=0, atol=atol)
    np.testing.assert_allclose(a.before_blur, b.before_blur, rtol=0, atol=atol)
    np.testing.assert_allclose(a.pixels, b.pixels, rtol=0, atol=atol)
    np.testing.assert_allclose(a.trace, b.trace, rtol=1e-4, atol=atol)


def start_pixels(seed: int, size: int = SIZE) -> np.ndarray:
    """The documented start: torch.rand(3, H, W) from a generator seeded with `seed`, as H×W×3."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, size, size, generator=g).permute(1, 2, 0).numpy()


# A config that provably diverges: SGD with lr·wd = 1e4 and no clamp multiplies the image by
# (1 - lr·wd) ≈ -1e4 every step, so |x| ~ 0.5·1e4^t overflows float32 (3.4e38) at t = 10.
DIVERGING = {"optimizer.lr": 1000.0, "optimizer.weight_decay": 10.0, "regularizer.clamp": False}


class TestObjectiveRises:
    def test_activation_rises(self) -> None:
        (out,) = run(spec(**{"optimizer.name": "adam", "steps": 40}))
        assert out.status == "ok"
        assert out.activation > out.activation_start + 0.3
        assert out.activation > 5 * abs(out.activation_start)
        acts = out.trace[:, 1]
        assert acts[-1] == pytest.approx(out.activation)
        assert np.mean(np.diff(acts) > 0) > 0.9  # rises almost every step

    # The tiny net is random: its channels like pixel noise, so blur lowers them at first, and a
    # post-ReLU channel whose map goes all-zero has no gradient left (SGD then stays stuck).
    # Pre-ReLU targets keep a gradient, so these settings show the rise within 20-40 steps.
    @pytest.mark.parametrize("changes, margin", [
        ({"optimizer.momentum": 0.9, "optimizer.lr": 1.0, "target.relu": "pre"}, 0.1),
        ({"target.relu": "pre", "target.layer": "block2", "target.channel": 5,
          "optimizer.name": "adam"}, 1.0),
        ({"image.space": "normalized", "optimizer.name": "adam", "target.relu": "pre"}, 0.08),
        ({"optimizer.name": "adam", "blur.kind": "gaussian", "blur.k": 5, "blur.sigma": 1.0,
          "target.relu": "pre", "steps": 40}, 0.04),
    ], ids=["sgd-momentum-pre", "adam-block2-pre", "normalized", "adam-gaussian"])
    def test_activation_rises_for_each_setting(self, changes: dict[str, Any],
                                               margin: float) -> None:
        (out,) = run(spec(**changes))
        assert out.status == "ok"
        assert out.activation > out.activation_start + margin

    def test_smoke_outcome_fields(self) -> None:
        lines: list[str] = []
        (out,) = run_batch([spec(steps=20, log_every=10)], emit=lines.append)
        assert out.optimized.shape == out.before_blur.shape == out.pixels.shape == (SIZE, SIZE, 3)
        assert out.optimized.dtype == out.pixels.dtype == np.float32
        assert out.device == "cpu"
        assert out.info["layer"] == "block3" and out.info["batch_size"] == 1
        assert out.seconds > 0
        assert any("step 10/20" in line and "ETA" in line for line in lines)
        assert any("step 20/20" in line for line in lines)


class TestEqualsPlainLoop:
    """The engine == a plain torch.optim loop written out here (hook, optimizer, clamp, cv2)."""

    @staticmethod
    def reference(s: RunSpec) -> np.ndarray:
        model = build_model(ModelSpec("tiny", "random"))
        captured = {}
        module = dict(model.named_modules())[s.target.layer]
        module.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o))
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        x0 = torch.from_numpy(start_pixels(s.seed)).permute(2, 0, 1)[None].clone()
        normalized = s.image.space == "normalized"
        x = ((x0 - mean) / std if normalized else x0).requires_grad_(True)
        o = s.optimizer
        opt = (torch.optim.SGD([x], lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay) if o.name == "sgd" else
               torch.optim.Adam([x], lr=o.lr, betas=o.betas, eps=o.eps,
                                weight_decay=o.weight_decay))
        for _ in range(s.steps):
            opt.zero_grad()
            model(x if normalized else (x - mean) / std)
            (-captured["out"][0, s.target.channel].mean()).backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(*s.regularizer.clamp_range)
                if s.blur.k > 1:
                    img = np.ascontiguousarray(x[0].permute(1, 2, 0).numpy())
                    img = cv2.blur(img, (s.blur.k, s.blur.k), borderType=cv2.BORDER_REFLECT_101)
                    x.copy_(torch.from_numpy(img).permute(2, 0, 1)[None])
        return x.detach()[0].permute(1, 2, 0).numpy()

    @pytest.mark.parametrize("changes", [
        {"optimizer.momentum": 0.9, "optimizer.nesterov": True, "optimizer.weight_decay": 0.01,
         "blur.k": 3},
        {"optimizer.name": "adam", "optimizer.weight_decay": 0.01, "blur.k": 5,
         "image.space": "normalized", "optimizer.lr": 0.02},
    ], ids=["sgd-pixel", "adam-normalized"])
    def test_engine_equals_reference_loop(self, changes: dict[str, Any]) -> None:
        s = spec(steps=15, **changes)
        (out,) = run(s)
        np.testing.assert_allclose(out.optimized, self.reference(s), rtol=0, atol=1e-4)


MIXED = [
    {"optimizer.name": "adam", "steps": 20},
    {"optimizer.momentum": 0.9, "blur.k": 3, "steps": 12, "target.channel": 10},
    {"optimizer.momentum": 0.99, "optimizer.nesterov": True, "optimizer.weight_decay": 0.1,
     "blur.k": 5, "steps": 7, "target.relu": "pre"},
    {"target.layer": "block2", "target.channel": 31, "blur.kind": "gaussian", "blur.k": 7,
     "steps": 16, "seed": 3},
    {"target.layer": "block1", "target.relu": "pre", "optimizer.name": "adam",
     "optimizer.betas": [0.5, 0.9], "blur.every": 3, "blur.k": 3, "steps": 15, "seed": 1},
    {"regularizer.clamp": False, "optimizer.lr": 0.5, "steps": 9},
    {"regularizer.clamp_space": "normalized", "regularizer.clamp_range": [-1.0, 1.0], "steps": 11},
]


class TestBatching:
    def test_batched_equals_per_image(self) -> None:
        """A run's outcome does not depend on which other jobs share its batch."""
        specs = [spec(**c) for c in MIXED]
        together = run(*specs)
        for s, got in zip(specs, together):
            (alone,) = run(s)
            assert got.status == "ok"
            assert got.steps_done == s.steps  # each snapshotted at its own step
            assert got.trace.shape == (s.steps + 1, 2)
            assert_same_outcome(got, alone)
            assert got.info["batch_size"] == len(specs) and alone.info["batch_size"] == 1

    def test_order_within_batch_does_not_matter(self) -> None:
        specs = [spec(**c) for c in MIXED[:4]]
        forward = run(*specs)
        backward = run(*reversed(specs))[::-1]
        for a, b in zip(forward, backward):
            assert_same_outcome(a, b)

    def test_same_spec_twice_is_bit_identical(self) -> None:
        s = spec(**MIXED[1])
        (a,), (b,) = run(s), run(s)
        assert np.array_equal(a.optimized, b.optimized)
        assert np.array_equal(a.before_blur, b.before_blur)
        assert np.array_equal(a.trace, b.trace)
        assert a.activation == b.activation

    def test_two_identical_jobs_in_one_batch(self) -> None:
        a, b = run(spec(**MIXED[0]), spec(**MIXED[0]))
        assert np.array_equal(a.optimized, b.optimized)

    def test_batch_key_mismatch_is_rejected(self) -> None:
        with pytest.raises(ValueError, match="share a batch key"):
            run(spec(), spec(**{"image.size": 48}))

    def test_empty_batch(self) -> None:
        assert run_batch([]) == []


class TestStart:
    def test_same_seed_same_start(self) -> None:
        a, b, c = run(spec(steps=1), spec(steps=1, **{"optimizer.name": "adam"}),
                      spec(steps=1, seed=5))
        assert a.activation_start == b.activation_start
        assert a.activation_start != c.activation_start

    def test_start_is_seeded_uniform_noise(self) -> None:
        """With a negligible step and no clamp the image is still the documented start."""
        (out,) = run(spec(steps=1, **{"optimizer.lr": 1e-12, "regularizer.clamp": False}))
        np.testing.assert_allclose(out.pixels, start_pixels(0), rtol=0, atol=1e-6)


class TestDivergence:
    def test_config_diverges_alone(self) -> None:
        """Proof that DIVERGING really produces inf/nan: alone, it diverges at step 10."""
        (out,) = run(spec(**DIVERGING))
        assert out.status == "diverged"
        assert out.diverged_at == 10
        assert out.steps_done == 10
        assert not np.isfinite(out.trace[-1, 1])
        assert np.all(np.isfinite(out.trace[:-1, 1]))
        assert out.activation is not None and math.isfinite(out.activation)  # last finite value
        assert out.activation == out.trace[-2, 1]

    def test_divergence_in_the_last_update(self) -> None:
        (out,) = run(spec(steps=10, **DIVERGING))
        assert not np.all(np.isfinite(out.pixels))  # the image really overflowed
        assert out.status == "diverged"
        assert out.diverged_at == 10

    def test_diverging_image_does_not_affect_others(self) -> None:
        others = [spec(**MIXED[0]), spec(**MIXED[1]), spec(**MIXED[3])]
        bad = spec(**DIVERGING)
        together = run(others[0], bad, others[1], others[2])
        assert [o.status for o in together] == ["ok", "diverged", "ok", "ok"]
        assert together[1].diverged_at == 10
        for s, got in zip(others, [together[0], together[2], together[3]]):
            (alone,) = run(s)
            assert_same_outcome(got, alone)


class TestInterrupt:
    def test_should_stop_gives_interrupted(self) -> None:
        polls = []

        def should_stop() -> bool:
            polls.append(1)
            return len(polls) > 5  # true at the 6th poll: 5 steps done

        a, b = run(spec(steps=20), spec(steps=3, seed=1), should_stop=should_stop)
        assert a.status == "interrupted" and a.steps_done == 5
        assert a.trace.shape == (6, 2)
        assert b.status == "ok" and b.steps_done == 3  # it had finished before the stop

    def test_interrupted_image_equals_shorter_run(self) -> None:
        calls = iter(range(100))
        (a,) = run(spec(steps=20), should_stop=lambda: next(calls) >= 5)
        (b,) = run(spec(steps=5))
        np.testing.assert_array_equal(a.optimized, b.optimized)


class TestTrace:
    def test_trace_rows(self) -> None:
        (out,) = run(spec(steps=13))
        assert out.trace.shape == (14, 2)
        assert np.array_equal(out.trace[:, 0], np.arange(14))
        assert out.trace[0, 1] == out.activation_start
        assert out.trace[-1, 1] == out.activation
        assert np.all(np.isfinite(out.trace))


class TestClampAndBlur:
    def test_normalized_space_clamp_the_notes_way(self) -> None:
        """The notes optimize normalize(rand) and clamp that tensor to [0, 1] every step."""
        for blur in (1, 3):
            (out,) = run(spec(**{"image.space": "normalized", "optimizer.lr": 0.5, "blur.k": blur,
                                 "regularizer.clamp_space": "normalized"}))
            assert out.optimized.min() >= 0.0 and out.optimized.max() <= 1.0
            assert out.optimized.min() == 0.0 or out.optimized.max() == 1.0 or blur > 1
            np.testing.assert_allclose(out.pixels, out.optimized * STD + MEAN, rtol=0, atol=1e-6)
            # so in pixel space the image lies in [mean, mean + std] per channel
            assert np.all(out.pixels >= MEAN - 1e-6) and np.all(out.pixels <= MEAN + STD + 1e-6)

    def test_pixel_space_clamp(self) -> None:
        (out,) = run(spec(**{"optimizer.lr": 0.5}))
        assert out.pixels.min() >= 0.0 and out.pixels.max() <= 1.0
        assert np.array_equal(out.pixels, out.optimized)

    def test_clamp_in_other_space(self) -> None:
        """Optimize pixels, clamp the normalized tensor to [0, 1]."""
        (out,) = run(spec(**{"regularizer.clamp_space": "normalized", "optimizer.lr": 0.5}))
        normalized = (out.pixels - MEAN) / STD
        assert normalized.min() >= -1e-5 and normalized.max() <= 1 + 1e-5

    def test_no_clamp_leaves_range(self) -> None:
        (out,) = run(spec(**{"regularizer.clamp": False, "optimizer.lr": 5.0}))
        assert out.pixels.min() < 0.0 or out.pixels.max() > 1.0

    @pytest.mark.parametrize("kind, k, sigma", [("box", 3, None), ("gaussian", 5, 1.2)])
    def test_before_blur_is_kept(self, kind: str, k: int, sigma: float | None) -> None:
        (out,) = run(spec(**{"blur.kind": kind, "blur.k": k, "blur.sigma": sigma}))
        blur = spec(**{"blur.kind": kind, "blur.k": k, "blur.sigma": sigma}).blur
        kernels = batch_kernels([blur])
        before = torch.from_numpy(out.before_blur).permute(2, 0, 1)[None]
        blurred = blur_batch(before, kernels)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(out.optimized, blurred, rtol=0, atol=1e-6)
        assert not np.allclose(out.optimized, out.before_blur)

    def test_no_blur_before_blur_equals_image(self) -> None:
        a, b = run(spec(), spec(**{"blur.k": 3}))
        assert np.array_equal(a.before_blur, a.optimized)

    def test_blur_every(self) -> None:
        """blur.every=4 with 10 steps: the last blur was at step 8, so two plain steps follow."""
        (every4,) = run(spec(steps=10, **{"blur.k": 5, "blur.every": 4}))
        (every1,) = run(spec(steps=10, **{"blur.k": 5}))
        assert not np.allclose(every4.optimized, every4.before_blur)
        assert not np.allclose(every4.optimized, every1.optimized)
        (eight,) = run(spec(steps=8, **{"blur.k": 5, "blur.every": 4}))
        np.testing.assert_array_equal(every4.before_blur, eight.before_blur)


class TestErrors:
    def test_bf16_on_the_cpu_is_a_config_error(self) -> None:
        from featsweep.engine import validate

        with pytest.raises(ConfigError, match=r"precision='bf16'.*CUDA only"):
            validate([spec(precision="bf16")])

    def test_validate_rejects_pre_without_relu(self) -> None:
        from featsweep.engine import validate

        with pytest.raises(ConfigError, match=r"target\.relu='pre'.*block3\.0"):
            validate([spec(**{"target.layer": "block3.0", "target.relu": "pre"})])

    def test_pre_without_relu_fails_before_any_step(self) -> None:
        polls = []
        with pytest.raises(ConfigError, match=r"target\.relu='pre'.*block3\.0"):
            run(spec(**{"target.layer": "block3.0", "target.relu": "pre"}),
                should_stop=lambda: polls.append(1) and False)
        assert len(polls) <= 1  # found in the first forward at the latest

    def test_bad_layer_is_caught_before_optimizing(self) -> None:
        with pytest.raises(ConfigError, match="close names: block3"):
            run(spec(**{"target.layer": "block33"}))

    def test_bad_channel(self) -> None:
        with pytest.raises(ConfigError, match="block2 has 32 channels"):
            run(spec(**{"target.layer": "block2", "target.channel": 32}))



class TestRerunFiles:
    def test_failure_clears_a_previous_runs_files(self, tmp_path) -> None:
        """A job that fails on a rerun must not keep the earlier run's images or ok result."""
        from featsweep.artifacts import FILES, read_result, write_failure, write_job

        (outcome,) = run(spec(steps=3))
        write_job(tmp_path, outcome)
        assert all((tmp_path / name).is_file() for name in FILES)
        write_failure(tmp_path, "RuntimeError: boom")
        assert read_result(tmp_path)["status"] == "failed"
        assert [name for name in FILES if (tmp_path / name).exists()] == ["result.json"]
