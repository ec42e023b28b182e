"""The engine's speed paths give the same results: memory layout, FX truncation, compilation.

Layouts and kernels round differently and the optimization amplifies rounding (DESIGN's chaos
pitfall), so equality is checked over a few steps only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from featsweep.engine import make_reader, run_batch
from featsweep.graph import GraphReader, graph_reader
from featsweep.models import build_model
from featsweep.spec import RunSpec
from featsweep.targets import LayerReader, probe_layers

from _specs import make_spec, tiny_config


BASE = tiny_config(
    optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 1e-4,
               "betas": [0.9, 0.999], "eps": 1e-8},
    blur={"kind": "box", "k": 3, "sigma": None, "every": 1},
    image={"size": 32, "space": "normalized"})


def spec(**changes: Any) -> RunSpec:
    return make_spec(BASE, **changes)


def run(*specs: RunSpec) -> list:
    return run_batch(list(specs), emit=lambda line: None)


SETTINGS = [{}, {"target.relu": "pre", "optimizer.name": "adam"},
            {"param.kind": "fft", "param.decorrelate": True, "param.squash": "sigmoid",
             "image.space": "pixel", "transform.jitter": 3, "transform.rotate": [-5.0, 5.0],
             "optimizer.name": "adam"}]


class TestLayout:
    @pytest.mark.parametrize("changes", SETTINGS, ids=["notes", "pre-adam", "fft-transforms"])
    def test_channels_last_equals_contiguous(self, changes: dict) -> None:
        (a,) = run(spec(**changes))
        (b,) = run(spec(**changes, **{"engine.memory_format": "contiguous"}))
        assert a.info["memory_format"] == "channels_last" and b.info["memory_format"] == "contiguous"
        np.testing.assert_allclose(a.pixels, b.pixels, rtol=0, atol=1e-6)

    def test_layout_is_part_of_the_batch_key(self) -> None:
        assert spec().batch_key() != spec(**{"engine.memory_format": "contiguous"}).batch_key()


class TestGraphTruncation:
    @pytest.mark.parametrize("model, targets", [
        ("tiny", [("block3", "post"), ("block2", "pre"), ("block3", "pre")]),
        ("efficientnet_lite0", [("_blocks.10", "post"), ("_blocks.10._bn1", "pre"),
                                ("_blocks.4", "post")]),
    ])
    def test_graph_equals_hooks_bit_for_bit(self, model: str, targets: list) -> None:
        net = build_model(spec(**{"model.name": model, "model.weights":
                                  "random" if model == "tiny" else "pretrained"}).model)
        order = [i.name for i in probe_layers(net, 64)]
        reader = graph_reader(net, targets, order, torch.rand(1, 3, 48, 48))
        assert isinstance(reader, GraphReader)
        x = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got, want = reader(x), LayerReader(net, targets, order)(x)
        for t in targets:
            assert torch.equal(got[t], want[t]), t
        pre = got[targets[1]]
        assert float(pre.min()) < 0  # a real pre-ReLU tensor, not overwritten by in-place ReLUs

    def test_nothing_after_the_deepest_target_runs(self) -> None:
        net = build_model(spec().model)
        order = [i.name for i in probe_layers(net, 64)]
        reader = graph_reader(net, [("block2", "post")], order, torch.rand(1, 3, 32, 32))
        called = [n.target for n in reader.module.graph.nodes if n.op == "call_module"]
        assert not any(str(c).startswith(("block3", "head")) for c in called)

    def test_untraceable_network_falls_back_to_hooks(self) -> None:
        class Branchy(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 4, 3)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                if x.sum() > 0:  # data-dependent control flow: FX cannot trace it
                    x = x * 2
                return self.conv(x)

        net = Branchy().eval()
        order = [i.name for i in probe_layers(net, 16)]
        assert graph_reader(net, [("conv", "post")], order, torch.rand(1, 3, 16, 16)) is None
        reader = make_reader(net, [("conv", "post")], order, spec(), 16, torch.device("cpu"))
        assert isinstance(reader, LayerReader)

    def test_hooks_on_request_and_same_result(self) -> None:
        (a,) = run(spec(**SETTINGS[1]))
        (b,) = run(spec(**SETTINGS[1], **{"engine.truncate": "hooks"}))
        assert a.info["truncation"] == "graph" and b.info["truncation"] == "hooks"
        assert np.array_equal(a.pixels, b.pixels)


class TestCompiledStep:
    @pytest.mark.slow
    def test_fullgraph_compile_equals_eager(self) -> None:
        """engine.compile=true: the step compiles as ONE graph (fullgraph=True raises on any graph
        break) and gives the eager images within 1e-5, for a batch mixing the notes' pixels
        (SGD, clamp, box blur, pre-ReLU) with FFT + random transforms + a penalty under Adam, over
        3 steps (Adam turns the fused kernels' rounding into whole steps soon after: 2e-5 at 5)."""
        settings = ({"target.relu": "pre", "steps": 3},
                    {**SETTINGS[2], "regularizer.tv": 0.05, "seed": 1, "steps": 3})
        specs = [spec(**c) for c in settings]
        compiled = [spec(**{**c, "engine.compile": True}) for c in settings]
        eager = run(*specs)
        got = run(*compiled)
        for a, b in zip(eager, got):
            assert b.status == "ok"
            np.testing.assert_allclose(b.pixels, a.pixels, rtol=0, atol=1e-5)
            np.testing.assert_allclose(b.trace, a.trace, rtol=1e-5, atol=1e-5)

    @pytest.mark.slow
    def test_fused_efficientnet_compiles_as_one_graph(self) -> None:
        """The pretrained default with its BatchNorms and pads folded (engine.fuse_conv) under
        engine.compile=true: fullgraph compiles, and 3 steps give the eager images within 1e-5
        (measured: equal)."""
        changes = {"model.name": "efficientnet_lite0", "model.weights": "pretrained",
                   "target.layer": "_blocks.4", "target.channel": 3, "image.size": 48,
                   "steps": 3, "regularizer.clamp": False}
        (eager,) = run(spec(**changes))
        (compiled,) = run(spec(**changes, **{"engine.compile": True}))
        assert compiled.status == "ok" and compiled.info["fused_batchnorms"] > 0
        np.testing.assert_allclose(compiled.pixels, eager.pixels, rtol=0, atol=1e-5)

    def test_compile_refuses_what_it_cannot_capture(self) -> None:
        from featsweep.errors import ConfigError

        with pytest.raises(ConfigError, match=r"engine\.compile=True.*redirected ReLU"):
            run(spec(**{"engine.compile": True, "target.relu_gradient": "redirect"}))
        with pytest.raises(ConfigError, match=r"engine\.cuda_graphs=True.*CUDA device"):
            run(spec(**{"engine.cuda_graphs": True}))


class _ConvBN(torch.nn.Module):
    """conv → BN → ReLU twice, in both forms a network writes them (an ``nn.Conv2d`` module and
    ``F.conv2d`` on its own weight, after a symmetric ``F.pad``), a depthwise stride-2 conv after
    TensorFlow's asymmetric "same" pad (foldable on the CPU), then an asymmetric pad before a
    dense conv and a BN left in training mode (neither foldable)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.weight2 = torch.nn.Parameter(torch.randn(8, 8, 3, 3, generator=g) * 0.2)
        self.bn2 = torch.nn.BatchNorm2d(8, eps=1e-3)
        self.depthwise = torch.nn.Parameter(torch.randn(8, 1, 3, 3, generator=g))
        self.pad3 = torch.nn.ZeroPad2d((0, 1, 0, 1))
        self.conv3 = torch.nn.Conv2d(8, 8, 2, stride=2, bias=False)
        self.bn3 = torch.nn.BatchNorm2d(8)
        for bn in (self.bn1, self.bn2, self.bn3):  # running statistics far from (0, 1)
            bn.running_mean.copy_(torch.randn(8, generator=g))
            bn.running_var.copy_(torch.rand(8, generator=g) * 3 + 0.1)
            bn.weight.data.copy_(torch.randn(8, generator=g))
            bn.bias.data.copy_(torch.randn(8, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.nn.functional.pad(x, (1, 1, 1, 1))
        x = torch.relu(self.bn2(torch.nn.functional.conv2d(x, self.weight2, None, 1, 0)))
        x = torch.nn.functional.pad(x, (0, 1, 0, 1))
        x = torch.nn.functional.conv2d(x, self.depthwise, None, 2, 0, 1, 8)
        return self.bn3(self.conv3(self.pad3(x)))


class TestBatchNormFolding:
    def _readers(self, net: torch.nn.Module, targets: list, size: int) -> tuple:
        order = [i.name for i in probe_layers(net, size)]
        probe = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        folded = graph_reader(net, targets, order, probe, fuse_conv=True)
        assert isinstance(folded, GraphReader)
        return folded, LayerReader(net, targets, order)

    def test_conv_bn_pairs_fold_and_agree(self) -> None:
        net = _ConvBN().eval()
        net.bn3.train()  # a training-mode BN normalizes by the batch: not foldable
        before = {k: v.clone() for k, v in net.state_dict().items()}
        targets = [("bn2", "post"), ("bn1", "post"), ("bn3", "post")]
        folded, hooks = self._readers(net, targets, 16)
        assert folded.fused == {"batchnorm": 2, "zero_pad": 2, "relu": 0}
        kinds = [type(dict(folded.module.named_modules())[str(n.target)]).__name__
                 for n in folded.module.graph.nodes if n.op == "call_module"]
        assert sorted(kinds) == ["BatchNorm2d", "Conv2d", "ZeroPad2d"]  # bn3, conv3, pad3
        assert not any(n.target is torch.nn.functional.pad for n in folded.module.graph.nodes)
        x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got, want = folded(x), hooks(x)
        for t in targets:
            scale = float(want[t].abs().max())
            assert float((got[t] - want[t]).abs().max()) <= 1e-5 * scale, t
        # the user's network keeps its own weights and statistics (bn3's running statistics
        # move with every forward in training mode, hooks or graph: not the folding's doing)
        for k, v in net.state_dict().items():
            assert k.startswith("bn3.") or torch.equal(v, before[k]), k

    def test_the_cache_follows_the_model_and_its_weights(self) -> None:
        """A folded reader holds copies of the weights: new weights (load_state_dict), another
        mode or another model give a new reader that agrees with the hooks, never an old one;
        and the cache does not keep a model alive (so no later model can inherit its entry)."""
        import subprocess
        import sys
        from pathlib import Path

        net = _ConvBN().eval()
        targets = [("bn2", "post")]
        first, hooks = self._readers(net, targets, 16)
        again, _ = self._readers(net, targets, 16)
        assert again is first
        other = _ConvBN().eval()
        with torch.no_grad():
            other.bn2.running_mean.add_(1.0)
            other.weight2.mul_(-1.0)
        net.load_state_dict(other.state_dict())
        fresh, hooks = self._readers(net, targets, 16)
        assert fresh is not first
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            got, want = fresh(x)[targets[0]], hooks(x)[targets[0]]
        assert float((got - want).abs().max()) <= 1e-5 * float(want.abs().max())
        net.bn2.train()
        order = [i.name for i in probe_layers(net, 16)]
        probe = torch.rand(1, 3, 16, 16)
        assert graph_reader(net, targets, order, probe, fuse_conv=True) is not fresh
        # The cache holds a model weakly (in a fresh interpreter: pytest's frames keep objects
        # alive): once the model is gone so is its entry, and no later model can get it.
        code = ("import gc, sys, weakref, torch; sys.path.insert(0, 'tests');"
                "from test_engine_paths import _ConvBN; from featsweep import graph;"
                "from featsweep.targets import probe_layers;"
                "net = _ConvBN().eval(); order = [i.name for i in probe_layers(net, 16)];"
                "r = graph.graph_reader(net, [('bn2', 'post')], order, torch.rand(1, 3, 16, 16),"
                " fuse_conv=True); assert r is not None and r.fused['batchnorm'] == 2;"
                "gone = weakref.ref(net); del net, r; gc.collect();"
                "assert gone() is None and len(graph._CACHE) == 0")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == 0, proc.stderr[-2000:]

    def test_efficientnet_folds_all_but_a_target_conv(self) -> None:
        net = build_model(spec(**{"model.name": "efficientnet_lite0",
                                  "model.weights": "pretrained"}).model)
        targets = [("_blocks.10", "post"), ("_blocks.8._bn1", "pre"),
                   ("_blocks.4._depthwise_conv", "post")]
        folded, hooks = self._readers(net, targets, 48)
        plain = graph_reader(net, targets, [i.name for i in probe_layers(net, 48)],
                             torch.rand(1, 3, 48, 48))
        n_bn = sum(1 for n in plain.module.graph.nodes if n.op == "call_module"
                   and isinstance(dict(net.named_modules()).get(str(n.target)), torch.nn.BatchNorm2d))
        # _blocks.4._bn1 reads a conv that is a target itself
        assert folded.fused["batchnorm"] == n_bn - 1
        pads = [n for n in folded.module.graph.nodes if n.op == "call_module"
                and isinstance(dict(net.named_modules()).get(str(n.target)), torch.nn.ZeroPad2d)]
        # what stays is the stem's: TensorFlow's asymmetric "same" pad before a dense conv
        assert [str(n.target) for n in pads] == ["_conv_stem.static_padding"]
        assert folded.fused["zero_pad"] > 0
        x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            got, want = folded(x), hooks(x)
        for t in targets:
            assert float((got[t] - want[t]).abs().max()) <= 1e-5 * float(want[t].abs().max()), t
        assert float(got[targets[1]].min()) < 0  # still the pre-ReLU tensor

    @pytest.mark.parametrize("steps, changes", [(1, {}), (5, {"regularizer.clamp": False})],
                             ids=["notes-1-step", "no-clamp-5-steps"])
    def test_short_run_equals_unfolded(self, steps: int, changes: dict) -> None:
        """engine.fuse_conv (default on) on EfficientNet: the unfolded images to rounding; the
        result records how many BatchNorms and pads were folded. With the clamp on, 2 steps already
        differ by 2e-5: a pixel at the clamp's edge lands on either side, as it does between
        the two memory layouts without folding (measured; DESIGN's chaos pitfall)."""
        changes = {"model.name": "efficientnet_lite0", "model.weights": "pretrained",
                   "target.layer": "_blocks.4", "target.channel": 3, "image.size": 48,
                   "steps": steps, **changes}
        (a,) = run(spec(**changes))
        (b,) = run(spec(**changes, **{"engine.fuse_conv": False}))
        assert a.info["fused_batchnorms"] > 0 and a.info["fused_zero_pads"] > 0
        assert b.info["fused_batchnorms"] == b.info["fused_zero_pads"] == 0
        np.testing.assert_allclose(a.pixels, b.pixels, rtol=0, atol=1e-6)
        np.testing.assert_allclose(a.trace, b.trace, rtol=1e-5, atol=0)
        assert spec().batch_key() != spec(**{"engine.fuse_conv": False}).batch_key()


class _ConvReLUChain(torch.nn.Module):
    """conv-BN-ReLU6 read by two convs and a residual sum, a depthwise conv-BN-ReLU6 read by one
    conv alone behind an Identity (its gradient can be overwritten in place), a conv-ReLU6 read
    by a sum alone (a sum's backward hands the same gradient to both sides: it must stay out of
    place), and a conv-ReLU that is a target (out of place)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.act1 = torch.nn.ReLU6()
        self.act2 = torch.nn.ReLU6()
        self.gap = torch.nn.Identity()
        self.conv3 = torch.nn.Conv2d(8, 8, 1)
        self.conv5 = torch.nn.Conv2d(8, 8, 1)
        self.act3 = torch.nn.ReLU6()
        self.conv4 = torch.nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.out = torch.nn.ReLU()
        for bn in (self.bn1, self.bn2):
            bn.running_mean.normal_(0.0, 0.5, generator=g)
            bn.running_var.uniform_(0.5, 2.0, generator=g)
            bn.weight.data.uniform_(0.5, 4.0, generator=g)  # so that some units clip at 6
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act1(self.bn1(self.conv1(x)))
        b = self.gap(self.act2(self.bn2(self.conv2(a))))
        c = self.conv3(b) + self.act3(self.conv5(a)) + a
        return self.out(self.conv4(c))


class TestConvReLUFusion:
    """Convolution + ReLU as one node (featsweep.graph._ConvClamp): the batch path is oneDNN's
    post-op, B = 1 an in-place clamp, and the mask's gradient is in place only where nothing
    else can read it. Values and input gradients equal the unfused graph's."""

    def _readers(self, net: torch.nn.Module, targets: list, size: int) -> tuple:
        order = [i.name for i in probe_layers(net, size)]
        probe = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        fused = graph_reader(net, targets, order, probe, fuse_conv=True, fuse_relu=True)
        plain = graph_reader(net, targets, order, probe, fuse_conv=True)
        assert isinstance(fused, GraphReader) and isinstance(plain, GraphReader)
        return fused, plain

    @staticmethod
    def _value_and_grad(reader: GraphReader, x: torch.Tensor, weights: dict) -> tuple:
        x = x.clone().requires_grad_(True)
        out = reader(x)
        loss = sum((out[t] * w).sum() for t, w in weights.items())
        (grad,) = torch.autograd.grad(loss, x)
        return {t: o.detach() for t, o in out.items()}, grad

    @pytest.mark.parametrize("batch", [1, 3])
    @pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
    def test_values_and_gradients_equal_unfused(self, batch: int, layout: torch.memory_format) -> None:
        net = _ConvReLUChain().eval().to(memory_format=layout)
        targets = [("out", "post"), ("act1", "post")]
        fused, plain = self._readers(net, targets, 16)
        assert fused.fused["relu"] == 4 and plain.fused["relu"] == 0
        owned = [n.args[-1] for n in fused.module.graph.nodes if n.op == "call_function"
                 and getattr(n.target, "__name__", "") == "_conv_clamp"]
        assert owned == [False, True, False, False]
        g = torch.Generator().manual_seed(5)
        x = (torch.randn(batch, 3, 16, 16, generator=g) * 4).contiguous(memory_format=layout)
        weights = {t: torch.randn(plain(x)[t].shape, generator=g) for t in targets}
        got, got_grad = self._value_and_grad(fused, x, weights)
        want, want_grad = self._value_and_grad(plain, x, weights)
        for t in targets:
            assert float(want[t].max()) > 0
            torch.testing.assert_close(got[t], want[t], rtol=0, atol=1e-6 * float(want[t].abs().max()))
        assert float((want[("act1", "post")] == 6).float().mean()) > 0.005  # the upper clip is used
        torch.testing.assert_close(got_grad, want_grad, rtol=0,
                                   atol=1e-6 * float(want_grad.abs().max()))
        assert float(want_grad.abs().max()) > 0

    def test_efficientnet_short_batch_equals_unfused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """EfficientNet-Lite0 at B = 2 (the oneDNN path) for 3 steps, fused and not: the same
        images to rounding, and result.json says how many ReLUs were fused."""
        import weakref

        from featsweep import graph

        changes = {"model.name": "efficientnet_lite0", "model.weights": "pretrained",
                   "target.layer": "_blocks.4", "target.channel": 3, "image.size": 48, "steps": 3,
                   "regularizer.clamp": False}
        specs = [spec(**changes), spec(**changes, seed=1, **{"optimizer.name": "adam"})]
        fused = run(*specs)
        monkeypatch.setattr(graph, "_CACHE", weakref.WeakKeyDictionary())
        monkeypatch.setattr(graph, "_fuse_conv_clamp", lambda gm: 0)
        plain = run(*specs)
        assert fused[0].info["fused_relus"] == 10 and plain[0].info["fused_relus"] == 0
        assert fused[0].info["fused_batchnorms"] == plain[0].info["fused_batchnorms"] > 0
        for a, b in zip(fused, plain):
            np.testing.assert_allclose(a.pixels, b.pixels, rtol=0, atol=1e-6)
            np.testing.assert_allclose(a.trace, b.trace, rtol=1e-5, atol=0)

    def test_not_fused_where_a_relu_must_be_seen(self) -> None:
        """The redirected gradient replaces each ReLU call, and a compiled step leaves fusion to
        inductor: neither gets the fused node."""
        changes = {"model.name": "efficientnet_lite0", "model.weights": "pretrained",
                   "target.layer": "_blocks.2", "target.channel": 3, "image.size": 32, "steps": 1}
        (redirected,) = run(spec(**changes, **{"target.relu_gradient": "redirect"}))
        assert redirected.info["fused_relus"] == 0 and redirected.info["fused_batchnorms"] > 0
