"""Tests for networks named by config (issue 10): model=torchvision | timm | custom.

The custom networks live in ``tests/featsweep_testnets`` (a package featsweep does not know).
Everything here is in-process and small; the end-to-end sweeps are in test_model_runs.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from hydra import compose

import featsweep_testnets as nets
from _hydra import SMALL_NET, TINY_VIT, featsweep_conf
from featsweep.errors import ConfigError
from featsweep.models import build_model, check_input, hub_model_info
from featsweep.spec import ModelSpec, from_config, model_info
from featsweep.targets import LayerReader, check_targets, has_pre_relu, probe_layers

pytestmark = pytest.mark.usefixtures("hydra_restore_singletons")

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="class")
def hydra_conf() -> Iterator[None]:
    with featsweep_conf():
        yield


@pytest.fixture(autouse=True)
def empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test may see (or fill) the machine's torch-hub or Hugging Face caches."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    return tmp_path / "torch_home"


def spec_of(*overrides: str):  # -> RunSpec
    return from_config(compose("config", overrides=["device=cpu", *overrides]))


def model_of(*overrides: str) -> ModelSpec:
    return spec_of(*overrides).model


def config_error(*overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        spec = spec_of(*overrides)
        build_model(spec.model)
    return str(info.value)


# ----------------------------------------------------------------------------- spec side


@pytest.mark.usefixtures("hydra_conf")
class TestSpec:
    def test_custom_from_config(self) -> None:
        spec = spec_of(*SMALL_NET, "+model.width=4", "target.layer=block_a", "target.channel=3")
        assert spec.model.name == "custom"
        assert spec.model.target == "featsweep_testnets.make_small_net"
        assert spec.model.kwargs == {"width": 4}
        assert spec.image.size == 32  # model.size is the default image.size
        info = model_info(spec.model)
        assert (info.mean, info.std, info.in_channels) == ((0.5,) * 3, (0.25,) * 3, 3)

    def test_sequential_layer_number_is_a_name(self) -> None:
        """Hydra turns target.layer=3 into the int 3; it must still mean module "3"."""
        cfg = compose("config", overrides=["model=custom",
                                            "model._target_=featsweep_testnets.make_sequential",
                                            "model.mean=[0,0,0]", "model.std=[1,1,1]",
                                            "model.size=16", "target.layer=3", "target.channel=1"])
        assert cfg.target.layer == 3  # what Hydra hands over
        spec = from_config(cfg)
        assert spec.target.layer == "3"
        model = build_model(spec.model)
        reader = LayerReader(model, [("3", "post")], [i.name for i in probe_layers(model, 16)])
        x = torch.randn(2, 3, 16, 16)
        expected = torch.relu(model[2](torch.relu(model[0](x))))
        torch.testing.assert_close(reader(x)[("3", "post")], expected)

    def test_batch_identity(self, tmp_path: Path) -> None:
        """Same network and weights -> one batch; another width, weights file, normalization
        or architecture -> another batch; two spellings of one weights file -> one batch."""
        base = spec_of(*SMALL_NET, "target.layer=block_a")
        assert spec_of(*SMALL_NET, "target.layer=block_b", "seed=3").batch_key() == base.batch_key()
        for change in ("+model.width=4", "model.mean=[0.4,0.5,0.5]"):
            assert spec_of(*SMALL_NET, change, "target.layer=block_a").batch_key() != base.batch_key()
        (tmp_path / "w.pt").write_bytes(b"")
        a = spec_of(*SMALL_NET, f"model.weights={tmp_path / 'w.pt'}", "target.layer=block_a")
        b = spec_of(*SMALL_NET, f"model.weights={tmp_path}/./w.pt", "target.layer=block_a")
        assert a.batch_key() == b.batch_key() != base.batch_key()
        r18 = spec_of("model=torchvision", "model.arch=resnet18", "model.weights=random",
                      "target.layer=layer2", "image.size=32")
        r34 = spec_of("model=torchvision", "model.arch=resnet34", "model.weights=random",
                      "target.layer=layer2", "image.size=32")
        assert r18.batch_key() != r34.batch_key()

    def test_torchvision_info_from_weights_metadata(self) -> None:
        import torchvision

        spec = spec_of("model=torchvision", "model.arch=mobilenet_v3_small", "target.layer=features")
        weights = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.transforms()
        info = model_info(spec.model)
        assert info.mean == tuple(weights.mean) and info.std == tuple(weights.std)
        assert spec.image.size == weights.crop_size[0] == 224
        inception = model_info(ModelSpec("torchvision", "random", arch="inception_v3"))
        assert (inception.default_size, inception.min_size) == (299, 75)

    def test_vit_size_is_fixed(self) -> None:
        vit = ["model=torchvision", "model.arch=vit_b_16", "model.weights=random",
               "target.layer=encoder"]
        assert spec_of(*vit).image.size == 224
        assert spec_of(*vit, "+model.image_size=32").image.size == 32
        message = config_error(*vit, "+model.image_size=32", "image.size=64")
        assert "image.size=64: torchvision vit_b_16 takes exactly 32 px images" in message

    def test_token_is_a_neuron_position(self) -> None:
        spec = spec_of(*TINY_VIT, "target.layer=encoder.layers.encoder_layer_1",
                       "target.kind=neuron", "target.token=2")
        assert (spec.target.x, spec.target.y, spec.target.token) == (2, 0, 2)
        with pytest.raises(ConfigError, match="target.token=2: picks one token of a neuron"):
            spec_of(*TINY_VIT, "target.layer=encoder", "target.token=2")

    def test_spec_imports_no_torch(self) -> None:
        """Validating a custom or preset config loads no torch (a mistyped override is reported
        in a blink); torchvision/timm read their weights' metadata, which needs the library."""
        code = ("import sys; from featsweep.spec import from_config; from_config({'model': "
                "{'name': 'custom', '_target_': 'x.y', 'weights': 'random', 'mean': [0.5], "
                "'std': [0.5], 'in_channels': 1, 'size': 32, 'min_size': 1, 'layer': 'c'}, "
                "'target': {'channel': 0, 'relu': 'post'}, 'optimizer': {'name': 'sgd', 'lr': 0.1},"
                " 'regularizer': {'clamp': True}, 'blur': {'kind': 'none', 'k': 1}, 'image': "
                "{'space': 'pixel'}, 'steps': 1, 'seed': 0, 'device': 'cpu'}); "
                "print('torch' in sys.modules)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=120)
        assert out.stdout.strip() == "False", out.stderr[-2000:]


# ----------------------------------------------------------------------------- building


@pytest.mark.usefixtures("hydra_conf")
class TestBuild:
    def test_custom_factory_with_arguments(self) -> None:
        model = build_model(model_of(*SMALL_NET, "+model.width=4", "target.layer=block_a"))
        assert isinstance(model, nets.SmallNet) and model.features[0].out_channels == 4
        assert not model.training and not any(p.requires_grad for p in model.parameters())

    def test_custom_random_is_deterministic(self) -> None:
        spec = model_of(*SMALL_NET, "target.layer=block_a")
        torch.manual_seed(1)
        a = build_model(spec).state_dict()
        torch.manual_seed(2)
        b = build_model(spec).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)

    def test_custom_state_dict_gives_the_same_logits(self, tmp_path: Path) -> None:
        torch.manual_seed(7)
        source = nets.make_small_net(width=4).eval()
        torch.save(source.state_dict(), tmp_path / "net.pt")
        model = build_model(model_of(*SMALL_NET, "+model.width=4", "target.layer=block_a",
                                     f"model.weights={tmp_path / 'net.pt'}"))
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)

    def test_torchvision_state_dict_gives_the_same_logits(self, tmp_path: Path) -> None:
        import torchvision

        torch.manual_seed(3)
        source = torchvision.models.resnet18(num_classes=7).eval()
        torch.save(source.state_dict(), tmp_path / "r18.pth")
        model = build_model(model_of("model=torchvision", "model.arch=resnet18",
                                     "+model.num_classes=7", f"model.weights={tmp_path / 'r18.pth'}",
                                     "target.layer=layer2", "image.size=32"))
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)

    def test_torchvision_pretrained_reads_the_hub_cache(self, empty_caches: Path) -> None:
        """weights=pretrained names the DEFAULT weights' file; once it is in the cache, it loads
        (through the builder, so the architecture follows the checkpoint); nothing downloads."""
        import torchvision

        args = ["model=torchvision", "model.arch=mobilenet_v3_small", "target.layer=features"]
        message = config_error(*args)
        wanted = empty_caches / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
        assert f"looked for {wanted}" in message and "never downloads" in message
        assert "model.weights=random" in message
        torch.manual_seed(5)
        source = torchvision.models.mobilenet_v3_small().eval()
        wanted.parent.mkdir(parents=True)
        torch.save(source.state_dict(), wanted)
        model = build_model(model_of(*args))
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)
        assert sorted(p.name for p in wanted.parent.iterdir()) == [wanted.name]

    def test_torchvision_weights_by_name(self, empty_caches: Path) -> None:
        message = config_error("model=torchvision", "model.arch=resnet50",
                               "model.weights=IMAGENET1K_V1", "target.layer=layer3")
        assert "resnet50-0676ba61.pth" in message  # V1's file, not DEFAULT's (V2)
        message = config_error("model=torchvision", "model.arch=resnet50",
                               "model.weights=IMAGENET9K", "target.layer=layer3")
        assert "resnet50's torchvision weights are IMAGENET1K_V1, IMAGENET1K_V2" in message

    def test_grayscale_custom_network(self) -> None:
        spec = model_of(*SMALL_NET[:2], "model.mean=[0.5]", "model.std=[0.25]",
                        "model.in_channels=1", "model.size=32", "target.layer=block_a")
        model = build_model(spec)  # make_small_net's in_channels parameter receives it
        assert model.features[0].in_channels == 1
        layers = probe_layers(model, 32, in_channels=1)
        assert next(i for i in layers if i.name == "block_a").shape == (16, 8, 8)


# ----------------------------------------------------------------------------- layers


@pytest.fixture(scope="module")
def small_net() -> tuple[torch.nn.Module, list[str]]:
    model = build_model(ModelSpec("custom", "random", target="featsweep_testnets.make_small_net",
                                  mean=(0.5,) * 3, std=(0.25,) * 3))
    return model, [i.name for i in probe_layers(model, 32)]


class TestLayers:
    @pytest.mark.parametrize("layer, relu6", [
        ("features.1", False),  # nn.ReLU(inplace=True)
        ("features.3", True),  # nn.ReLU6(inplace=True)
        ("block_a", False),  # F.relu(inplace=True)
        ("block_b", True),  # F.relu6
        ("block_c", False),  # Tensor.relu_
    ])
    def test_pre_relu_module_and_functional(self, small_net: Any, layer: str, relu6: bool) -> None:
        model, order = small_net
        reader = LayerReader(model, [(layer, "pre"), (layer, "post")], order)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        feats = reader(x)
        pre, post = feats[(layer, "pre")], feats[(layer, "post")]
        assert (pre < 0).any()  # really before the ReLU, even where it runs in place
        torch.testing.assert_close(post, pre.clamp(0, 6) if relu6 else pre.clamp(min=0))
        assert has_pre_relu(model, order, layer, 32)

    def test_no_relu_is_refused(self, small_net: Any) -> None:
        model, order = small_net
        assert not has_pre_relu(model, order, "block_d", 32)  # GELU
        with pytest.raises(ConfigError, match="output of layer block_d is not produced by a ReLU"):
            LayerReader(model, [("block_d", "pre")], order)(torch.zeros(1, 3, 32, 32))

    def test_forward_stops_at_the_deepest_target(self, small_net: Any) -> None:
        model, order = small_net
        ran: list[str] = []
        handles = [getattr(model, n).register_forward_hook(lambda *a, n=n: ran.append(n))
                   for n in ("block_c", "block_d", "head")]
        try:
            LayerReader(model, [("block_b", "post"), ("block_c", "pre")], order)(
                torch.zeros(1, 3, 32, 32))
        finally:
            for h in handles:
                h.remove()
        assert ran == ["block_c"]

    def test_tuple_output_is_not_a_target(self) -> None:
        spec = ModelSpec("custom", "random", target="featsweep_testnets.TupleNet",
                         mean=(0.5,) * 3, std=(0.5,) * 3)
        model = build_model(spec)
        layers = probe_layers(model, 16)
        with pytest.raises(ConfigError) as info:
            check_targets(model, layers, [("pair", "post", 0)], spec.cli)
        assert "target.layer='pair': its output is a tuple, not a tensor" in str(info.value)
        check_targets(model, layers, [("pair.conv", "post", 0)], spec.cli)  # its child is fine

    def test_token_layers_read_as_channels_by_tokens(self) -> None:
        """A ViT block's (B, N, C) output is read as (B, C, 1, N): channel c of token t is
        output[b, t, c]."""
        spec = ModelSpec("custom", "random", target="torchvision.models.VisionTransformer",
                         args=json.dumps({"image_size": 32, "patch_size": 8, "num_layers": 2,
                                          "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}),
                         mean=(0.5,) * 3, std=(0.5,) * 3, size=32)
        model = build_model(spec)
        layers = {i.name: i for i in probe_layers(model, 32)}
        block = layers["encoder.layers.encoder_layer_1"]
        assert (block.output, block.shape) == ("tokens", (16, 1, 17))  # 4x4 patches + class token
        seen: list[torch.Tensor] = []
        module = model.encoder.layers.encoder_layer_1
        handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
        x = torch.randn(2, 3, 32, 32)
        try:
            got = LayerReader(model, [(block.name, "post")], list(layers))(x)[(block.name, "post")]
        finally:
            handle.remove()
        assert got.shape == (2, 16, 1, 17)
        torch.testing.assert_close(got[:, 5, 0, 3], seen[0][:, 3, 5])


# ----------------------------------------------------------------------------- bad input


@pytest.mark.usefixtures("hydra_conf")
class TestBadInput:
    def test_unknown_arch_suggests_close_names(self) -> None:
        message = config_error("model=torchvision", "model.arch=resnet81", "target.layer=x")
        assert "model.arch='resnet81': not a torchvision classifier" in message
        assert "close names: resnet18" in message
        assert "python -m featsweep.layers model=torchvision --archs" in message

    def test_missing_arch(self) -> None:
        message = config_error("model=torchvision", "target.layer=x")
        assert "model.arch=None: model=torchvision needs an architecture name" in message

    def test_target_that_does_not_import(self) -> None:
        message = config_error(*SMALL_NET[:1], "model._target_=featsweep_testnets.nope",
                               *SMALL_NET[2:], "target.layer=x")
        assert "model._target_='featsweep_testnets.nope': cannot import it" in message
        message = config_error(*SMALL_NET[:1], "model._target_=no_such_package.net",
                               *SMALL_NET[2:], "target.layer=x")
        assert "model._target_='no_such_package.net': cannot import it" in message
        assert "no_such_package" in message.split("cannot import it")[1]

    def test_target_that_returns_no_module(self) -> None:
        message = config_error(*SMALL_NET[:1], "model._target_=featsweep_testnets.not_a_module",
                               *SMALL_NET[2:], "target.layer=x")
        assert ("model._target_='featsweep_testnets.not_a_module': it returned a list, not a "
                "torch.nn.Module") in message

    def test_target_that_raises(self) -> None:
        message = config_error(*SMALL_NET[:1], "model._target_=featsweep_testnets.broken_factory",
                               *SMALL_NET[2:], "target.layer=x")
        assert "model._target_='featsweep_testnets.broken_factory': calling it failed" in message
        assert "ValueError: width 8 is not supported" in message

    def test_builder_argument_refused(self) -> None:
        message = config_error("model=torchvision", "model.arch=resnet18", "model.weights=random",
                               "+model.depth=3", "target.layer=layer1", "image.size=32")
        assert "model.depth" in message and "could not be built with these arguments" in message
        assert "depth" in message

    def test_weight_keys_that_do_not_match(self, tmp_path: Path) -> None:
        state = nets.make_small_net(width=8).state_dict()
        state["extra.weight"] = torch.zeros(1)
        del state["head.bias"]
        state["features.0.weight"] = torch.zeros(8, 3, 5, 5)
        torch.save(state, tmp_path / "bad.pt")
        message = config_error(*SMALL_NET, f"model.weights={tmp_path / 'bad.pt'}",
                               "target.layer=block_a")
        assert f"model.weights='{tmp_path / 'bad.pt'}': the file does not match" in message
        assert "missing keys: head.bias" in message
        assert "unexpected keys: extra.weight" in message
        assert "features.0.weight (file (8, 3, 5, 5), network (8, 3, 3, 3))" in message

    def test_missing_normalization(self) -> None:
        message = config_error("model=custom", "model._target_=featsweep_testnets.make_small_net",
                               "target.layer=block_a")
        assert "model.mean=None: model=custom needs the input normalization" in message
        message = config_error("model=custom", "model._target_=featsweep_testnets.make_small_net",
                               "model.mean=[0.5]", "model.std=[0.5]", "target.layer=block_a")
        assert "model.mean=[0.5]: needs one value per input channel: 3" in message

    def test_in_channels_that_disagree(self) -> None:
        message = config_error("model=custom", "model._target_=featsweep_testnets.make_sequential",
                               "model.mean=[0.5]", "model.std=[0.5]", "model.in_channels=1",
                               "target.layer=1", "model.size=16")
        assert "model.in_channels=1: featsweep_testnets.make_sequential does not take " \
               "1-channel images" in message
        assert "expected input[1, 1, 16, 16] to have 3 channels" in message
        message = config_error("model=torchvision", "model.arch=resnet18", "model.in_channels=1",
                               "model.mean=[0.5]", "model.std=[0.5]", "target.layer=layer1")
        assert "model.in_channels=1: torchvision's resnet18 takes RGB (3-channel) input" in message

    def test_preset_with_other_keys(self) -> None:
        message = config_error("model=resnet50", "+model.arch=resnet18")
        assert "model.arch='resnet18': the preset model=resnet50 takes only model.weights" in message

    def test_unknown_model_name(self) -> None:
        message = config_error("model.name=resnet18")
        assert "model.name='resnet18': allowed values are efficientnet_lite0" in message
        assert "model=torchvision model.arch=resnet18" in message


# ----------------------------------------------------------------------------- timm


@pytest.fixture(scope="module")
def timm_module() -> Any:
    return pytest.importorskip("timm")


@pytest.mark.usefixtures("hydra_conf")
class TestTimm:
    VIT = ["model=timm", "model.arch=vit_tiny_patch16_224", "model.weights=random",
           "+model.img_size=32", "target.layer=blocks.1"]

    def test_normalization_and_size_from_the_pretrained_config(self, timm_module: Any) -> None:
        spec = spec_of(*self.VIT)
        cfg = timm_module.models.get_pretrained_cfg("vit_tiny_patch16_224")
        info = model_info(spec.model)
        assert (info.mean, info.std) == (tuple(cfg.mean), tuple(cfg.std)) == ((0.5,) * 3,) * 2
        assert spec.image.size == info.min_size == info.max_size == 32  # fixed input size
        resnet = hub_model_info("timm", "resnet18", "{}")
        assert resnet.mean == (0.485, 0.456, 0.406) and resnet.max_size is None

    def test_random_vit_tokens(self, timm_module: Any) -> None:
        model = build_model(spec_of(*self.VIT).model)
        layers = {i.name: i for i in probe_layers(model, 32)}
        assert (layers["blocks.1"].output, layers["blocks.1"].shape) == ("tokens", (192, 1, 5))

    def test_in_channels_builds_the_first_layer(self, timm_module: Any) -> None:
        spec = model_of("model=timm", "model.arch=resnet18", "model.weights=random",
                        "model.in_channels=1", "model.mean=[0.5]", "model.std=[0.2]",
                        "target.layer=layer1", "image.size=32")
        model = build_model(spec)
        assert model.conv1.in_channels == 1
        check_input(model, spec, 32)

    def test_state_dict_gives_the_same_logits(self, timm_module: Any, tmp_path: Path) -> None:
        torch.manual_seed(11)
        source = timm_module.create_model("resnet18", num_classes=3).eval()
        torch.save(source.state_dict(), tmp_path / "t.pt")
        model = build_model(model_of("model=timm", "model.arch=resnet18", "+model.num_classes=3",
                                     f"model.weights={tmp_path / 't.pt'}", "target.layer=layer1",
                                     "image.size=32"))
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)

    def test_pretrained_never_downloads(self, timm_module: Any, tmp_path: Path) -> None:
        message = config_error("model=timm", "model.arch=resnet18", "target.layer=layer1")
        assert "model.weights='pretrained': no weights for timm resnet18 on this machine" in message
        assert "timm/resnet18.a1_in1k" in message and "never downloads" in message
        assert f"in {tmp_path / 'hf_hub'}" in message  # the cache HF_HUB_CACHE names, read now
        assert not (tmp_path / "hf_hub").exists() or not any((tmp_path / "hf_hub").iterdir())

    def test_pretrained_reads_the_hub_cache(self, timm_module: Any, tmp_path: Path) -> None:
        """A checkpoint in the Hugging Face hub cache (where timm would have downloaded it) is
        what model.weights=pretrained loads, through timm's own loader."""
        from safetensors.torch import save_file

        torch.manual_seed(13)
        source = timm_module.create_model("resnet18").eval()
        repo = tmp_path / "hf_hub" / "models--timm--resnet18.a1_in1k"
        (repo / "snapshots" / "0123abc").mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0123abc")
        save_file(source.state_dict(), str(repo / "snapshots" / "0123abc" / "model.safetensors"))
        model = build_model(model_of("model=timm", "model.arch=resnet18", "target.layer=layer1",
                                     "image.size=32"))
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)

    def test_unknown_arch(self, timm_module: Any) -> None:
        message = config_error("model=timm", "model.arch=vit_tiny_patch16", "target.layer=x")
        assert "model.arch='vit_tiny_patch16': not a timm classifier (close names: " in message
        assert "python -m featsweep.layers model=timm --archs" in message


# ----------------------------------------------------------------------------- the CLI


def layers_cli(*args: str) -> subprocess.CompletedProcess[str]:
    from _cli import cli_env, run_module

    env = cli_env()
    env["PYTHONPATH"] = str(TESTS) + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return run_module("featsweep.layers", *args, cwd=TESTS, env=env, timeout=300)


class TestLayersCommand:
    def test_custom_network(self) -> None:
        """``python -m featsweep.layers`` as a user runs it, on a network featsweep does not know."""
        proc = layers_cli(*SMALL_NET)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[2:]}
        assert rows["features.3"][1:4] == ["ReLU6", "8", "16x16"] and rows["features.3"][-1] == "pre"
        assert rows["block_a"][-1] == "pre" and rows["block_c"][-1] == "pre"
        assert rows["block_d"][-1] == "8x8"  # GELU: no pre-ReLU
        assert "head" not in rows  # not a feature map (listed with --all)

    def run(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        from featsweep.layers import main

        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out, out.err

    def test_token_network(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, err = self.run(capsys, *TINY_VIT)
        assert code == 0, err
        assert any(line.split()[:1] == ["encoder.layers.encoder_layer_1"] and "17 tokens" in line
                   for line in out.splitlines())

    def test_timm_network(self, capsys: pytest.CaptureFixture[str]) -> None:
        pytest.importorskip("timm")
        code, out, err = self.run(capsys, "model=timm", "model.arch=resnet18", "image.size=32")
        assert code == 0, err
        rows = {line.split()[0]: line.split() for line in out.splitlines()[2:]}
        assert rows["layer3"][1:4] == ["Sequential", "256", "2x2"] and rows["layer3"][-1] == "pre"

    def test_torchvision_archs_and_errors(self, capsys: pytest.CaptureFixture[str]) -> None:
        code, out, err = self.run(capsys, "model=torchvision", "model.arch=resnet18", "image.size=32")
        assert code == 0, err
        assert any(line.startswith("layer4 ") and " 512 " in line and "1x1" in line
                   for line in out.splitlines())
        code, out, _ = self.run(capsys, "model=torchvision", "--archs")
        assert code == 0 and {"resnet18", "mobilenet_v3_small", "vit_b_16"} <= set(out.split())
        code, _, err = self.run(capsys, "model=torchvision", "model.arch=resnet81")
        assert code == 2 and "close names: resnet18" in err


@pytest.mark.usefixtures("hydra_conf")
class TestMoreBadInput:
    def test_timm_not_installed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
        hub_model_info.cache_clear()
        try:
            message = config_error("model=timm", "model.arch=resnet18", "target.layer=layer1")
        finally:
            hub_model_info.cache_clear()
        assert "timm is not installed: pip install 'featsweep[timm]'" in message

    def test_custom_has_no_pretrained_weights(self) -> None:
        message = config_error(*SMALL_NET, "model.weights=pretrained", "target.layer=block_a")
        assert "model.weights='pretrained': model=custom has no pretrained weights" in message

    def test_hub_file_of_another_architecture(self, empty_caches: Path) -> None:
        """A file in the hub cache that does not fit the architecture names the mismatch."""
        wanted = empty_caches / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
        wanted.parent.mkdir(parents=True)
        torch.save(nets.make_small_net().state_dict(), wanted)
        message = config_error("model=torchvision", "model.arch=resnet18", "target.layer=layer1",
                               "image.size=32")
        assert f"model.weights='{wanted}': the file does not match this architecture" in message
        assert "Missing key(s)" in message and "conv1.weight" in message

    def test_token_out_of_range(self) -> None:
        from featsweep.engine import validate

        spec = spec_of(*TINY_VIT, "target.layer=encoder.layers.encoder_layer_1",
                       "target.kind=neuron", "target.token=17", "target.channel=0")
        with pytest.raises(ConfigError) as info:
            validate([spec])
        assert ("target.token=17: layer encoder.layers.encoder_layer_1 has 17 tokens at "
                "image.size=32, so it must be in 0..16") in str(info.value)

    def test_no_default_layer(self) -> None:
        message = config_error("model=torchvision", "model.arch=resnet18", "model.weights=random")
        assert "target.layer=None: must be a module name (list them: python -m featsweep.layers " \
               "model=torchvision model.arch=resnet18)" in message
