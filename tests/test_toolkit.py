"""The toolkit's components against independent references, and the engine built from them.

Transforms against Kornia/torch calls written out here; penalties and objectives against their
formulas on the layer output; the redirected ReLU against a hand-written reference; the engine:
batched == alone for a batch mixing parameterizations, transforms and penalties (over 5 steps,
where rounding has not grown), diversity, blur inside the forward, and the dead-channel case.
"""

from __future__ import annotations

import math
from typing import Any

import kornia.geometry.transform as KT
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featsweep import penalties, transforms
from featsweep.blur import batch_kernels, blur_batch
from featsweep.engine import JobOutcome, run_batch
from featsweep.errors import ConfigError
from featsweep.models import build_model
from featsweep.objectives import Objectives, diversity_terms, gram
from featsweep.redirect import redirected_relu, redirecting
from featsweep.spec import RunSpec, from_config
from featsweep.targets import LayerReader, probe_layers

from _specs import make_spec, tiny_config

SIZE = 32


BASE = tiny_config(optimizer={"name": "adam", "lr": 0.05, "momentum": 0.0, "nesterov": False,
                                "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8})


def spec(**changes: Any) -> RunSpec:
    return make_spec(BASE, **changes)


def run(*specs: RunSpec, **kwargs: Any) -> list[JobOutcome]:
    return run_batch(list(specs), emit=lambda line: None, **kwargs)


STANDARD = {"transform.pad": 4, "transform.jitter": 4, "transform.scale": [0.9, 1.0, 1.1],
            "transform.rotate": [-10.0, 0.0, 10.0], "transform.jitter_final": 2}
FFT = {"param.kind": "fft", "param.decorrelate": True, "param.squash": "sigmoid"}


# ------------------------------------------------------------------------------------ transforms
class TestTransforms:
    def images(self, n: int = 2, size: int = 24) -> torch.Tensor:
        return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))

    def one(self, draws: tuple[float, ...], x: torch.Tensor, jitter: int = 0,
            crop: int = 0) -> torch.Tensor:
        m = transforms.affine_matrices(torch.tensor([draws] * x.shape[0]), *x.shape[-2:], jitter)
        h, w = x.shape[-2:]
        return KT.warp_affine(x, m, dsize=(h - crop, w - crop), align_corners=True)

    def test_jitter_is_lucents_random_crop(self) -> None:
        """Lucent's jitter(d): x[..., dy:dy + H - d, dx:dx + W - d] (integer offsets, exact)."""
        x = self.images()
        got = self.one((3, 2, 1.0, 0.0, 0, 0), x, jitter=4, crop=4)
        torch.testing.assert_close(got, x[..., 2:2 + 20, 3:3 + 20], rtol=0, atol=1e-5)
        # The final jitter crops again, from the first crop's image.
        both = self.one((3, 2, 1.0, 0.0, 1, 0), x, jitter=4, crop=6)
        torch.testing.assert_close(both, x[..., 2:2 + 18, 4:4 + 18], rtol=0, atol=1e-5)

    def test_rotate_is_kornia_rotate(self) -> None:
        x = self.images()
        got = self.one((0, 0, 1.0, 10.0, 0, 0), x)
        want = KT.rotate(x, torch.tensor([10.0, 10.0]), align_corners=True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    def test_scale_is_kornia_scale(self) -> None:
        x = self.images()
        got = self.one((0, 0, 1.1, 0.0, 0, 0), x)
        want = KT.scale(x, torch.tensor([[1.1, 1.1]] * 2), align_corners=True)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)

    def test_composition_order(self) -> None:
        """One warp = crop, then scale and rotate about the cropped image's centre, then crop."""
        m = transforms.affine_matrices(torch.tensor([[2.0, 1.0, 1.1, 10.0, 3.0, 0.0]]), 24, 24,
                                       jitter=4)[0]
        c = torch.tensor([9.5, 9.5])  # centre of the 20 x 20 first crop
        point = torch.tensor([5.0, 7.0])
        a = math.radians(10.0)
        rot = 1.1 * torch.tensor([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
        want = rot @ (point - torch.tensor([2.0, 1.0]) - c) + c - torch.tensor([3.0, 0.0])
        torch.testing.assert_close(m[:, :2] @ point + m[:, 2], want, rtol=0, atol=1e-5)

    def test_whole_transform_is_lucents_pipeline_written_out(self) -> None:
        """pad -> crop -> rotate (Kornia's, about the crop's centre) -> crop, as Lucent chains
        them, equals the one warp (scale 1: Lucent resizes for scale, see the module)."""
        t = spec(**{**STANDARD, "transform.scale": [1.0]}).transform
        rt = transforms.RandomTransforms([spec(seed=3, **{**STANDARD, "transform.scale": [1.0]})],
                                         torch.device("cpu"))
        x = self.images(1, SIZE)
        for step in (0, 7, 70):
            dx1, dy1, _, angle, dx2, dy2 = (int(v) if i != 3 else v for i, v in
                                            enumerate(transforms.draw(t, 3, step)))
            padded = F.pad(x - 0.5, [t.pad] * 4) + 0.5
            n1 = padded.shape[-1] - t.jitter
            first = padded[..., dy1:dy1 + n1, dx1:dx1 + n1]
            turned = KT.rotate(first, torch.tensor([angle]), align_corners=True)
            n2 = n1 - t.jitter_final
            want = turned[..., dy2:dy2 + n2, dx2:dx2 + n2]
            # Where the rotation reads outside the first crop, Lucent's chain reads zeros and the
            # one warp reads the padded image beyond it: compare where the source is inside.
            inside = KT.rotate(torch.ones_like(first), torch.tensor([angle]),
                               align_corners=True)[..., dy2:dy2 + n2, dx2:dx2 + n2] > 1 - 1e-6
            got = rt.apply(rt.groups[0], x, step)
            assert got.shape[-1] == SIZE + 2 * t.pad - t.crop == t.model_size(SIZE)
            assert inside.float().mean() > 0.9
            torch.testing.assert_close(got[inside], want[inside], rtol=0, atol=1e-5)

    @pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
    def test_pad_is_torch_pad(self, mode: str) -> None:
        x = self.images()
        value = torch.tensor([0.5, 0.25]).view(2, 1, 1, 1)
        got = transforms.pad_images(x, 3, mode, value)
        if mode == "constant":
            want = torch.stack([F.pad(x[i], [3] * 4, value=float(value[i])) for i in range(2)])
        else:
            want = F.pad(x, [3] * 4, mode=mode)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    def test_draws_are_lucents_and_seeded(self) -> None:
        t = spec(**STANDARD).transform
        draws = np.array([transforms.draw(t, 0, step) for step in range(200)])
        assert set(draws[:, 0]) == set(range(4)) and set(draws[:, 4]) == {0, 1}
        assert set(draws[:, 2]) == {0.9, 1.0, 1.1} and set(draws[:, 3]) == {-10.0, 0.0, 10.0}
        assert transforms.draw(t, 0, 77) == transforms.draw(t, 0, 77)
        assert not np.array_equal(draws, [transforms.draw(t, 1, s) for s in range(200)])

    def test_random_transforms_per_image(self) -> None:
        """Each image gets its own draws, independent of its batch-mates."""
        specs = [spec(seed=0, **STANDARD), spec(seed=1, **STANDARD), spec()]
        rt = transforms.RandomTransforms(specs, torch.device("cpu"))
        alone = transforms.RandomTransforms(specs[1:2], torch.device("cpu"))
        x = self.images(3, SIZE)
        padded = next(g for g in rt.groups if g.pad == 4)
        got = rt.apply(padded, x[:2], step=5)
        want = alone.apply(alone.groups[0], x[1:2], step=5)
        torch.testing.assert_close(got[1:2], want, rtol=0, atol=1e-6)
        assert got.shape[-1] == SIZE + 8 - 6  # pad 4 each side, crops 4 + 2
        plain = next(g for g in rt.groups if g.pad == 0)
        last = x[2:]
        assert not plain.transformed and rt.apply(plain, last, 5) is last


# ------------------------------------------------------------------------------------ penalties
class TestPenalties:
    def test_formulas(self) -> None:
        x = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(1))
        a = x.numpy().astype(np.float64)
        np.testing.assert_allclose(penalties.l1(x), np.abs(a - 0.5).reshape(2, -1).mean(1), rtol=1e-6)
        np.testing.assert_allclose(penalties.l2(x), ((a - 0.5) ** 2).reshape(2, -1).mean(1), rtol=1e-6)
        tv = (np.abs(np.diff(a, axis=2)).reshape(2, -1).mean(1)
              + np.abs(np.diff(a, axis=3)).reshape(2, -1).mean(1))
        np.testing.assert_allclose(penalties.tv(x), tv, rtol=1e-6)

    def test_blur_penalty_is_lucents(self) -> None:
        lucent = pytest.importorskip("lucent.optvis.objectives",
                                     reason="pip install --no-deps torch-lucent==0.1.8")
        _torch_blur = lucent._torch_blur

        x = torch.rand(1, 3, 10, 10, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(penalties.blur3(x), _torch_blur(x), rtol=0, atol=1e-6)
        want = 0.5 * (x - _torch_blur(x)).square().mean()
        torch.testing.assert_close(penalties.blur(x), want.view(1), rtol=1e-6, atol=0)

    def test_known_answers(self) -> None:
        grey = torch.full((1, 3, 8, 8), 0.5)
        assert all(float(f(grey)) == 0.0 for f in (penalties.l1, penalties.l2, penalties.tv))
        checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2
        x = checker.float().expand(1, 3, 8, 8)
        assert float(penalties.tv(x)) == pytest.approx(2.0)  # every neighbour differs by 1

    def test_weights_per_image(self) -> None:
        p = penalties.Penalties([spec(**{"regularizer.tv": 0.5}), spec()], torch.device("cpu"))
        x = torch.rand(2, 3, 8, 8)
        got = p(x)
        assert float(got[1]) == 0.0
        torch.testing.assert_close(got[0], 0.5 * penalties.tv(x)[0])


# ----------------------------------------------------------------------------------- objectives
class TestObjectives:
    @pytest.fixture(scope="class")
    def tiny(self) -> tuple[torch.nn.Module, list[str]]:
        model = build_model(spec().model)
        return model, [i.name for i in probe_layers(model, 32)]

    def feats(self, tiny: Any, n: int = 3) -> torch.Tensor:
        model, order = tiny
        x = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            return LayerReader(model, [("block3", "pre")], order)(x)[("block3", "pre")]

    def test_each_kind_equals_direct_computation(self, tiny: Any, tmp_path: Any) -> None:
        f = self.feats(tiny)
        vec = np.random.default_rng(0).normal(size=64).astype(np.float32)
        np.save(tmp_path / "d.npy", vec)
        specs = [spec(**{"target.relu": "pre", "target.channel": 5}),
                 spec(**{"target.relu": "pre", "target.kind": "neuron", "target.channel": 9,
                         "target.x": 2, "target.y": 6}),
                 spec(**{"target.relu": "pre", "target.kind": "direction",
                         "target.direction": str(tmp_path / "d.npy")})]
        d = torch.from_numpy(vec)
        got = Objectives(specs, [0, 1, 2], torch.device("cpu"), {2: d})({("block3", "pre"): f})
        cos = (f[2] * d[:, None, None]).sum(0) / (f[2].norm(dim=0) * d.norm())
        want = torch.stack([f[0, 5].mean(), f[1, 9, 6, 2], cos.mean()])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    def test_neuron_default_is_the_centre_and_deepdream(self, tiny: Any) -> None:
        f = self.feats(tiny, 2)
        specs = [spec(**{"target.relu": "pre", "target.kind": "neuron", "target.channel": 1}),
                 spec(**{"target.relu": "pre", "target.kind": "deepdream"})]
        got = Objectives(specs, [0, 1], torch.device("cpu"), {})({("block3", "pre"): f})
        h, w = f.shape[-2:]
        torch.testing.assert_close(got, torch.stack([f[0, 1, h // 2, w // 2], f[1].square().mean()]))

    def test_diversity_terms(self) -> None:
        f = torch.randn(4, 5, 3, 3)
        g = gram(f)
        torch.testing.assert_close(g.flatten(1).norm(dim=1), torch.ones(4))
        groups = torch.tensor([0, 0, 0, -1])
        terms = diversity_terms(g, groups)
        want0 = ((g[0] * g[1]).sum() + (g[0] * g[2]).sum()) / 3
        torch.testing.assert_close(terms[0], want0)
        assert float(terms[3]) == 0.0


# ------------------------------------------------------------------------------- redirected ReLU
class TestRedirectedReLU:
    def reference(self, x: torch.Tensor, grad: torch.Tensor, upper: float = math.inf) -> torch.Tensor:
        """Lucid's rule written out element by element (numpy)."""
        xs, gs = x.numpy(), grad.numpy()
        out = np.zeros_like(gs)
        for b in range(xs.shape[0]):
            ordinary = np.where((xs[b] > 0) & (xs[b] < upper), gs[b], 0.0)
            if np.any(ordinary != 0):
                out[b] = ordinary
                continue
            for idx in np.ndindex(xs[b].shape):
                v, g = xs[b][idx], gs[b][idx]
                out[b][idx] = 0.0 if (v <= 0 and g > 0) or (v >= upper and g < 0) else g
        return torch.from_numpy(out)

    @pytest.mark.parametrize("upper", [math.inf, 6.0])
    def test_gradient_equals_reference(self, upper: float) -> None:
        x = torch.tensor([[[-1.0, -2.0], [-0.5, -3.0]],      # all off: redirected
                          [[1.0, -2.0], [0.5, -3.0]],        # some on: ordinary
                          [[7.0, 8.0], [-1.0, -0.5]]])       # relu6: all outside 0..6
        grad = torch.tensor([[[-1.0, 1.0], [-2.0, 0.5]],
                             [[-1.0, -1.0], [1.0, -1.0]],
                             [[1.0, -1.0], [-1.0, 2.0]]])
        xr = x.clone().requires_grad_(True)
        mask = torch.ones(3, dtype=torch.bool)
        y = redirected_relu(xr, mask, upper)
        torch.testing.assert_close(y, x.clamp(0, upper))
        y.backward(grad)
        torch.testing.assert_close(xr.grad, self.reference(x, grad, upper))

    def test_mask_off_is_the_ordinary_gradient(self) -> None:
        x = torch.tensor([[-1.0, -2.0]], requires_grad=True)
        redirected_relu(x, torch.zeros(1, dtype=torch.bool)).backward(torch.tensor([[-1.0, -1.0]]))
        assert float(x.grad.abs().sum()) == 0.0

    def test_mode_reaches_module_and_functional_relus(self) -> None:
        net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=True), torch.nn.ReLU(inplace=True),
                                  torch.nn.ReLU6())
        with torch.no_grad():
            net[0].weight.fill_(1.0)
            net[0].bias.fill_(-100.0)  # every unit dead
        x = torch.rand(2, 1, 4, 4, requires_grad=True)
        net(x).sum().backward()
        assert float(x.grad.abs().sum()) == 0.0
        x.grad = None
        with redirecting(torch.tensor([True, False])):
            out = net(x)
            out = out + F.relu(out)  # a functional call too
        (-out.sum()).backward()
        assert float(x.grad[0].abs().sum()) > 0 and float(x.grad[1].abs().sum()) == 0.0
        torch.testing.assert_close(out, 2 * net(x))  # the forward is unchanged

    @pytest.mark.slow
    def test_dead_channel_moves_only_with_redirect(self) -> None:
        """Pretrained default, _blocks.10._bn1 channel 7 post-ReLU6, 96 px, Adam lr 0.05, no
        blur, 150 steps: the activation stays exactly 0 without redirect and rises with it."""
        kw = {"model.name": "efficientnet_lite0", "model.weights": "pretrained",
              "target.layer": "_blocks.10._bn1", "target.channel": 7, "image.size": 96,
              "steps": 150}
        plain, redirect = run(spec(**kw), spec(**kw, **{"target.relu_gradient": "redirect"}))
        assert plain.activation_start == 0.0 and plain.activation == 0.0
        assert np.all(plain.trace[:, 1] == 0.0)
        assert redirect.activation > 0.5

    def test_redirect_steps_stop_redirecting(self) -> None:
        """redirect_steps=2: the first 2 updates are the redirected ones, later ones are not."""
        dead = {"target.channel": 3, **FFT}  # a dead ReLU channel of the tiny network
        redirect = {"target.relu_gradient": "redirect"}
        first_two = {**redirect, "target.redirect_steps": 2}
        plain, b2, c2, b4, c4 = run(spec(**dead, steps=4), spec(**dead, **redirect, steps=2),
                                    spec(**dead, **first_two, steps=2),
                                    spec(**dead, **redirect, steps=4),
                                    spec(**dead, **first_two, steps=4))
        # a dead channel without redirect never moves its image (compared run alone against run
        # alone: the FFT's rounding depends on the batch size on some CPUs, this Intel Xeon one)
        assert plain.activation == 0.0
        assert np.array_equal(run(spec(**dead, steps=4))[0].pixels, run(spec(**dead, steps=1))[0].pixels)
        assert np.array_equal(b2.pixels, c2.pixels)
        assert not np.array_equal(b4.pixels, c4.pixels)
        assert not np.array_equal(c4.pixels, plain.pixels)


# --------------------------------------------------------------------------------------- engine
MIXED = [
    {},
    {**FFT},
    {**FFT, **STANDARD, "seed": 1},
    {**STANDARD, "regularizer.tv": 0.05, "seed": 2},
    {"param.squash": "sigmoid", "param.decorrelate": True, "regularizer.l1": 0.1,
     "regularizer.blur": 0.5, "seed": 3},
    {**FFT, "param.squash": "none", "param.decay": 1.5, "regularizer.l2": 0.1, "seed": 4},
    {"image.space": "normalized", "blur.kind": "box", "blur.k": 3, "target.kind": "neuron"},
    {**FFT, "blur.kind": "gaussian", "blur.k": 3, "blur.mode": "transform",
     "target.kind": "deepdream", "seed": 5},
    {"optimizer.name": "sgd", "optimizer.momentum": 0.9, "transform.jitter": 3,
     "transform.pad": 2, "transform.pad_mode": "reflect", "seed": 6},
]


class TestEngine:
    def test_batched_equals_alone(self) -> None:
        """A batch mixing pixel and FFT parameters, random transforms, penalties and objectives:
        each image equals its run alone (5 steps, where rounding has not grown)."""
        specs = [spec(**c) for c in MIXED]
        together = run(*specs)
        assert together[0].info["forwards_per_step"] == 3  # pads 0, 2 and 4
        for c, s, got in zip(MIXED, specs, together):
            (alone,) = run(s)
            assert got.status == alone.status == "ok", c
            np.testing.assert_allclose(got.pixels, alone.pixels, rtol=0, atol=1e-5, err_msg=str(c))
            np.testing.assert_allclose(got.trace, alone.trace, rtol=1e-4, atol=1e-5)

    def test_every_setting_raises_its_objective(self) -> None:
        specs = [spec(**{**c, "steps": 25}) for c in MIXED]
        for c, out in zip(MIXED, run(*specs)):
            assert out.activation > out.activation_start, c

    def test_weight_decay_acts_on_the_parameters(self) -> None:
        """With a sigmoid, decay pulls the parameters to 0, i.e. the image toward mid-grey."""
        base = {**FFT, "optimizer.name": "sgd", "optimizer.lr": 0.5, "steps": 30, "target.channel": 3}
        (out,) = run(spec(**base, **{"optimizer.weight_decay": 1.0}))  # params x 0.5 per step
        assert abs(float(out.pixels.mean()) - 0.5) < 0.02

    def test_sigmoid_clamp_is_resolved_and_recorded(self) -> None:
        (a,), (b,) = run(spec(**FFT)), run(spec(**FFT, **{"regularizer.clamp": False}))
        assert a.info["clamp"].startswith("not applied: param.squash=sigmoid")
        assert np.array_equal(a.pixels, b.pixels)

    def test_fft_clamp_projects_the_image(self) -> None:
        unsquashed = {**FFT, "param.squash": "none", "param.init_sd": 0.5, "optimizer.lr": 0.5}
        (clamped,) = run(spec(**unsquashed))
        (free,) = run(spec(**unsquashed, **{"regularizer.clamp": False}))
        assert free.pixels.min() < -0.01 or free.pixels.max() > 1.01
        assert clamped.pixels.min() >= -1e-5 and clamped.pixels.max() <= 1 + 1e-5
        assert clamped.info["clamp"].startswith("the image")

    def test_blur_inside_the_forward_is_differentiated(self) -> None:
        """blur.mode=transform: one SGD step equals x + lr * d act(blur(x)) / dx, computed here."""
        s = spec(**{"optimizer.name": "sgd", "optimizer.lr": 1.0, "blur.kind": "box", "blur.k": 3,
                    "blur.mode": "transform", "regularizer.clamp": False, "steps": 1})
        (out,) = run(s)
        model = build_model(s.model)
        order = [i.name for i in probe_layers(model, 32)]
        g = torch.Generator().manual_seed(0)
        x = torch.rand(1, 3, SIZE, SIZE, generator=g).requires_grad_(True)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        blurred = blur_batch(x, batch_kernels([s.blur]))
        act = LayerReader(model, [("block3", "post")], order)((blurred - mean) / std)
        act[("block3", "post")][0, 12].mean().backward()
        want = (x + x.grad).detach()[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(out.pixels, want, rtol=0, atol=1e-5)

    def test_diversity_pushes_a_group_apart(self) -> None:
        """A diversity group's images end less alike (Gram similarity at the target layer) than
        the same jobs without the term."""
        base = {**FFT, "steps": 40, "target.diversity_group": "g"}

        def similarity(outs: list[JobOutcome]) -> float:
            model = build_model(spec().model)
            order = [i.name for i in probe_layers(model, 32)]
            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            x = torch.stack([torch.from_numpy(o.pixels).permute(2, 0, 1) for o in outs])
            with torch.no_grad():
                f = LayerReader(model, [("block3", "post")], order)((x - mean) / std)
            g = gram(f[("block3", "post")]).flatten(1)
            sim = g @ g.T
            return float((sim.sum() - sim.diagonal().sum()) / (len(outs) * (len(outs) - 1)))

        plain = run(*[spec(**base, seed=i) for i in range(3)])
        diverse = run(*[spec(**base, seed=i, **{"target.diversity": 50.0}) for i in range(3)])
        assert similarity(diverse) < similarity(plain) - 0.01

    def test_diversity_group_of_one_is_refused(self) -> None:
        with pytest.raises(ConfigError, match=r"target\.diversity_group='g'.*only one job"):
            run(spec(**{"target.diversity": 1.0, "target.diversity_group": "g"}))

    def test_interrupted_fft_job_continues_exactly(self) -> None:
        """An interrupted job's state continues it: the final image equals an uninterrupted
        run's, bit for bit (same batch composition), for FFT + transforms + Adam."""
        specs = [spec(**FFT, **STANDARD, steps=8), spec(**MIXED[4], steps=8)]
        full = run(*specs)
        calls = iter(range(100))
        part = run(*specs, should_stop=lambda: next(calls) >= 3)
        assert [p.status for p in part] == ["interrupted", "interrupted"]
        assert all(p.state is not None and p.state["step"] == 3 for p in part)
        rest = run(*specs, states=[p.state for p in part])
        for a, b in zip(full, rest):
            assert np.array_equal(a.pixels, b.pixels)
            assert np.array_equal(a.trace, b.trace)
            assert b.status == "ok" and b.steps_done == 8

    def test_long_runs_keep_a_bounded_trace(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import featsweep.engine as engine

        monkeypatch.setattr(engine, "TRACE_MAX", 4)
        (out,) = run(spec(steps=10))
        assert out.info["trace_stride"] == 3
        assert list(out.trace[:, 0]) == [0, 3, 6, 9, 10]


# ----------------------------------------------------------------------------- bad inputs (model)
class TestModelChecks:
    def test_direction_of_the_wrong_length(self, tmp_path: Any) -> None:
        np.save(tmp_path / "d.npy", np.ones(10, dtype=np.float32))
        with pytest.raises(ConfigError, match=r"target\.direction=.*shape \(10,\).*64 channels"):
            run(spec(**{"target.kind": "direction", "target.direction": str(tmp_path / "d.npy")}))

    def test_direction_unreadable(self, tmp_path: Any) -> None:
        (tmp_path / "d.npy").write_text("not an array")
        with pytest.raises(ConfigError, match=r"could not read it as a \.npy array"):
            run(spec(**{"target.kind": "direction", "target.direction": str(tmp_path / "d.npy")}))

    def test_neuron_outside_the_layer(self) -> None:
        with pytest.raises(ConfigError, match=r"target\.x=8.*is 8×8.*0\.\.7"):
            run(spec(**{"target.kind": "neuron", "target.x": 8}))

    def test_decorrelate_needs_rgb(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import featsweep.engine as engine
        from featsweep.spec import MODELS

        monkeypatch.setattr(engine, "model_info",
                            lambda m: __import__("dataclasses").replace(MODELS["tiny"], in_channels=1))
        with pytest.raises(ConfigError, match=r"param\.decorrelate=True.*1 channel"):
            run(spec(**FFT))


# ------------------------------------------------------------------------------ the CLI, presets
class TestSweep:
    @pytest.mark.slow
    def test_eight_job_toolkit_sweep_is_one_batch(self, tmp_path: Any) -> None:
        """`-m param=pixel,fft transform=none,standard regularizer.tv=0,0.05`: 8 jobs, 1 batch."""
        import json

        from _cli import run_module

        sweep = tmp_path / "sweep"
        proc = run_module("featsweep", "-m", "param=pixel,fft", "transform=none,standard",
                          "regularizer.tv=0,0.05", "model=tiny", "image.size=32", "steps=3",
                          "device=cpu", "target.channel=12", f"hydra.sweep.dir={sweep}",
                          cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        log = proc.stdout + proc.stderr
        assert "Batched 8 jobs into 1 batch" in log
        results = [json.loads((sweep / str(i) / "result.json").read_text()) for i in range(8)]
        assert [r["status"] for r in results] == ["ok"] * 8
        assert {r["param"] for r in results} == {"pixel", "fft"}
        assert {r["forwards_per_step"] for r in results} == {2}  # pad 0 and pad 12

    @pytest.mark.parametrize("preset", ["lucent_defaults", "toolkit"])
    def test_presets_compose_and_validate(self, preset: str) -> None:
        from hydra import compose

        from _hydra import featsweep_conf

        with featsweep_conf():
            cfg = compose("config", overrides=[f"experiment={preset}"])
        s = from_config(cfg)
        if preset == "lucent_defaults":
            assert (s.param.kind, s.param.decorrelate, s.param.squash) == ("fft", True, "sigmoid")
            assert s.transform.pad == 12 and s.transform.jitter == 8 and s.transform.jitter_final == 4
            assert (s.optimizer.name, s.optimizer.lr, s.steps, s.image.size) == ("adam", 0.05, 512, 128)
        else:
            assert s.image.size == 96 and s.optimizer.name == "adam"


class TestDiversitySweep:
    @pytest.mark.slow
    def test_a_diversity_group_runs_as_one_batch(self, tmp_path: Any) -> None:
        """3 jobs of one group with hydra.launcher.max_batch=2: still one batch of 3; a group of
        one job is refused before anything runs."""
        from _cli import run_module

        common = ["model=tiny", "image.size=32", "steps=2", "device=cpu", "target.channel=12",
                  "target.diversity=10", "target.diversity_group=a"]
        proc = run_module("featsweep", "-m", "seed=0,1,2", "hydra.launcher.max_batch=2", *common,
                          f"hydra.sweep.dir={tmp_path / 'three'}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Batched 3 jobs into 1 batch" in proc.stdout + proc.stderr
        report = run_module("featsweep.analysis", str(tmp_path / "three"), cwd=tmp_path)
        assert report.returncode == 0, report.stderr[-3000:]
        text = (tmp_path / "three" / "analysis" / "report.md").read_text()
        assert "`a`: 3 job(s), weight 10, batch size 3" in text
        alone = run_module("featsweep", "-m", "seed=0", *common,
                           f"hydra.sweep.dir={tmp_path / 'one'}", cwd=tmp_path)
        assert alone.returncode != 0
        assert "target.diversity_group='a': only one job (#0)" in alone.stderr
        assert not (tmp_path / "one" / "0" / "result.json").exists()


def test_report_names_diversity_groups(tmp_path: Any) -> None:
    """The analysis report says which jobs formed a diversity group and that it ran as one batch."""
    import pandas as pd

    from featsweep.analysis.factors import diversity_summary as _diversity_lines

    df = pd.DataFrame({"target.diversity_group": ["a", "a", "a", None],
                       "target.diversity": [10.0, 10.0, 10.0, 0.0],
                       "result.batch_size": [4, 4, 4, 4]})
    (line, _) = _diversity_lines(df)
    assert "`a`: 3 job(s), weight 10, batch size 4" in line and "one batch" in line
    assert _diversity_lines(df.iloc[3:]) == []
