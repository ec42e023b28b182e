"""Lucent 0.1.8 as the oracle: its FFT image + colour decorrelation, and its render_vis.

Lucent runs one image on the full network; featsweep runs a batch on a truncated network.
Over 5 steps (before rounding differences can grow, see DESIGN's chaos pitfall) the images must
agree to 1e-5; over 200 steps only their distributions over seeds can be compared.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

lucent_param = pytest.importorskip("lucent.optvis.param", reason="pip install --no-deps torch-lucent==0.1.8")
from lucent.optvis import render  # noqa: E402
from lucent.optvis.param.color import to_valid_rgb  # noqa: E402
from lucent.optvis.param.spatial import fft_image  # noqa: E402

from featsweep.engine import run_batch  # noqa: E402
from featsweep.metrics import image_stats  # noqa: E402
from featsweep.models import build_model  # noqa: E402
from featsweep.param import ImageParams, initial_params  # noqa: E402
from featsweep.spec import RunSpec, model_info  # noqa: E402

from _specs import make_spec  # noqa: E402

LUCENT_FFT = {"param.kind": "fft", "param.decorrelate": True, "param.squash": "sigmoid",
              "optimizer.name": "adam", "optimizer.lr": 0.05, "blur.kind": "none",
              "regularizer.clamp": False}


def spec(model: str = "tiny", layer: str = "block3", size: int = 32, **changes: Any) -> RunSpec:
    cfg: dict[str, Any] = {
        "model": {"name": model, "weights": "random" if model == "tiny" else "pretrained"},
        "target": {"layer": layer, "channel": 3, "relu": "post"},
        "optimizer": {"name": "adam", "lr": 0.05, "momentum": 0.0, "nesterov": False,
                      "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8},
        "regularizer": {"clamp": False, "clamp_range": [0.0, 1.0], "clamp_space": None},
        "blur": {"kind": "none", "k": 1, "sigma": None, "every": 1},
        "image": {"size": size, "space": "pixel"},
        "steps": 5, "seed": 0, "device": "cpu", "log_every": 1000,
    }
    return make_spec(cfg, **{**LUCENT_FFT, **changes})


def lucent_image(init: torch.Tensor, size: int, decay: float = 1.0,
                 decorrelate: bool = True) -> tuple[list[torch.Tensor], Any]:
    """Lucent's (params, image_f) for one FFT image, its spectrum set to `init`."""
    params, image_f = fft_image((1, 3, size, size), decay_power=decay)
    with torch.no_grad():
        params[0].copy_(init[None])
    return params, to_valid_rgb(image_f, decorrelate=decorrelate)


class TestFFTImage:
    @pytest.mark.parametrize("size, decay, decorrelate", [(32, 1.0, True), (33, 1.0, True),
                                                          (48, 1.5, True), (32, 0.5, False)])
    def test_equals_lucent(self, size: int, decay: float, decorrelate: bool) -> None:
        s = spec(size=size, seed=3, **{"param.decay": decay, "param.decorrelate": decorrelate})
        info = model_info(s.model)
        ours = ImageParams([s], 3, info.mean, info.std, torch.device("cpu"))
        init = ours.groups[0].tensor[0].clone()
        _, image_f = lucent_image(init, size, decay, decorrelate)
        torch.testing.assert_close(ours.image()[0], image_f()[0], rtol=0, atol=1e-6)

    def test_inverse_round_trip(self) -> None:
        """project() sets parameters whose image is the given image (the post-step clamp/blur)."""
        s = spec(size=33, **{"param.squash": "none"})
        info = model_info(s.model)
        params = ImageParams([s], 3, info.mean, info.std, torch.device("cpu"))
        g = params.groups[0]
        target = torch.rand(1, 3, 33, 33) * 0.5 + 0.25
        params.project(g, target, torch.ones(1, dtype=torch.bool))
        torch.testing.assert_close(params.image(), target, rtol=0, atol=1e-5)

    def test_start_is_seeded(self) -> None:
        a = initial_params(spec(seed=1), 3, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
        b = initial_params(spec(seed=1), 3, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
        assert torch.equal(a, b) and a.shape == (3, 32, 17, 2)


def lucent_render(s: RunSpec, steps: int) -> list[np.ndarray]:
    """Lucent's render_vis from featsweep's starting spectrum: the image after each step."""
    model = build_model(s.model)
    info = model_info(s.model)
    init = initial_params(s, 3, torch.tensor(info.mean).view(1, 3, 1, 1),
                          torch.tensor(info.std).view(1, 3, 1, 1))
    params, image_f = lucent_image(init, s.image.size, s.param.decay)
    layer = s.target.layer.replace(".", "_")  # Lucent joins module names with "_"
    images = render.render_vis(
        model, f"{layer}:{s.target.channel}", param_f=lambda: (params, image_f),
        optimizer=lambda p: torch.optim.Adam(p, lr=s.optimizer.lr), transforms=[],
        thresholds=tuple(range(1, steps + 1)), progress=False, show_image=False,
        fixed_image_size=s.image.size)
    return [img[0] for img in images]


class TestRenderVis:
    def test_first_five_steps_equal_lucent(self) -> None:
        """Same model, layer, channel and starting spectrum; fft + decorrelate + sigmoid, no
        transforms, Adam lr 0.05: featsweep's image equals render_vis's after each of 5 steps."""
        alive = {"target.channel": 12}  # channel 3 of block3 is a dead ReLU on the tiny network
        want = lucent_render(spec(steps=5, **alive), 5)
        assert np.abs(want[4] - want[0]).max() > 1e-3  # the image really moves
        for k in range(1, 6):
            (out,) = run_batch([spec(steps=k, **alive)], emit=lambda line: None)
            np.testing.assert_allclose(out.pixels, want[k - 1], rtol=0, atol=1e-5,
                                       err_msg=f"step {k}")

    @pytest.mark.slow
    def test_200_steps_agree_over_seeds(self) -> None:
        """Chaos rules out image equality at 200 steps; the mean final activation and hf_energy
        over 8 seeds agree within their seed-to-seed standard errors (featsweep batched B=8,
        Lucent one image at a time). The tiny network at 48 px keeps it CI-sized."""
        seeds = range(8)
        # block3 channel 12 is alive from the start (channel 3 is a dead ReLU on this network).
        kw = dict(model="tiny", layer="block3", size=48, steps=200, **{"target.channel": 12})
        ours = run_batch([spec(seed=i, **kw) for i in seeds], emit=lambda line: None)
        s0 = spec(**kw)
        model = build_model(s0.model)
        info = model_info(s0.model)
        mean = torch.tensor(info.mean).view(1, 3, 1, 1)
        std = torch.tensor(info.std).view(1, 3, 1, 1)
        theirs_act, theirs_hf = [], []
        for i in seeds:
            img = lucent_render(spec(seed=i, **kw), 200)[-1]
            x = (torch.from_numpy(img).permute(2, 0, 1)[None] - mean) / std
            feats = {}
            handle = dict(model.named_modules())[s0.target.layer].register_forward_hook(
                lambda m, inp, out: feats.setdefault("out", out))
            with torch.no_grad():
                model(x)
            handle.remove()
            theirs_act.append(float(feats["out"][0, s0.target.channel].mean()))
            theirs_hf.append(image_stats(np.clip(img, 0, 1))["hf_energy"])
        our_act = [o.activation for o in ours]
        our_hf = [image_stats(np.clip(o.pixels, 0, 1))["hf_energy"] for o in ours]
        for a, b in ((our_act, theirs_act), (our_hf, theirs_hf)):
            se = np.sqrt(np.var(a, ddof=1) / len(a) + np.var(b, ddof=1) / len(b))
            assert abs(np.mean(a) - np.mean(b)) <= 2 * se, (np.mean(a), np.mean(b), se)
        assert np.mean(our_act) > ours[0].activation_start  # and the objective did rise
