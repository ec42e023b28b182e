"""Targets: read layer outputs (post- or pre-ReLU) and stop the forward at the deepest one.

A target is ``(layer, relu)``: ``post`` is the layer's output as the model computes it; ``pre`` is
the same tensor with the layer's final ReLU undone, i.e. the tensor(s) that entered the ReLU(s)
whose outputs form the layer's output (directly, or concatenated as in Inception blocks).

How ``pre`` works where the ReLU is a function call (torchvision's Inception ``BasicConv2d`` calls
``F.relu(x, inplace=True)``): while the target module runs, a ``TorchFunctionMode`` sees every
relu/relu6/hardtanh and ``cat`` call; relu inputs are cloned before an in-place ReLU can overwrite
them, and the module's output is traced back through ``cat`` to those inputs.

The forward stops right after the deepest target (a hook raises ``_StopForward``), so no later
layer runs. Targets that finish earlier are cloned at their hook, because a later in-place op
could overwrite the captured tensor.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from featsweep.errors import ConfigError, config_error

Target = tuple[str, str]  # (layer name, "post" | "pre")

_RELU_FUNCS = {F.relu, F.relu_, F.relu6, F.hardtanh, F.hardtanh_, torch.relu, torch.relu_,
               torch.Tensor.relu, torch.Tensor.relu_, torch.nn.functional.threshold}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}


class _StopForward(Exception):
    """Raised by the deepest target's hook: nothing after it needs computing."""


class _PreReluTracker(TorchFunctionMode):
    """Records, during one module's forward, which tensors came out of ReLUs and cats."""

    def __init__(self) -> None:
        super().__init__()
        self.relu_inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(out) -> (out, in)
        self.cats: dict[int, tuple[torch.Tensor, Sequence[torch.Tensor], int]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func in _RELU_FUNCS and args and isinstance(args[0], torch.Tensor):
            # Clone first: an in-place ReLU would overwrite the very tensor we want.
            before = args[0].clone()
            out = func(*args, **kwargs)
            self.relu_inputs[id(out)] = (out, before)
            return out
        out = func(*args, **kwargs)
        if func in _CAT_FUNCS and isinstance(out, torch.Tensor):
            parts = args[0] if args else kwargs.get("tensors")
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            self.cats[id(out)] = (out, list(parts), dim)
        return out

    def pre_relu(self, out: torch.Tensor) -> torch.Tensor | None:
        """The pre-ReLU version of `out`, or None if `out` is not made of ReLU outputs."""
        if id(out) in self.relu_inputs:
            return self.relu_inputs[id(out)][1]
        if id(out) in self.cats:
            _, parts, dim = self.cats[id(out)]
            pre = [self.pre_relu(p) for p in parts]
            if any(p is None for p in pre):
                return None
            return torch.cat(pre, dim=dim)
        return None


@dataclass(frozen=True)
class LayerInfo:
    """One module's output as seen in a probe forward (execution order)."""

    name: str
    kind: str  # module class name
    shape: tuple[int, ...]  # output shape without the batch dim, e.g. (C, H, W)
    calls: int  # times the module ran in one forward (shared modules run more than once)
    order: int  # position of its first output in the forward
    output: str = "tensor"  # "tensor"; "tokens": a (N, C) output, shape given as (C, 1, N)
    # (see as_feature_map); else the output's type name (tuple, dict, ...): not targetable


def as_feature_map(t: torch.Tensor) -> torch.Tensor:
    """A layer output as (B, C, h, w): token outputs (B, N, C) of ViT blocks become (B, C, 1, N),
    a row of N tokens (``channel`` = mean over tokens of feature C, ``neuron`` at x = token, y = 0);
    (B, C, H, W) maps are returned as they are."""
    return t.transpose(1, 2).unsqueeze(2) if t.dim() == 3 else t


def probe_layers(model: nn.Module, size: int, device: torch.device | str = "cpu",
                 in_channels: int = 3) -> list[LayerInfo]:
    """Run one forward of a (1, in_channels, size, size) zero image and list every named module's
    output, in execution order. Token outputs (1, N, C) are listed as (C, 1, N), output "tokens"."""
    seen: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod: nn.Module, inp: object, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor):
                output = "tokens" if out.dim() == 3 else "tensor"
                shape = tuple(as_feature_map(out).shape[1:])
            else:
                output, shape = type(out).__name__, ()
            if name in seen:
                seen[name][1] += 1
            else:
                seen[name] = [shape, 1, len(seen), type(mod).__name__, output]

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(torch.zeros(1, in_channels, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    infos = [LayerInfo(n, v[3], v[0], v[1], v[2], v[4]) for n, v in seen.items()]
    return sorted(infos, key=lambda i: i.order)


def check_targets(model: nn.Module, layers: Sequence[LayerInfo],
                  targets: Iterable[tuple[str, str, int]], model_name: str) -> None:
    """Check every (layer, relu, channel) against a probe; raise ConfigError naming the problem."""
    by_name = {i.name: i for i in layers}
    for layer, relu, channel in targets:
        info = by_name.get(layer)
        if info is None:
            names = [n for n, _ in model.named_modules() if n]
            close = difflib.get_close_matches(layer, names, n=3, cutoff=0.5)
            hint = f"close names: {', '.join(close)}; " if close else ""
            raise config_error("target.layer", layer, f"{model_name} has no such layer ({hint}"
                               f"list them: python -m featsweep.layers model={model_name})")
        if info.output not in ("tensor", "tokens"):
            raise config_error("target.layer", layer, f"its output is a {info.output}, not a "
                               "tensor, so it has no channels to maximize; target one of its "
                               "submodules, or the module that consumes it (python -m "
                               f"featsweep.layers model={model_name} --all lists them)")
        if len(info.shape) != 3:
            raise config_error("target.layer", layer, f"its output has shape {info.shape}, not "
                               "(channels, height, width); choose a convolutional layer")
        if info.calls != 1:
            raise config_error("target.layer", layer, f"this module runs {info.calls} times per "
                               "forward (a shared module), so its output is ambiguous; target its "
                               "parent block instead")
        if not 0 <= channel < info.shape[0]:
            raise config_error("target.channel", channel, f"layer {layer} has {info.shape[0]} "
                               f"channels, so the channel must be in 0..{info.shape[0] - 1}")


class LayerReader:
    """Reads target tensors from a truncated forward.

    >>> reader = LayerReader(model, [("_blocks.10", "post")])
    >>> feats = reader(x)          # {("_blocks.10", "post"): (B, C, H, W)}
    """

    def __init__(self, model: nn.Module, targets: Sequence[Target], order: Sequence[str]) -> None:
        """`order`: layer names in execution order (from ``probe_layers``), to find the deepest."""
        self.model = model
        self.targets = list(dict.fromkeys(targets))
        layers = list(dict.fromkeys(layer for layer, _ in self.targets))
        rank = {name: i for i, name in enumerate(order)}
        self.deepest = max(layers, key=lambda n: rank[n])
        self.modules = dict(model.named_modules())
        self._pre_layers = {layer for layer, relu in self.targets if relu == "pre"}

    def __call__(self, x: torch.Tensor) -> dict[Target, torch.Tensor]:
        """Forward `x` (B,3,H,W, normalized) up to the deepest target; return each target (B,C,h,w)."""
        found: dict[Target, torch.Tensor] = {}
        trackers: dict[str, _PreReluTracker] = {}
        handles = []

        def make_pre_hook(layer: str) -> Callable:
            def pre_hook(mod: nn.Module, inp: object) -> None:
                trackers[layer] = _PreReluTracker()
                trackers[layer].__enter__()
            return pre_hook

        def make_hook(layer: str) -> Callable:
            def hook(mod: nn.Module, inp: object, out: torch.Tensor) -> None:
                tracker = trackers.pop(layer, None)
                if tracker is not None:
                    tracker.__exit__(None, None, None)
                last = layer == self.deepest
                for relu in ("post", "pre"):
                    if (layer, relu) not in self.targets:
                        continue
                    value = out if relu == "post" else tracker.pre_relu(out)
                    if value is None:
                        raise config_error(
                            "target.relu", "pre", f"the output of layer {layer} is not produced by "
                            "a ReLU (nor a concatenation of ReLU outputs), so it has no pre-ReLU "
                            "form; use target.relu=post, or target a layer that ends in a ReLU")
                    value = as_feature_map(value)  # token outputs (B, N, C) -> (B, C, 1, N)
                    found[(layer, relu)] = value if last else value.clone()
                if last:
                    raise _StopForward
            return hook

        for layer in dict.fromkeys(layer for layer, _ in self.targets):
            module = self.modules[layer]
            if layer in self._pre_layers:
                handles.append(module.register_forward_pre_hook(make_pre_hook(layer)))
            handles.append(module.register_forward_hook(make_hook(layer)))
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
            for tracker in trackers.values():  # a forward that raised mid-module
                tracker.__exit__(None, None, None)
        missing = [t for t in self.targets if t not in found]
        if missing:
            raise RuntimeError(f"targets not reached in the forward: {missing}")
        return found


def has_pre_relu(model: nn.Module, order: Sequence[str], layer: str, size: int,
                 device: torch.device | str = "cpu", in_channels: int = 3) -> bool:
    """Whether `layer`'s output is made of ReLU outputs (so a pre-ReLU target exists): one
    truncated forward of a (1, in_channels, size, size) zero image."""
    x = torch.zeros(1, in_channels, size, size, device=device)
    try:
        with torch.no_grad():
            LayerReader(model, [(layer, "pre")], order)(x)
    except ConfigError:
        return False
    return True


__all__ = ["ConfigError", "LayerInfo", "LayerReader", "Target", "check_targets",
           "has_pre_relu", "probe_layers"]
