"""CUDA-only checks (skipped without a GPU; `benchmarks/gpu_check.sh` runs them on a lent one).

The GPU rounds differently from the CPU (cuDNN picks its algorithms, channels-last kernels), so
results are compared over a few steps only (DESIGN's chaos pitfall).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from featsweep.engine import run_batch
from featsweep.spec import RunSpec

from _specs import make_spec, tiny_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


BASE = tiny_config(
    target={"layer": "block3", "channel": 12, "relu": "pre"},
    optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
               "betas": [0.9, 0.999], "eps": 1e-8},
    blur={"kind": "box", "k": 3, "sigma": None, "every": 1},
    image={"size": 64, "space": "normalized"}, steps=3, device="cuda")


def spec(**changes: Any) -> RunSpec:
    return make_spec(BASE, **changes)


FFT = {"param.kind": "fft", "param.decorrelate": True, "param.squash": "sigmoid",
       "image.space": "pixel", "optimizer.name": "adam", "transform.jitter": 4,
       "transform.rotate": [-5.0, 5.0]}


def run(*specs: RunSpec) -> list:
    return run_batch(list(specs), emit=lambda line: None)


@pytest.mark.parametrize("changes", [{}, FFT], ids=["notes", "fft"])
def test_cuda_equals_cpu_over_three_steps(changes: dict) -> None:
    (gpu,) = run(spec(**changes))
    (cpu,) = run(spec(**changes, device="cpu"))
    assert gpu.device.startswith("cuda")
    np.testing.assert_allclose(gpu.pixels, cpu.pixels, rtol=0, atol=1e-4)


def test_batched_equals_alone_on_cuda() -> None:
    specs = [spec(), spec(**FFT, seed=1), spec(**{"target.relu": "post", "seed": 2})]
    together = run(*specs)
    for s, got in zip(specs, together):
        (alone,) = run(s)
        np.testing.assert_allclose(got.pixels, alone.pixels, rtol=0, atol=1e-4)


def test_bf16_runs_and_stays_close() -> None:
    (a,) = run(spec(steps=20))
    (b,) = run(spec(steps=20, precision="bf16"))
    assert b.status == "ok"
    assert abs(a.activation - b.activation) <= 0.05 * abs(a.activation) + 0.05


@pytest.mark.parametrize("engine", [{"engine.compile": True}, {"engine.cuda_graphs": True}],
                         ids=["compile", "cuda_graphs"])
def test_compiled_step_equals_eager_on_cuda(engine: dict) -> None:
    (a,) = run(spec(**FFT))
    (b,) = run(spec(**FFT, **engine))
    np.testing.assert_allclose(b.pixels, a.pixels, rtol=0, atol=1e-4)
