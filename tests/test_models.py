"""Tests for featsweep.models: offline weights, clear errors, EfficientNet's BN+ReLU6 surgery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from featsweep.errors import ConfigError
from featsweep.models import build_model, resolve_weights
from featsweep.spec import IMAGENET_MEAN, IMAGENET_STD, ModelSpec


@pytest.fixture(scope="module")
def effnet() -> torch.nn.Module:
    return build_model(ModelSpec("efficientnet_lite0", "pretrained"))


def imagenet_input(img_u8: np.ndarray, size: int = 224) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, size, size): bilinear antialiased resize, ImageNet mean/std."""
    x = torch.from_numpy(img_u8).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test may see (or fill) the machine's torch-hub cache."""
    home = tmp_path / "torch_home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


class TestEfficientNetLite0:
    @pytest.mark.parametrize("name, label, p", [("chelsea", 285, 0.80), ("coffee", 967, 0.86)])
    def test_classifies_skimage_photos(self, effnet: torch.nn.Module, name: str, label: int,
                                       p: float) -> None:
        """285 = Egyptian cat, 967 = espresso. Guards the BN+ReLU6 surgery: a wrong activation
        (or one shared ReLU6 firing in the wrong place) would not give these probabilities."""
        data = pytest.importorskip("skimage.data")
        with torch.no_grad():
            probs = effnet(imagenet_input(getattr(data, name)())).softmax(dim=-1)[0]
        assert int(probs.argmax()) == label
        assert float(probs[label]) == pytest.approx(p, abs=0.02)

    def test_surgery_computes_the_package_function(self, effnet: torch.nn.Module) -> None:
        """The unmodified package model with the same weights gives the same logits."""
        from efficientnet_lite_pytorch import EfficientNet

        original = EfficientNet.from_name("efficientnet-lite0")
        path = resolve_weights(ModelSpec("efficientnet_lite0", "pretrained"))
        original.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        original.eval()
        x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(effnet(x), original(x), rtol=1e-5, atol=1e-5)
        # and the surgery really happened: every block BN is followed by its own ReLU6
        names = dict(effnet.named_modules())
        assert type(names["_blocks.10._bn1.act"]).__name__ == "ReLU6"
        assert type(names["_blocks.10._swish"]).__name__ == "Identity"

    def test_frozen_eval(self, effnet: torch.nn.Module) -> None:
        assert not effnet.training
        assert not any(p.requires_grad for p in effnet.parameters())

    def test_weights_from_a_path(self, effnet: torch.nn.Module) -> None:
        path = resolve_weights(ModelSpec("efficientnet_lite0", "pretrained"))
        model = build_model(ModelSpec("efficientnet_lite0", str(path)))
        for (n, a), (_, b) in zip(model.state_dict().items(), effnet.state_dict().items()):
            assert torch.equal(a, b), n


class TestMissingWeights:
    @pytest.mark.parametrize("name", ["inception_v3", "googlenet", "resnet50", "vgg16"])
    def test_pretrained_without_cache_says_how_to_fix(self, name: str,
                                                      empty_torch_home: Path) -> None:
        with pytest.raises(ConfigError) as info:
            build_model(ModelSpec(name, "pretrained"))
        message = str(info.value)
        checkpoints = empty_torch_home / "hub" / "checkpoints"
        assert "model.weights='pretrained'" in message
        assert f"no ImageNet weights for {name}" in message
        assert str(checkpoints) in message  # where to put the file
        assert ".pth" in message
        assert "model.weights=random" in message
        assert not checkpoints.exists() or not any(checkpoints.iterdir())  # nothing downloaded

    def test_cached_checkpoint_is_found(self, empty_torch_home: Path) -> None:
        """Copying the file where the error says makes model.weights=pretrained work."""
        import torchvision

        with pytest.raises(ConfigError) as info:
            build_model(ModelSpec("googlenet", "pretrained"))
        wanted = Path(str(info.value).split("looked for ")[1].split(")")[0])
        source = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
        wanted.parent.mkdir(parents=True)
        torch.save(source.state_dict(), wanted)
        model = build_model(ModelSpec("googlenet", "pretrained"))
        assert torch.equal(model.conv1.conv.weight, source.conv1.conv.weight)
        assert model.aux1 is None  # training-only heads dropped, as torchvision does

    def test_missing_path(self, tmp_path: Path) -> None:
        missing = tmp_path / "nope.pth"
        with pytest.raises(ConfigError) as info:
            build_model(ModelSpec("resnet50", str(missing)))
        message = str(info.value)
        assert f"model.weights='{missing}'" in message
        assert "no such file" in message

    def test_unreadable_file(self, tmp_path: Path) -> None:
        junk = tmp_path / "junk.pth"
        junk.write_bytes(b"not a checkpoint")
        with pytest.raises(ConfigError, match="could not read it as a PyTorch state dict"):
            build_model(ModelSpec("efficientnet_lite0", str(junk)))

    def test_wrong_architecture(self, tmp_path: Path) -> None:
        path = tmp_path / "tiny.pth"
        torch.save(build_model(ModelSpec("tiny", "random")).state_dict(), path)
        with pytest.raises(ConfigError, match="does not match this architecture"):
            build_model(ModelSpec("efficientnet_lite0", str(path)))

    def test_unknown_model(self) -> None:
        with pytest.raises(ConfigError, match=r"model\.name='lenet'.*allowed values"):
            build_model(ModelSpec("lenet", "random"))


class TestRandomWeights:
    @pytest.mark.parametrize("name", ["tiny", "inception_v3"])
    def test_deterministic_and_independent_of_global_rng(self, name: str) -> None:
        torch.manual_seed(123)
        a = build_model(ModelSpec(name, "random")).state_dict()
        torch.manual_seed(456)
        state = torch.get_rng_state()
        b = build_model(ModelSpec(name, "random")).state_dict()
        assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key

    def test_random_needs_no_file(self) -> None:
        assert resolve_weights(ModelSpec("inception_v3", "random")) is None

    def test_tiny_shape(self) -> None:
        model = build_model(ModelSpec("tiny", "random"))
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
        assert not model.training
