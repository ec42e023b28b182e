"""Truncated networks as FX graphs: the forward up to the deepest target, pre-ReLU as a node.

``targets.LayerReader`` stops the forward with an exception raised in a hook and finds pre-ReLU
tensors with a ``TorchFunctionMode``: correct for any network, but neither can be captured by
``torch.compile(fullgraph=True)`` or a CUDA graph. :func:`graph_reader` builds the same reader as
one ``torch.fx.GraphModule`` instead (torch.fx records the modules each node was traced in,
``node.meta["nn_module_stack"]``, which names every node by its module path):

- a module's output is the last node inside that module's path (``layer`` or ``layer.*``);
- its pre-ReLU tensor is the input of that node when the node is a ReLU / ReLU6 /
  ``hardtanh(0, m)`` (module, function or method), or the concatenation of the inputs' pre-ReLU
  tensors when the node is a ``cat`` (Inception blocks), as a new node;
- every ReLU-like node is made out of place (an in-place ReLU would overwrite its own input,
  which is exactly the pre-ReLU tensor), and everything after the deepest target is dead code.

With ``fuse_conv``, every eval-mode ``BatchNorm2d`` whose input is a convolution used by nothing
else is folded into that convolution (``torch.nn.utils.fusion.fuse_conv_bn_weights``: one conv
with scaled weights and a bias instead of a conv and a per-channel affine pass, forward and
backward). A folded BatchNorm that is a target (or the pre-ReLU input of one) is read from the
fused convolution: the same values up to rounding. A convolution that is itself a target has a
second user and is left alone. Then every symmetric zero padding read only by a convolution
becomes that convolution's own padding (EfficientNet's "same" padding at stride 1 is a
``ZeroPad2d`` module: a padded copy of the activations forward, and a slice of the gradient
backward, each time), and on the CPU so does an asymmetric one before a depthwise convolution,
whose kernel grows by zero rows/columns to keep every window (:func:`_fold_zero_pads`).

Networks that do not trace, and graphs whose outputs differ from ``LayerReader``'s on a probe
input, give None: the caller keeps the hook reader.
"""

from __future__ import annotations

import weakref
from operator import attrgetter
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from featsweep.targets import LayerReader, Target, as_feature_map

_RELU_FUNCS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
               F.relu6: "relu6", F.hardtanh: "hardtanh", F.hardtanh_: "hardtanh"}
_RELU_METHODS = {"relu": "relu", "relu_": "relu"}
_CAT = {torch.cat, torch.concat, torch.concatenate}
_CONV2D = {torch.conv2d, F.conv2d}
# How far a folded graph may drift from the hook reader on the probe, relative to the largest
# |activation| of that target: a fused conv rounds once where conv + BatchNorm rounded twice,
# and the differences add up over the layers (measured ≤ 3e-6 of the largest |activation| at EfficientNet-Lite0 _blocks.8 to 15).
_FOLDED_RTOL = 1e-4


class GraphReader(nn.Module):
    """Same contract as ``LayerReader``: ``reader(x)`` -> {target: (B, C, h, w)}."""

    def __init__(self, module: fx.GraphModule, targets: Sequence[Target], deepest: str,
                 fused: dict[str, int]) -> None:
        super().__init__()
        self.module = module
        self.targets = list(targets)
        self.deepest = deepest
        self.fused = fused  # {"batchnorm": n, "zero_pad": m, "relu": k}: folded into convolutions

    def forward(self, x: torch.Tensor) -> dict[Target, torch.Tensor]:  # type: ignore[override]
        outs = self.module(x)
        return {t: as_feature_map(o) for t, o in zip(self.targets, outs)}


def _relu_kind(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str, float] | None:
    """('relu', inf) / ('relu6', 6) / ('hardtanh', max) when `node` is a ReLU-like call."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if isinstance(mod, nn.ReLU):
            return ("relu", float("inf"))
        if isinstance(mod, nn.Hardtanh) and mod.min_val == 0:  # nn.ReLU6 is Hardtanh(0, 6)
            return ("hardtanh", float(mod.max_val))
        return None
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        kind = _RELU_FUNCS[node.target]
        if kind == "hardtanh":
            low = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
            high = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
            return ("hardtanh", float(high)) if low == 0 else None
        return (kind, 6.0 if kind == "relu6" else float("inf"))
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return ("relu", float("inf"))
    return None


def _out_of_place(graph: fx.Graph, modules: dict[str, nn.Module]) -> None:
    """Replace every ReLU-like node by its out-of-place functional form (same values)."""
    for node in list(graph.nodes):
        kind = _relu_kind(node, modules)
        if kind is None:
            continue
        name, upper = kind
        x = node.args[0] if node.args else node.kwargs["input"]
        with graph.inserting_before(node):
            if name == "relu":
                new = graph.call_function(F.relu, (x,))
            else:
                new = graph.call_function(F.hardtanh, (x, 0.0, upper))
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _pre_relu(graph: fx.Graph, node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    if _relu_kind(node, modules) is not None:
        return node.args[0]  # type: ignore[return-value]
    if node.op == "call_function" and node.target in _CAT:
        parts = node.args[0] if node.args else node.kwargs.get("tensors")
        pre = [_pre_relu(graph, p, modules) for p in parts]  # type: ignore[union-attr]
        if any(p is None for p in pre):
            return None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        with graph.inserting_after(node):
            return graph.call_function(torch.cat, (pre, dim))
    return None


def _module_path(node: fx.Node) -> str:
    """The innermost module `node` was traced in ("" at the top level). torchvision's
    ``NodePathTracer`` gives the same paths, but importing it imports ``torch._dynamo``: ~1 s
    of every run's start-up."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return str(node.target) if node.op == "call_module" else ""
    return next(reversed(stack.values()))[0]


def _output_node(nodes: list[fx.Node], names: dict[fx.Node, str], layer: str) -> fx.Node | None:
    inside = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")
              and (names.get(n) == layer or names.get(n, "").startswith(layer + "."))]
    return inside[-1] if inside else None


def _conv_parts(node: fx.Node, modules: dict[str, nn.Module], gm: fx.GraphModule
                ) -> tuple[fx.Node, torch.Tensor, torch.Tensor | None, tuple] | None:
    """(input, weight, bias, (stride, padding, dilation, groups)) of a 2-D convolution node whose
    weight and bias are attributes (not computed), or None."""
    if node.op == "call_module":
        conv = modules.get(str(node.target))
        if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or len(node.args) != 1:
            return None
        return (node.args[0], conv.weight, conv.bias,  # type: ignore[return-value]
                (conv.stride, conv.padding, conv.dilation, conv.groups))
    if node.op != "call_function" or node.target not in _CONV2D or node.kwargs:
        return None
    x, w, *rest = node.args
    b = rest.pop(0) if rest else None
    if not isinstance(w, fx.Node) or w.op != "get_attr":
        return None
    if b is not None and not (isinstance(b, fx.Node) and b.op == "get_attr"):
        return None
    weight = attrgetter(str(w.target))(gm)
    bias = None if b is None else attrgetter(str(b.target))(gm)  # type: ignore[union-attr]
    return (x, weight, bias, tuple(rest) + (1, 0, 1, 1)[len(rest):])  # type: ignore[return-value]


def _fold_batchnorm(gm: fx.GraphModule) -> int:
    """Fold each eval-mode BatchNorm2d that only follows a convolution into it; the count."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    modules = dict(gm.named_modules())
    graph = gm.graph
    folded = 0
    for node in list(graph.nodes):
        bn = modules.get(str(node.target)) if node.op == "call_module" else None
        if (not isinstance(bn, nn.BatchNorm2d) or bn.training or bn.running_mean is None
                or len(node.args) != 1 or not isinstance(node.args[0], fx.Node)):
            continue
        conv = node.args[0]
        parts = _conv_parts(conv, modules, gm)
        if parts is None or len(conv.users) != 1:
            continue
        x, w, b, rest = parts
        assert bn.running_var is not None
        fw, fb = fuse_conv_bn_weights(w, b, bn.running_mean, bn.running_var, bn.eps,
                                      bn.weight, bn.bias)
        fw = fw.detach().contiguous(memory_format=_layout(w))
        name = f"_folded_{folded}"
        gm.register_buffer(name + "_weight", fw)
        gm.register_buffer(name + "_bias", fb.detach())
        with graph.inserting_before(node):
            new = graph.call_function(torch.conv2d, (x, graph.get_attr(name + "_weight"),
                                                     graph.get_attr(name + "_bias"), *rest))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(conv)
        folded += 1
    return folded


def _zero_pad(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, int, int, int] | None:
    """(left, right, top, bottom) of a 2-D zero padding node (``nn.ZeroPad2d``, a zero
    ``nn.ConstantPad2d`` or ``F.pad(x, (l, r, t, b))`` with value 0), else None."""
    if node.op == "call_module":
        mod = modules.get(str(node.target))
        if not isinstance(mod, nn.ConstantPad2d) or mod.value != 0:  # ZeroPad2d is one
            return None
        pads = tuple(mod.padding)
    elif node.op == "call_function" and node.target is F.pad:
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pads, (tuple, list)):
            return None
        pads = tuple(pads)
    else:
        return None
    if len(pads) != 4 or not all(isinstance(p, int) and p >= 0 for p in pads):
        return None
    return pads  # type: ignore[return-value]


def _fold_zero_pads(gm: fx.GraphModule, asymmetric_depthwise: bool) -> int:
    """Give each zero padding read only by an unpadded ``conv2d`` call to that convolution's
    own ``padding`` (the same sums, without a padded copy of the input, forward and backward);
    the count.

    A symmetric padding is the convolution's padding as it is. An asymmetric one (TensorFlow's
    "same" at stride 2: (0, 1, 0, 1) before a 3x3) becomes the larger side's padding on both
    sides, with the kernel grown by zero rows/columns on the side padded less, so every window
    covers the same inputs with the same weights (bit-equal on the CPU). Only with
    `asymmetric_depthwise` and only for depthwise convolutions with a fixed weight: on the
    project's CPU a depthwise 3x3 stride-2 step (fwd + input gradient, B = 12, 96 channels at
    64 px) took 16 ms this way against 30 ms padded, while the dense 3-channel stem got slower
    (4.3 against 3.5 ms), and the GPU's kernels are not measured yet."""
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _CONV2D or node.kwargs:
            continue
        pad = node.args[0]
        if not isinstance(pad, fx.Node) or len(pad.users) != 1:
            continue
        pads = _zero_pad(pad, modules)
        args = list(node.args) + [None, 1, 0, 1, 1][len(node.args) - 2:]  # defaults to 7 args
        if pads is None or args[4] not in (0, (0, 0), [0, 0]):  # (also refuses "same"/"valid")
            continue
        left, right, top, bottom = pads
        if left != right or top != bottom:
            weight = args[1]
            if not (asymmetric_depthwise and isinstance(weight, fx.Node) and weight.op == "get_attr"
                    and args[5] in (1, (1, 1), [1, 1])):
                continue
            w = attrgetter(str(weight.target))(gm)
            if not (w.dim() == 4 and w.shape[1] == 1 and args[6] == w.shape[0]):  # depthwise
                continue
            grown = F.pad(w.detach(), (max(right - left, 0), max(left - right, 0),
                                       max(bottom - top, 0), max(top - bottom, 0)))
            name = f"_padded_{folded}_weight"
            gm.register_buffer(name, grown.contiguous(memory_format=_layout(w)))
            with gm.graph.inserting_before(node):
                args[1] = gm.graph.get_attr(name)
            left = right = max(left, right)
            top = bottom = max(top, bottom)
        args[0], args[4] = pad.args[0], (top, left)
        node.args = tuple(args)
        gm.graph.erase_node(pad)
        folded += 1
    return folded


class _ConvClamp(torch.autograd.Function):
    """``clamp(conv2d(x, w, b), 0, upper)`` as one autograd node, for a frozen `w` and `b`.

    Forward: the convolution, then the clamp in place on its own fresh output (autograd's
    out-of-place ReLU writes a second copy of the activations). Backward: the clamp's mask
    applied with ``hardtanh_backward`` (the output `y` is 0 or `upper` exactly where the input was
    outside (0, upper)), in place on the incoming gradient when the graph says nothing else can
    hold it (`grad_owned`), then the convolution's input gradient alone. Measured on the project's
    CPU (BENCHMARKS.md): in place, both passes take half to two thirds of the time at B = 12.
    oneDNN's convolution with the clamp as a post-op was ~5 % faster still, but it turns NaN
    into 0, and an image that diverged must keep its NaN activation."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, upper, grad_owned):  # noqa: ANN001, ANN205
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups).clamp_(0, upper)
        ctx.save_for_backward(x, weight, y)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.upper, ctx.grad_owned = upper, grad_owned
        return y

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight, y = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        if ctx.grad_owned:
            masked = torch.ops.aten.hardtanh_backward.grad_input(grad, y, 0.0, ctx.upper,
                                                                 grad_input=grad)
        else:
            masked = torch.ops.aten.hardtanh_backward(grad, y, 0.0, ctx.upper)
        stride, padding, dilation, groups = ctx.conv
        gx = torch.ops.aten.convolution_backward(masked, x, weight, None, stride, padding,
                                                 dilation, False, [0, 0], groups,
                                                 [True, False, False])[0]
        return (gx,) + (None,) * 8


def _conv_clamp(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stride: list[int], padding: list[int], dilation: list[int], groups: int,
                upper: float, grad_owned: bool) -> torch.Tensor:
    """(B, C, H, W) -> clamp(conv2d(x, weight, bias, ...), 0, upper): see :class:`_ConvClamp`."""
    return _ConvClamp.apply(x, weight, bias, stride, padding, dilation, groups, upper, grad_owned)


def _pair(v: object) -> list[int] | None:
    if isinstance(v, int):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return list(v)
    return None


def _is_conv(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A 2-D convolution call: its backward hands over a fresh input gradient."""
    if node.op == "call_module":
        return type(modules.get(str(node.target))) is nn.Conv2d
    return node.op == "call_function" and node.target in _CONV2D


def _fuse_conv_clamp(gm: fx.GraphModule) -> int:
    """Make each 2-D convolution (``nn.Conv2d``, or ``conv2d`` on attributes; frozen weights) whose
    only user is a ReLU / ReLU6 / ``hardtanh(0, m)`` one :func:`_conv_clamp` node; the count.
    Runs after the ReLUs are out of place and the BatchNorms folded, in graph order, so a
    convolution that reads a fused node's output is still a plain one when that node is made. The clamp's gradient is overwritten in place only when the
    clamp's output is read by one convolution alone (that convolution's backward hands over a
    fresh tensor nobody else holds); a target's output, a residual sum or a concatenation keep
    it out of place."""
    modules = dict(gm.named_modules())
    fused = 0
    for node in list(gm.graph.nodes):
        if not _is_conv(node, modules) or len(node.users) != 1:
            continue
        (clamp,) = node.users
        kind = _relu_kind(clamp, modules)
        parts = _conv_parts(node, modules, gm)
        if kind is None or clamp.args[0] is not node or parts is None:
            continue
        x, weight, bias, rest = parts
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            continue
        stride, padding, dilation, groups = rest
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        if stride is None or padding is None or dilation is None or not isinstance(groups, int):
            continue
        if node.op == "call_module":
            with gm.graph.inserting_before(clamp):
                w = gm.graph.get_attr(f"{node.target}.weight")
                b = None if bias is None else gm.graph.get_attr(f"{node.target}.bias")
        else:
            w, b = node.args[1], (node.args[2] if len(node.args) > 2 else None)
        users = list(clamp.users)
        owned = len(users) == 1 and _is_conv(users[0], modules) and users[0].args[0] is clamp
        with gm.graph.inserting_before(clamp):
            new = gm.graph.call_function(_conv_clamp, (x, w, b, stride, padding, dilation,
                                                       groups, kind[1], owned))
        clamp.replace_all_uses_with(new)
        gm.graph.erase_node(clamp)
        gm.graph.erase_node(node)
        fused += 1
    return fused


def _drop_identities(gm: fx.GraphModule) -> None:
    """Read past every ``nn.Identity`` call (EfficientNet-Lite's ``_swish`` after each ReLU6): a
    module call per layer for nothing, and it hides which ReLU feeds which convolution."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if (node.op == "call_module" and type(modules.get(str(node.target))) is nn.Identity
                and len(node.args) == 1 and not node.kwargs):
            node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
            gm.graph.erase_node(node)


def _layout(w: torch.Tensor) -> torch.memory_format:
    return (torch.channels_last if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last)
            and not w.is_contiguous() else torch.contiguous_format)


# Per model (weakly: a reader holds the model's submodules but not the model itself, so an entry
# dies with its model and a new model can never be handed an old one's reader), per everything
# the reader was built from (see _state).
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, GraphReader | None]]" = \
    weakref.WeakKeyDictionary()


def _state(model: nn.Module) -> tuple:
    """What a cached reader depends on in the model: every parameter's and buffer's storage,
    in-place version (``Tensor._version``: ``load_state_dict`` and ``copy_`` bump it), strides
    (the memory layout) and dtype, and every module's training flag. A folded graph holds
    copies of the weights, so any change means a new reader."""
    tensors = tuple((t.data_ptr(), t._version, tuple(t.stride()), t.dtype)
                    for t in (*model.parameters(), *model.buffers()))
    return tensors, tuple(m.training for m in model.modules())


def graph_reader(model: nn.Module, targets: Sequence[Target], order: Sequence[str],
                 probe: torch.Tensor, *, fuse_conv: bool = False, fuse_relu: bool = False
                 ) -> GraphReader | None:
    """An FX reader of `targets`, checked against ``LayerReader`` on `probe` (1, C, H, W); None
    when the network does not trace or the graph disagrees. With `fuse_conv`, BatchNorms and
    zero paddings are folded into their convolutions (see the module docstring). Cached per model,
    targets, device, folding and the model's weights as they are (:func:`_state`)."""
    targets = list(dict.fromkeys(targets))
    fuse_relu = fuse_relu and fuse_conv and probe.device.type == "cpu"
    key = (tuple(targets), str(probe.device), fuse_conv, fuse_relu, _state(model))
    cached = _CACHE.setdefault(model, {})
    if key in cached:
        return cached[key]
    reader = None
    try:
        reader = _build(model, targets, order, fuse_conv, probe.device, fuse_relu)
        if reader is not None and not _agrees(reader, LayerReader(model, targets, order), probe):
            reader = None
    except Exception:  # a network that does not trace keeps the hook reader
        reader = None
    cached[key] = reader
    return reader


def _build(model: nn.Module, targets: list[Target], order: Sequence[str],
           fuse_conv: bool = False, device: torch.device = torch.device("cpu"),
           fuse_relu: bool = False) -> GraphReader | None:
    tracer = fx.Tracer()
    graph = tracer.trace(model)
    names = {n: _module_path(n) for n in graph.nodes}
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    found = {t: _output_node(nodes, names, t[0]) for t in targets}
    if any(n is None for n in found.values()):
        return None
    # Pre-ReLU nodes are taken before ReLUs become out of place (the kind needs the modules).
    outs = []
    for target in targets:
        node = found[target]
        if target[1] == "pre":
            node = _pre_relu(graph, node, modules)  # type: ignore[arg-type]
            if node is None:
                return None
        outs.append(node)
    (old_out,) = [n for n in graph.nodes if n.op == "output"]
    graph.erase_node(old_out)
    graph.output(tuple(outs))
    _out_of_place(graph, modules)
    # (replace_all_uses_with also updates the output tuple where an output is a ReLU node)
    module = fx.GraphModule(tracer.root, graph)
    module.graph.eliminate_dead_code()
    fused = {"batchnorm": 0, "zero_pad": 0, "relu": 0}
    if fuse_conv:
        fused["batchnorm"] = _fold_batchnorm(module)
        fused["zero_pad"] = _fold_zero_pads(module, asymmetric_depthwise=device.type == "cpu")
        module.graph.eliminate_dead_code()
        if fuse_relu:
            _drop_identities(module)
            fused["relu"] = _fuse_conv_clamp(module)
    module.graph.lint()
    module.recompile()
    rank = {name: i for i, name in enumerate(order)}
    deepest = max((t[0] for t in targets), key=lambda n: rank.get(n, -1))
    return GraphReader(module, targets, deepest, fused)


def _agrees(reader: GraphReader, hooks: LayerReader, probe: torch.Tensor) -> bool:
    with torch.no_grad():
        a = reader(probe)
        b = hooks(probe)
    if any(a[t].shape != b[t].shape for t in b):
        return False
    if not reader.fused["batchnorm"]:  # a zero pad in the conv sums the same terms
        return all(torch.allclose(a[t], b[t], rtol=1e-5, atol=1e-6) for t in b)
    return all(float((a[t] - b[t]).abs().max()) <= _FOLDED_RTOL * float(b[t].abs().max()) + 1e-6
               for t in b)


__all__ = ["GraphReader", "graph_reader"]
