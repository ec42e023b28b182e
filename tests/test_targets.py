"""Tests for featsweep.targets: pre-/post-ReLU reads, the truncated forward, target checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featsweep.errors import ConfigError
from featsweep.models import build_model
from featsweep.spec import ModelSpec
from featsweep.objectives import Objectives
from featsweep.targets import (LayerInfo, LayerReader, check_targets,
                               probe_layers)

INCEPTION_PX = 128  # above Inception v3's 75 px minimum, cheap on a CPU (Mixed_7c is 2x2 here)


class Net:
    """A model with its probed layers."""

    def __init__(self, name: str, size: int, weights: str = "random") -> None:
        self.name = name
        self.size = size
        self.model = build_model(ModelSpec(name, weights))
        self.layers = probe_layers(self.model, size)
        self.order = [i.name for i in self.layers]

    def reader(self, *targets: tuple[str, str]) -> LayerReader:
        return LayerReader(self.model, list(targets), self.order)

    def input(self, batch: int = 2, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, self.size, self.size, generator=g)

    def check(self, layer: str, relu: str = "post", channel: int = 0) -> None:
        check_targets(self.model, self.layers, [(layer, relu, channel)], self.name)


@pytest.fixture(scope="module")
def tiny() -> Net:
    return Net("tiny", 32)


@pytest.fixture(scope="module")
def inception() -> Net:
    return Net("inception_v3", INCEPTION_PX)


@pytest.fixture(scope="module")
def effnet() -> Net:
    return Net("efficientnet_lite0", 64, "pretrained")


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def assert_pre_post(pre: torch.Tensor, post: torch.Tensor, high: float | None = None) -> None:
    """post = relu(pre) (relu6 when high=6): negative pre exactly where post is 0 (pre == 0 exactly,
    e.g. in zero-padded borders, gives post == 0 too)."""
    assert pre.shape == post.shape
    assert (pre < 0).any(), "the pre-ReLU tensor has no negative values"
    assert (post > 0).any()
    assert torch.equal(pre <= 0, post == 0)
    assert torch.all(pre[post == 0] <= 0)
    want = pre.clamp(min=0) if high is None else pre.clamp(0, high)
    assert torch.equal(want, post)
    assert torch.equal(pre[post > 0 if high is None else (post > 0) & (post < high)],
                       post[post > 0 if high is None else (post > 0) & (post < high)])


class TestProbe:
    def test_smoke(self, tiny: Net) -> None:
        by_name = {i.name: i for i in tiny.layers}
        assert by_name["block3"] == LayerInfo("block3", "Sequential", (64, 8, 8), 1,
                                              by_name["block3"].order)
        assert by_name["head"].shape == (10,)
        assert tiny.order.index("block1") < tiny.order.index("block2") < tiny.order.index("block3")
        assert no_hooks_left(tiny.model)


class TestPreRelu:
    def test_inception_mixed_7c(self, inception: Net) -> None:
        """A block whose output is a (nested) concatenation of functional, in-place ReLUs."""
        feats = inception.reader(("Mixed_7c", "pre"), ("Mixed_7c", "post"))(inception.input())
        pre, post = feats[("Mixed_7c", "pre")], feats[("Mixed_7c", "post")]
        assert pre.shape == (2, 2048, 2, 2)
        assert_pre_post(pre, post)

    def test_inception_basic_conv(self, inception: Net) -> None:
        """BasicConv2d: F.relu(bn(conv(x)), inplace=True); pre is exactly the BN output."""
        x = inception.input()
        feats = inception.reader(("Mixed_5d.branch1x1", "pre"),
                                 ("Mixed_5d.branch1x1", "post"))(x)
        pre = feats[("Mixed_5d.branch1x1", "pre")]
        assert_pre_post(pre, feats[("Mixed_5d.branch1x1", "post")])
        bn_target = ("Mixed_5d.branch1x1.bn", "post")
        bn = inception.reader(bn_target)(x)[bn_target]
        assert torch.equal(pre, bn)

    def test_post_equals_unhooked_forward(self, inception: Net) -> None:
        """Reading a target does not change what the model computes."""
        x = inception.input()
        seen = {}
        module = dict(inception.model.named_modules())["Mixed_6b"]
        handle = module.register_forward_hook(lambda m, i, o: seen.setdefault("out", o.clone()))
        try:
            with torch.no_grad():
                inception.model(x)
        finally:
            handle.remove()
        feats = inception.reader(("Mixed_6b", "post"), ("Mixed_6b", "pre"))(x)
        assert torch.equal(feats[("Mixed_6b", "post")], seen["out"])

    def test_tiny_inplace_relu_module(self, tiny: Net) -> None:
        feats = tiny.reader(("block3", "pre"), ("block3", "post"))(tiny.input())
        assert_pre_post(feats[("block3", "pre")], feats[("block3", "post")])
        conv = tiny.reader(("block3.0", "post"))(tiny.input())[("block3.0", "post")]
        assert torch.equal(feats[("block3", "pre")], conv)

    @pytest.mark.parametrize("layer", ["_blocks.10._bn1", "_blocks.2._bn1"])
    def test_efficientnet_bn_relu6(self, effnet: Net, layer: str) -> None:
        """BN+ReLU6 (after models.py's surgery): pre is the BN output, post = clamp(pre, 0, 6)."""
        x = effnet.input()
        feats = effnet.reader((layer, "pre"), (layer, "post"))(x)
        pre, post = feats[(layer, "pre")], feats[(layer, "post")]
        assert_pre_post(pre, post, high=6.0)
        if layer == "_blocks.2._bn1":
            assert (pre > 6).any()  # the ReLU6 ceiling is exercised too
        bn = effnet.reader((layer + ".bn", "post"))(x)[(layer + ".bn", "post")]
        assert torch.equal(pre, bn)

    def test_pre_has_gradient(self, tiny: Net) -> None:
        x = tiny.input(1).requires_grad_(True)
        pre = tiny.reader(("block3", "pre"))(x)[("block3", "pre")]
        (grad,) = torch.autograd.grad(pre[:, 0].mean(), x)
        assert grad.abs().sum() > 0

    def test_pre_without_final_relu_is_config_error(self, effnet: Net) -> None:
        """_blocks.10 ends in a linear bottleneck (BN, then the skip add): no ReLU to undo."""
        with pytest.raises(ConfigError, match=r"target\.relu='pre'.*_blocks\.10.*ReLU"):
            effnet.reader(("_blocks.10", "pre"))(effnet.input())
        assert no_hooks_left(effnet.model)
        assert torch._C._len_torch_function_stack() == 0  # the tracking mode was left

    def test_pre_on_conv_is_config_error(self, tiny: Net) -> None:
        with pytest.raises(ConfigError, match=r"target\.relu=post"):
            tiny.reader(("block3.0", "pre"))(tiny.input())
        assert no_hooks_left(tiny.model)
        assert torch._C._len_torch_function_stack() == 0


class TestTruncatedForward:
    def test_stops_at_deepest_target(self, inception: Net) -> None:
        fired: list[str] = []
        modules = dict(inception.model.named_modules())
        later = ["Mixed_6e", "Mixed_7a", "Mixed_7c", "avgpool", "fc"]
        handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: fired.append(n))
                   for n in ["Mixed_6d", *later]]
        try:
            feats = inception.reader(("Mixed_5b", "post"), ("Mixed_6d", "pre"))(inception.input(1))
        finally:
            for h in handles:
                h.remove()
        assert fired == ["Mixed_6d"]
        assert set(feats) == {("Mixed_5b", "post"), ("Mixed_6d", "pre")}

    def test_tiny_head_never_runs(self, tiny: Net) -> None:
        fired: list[str] = []
        handle = tiny.model.head.register_forward_hook(lambda *a: fired.append("head"))
        try:
            tiny.reader(("block2", "post"))(tiny.input())
        finally:
            handle.remove()
        assert fired == []
        assert tiny.reader(("block2", "post")).deepest == "block2"

    def test_deepest_ignores_target_order(self, tiny: Net) -> None:
        assert tiny.reader(("block3", "post"), ("block1", "pre")).deepest == "block3"
        assert tiny.reader(("block1", "pre"), ("block3", "post")).deepest == "block3"

    def test_shallow_target_not_overwritten_by_later_inplace_ops(self, tiny: Net) -> None:
        """block1.0 (a conv) is followed by an in-place ReLU: read with a deeper target, its value
        must still equal a run that stops right at block1.0."""
        x = tiny.input()
        together = tiny.reader(("block1.0", "post"), ("block3", "post"))(x)[("block1.0", "post")]
        alone = tiny.reader(("block1.0", "post"))(x)[("block1.0", "post")]
        assert (alone < 0).any()
        assert torch.equal(together, alone)

    def test_shallow_inception_target_not_overwritten(self, inception: Net) -> None:
        x = inception.input(1)
        layer = "Mixed_5d.branch1x1.conv"  # its output goes straight into BN, then F.relu_ in place
        together = inception.reader((layer, "post"), ("Mixed_6b", "pre"))(x)[(layer, "post")]
        alone = inception.reader((layer, "post"))(x)[(layer, "post")]
        assert (alone < 0).any()
        assert torch.equal(together, alone)

    def test_shallow_pre_with_deeper_target(self, inception: Net) -> None:
        x = inception.input(1)
        together = inception.reader(("Mixed_5d", "pre"), ("Mixed_7c", "post"))(x)
        alone = inception.reader(("Mixed_5d", "pre"))(x)
        assert torch.equal(together[("Mixed_5d", "pre")], alone[("Mixed_5d", "pre")])

    def test_batched_equals_per_item(self, tiny: Net) -> None:
        x = tiny.input(3)
        reader = tiny.reader(("block2", "pre"), ("block3", "post"))
        together = reader(x)
        for i in range(3):
            alone = reader(x[i:i + 1])
            for key in together:
                torch.testing.assert_close(together[key][i:i + 1], alone[key], rtol=1e-5,
                                           atol=1e-6)


class TestCheckTargets:
    def test_valid(self, tiny: Net) -> None:
        tiny.check("block3", "pre", 63)

    def test_unknown_layer_suggests_close_names(self, tiny: Net) -> None:
        with pytest.raises(ConfigError) as info:
            tiny.check("blok3")
        message = str(info.value)
        assert "target.layer='blok3'" in message
        assert "close names: block3" in message
        assert "python -m featsweep.layers model=tiny" in message

    def test_unknown_inception_layer_suggests(self, inception: Net) -> None:
        with pytest.raises(ConfigError, match=r"close names: .*Mixed_7c"):
            inception.check("Mixed7c")

    @pytest.mark.parametrize("channel", [64, 1000])
    def test_channel_out_of_range_names_the_count(self, tiny: Net, channel: int) -> None:
        with pytest.raises(ConfigError) as info:
            tiny.check("block3", "post", channel)
        message = str(info.value)
        assert f"target.channel={channel}" in message
        assert "block3 has 64 channels" in message
        assert "0..63" in message

    def test_non_spatial_layer_rejected(self, tiny: Net) -> None:
        with pytest.raises(ConfigError, match=r"target\.layer='head'.*\(10,\).*convolutional"):
            tiny.check("head")

    def test_shared_module_rejected(self) -> None:
        class Shared(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv = nn.Conv2d(3, 3, 3, padding=1)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.conv(F.relu(self.conv(x)))

        model = Shared().eval()
        layers = probe_layers(model, 8)
        with pytest.raises(ConfigError, match=r"target\.layer='conv'.*runs 2 times.*shared"):
            check_targets(model, layers, [("conv", "post", 0)], "shared")

    def test_efficientnet_shared_swish_rejected(self, effnet: Net) -> None:
        """The package's one _swish per block runs twice; after the BN+ReLU6 surgery it is an
        Identity that still runs twice, so it stays rejected."""
        with pytest.raises(ConfigError, match=r"runs 2 times"):
            effnet.check("_blocks.1._swish")


class TestChannelObjective:
    """featsweep.objectives.Objectives (kind channel) on the reader's output."""

    @staticmethod
    def objective(targets: list, channels: list) -> Objectives:
        specs = [SimpleNamespace(target=SimpleNamespace(layer=t[0], relu=t[1], kind="channel",
                                                        channel=c, x=None, y=None))
                 for t, c in zip(targets, channels)]
        return Objectives(specs, list(range(len(specs))), torch.device("cpu"), {})

    def test_smoke(self, tiny: Net) -> None:
        feats = tiny.reader(("block3", "post"))(tiny.input(2))
        obj = self.objective([("block3", "post")] * 2, [3, 5])(feats)
        want = torch.stack([feats[("block3", "post")][0, 3].mean(),
                            feats[("block3", "post")][1, 5].mean()])
        torch.testing.assert_close(obj, want)

    def test_mixed_targets_equal_per_item(self, tiny: Net) -> None:
        targets = [("block3", "post"), ("block2", "pre"), ("block3", "pre"), ("block2", "pre")]
        channels = [1, 2, 3, 31]
        x = tiny.input(4)
        together = self.objective(targets, channels)(tiny.reader(*targets)(x))
        assert together.shape == (4,) and together.dtype == torch.float32
        for i, (t, c) in enumerate(zip(targets, channels)):
            alone = self.objective([t], [c])(tiny.reader(t)(x[i:i + 1]))
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-6)
