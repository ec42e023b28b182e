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
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from featsweep.errors import ConfigError, config_error

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelInfo:
    """What featsweep knows about a model before building it (``model_info``)."""

    default_size: int  # input side in pixels used when image.size is null
    min_size: int  # smallest input side the architecture accepts, pixels
    default_layer: str | None  # target.layer used when it is null (None: target.layer is required)
    mean: tuple[float, ...] = IMAGENET_MEAN  # input normalization, one value per input channel
    std: tuple[float, ...] = IMAGENET_STD
    weights: tuple[str, ...] = ("pretrained", "random")  # allowed model.weights words (or a path)
    in_channels: int = 3  # channels of the input image: 3 = RGB, 1 = grayscale, 4+ allowed
    max_size: int | None = None  # largest input side; = min_size for fixed-size networks (ViTs)


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
RELU_GRADIENTS = ("normal", "redirect")
OBJECTIVE_KINDS = ("channel", "neuron", "direction", "deepdream")
BLUR_KINDS = ("none", "box", "gaussian")
BLUR_MODES = ("project", "transform")
SPACES = ("pixel", "normalized")
PARAM_KINDS = ("pixel", "fft")
SQUASHES = ("none", "sigmoid")
PAD_MODES = ("constant", "reflect", "replicate")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
TRUNCATIONS = ("auto", "hooks")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")


# --- The model block: which network, how to normalize its input, and its batching identity. ---

MODEL_FORMS = ("torchvision", "timm", "custom")  # model=<form>: any network, not one of MODELS
# Keys of a model=torchvision|timm|custom node that featsweep reads itself; every other key of the
# node is passed to the builder (torchvision, timm) or to the factory (custom: Hydra's
# instantiate), e.g. +model.num_classes=10.
MODEL_KEYS = ("name", "weights", "arch", "_target_", "mean", "std", "size", "min_size",
              "in_channels", "layer")
_WEIGHT_WORDS = ("pretrained", "random")


@dataclass(frozen=True)
class ModelSpec:
    """A network as a config value: a preset of MODELS, or a form of MODEL_FORMS with its settings.

    Fields left None take the network's own values (``model_info``): normalization from the
    weights' metadata (torchvision, timm), sizes from the architecture.
    """

    name: str  # a key of MODELS, or "torchvision" | "timm" | "custom"
    weights: str  # "pretrained", "random", a torchvision weights name (IMAGENET1K_V2), or a path
    arch: str | None = None  # torchvision/timm architecture, e.g. "resnet18", "convnext_tiny"
    target: str | None = None  # custom: import path of a factory returning an nn.Module (_target_)
    args: str = "{}"  # builder/factory keyword arguments, a JSON object (sorted keys: hashable)
    mean: tuple[float, ...] | None = None  # input normalization, one value per input channel
    std: tuple[float, ...] | None = None
    size: int | None = None  # default image side, px (image.size=null)
    min_size: int | None = None  # smallest image side the network accepts, px
    in_channels: int | None = None  # input channels: 3 RGB, 1 grayscale, 4+ multispectral
    layer: str | None = None  # default target.layer

    @property
    def kwargs(self) -> dict[str, Any]:
        """The builder/factory arguments as a dict."""
        return json.loads(self.args)

    @property
    def cli(self) -> str:
        """The command-line form naming this network (without the leading ``model=``), as the
        messages' ``python -m featsweep.layers model=...`` hints need it."""
        if self.name not in MODEL_FORMS:
            return self.name
        parts = [self.name]
        if self.arch is not None:
            parts.append(f"model.arch={self.arch}")
        if self.target is not None:
            parts.append(f"model._target_={self.target}")
        for key in ("mean", "std", "in_channels", "size"):
            value = getattr(self, key)
            if value is not None:
                shown = "[" + ",".join(f"{v:g}" for v in value) + "]" if isinstance(
                    value, tuple) else value
                parts.append(f"model.{key}={shown}")
        parts += [f"+model.{k}={json.dumps(v)}" for k, v in self.kwargs.items()]
        return " ".join(parts)

    @property
    def label(self) -> str:
        """A short name for messages and progress lines: resnet50, torchvision resnet18, pkg.net."""
        if self.name == "custom":
            return str(self.target)
        return f"{self.name} {self.arch}" if self.name in MODEL_FORMS else self.name

    def identity(self) -> tuple[Any, ...]:
        """Equal for two jobs exactly when they run the same network with the same weights and
        input normalization: the model part of ``RunSpec.batch_key``. A weights path counts by
        its real path, so two spellings of one file share a batch."""
        weights = self.weights
        if weights not in _WEIGHT_WORDS and not weights.replace("_", "").isalnum():
            weights = os.path.realpath(os.path.expanduser(weights))
        return (self.name, self.arch, self.target, self.args, weights, self.mean, self.std,
                self.in_channels)


def model_from_config(cfg: Mapping[str, Any]) -> ModelSpec:
    """The model block of from_config: the ``model`` node -> ModelSpec (torch-free)."""
    name = _get(cfg, "model.name")
    if name not in MODELS and name not in MODEL_FORMS:
        allowed = tuple(MODELS) + MODEL_FORMS
        hint = difflib.get_close_matches(str(name), allowed, n=1)
        extra = f"did you mean {hint[0]!r}? " if hint else ""
        raise config_error("model.name", name, f"allowed values are {', '.join(allowed)} ("
                           f"{extra}any torchvision classifier: model=torchvision "
                           f"model.arch={name}; README: Your own model)")
    weights = _get(cfg, "model.weights")
    if isinstance(weights, (list, tuple)) or not isinstance(weights, str) or not weights:
        raise config_error("model.weights", weights,
                           "use pretrained or random, or a path to a state-dict file")
    if name in MODELS:
        if name == "tiny" and weights != "random":
            raise config_error("model.weights", weights,
                               "the tiny test model only has random weights")
        node = _get(cfg, "model")
        extra_keys = [k for k in node if k not in ("name", "weights")]
        if extra_keys:
            key = extra_keys[0]
            raise config_error(f"model.{key}", node[key], f"the preset model={name} takes only "
                               "model.weights; for other settings use model=torchvision "
                               f"model.arch=... or model=custom (README: Your own model)")
        return ModelSpec(name, weights)

    node = _get(cfg, "model")  # reads the whole node: its other keys are builder arguments
    args = {str(k): _plain(node[k]) for k in node if k not in MODEL_KEYS}
    arch = node.get("arch")
    target = node.get("_target_")
    if name in ("torchvision", "timm"):
        if not isinstance(arch, str) or not arch:
            raise config_error("model.arch", arch, f"model={name} needs an architecture name, "
                               "e.g. model.arch=resnet18 (list them: python -m "
                               f"featsweep.layers model={name} --archs)")
        if target is not None:
            raise config_error("model._target_", target, f"model={name} builds the network from "
                               "model.arch; use model=custom for a factory")
    else:
        if not isinstance(target, str) or not target:
            raise config_error("model._target_", target, "model=custom needs the import path of a "
                               "function or class that returns the nn.Module, e.g. "
                               "model._target_=mypkg.nets.make_net (its arguments as "
                               "+model.ARG=VALUE)")
        arch = None
    in_channels = node.get("in_channels")
    if in_channels is not None:
        in_channels = _number("model.in_channels", in_channels, kind=int, low=1)
    mean, std = (None if node.get(k) is None else _number_list(f"model.{k}", node.get(k))
                 for k in ("mean", "std"))
    for i, s in enumerate(std or ()):
        if s <= 0:
            raise config_error(f"model.std[{i}]", s, "must be > 0 (the input is divided by it)")
    if name == "custom":
        if mean is None or std is None:
            key = "model.mean" if mean is None else "model.std"
            raise config_error(key, None, "model=custom needs the input normalization its "
                               "network was trained with: model.mean=[...] model.std=[...], one "
                               "value per input channel (e.g. [0.5] and [0.25] for grayscale; "
                               "[0,0,0] and [1,1,1] mean none)")
        in_channels = in_channels or 3
    channels = in_channels or (len(mean) if mean else len(std) if std else None)
    for key, value in (("model.mean", mean), ("model.std", std)):
        if value is not None and channels is not None and len(value) != channels:
            raise config_error(key, list(value), f"needs one value per input channel: "
                               f"{channels} (model.in_channels), got {len(value)}")
    layer = node.get("layer")
    if isinstance(layer, int) and not isinstance(layer, bool):
        layer = str(layer)  # Hydra reads model.layer=3 as an int; nn.Sequential names it "3"
    if layer is not None and (not isinstance(layer, str) or not layer):
        raise config_error("model.layer", layer, "must be a module name, or null")
    sizes = {k: None if node.get(k) is None else _number(f"model.{k}", node.get(k), kind=int, low=1)
             for k in ("size", "min_size")}
    return ModelSpec(name, weights, arch=arch, target=target,
                     args=json.dumps(args, sort_keys=True), mean=mean, std=std,
                     size=sizes["size"], min_size=sizes["min_size"], in_channels=in_channels,
                     layer=layer)


def _plain(value: Any) -> Any:
    """A config value as plain JSON-able Python (OmegaConf containers -> dict/list)."""
    if isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "keys")):
        return {str(k): _plain(value[k]) for k in value}
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and hasattr(value, "__len__")
                                            and not isinstance(value, str)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise config_error("model", value, "builder arguments must be numbers, strings, lists or "
                       "mappings")


def model_info(spec: ModelSpec) -> ModelInfo:
    """Sizes, default layer, normalization and input channels of `spec`'s network.

    Presets and model=custom: from the config alone (no torch import). torchvision and timm: from
    the weights' metadata (imports that library once; cached), in ``featsweep.models``.
    Raises ConfigError for an unknown architecture.
    """
    if spec.name in MODELS:
        return MODELS[spec.name]
    if spec.name == "torchvision" and spec.in_channels not in (None, 3):
        raise config_error("model.in_channels", spec.in_channels, f"torchvision's {spec.arch} "
                           "takes RGB (3-channel) input; for other inputs use model=timm (which "
                           "builds its first layer for model.in_channels) or model=custom")
    if spec.name in ("torchvision", "timm"):
        from featsweep.models import hub_model_info  # heavy: torchvision / timm

        base = hub_model_info(spec.name, spec.arch, spec.args)
    else:
        base = ModelInfo(224, 1, None, weights=_WEIGHT_WORDS)
    in_channels = spec.in_channels or base.in_channels
    mean = spec.mean or base.mean
    std = spec.std or base.std
    if len(mean) != in_channels or len(std) != in_channels:
        raise config_error("model.mean", list(mean), f"{spec.label} takes {in_channels}-channel "
                           f"input but its normalization has {len(mean)} values; give "
                           f"model.mean and model.std with {in_channels} values each")
    min_size = spec.min_size or base.min_size
    default = spec.size or base.default_size
    if base.max_size is not None and spec.size is None:
        default = base.max_size
    return dataclasses.replace(base, default_size=max(default, min_size), min_size=min_size,
                               default_layer=spec.layer or base.default_layer, mean=mean, std=std,
                               in_channels=in_channels)


@dataclass(frozen=True)
class TargetSpec:
    layer: str  # module name as in model.named_modules(), e.g. "_blocks.10"
    channel: int  # channel index in that layer's output (channel and neuron objectives)
    relu: str  # "post": the layer's output; "pre": the tensor entering its final ReLU(s)
    kind: str = "channel"  # objective: channel | neuron | direction | deepdream (featsweep.objectives)
    x: int | None = None  # neuron column in the layer's output; None = the centre (W // 2)
    y: int | None = None  # neuron row; None = the centre (H // 2)
    token: int | None = None  # neuron of a token layer ((N, C) output, read as (C, 1, N)):
    # the token index, i.e. x = token, y = 0
    direction: str | None = None  # direction objective: path to a .npy (C,) vector, or "random"
    diversity: float = 0.0  # weight of the Gram-matrix diversity term within diversity_group, >= 0
    diversity_group: str | None = None  # jobs sharing this name run in one batch, pushed apart
    relu_gradient: str = "normal"  # normal | redirect (Lucid's redirected ReLU gradient)
    redirect_steps: int | None = None  # redirect only for the first N steps; None = every step


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
    # Penalty weights (>= 0) subtracted from the objective, each a per-pixel mean on the pixel
    # image x in [0, 1] (featsweep.penalties): l1 = mean|x - 0.5|, l2 = mean (x - 0.5)^2,
    # tv = mean |vertical| + mean |horizontal differences|, blur = 0.5 mean (x - blur3(x))^2.
    l1: float = 0.0
    l2: float = 0.0
    tv: float = 0.0
    blur: float = 0.0


@dataclass(frozen=True)
class BlurSpec:
    kind: str  # "none" | "box" | "gaussian"
    k: int  # kernel side in pixels, odd; 1 = no blur (kind none: always 1)
    sigma: float | None  # Gaussian sigma in pixels; None = OpenCV's rule from k
    every: int  # blur after every `every` steps (mode project)
    mode: str = "project"  # project: blur the image after the step (the notes) | transform: blur
    # inside the forward graph, every step, gradients flowing through it

    @property
    def active(self) -> bool:
        return self.kind != "none" and self.k > 1


@dataclass(frozen=True)
class ParamSpec:
    """How the optimized parameters become the image (featsweep.param)."""

    kind: str = "pixel"  # pixel: the image itself (in image.space units) | fft: Lucid's spectrum
    decay: float = 1.0  # fft: spectrum scaled by 1 / max(f, 1/max(H, W)) ** decay, >= 0
    decorrelate: bool = False  # Lucid's ImageNet colour-correlation matrix (3 channels only)
    squash: str = "none"  # none | sigmoid: image = sigmoid(...), always inside (0, 1)
    init_sd: float | None = None  # start ~ N(0, init_sd); None: pixel+none = the notes' uniform
    # noise, otherwise 0.01 (Lucid's default)

    @property
    def is_plain(self) -> bool:
        """The notes' parameterization: the optimized tensor is the image."""
        return self.kind == "pixel" and not self.decorrelate and self.squash == "none"


@dataclass(frozen=True)
class EngineSpec:
    """How a batch runs: speed settings, shared by a batch (part of the batch key)."""

    memory_format: str = "auto"  # auto (= channels_last) | channels_last | contiguous
    truncate: str = "auto"  # auto: FX graph cut (featsweep.graph) where it traces, else hooks
    compile: bool = False  # torch.compile(fullgraph=True) of the step
    cuda_graphs: bool = False  # CUDA only: capture the step once, replay it
    fuse_conv: bool = True  # graph cut: eval-mode BatchNorm2d and zero pads folded into convs


@dataclass(frozen=True)
class TransformSpec:
    """Random differentiable transforms between the image and the model, redrawn every step
    (featsweep.transforms), in this order: pad -> jitter -> scale -> rotate -> jitter_final."""

    pad: int = 0  # pixels added on each side
    pad_mode: str = "constant"  # constant | reflect | replicate
    pad_value: float = 0.5  # constant mode: the border's pixel value
    # Lucid/Lucent's jitter d: a random crop, d px smaller, at offsets 0..d-1 in x and y; 0 = none
    jitter: int = 0
    scale: tuple[float, ...] = (1.0,)  # scale factors drawn uniformly (about the centre)
    rotate: tuple[float, ...] = (0.0,)  # angles in degrees drawn uniformly
    jitter_final: int = 0  # a second jitter crop after scale and rotate (Lucid's standard: 4)

    @property
    def crop(self) -> int:
        """Pixels the two jitter crops take off each side length."""
        return self.jitter + self.jitter_final

    def model_size(self, image_size: int) -> int:
        """Side of the image the model sees: image.size + 2 pad − jitter − jitter_final."""
        return image_size + 2 * self.pad - self.crop

    @property
    def geometric(self) -> bool:
        """Whether the image is warped: a jitter crop, a scale or a rotation."""
        return self.crop > 0 or any(s != 1.0 for s in self.scale) or any(r != 0.0 for r in self.rotate)

    @property
    def active(self) -> bool:
        return self.pad > 0 or self.geometric


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
    param: ParamSpec = ParamSpec()
    transform: TransformSpec = TransformSpec()
    engine: EngineSpec = EngineSpec()

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one batch (same network, image size, device and
        precision, and engine settings). Parameterization, space, transforms, objectives and
        penalties are per image."""
        return (self.model.identity(), self.image.size, self.device, self.precision, self.engine)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys of the composed config that code outside from_config reads (so they are known keys).
# Add a key here when another module reads it from the job config.
KEYS_READ_ELSEWHERE: set[str] = {"resume", "optimized_metric", "resume_any_version"}

# Values that mean something else than their spelling suggests.
_SYNONYMS = {"gpu": "cuda", "cuda:0": "cuda", "nvidia": "cuda", "cpu:0": "cpu", "float32": "fp32",
             "bfloat16": "bf16", "fourier": "fft", "spectral": "fft", "pixels": "pixel",
             "relu": "post", "before": "pre", "after": "post", "blur": "box", "off": "none",
             "false": "none"}

_SEEN: list[set[str]] = []  # keys read by the from_config calls in progress (innermost last)


def _get(cfg: Mapping[str, Any], key: str, default: Any = ...) -> Any:
    if _SEEN:
        _SEEN[-1].add(key)
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
        synonym = _SYNONYMS.get(str(value).lower())
        hint = [synonym] if synonym in allowed else difflib.get_close_matches(str(value), allowed, n=1)
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

    Raises ConfigError (one paragraph: key, value, rule) on the first bad value, and for any key
    that featsweep does not read (a typo such as ``+optimzer.lr=0.1``), naming the closest key.
    """
    _SEEN.append(set())
    try:
        spec = _from_config(cfg)
        _check_unknown_keys(cfg, _SEEN[-1] | KEYS_READ_ELSEWHERE)
    finally:
        _SEEN.pop()
    return spec


def _leaves(node: Any, prefix: str = "") -> list[str]:
    """Dotted names of a config's leaves (lists count as leaves), without Hydra's node."""
    out = []
    for key in node:
        name = f"{prefix}{key}"
        if not prefix and key == "hydra":
            continue
        value = node[key]
        if hasattr(value, "keys") and len(value):
            out.extend(_leaves(value, name + "."))
        else:
            out.append(name)
    return out


def _check_unknown_keys(cfg: Mapping[str, Any], known: set[str]) -> None:
    """Refuse keys nothing reads: a key is known when it, or a node above it, was read."""
    try:
        leaves = _leaves(cfg)
    except Exception:  # an unresolvable interpolation: the value checks already reported it
        return
    for leaf in leaves:
        parts = leaf.split(".")
        if any(".".join(parts[:i]) in known for i in range(1, len(parts) + 1)):
            continue
        close = difflib.get_close_matches(leaf, sorted(known), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}? " if close else ""
        value = _get(cfg, leaf, None)
        raise ConfigError(
            f"featsweep: unknown config key {leaf}={value!r}: featsweep does not read it, so it "
            f"would be silently ignored ({hint}a '+' on the command line adds a new key and does "
            "not make it meaningful; python -m featsweep --cfg job shows every key).")


def _from_config(cfg: Mapping[str, Any]) -> RunSpec:
    model = model_from_config(cfg)
    info = model_info(model)

    layer = _get(cfg, "target.layer", None)
    if isinstance(layer, int) and not isinstance(layer, bool):
        layer = str(layer)  # Hydra reads target.layer=3 as an int; nn.Sequential names it "3"
    layer = info.default_layer if layer is None else layer
    if not isinstance(layer, str) or not layer:
        example = f"such as {info.default_layer!r} " if info.default_layer else ""
        raise config_error("target.layer", layer, f"must be a module name {example}(list them: "
                           f"python -m featsweep.layers model={model.cli})")
    target = _target(cfg, layer)

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
                                                              clamp_space, SPACES),
        **{name: _number(f"regularizer.{name}", _get(cfg, f"regularizer.{name}", 0.0), low=0.0)
           for name in ("l1", "l2", "tv", "blur")})

    kind = _choice("blur.kind", _get(cfg, "blur.kind"), BLUR_KINDS)
    k = _number("blur.k", _get(cfg, "blur.k"), kind=int)
    if k < 1 or k % 2 == 0:
        raise config_error("blur.k", k, "the kernel side must be odd and >= 1 (1 = no blur)")
    if kind == "none":
        k = 1  # no blur whatever blur.k says, so sweeps like blur.kind=none,box work
    sigma = _get(cfg, "blur.sigma", None)
    if sigma is not None:
        sigma = _number("blur.sigma", sigma, low=0.0, low_open=True)
    blur = BlurSpec(kind, k, sigma, _number("blur.every", _get(cfg, "blur.every", 1), kind=int, low=1),
                    _choice("blur.mode", _get(cfg, "blur.mode", "project"), BLUR_MODES))

    size = _get(cfg, "image.size", None)
    size = info.default_size if size is None else _number("image.size", size, kind=int)
    if info.max_size is not None and info.max_size == info.min_size and size != info.min_size:
        raise config_error("image.size", size, f"{model.label} takes exactly {info.min_size} px "
                           "images (a ViT's position embedding fixes its input size; build it "
                           "for another size with +model.image_size=N, or +model.img_size=N for "
                           "timm)")
    if size < info.min_size:
        raise config_error("image.size", size, f"{model.label} needs images of at least "
                           f"{info.min_size} px")
    if info.max_size is not None and size > info.max_size:
        raise config_error("image.size", size, f"{model.label} takes images of at most "
                           f"{info.max_size} px")
    image = ImageSpec(size, space)
    if blur.kind != "none" and k // 2 >= size:
        raise config_error("blur.k", k, f"the kernel must fit the image: blur.k // 2 must be < "
                           f"image.size ({size})")

    param = _param(cfg, image)
    transform = _transform(cfg, size)
    return RunSpec(
        model=model, target=target, optimizer=optimizer, regularizer=regularizer, blur=blur,
        image=image,
        steps=_number("steps", _get(cfg, "steps"), kind=int, low=1),
        seed=_number("seed", _get(cfg, "seed"), kind=int),
        device=_choice("device", _get(cfg, "device"), DEVICES),
        log_every=_number("log_every", _get(cfg, "log_every", 100), kind=int, low=1),
        precision=_choice("precision", _get(cfg, "precision", "fp32"), PRECISIONS),
        param=param, transform=transform, engine=_engine(cfg),
    )


def _engine(cfg: Mapping[str, Any]) -> EngineSpec:
    return EngineSpec(
        memory_format=_choice("engine.memory_format", _get(cfg, "engine.memory_format", "auto"),
                              MEMORY_FORMATS),
        truncate=_choice("engine.truncate", _get(cfg, "engine.truncate", "auto"), TRUNCATIONS),
        compile=_flag("engine.compile", _get(cfg, "engine.compile", False)),
        cuda_graphs=_flag("engine.cuda_graphs", _get(cfg, "engine.cuda_graphs", False)),
        fuse_conv=_flag("engine.fuse_conv", _get(cfg, "engine.fuse_conv", True)))


def _optional_int(key: str, value: Any, low: int = 0) -> int | None:
    return None if value is None else _number(key, value, kind=int, low=low)


def _neuron_position(cfg: Mapping[str, Any], kind: str) -> dict[str, int | None]:
    """target.x/y, or target.token for token layers (ViT blocks): their (B, N, C) output is read
    as (B, C, 1, N), so token t is the neuron at x = t, y = 0."""
    x = _optional_int("target.x", _get(cfg, "target.x", None))
    y = _optional_int("target.y", _get(cfg, "target.y", None))
    token = _optional_int("target.token", _get(cfg, "target.token", None))
    if token is not None:
        if kind != "neuron":
            raise config_error("target.token", token, "picks one token of a neuron objective: "
                               "use it with target.kind=neuron (target.kind=channel averages "
                               "over all tokens)")
        if x is not None or y is not None:
            raise config_error("target.token", token, "gives the position itself (x = token, "
                               "y = 0): leave target.x and target.y null")
        x, y = token, 0
    return {"x": x, "y": y, "token": token}


def _target(cfg: Mapping[str, Any], layer: str) -> TargetSpec:
    kind = _choice("target.kind", _get(cfg, "target.kind", "channel"), OBJECTIVE_KINDS)
    direction = _get(cfg, "target.direction", None)
    if kind == "direction":
        if not isinstance(direction, str) or not direction:
            raise config_error("target.direction", direction, "target.kind=direction needs a "
                               "direction: a path to a .npy vector with one value per channel of "
                               "the layer, or random (a Gaussian vector seeded by seed)")
        if direction != "random":
            from pathlib import Path

            if not Path(direction).expanduser().is_file():
                raise config_error("target.direction", direction, "no such file; give a .npy "
                                   "vector with one value per channel of the layer, or random")
    elif direction is not None and not isinstance(direction, str):
        raise config_error("target.direction", direction, "must be a path, random, or null")
    diversity = _number("target.diversity", _get(cfg, "target.diversity", 0.0), low=0.0)
    group = _get(cfg, "target.diversity_group", None)
    if group is not None:
        if isinstance(group, bool) or not isinstance(group, (str, int)) or str(group) == "":
            raise config_error("target.diversity_group", group, "must be a name (jobs that share "
                               "it run in one batch and are pushed apart), or null")
        group = str(group)
    if diversity > 0 and group is None:
        raise config_error("target.diversity", diversity, "a diversity weight needs "
                           "target.diversity_group: the name of the jobs to push apart (for "
                           "example target.diversity_group=a with -m seed=0,1,2,3)")
    relu_gradient = _choice("target.relu_gradient", _get(cfg, "target.relu_gradient", "normal"),
                            RELU_GRADIENTS)
    return TargetSpec(
        layer=layer,
        channel=_number("target.channel", _get(cfg, "target.channel"), kind=int, low=0),
        relu=_choice("target.relu", _get(cfg, "target.relu"), RELU_CHOICES),
        kind=kind,
        **_neuron_position(cfg, kind),
        direction=None if direction is None else str(direction),
        diversity=diversity,
        diversity_group=group,
        relu_gradient=relu_gradient,
        redirect_steps=_optional_int("target.redirect_steps", _get(cfg, "target.redirect_steps", None),
                                     low=1),
    )


def _param(cfg: Mapping[str, Any], image: ImageSpec) -> ParamSpec:
    kind = _choice("param.kind", _get(cfg, "param.kind", "pixel"), PARAM_KINDS)
    init_sd = _get(cfg, "param.init_sd", None)
    param = ParamSpec(
        kind=kind,
        decay=_number("param.decay", _get(cfg, "param.decay", 1.0), low=0.0),
        decorrelate=_flag("param.decorrelate", _get(cfg, "param.decorrelate", False)),
        squash=_choice("param.squash", _get(cfg, "param.squash", "none"), SQUASHES),
        init_sd=None if init_sd is None else _number("param.init_sd", init_sd, low=0.0,
                                                     low_open=True))
    if image.space == "normalized" and not param.is_plain:
        what = "param=fft" if kind == "fft" else "param.decorrelate/param.squash"
        raise config_error("image.space", "normalized", f"{what} builds the image in pixel "
                           "space ([0, 1]); image.space=normalized (the notes' optimized tensor) "
                           "exists only for param=pixel without decorrelate or squash; use "
                           "image.space=pixel")
    return param


def _number_list(key: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value]
    if not hasattr(value, "__len__") or isinstance(value, str):
        raise config_error(key, value, "must be a list of numbers, e.g. [0.9, 1.0, 1.1]")
    if len(value) == 0:
        raise config_error(key, list(value), "must list at least one value (use [1.0] for no "
                           "scaling, [0] for no rotation)")
    return tuple(_number(f"{key}[{i}]", v) for i, v in enumerate(value))


def _transform(cfg: Mapping[str, Any], size: int) -> TransformSpec:
    pad = _number("transform.pad", _get(cfg, "transform.pad", 0), kind=int, low=0)
    if pad >= size:
        raise config_error("transform.pad", pad, f"must be smaller than image.size ({size})")
    jitters = {}
    for key in ("jitter", "jitter_final"):
        value = _number(f"transform.{key}", _get(cfg, f"transform.{key}", 0), kind=int, low=0)
        if value >= size:
            raise config_error(f"transform.{key}", value, f"the jitter crop must be smaller "
                               f"than image.size ({size})")
        jitters[key] = value
    scale = _number_list("transform.scale", _get(cfg, "transform.scale", [1.0]))
    for i, s in enumerate(scale):
        if s <= 0:
            raise config_error(f"transform.scale[{i}]", s, "scale factors must be > 0")
    rotate = _number_list("transform.rotate", _get(cfg, "transform.rotate", [0.0]))
    spec = TransformSpec(
        pad=pad,
        pad_mode=_choice("transform.pad_mode", _get(cfg, "transform.pad_mode", "constant"), PAD_MODES),
        pad_value=_number("transform.pad_value", _get(cfg, "transform.pad_value", 0.5)),
        jitter=jitters["jitter"], scale=scale, rotate=rotate, jitter_final=jitters["jitter_final"])
    if spec.model_size(size) < 1:
        raise config_error("transform.jitter", spec.jitter,
                           f"the two jitter crops (transform.jitter + transform.jitter_final = "
                           f"{spec.crop} px) must leave the model an image: image.size + 2 × "
                           f"transform.pad − both = {spec.model_size(size)} px, must be ≥ 1")
    return spec


def check_batch_groups(specs: Sequence[RunSpec], names: Sequence[str] | None = None) -> None:
    """Rules across jobs, checked before any model work: a diversity group needs >= 2 jobs that
    share model, size and target layer (they run as one batch). `names` label the jobs in errors."""
    groups: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        if spec.target.diversity_group is not None:
            groups.setdefault(spec.target.diversity_group, []).append(i)
    for name, members in groups.items():
        label = (names[members[0]] if names else f"job {members[0]}")
        if len(members) < 2:
            raise config_error("target.diversity_group", name, f"only one job ({label}) is in "
                               "this group; diversity pushes the images of a group apart, so it "
                               "needs at least 2 jobs (sweep seeds, e.g. -m seed=0,1,2,3)")
        first = specs[members[0]]
        for i in members[1:]:
            other = specs[i]
            if other.batch_key() != first.batch_key():
                raise config_error("target.diversity_group", name, "its jobs must share model, "
                                   "weights, image.size, device and precision (they run as one "
                                   "batch)")
            if (other.target.layer, other.target.relu) != (first.target.layer, first.target.relu):
                raise config_error("target.diversity_group", name, "its jobs must share "
                                   "target.layer and target.relu (diversity compares their "
                                   "activations at that layer)")
