"""RunSpec: one job's settings as a plain, validated, typed value (no torch, no Hydra at run time).

The Hydra config is converted once, at the entry point (or by the batched launcher, for every
job of a sweep before any heavy work), with :func:`from_config`. Every rule a user can break is
checked here and raised as a :class:`~featsweep.errors.ConfigError` that names the key, the value
and what is allowed. Checks that need the model (layer names, channel counts) live in
``featsweep.targets`` and run right after the model is built, still before optimization.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Mapping

from featsweep.errors import config_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInfo:
    """What featsweep knows about a model before building it."""

    default_size: int  # input side in pixels used when image.size is null
    min_size: int  # smallest input side the architecture accepts, pixels
    default_layer: str  # target.layer used when it is null
    mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalization, per RGB channel
    std: tuple[float, float, float] = IMAGENET_STD
    weights: tuple[str, ...] = ("pretrained", "random")  # allowed model.weights words (or a path)


MODELS: dict[str, ModelInfo] = {
    "efficientnet_lite0": ModelInfo(224, 32, "_blocks.10"),
    "inception_v3": ModelInfo(299, 75, "Mixed_7c"),
    "googlenet": ModelInfo(224, 32, "inception4c"),
    "resnet50": ModelInfo(224, 32, "layer3"),
    "vgg16": ModelInfo(224, 32, "features.22"),
    # Small random CNN for tests: a fixed-seed init, so it is the same network everywhere.
    "tiny": ModelInfo(64, 16, "block3", weights=("random",)),
}

OPTIMIZERS = ("sgd", "adam")
RELU_CHOICES = ("post", "pre")
BLUR_KINDS = ("none", "box", "gaussian")
SPACES = ("pixel", "normalized")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class ModelSpec:
    name: str  # key of MODELS
    weights: str  # "pretrained", "random", or a path to a state-dict file


@dataclass(frozen=True)
class TargetSpec:
    layer: str  # module name as in model.named_modules(), e.g. "_blocks.10"
    channel: int  # channel index in that layer's output
    relu: str  # "post": the layer's output; "pre": the tensor entering its final ReLU(s)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str  # "sgd" | "adam" (update rules of torch.optim.SGD / torch.optim.Adam)
    lr: float  # step size, > 0
    momentum: float  # SGD momentum in [0, 1); ignored by Adam
    nesterov: bool  # SGD Nesterov momentum (needs momentum > 0); ignored by Adam
    betas: tuple[float, float]  # Adam moment decay rates in [0, 1); ignored by SGD
    weight_decay: float  # L2 penalty added to the gradient (torch.optim semantics), >= 0
    eps: float  # Adam denominator epsilon, > 0


@dataclass(frozen=True)
class RegularizerSpec:
    clamp: bool  # clamp the image after every step
    clamp_range: tuple[float, float]  # (low, high), in clamp_space units
    clamp_space: str  # "pixel" ([0,1] RGB) or "normalized" ((x - mean) / std, the notes' space)


@dataclass(frozen=True)
class BlurSpec:
    kind: str  # "none" | "box" | "gaussian"
    k: int  # kernel side in pixels, odd; 1 = no blur
    sigma: float | None  # Gaussian sigma in pixels; None = OpenCV's rule from k
    every: int  # blur after every `every` steps


@dataclass(frozen=True)
class ImageSpec:
    size: int  # side of the square image, pixels (resolved from the model when null)
    space: str  # what is optimized: "pixel" (x in [0,1]) or "normalized" ((x - mean) / std)


@dataclass(frozen=True)
class RunSpec:
    model: ModelSpec
    target: TargetSpec
    optimizer: OptimizerSpec
    regularizer: RegularizerSpec
    blur: BlurSpec
    image: ImageSpec
    steps: int  # optimization steps, > 0
    seed: int  # seeds the starting noise: same seed and size -> same start
    device: str  # "auto" | "cpu" | "cuda"
    log_every: int  # steps between progress lines and host syncs
    precision: str  # "fp32" | "bf16" (autocast on CUDA)

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one batch (same network, input size and space)."""
        return (self.model.name, self.model.weights, self.image.size, self.image.space,
                self.device, self.precision)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _get(cfg: Mapping[str, Any], key: str, default: Any = ...) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not hasattr(node, "get") or part not in node:
            if default is ...:
                raise config_error(key, None, "this key is required (is the config group missing?)")
            return default
        node = node[part]
    return node


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise config_error(key, value, f"allowed values are {', '.join(allowed)}{extra}")
    return str(value)


def _number(key: str, value: Any, *, kind: type = float, low: float | None = None,
            high: float | None = None, low_open: bool = False, high_open: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and isinstance(value, float) and not value.is_integer()):
        raise config_error(key, value, f"must be {'an integer' if kind is int else 'a number'}")
    value = kind(value)
    if not math.isfinite(value):
        raise config_error(key, value, "must be finite")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        raise config_error(key, value, "must be " + " and ".join(s for s in (lo, hi) if s))
    return value


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise config_error(key, value, "must be true or false")
    return value


def _pair(key: str, value: Any) -> tuple[float, float]:
    if not hasattr(value, "__len__") or isinstance(value, str) or len(value) != 2:
        raise config_error(key, value, "must be a list of two numbers, e.g. [0.9, 0.999]")
    return (_number(key, value[0]), _number(key, value[1]))


def from_config(cfg: Mapping[str, Any]) -> RunSpec:
    """Validate a composed featsweep config (DictConfig or dict) into a RunSpec.

    Raises ConfigError (one paragraph: key, value, rule) on the first bad value.
    """
    model_name = _choice("model.name", _get(cfg, "model.name"), tuple(MODELS))
    info = MODELS[model_name]
    weights = _get(cfg, "model.weights")
    if not isinstance(weights, str) or not weights:
        raise config_error("model.weights", weights,
                           f"use {' or '.join(info.weights)}, or a path to a weights file")
    if model_name == "tiny" and weights != "random":
        raise config_error("model.weights", weights, "the tiny test model only has random weights")
    model = ModelSpec(model_name, weights)

    layer = _get(cfg, "target.layer", None)
    layer = info.default_layer if layer is None else layer
    if not isinstance(layer, str) or not layer:
        raise config_error("target.layer", layer, "must be a module name such as "
                           f"{info.default_layer!r} (list them: python -m featsweep.layers "
                           f"model={model_name})")
    target = TargetSpec(layer, _number("target.channel", _get(cfg, "target.channel"), kind=int, low=0),
                        _choice("target.relu", _get(cfg, "target.relu"), RELU_CHOICES))

    opt_name = _choice("optimizer.name", _get(cfg, "optimizer.name"), OPTIMIZERS)
    momentum = _number("optimizer.momentum", _get(cfg, "optimizer.momentum", 0.0), low=0.0, high=1.0,
                       high_open=True)
    nesterov = _flag("optimizer.nesterov", _get(cfg, "optimizer.nesterov", False))
    if opt_name == "sgd" and nesterov and momentum == 0:
        raise config_error("optimizer.nesterov", nesterov, "Nesterov momentum needs "
                           "optimizer.momentum > 0 (as in torch.optim.SGD)")
    betas = _pair("optimizer.betas", _get(cfg, "optimizer.betas", (0.9, 0.999)))
    for i, b in enumerate(betas):
        _number(f"optimizer.betas[{i}]", b, low=0.0, high=1.0, high_open=True)
    optimizer = OptimizerSpec(
        name=opt_name,
        lr=_number("optimizer.lr", _get(cfg, "optimizer.lr"), low=0.0, low_open=True),
        momentum=momentum, nesterov=nesterov, betas=betas,
        weight_decay=_number("optimizer.weight_decay", _get(cfg, "optimizer.weight_decay", 0.0),
                             low=0.0),
        eps=_number("optimizer.eps", _get(cfg, "optimizer.eps", 1e-8), low=0.0, low_open=True))

    space = _choice("image.space", _get(cfg, "image.space"), SPACES)
    clamp_range = _pair("regularizer.clamp_range", _get(cfg, "regularizer.clamp_range", (0.0, 1.0)))
    if not clamp_range[0] < clamp_range[1]:
        raise config_error("regularizer.clamp_range", list(clamp_range), "low must be < high")
    clamp_space = _get(cfg, "regularizer.clamp_space", None)
    regularizer = RegularizerSpec(
        clamp=_flag("regularizer.clamp", _get(cfg, "regularizer.clamp")),
        clamp_range=clamp_range,
        clamp_space=space if clamp_space is None else _choice("regularizer.clamp_space",
                                                              clamp_space, SPACES))

    kind = _choice("blur.kind", _get(cfg, "blur.kind"), BLUR_KINDS)
    k = _number("blur.k", _get(cfg, "blur.k"), kind=int)
    if k < 1 or k % 2 == 0:
        raise config_error("blur.k", k, "the kernel side must be odd and >= 1 (1 = no blur)")
    if kind == "none" and k != 1:
        raise config_error("blur.k", k, "blur.kind=none does not blur; use blur=box or "
                           "blur=gaussian to blur with a kernel")
    sigma = _get(cfg, "blur.sigma", None)
    if sigma is not None:
        sigma = _number("blur.sigma", sigma, low=0.0, low_open=True)
    blur = BlurSpec(kind, k, sigma, _number("blur.every", _get(cfg, "blur.every", 1), kind=int, low=1))

    size = _get(cfg, "image.size", None)
    size = info.default_size if size is None else _number("image.size", size, kind=int)
    if size < info.min_size:
        raise config_error("image.size", size, f"{model_name} needs images of at least "
                           f"{info.min_size} px")
    image = ImageSpec(size, space)
    if blur.kind != "none" and k // 2 >= size:
        raise config_error("blur.k", k, f"the kernel must fit the image: blur.k // 2 must be < "
                           f"image.size ({size})")

    return RunSpec(
        model=model, target=target, optimizer=optimizer, regularizer=regularizer, blur=blur,
        image=image,
        steps=_number("steps", _get(cfg, "steps"), kind=int, low=1),
        seed=_number("seed", _get(cfg, "seed"), kind=int),
        device=_choice("device", _get(cfg, "device"), DEVICES),
        log_every=_number("log_every", _get(cfg, "log_every", 100), kind=int, low=1),
        precision=_choice("precision", _get(cfg, "precision", "fp32"), PRECISIONS),
    )
