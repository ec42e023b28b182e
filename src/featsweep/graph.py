"""Truncated networks as FX graphs: the forward up to the deepest target, pre-ReLU as a node.

``targets.LayerReader`` stops the forward with an exception raised in a hook and finds pre-ReLU
tensors with a ``TorchFunctionMode``: correct for any network, but neither can be captured by
``torch.compile(fullgraph=True)`` or a CUDA graph. :func:`graph_reader` builds the same reader as
one ``torch.fx.GraphModule`` instead (torchvision's ``NodePathTracer`` names every node by its
module path):

- a module's output is the last node inside that module's path (``layer`` or ``layer.*``);
- its pre-ReLU tensor is the input of that node when the node is a ReLU / ReLU6 /
  ``hardtanh(0, m)`` (module, function or method), or the concatenation of the inputs' pre-ReLU
  tensors when the node is a ``cat`` (Inception blocks), as a new node;
- every ReLU-like node is made out of place (an in-place ReLU would overwrite its own input,
  which is exactly the pre-ReLU tensor), and everything after the deepest target is dead code.

Networks that do not trace, and graphs whose outputs differ from ``LayerReader``'s on a probe
input, give None: the caller keeps the hook reader.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from featsweep.targets import LayerReader, Target, as_feature_map

_RELU_FUNCS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
               F.relu6: "relu6", F.hardtanh: "hardtanh", F.hardtanh_: "hardtanh"}
_RELU_METHODS = {"relu": "relu", "relu_": "relu"}
_CAT = {torch.cat, torch.concat, torch.concatenate}


class GraphReader(nn.Module):
    """Same contract as ``LayerReader``: ``reader(x)`` -> {target: (B, C, h, w)}."""

    def __init__(self, module: fx.GraphModule, targets: Sequence[Target], deepest: str) -> None:
        super().__init__()
        self.module = module
        self.targets = list(targets)
        self.deepest = deepest

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


def _output_node(nodes: list[fx.Node], names: dict[fx.Node, str], layer: str) -> fx.Node | None:
    inside = [n for n in nodes if n.op not in ("placeholder", "get_attr", "output")
              and (names.get(n) == layer or names.get(n, "").startswith(layer + "."))]
    return inside[-1] if inside else None


_CACHE: dict[tuple, GraphReader | None] = {}


def graph_reader(model: nn.Module, targets: Sequence[Target], order: Sequence[str],
                 probe: torch.Tensor) -> GraphReader | None:
    """An FX reader of `targets`, checked against ``LayerReader`` on `probe` (1, C, H, W); None
    when the network does not trace or the graph disagrees. Cached per model and targets."""
    targets = list(dict.fromkeys(targets))
    key = (id(model), tuple(targets), str(probe.device))
    if key in _CACHE:
        return _CACHE[key]
    reader = None
    try:
        reader = _build(model, targets, order)
        if reader is not None and not _agrees(reader, LayerReader(model, targets, order), probe):
            reader = None
    except Exception:  # a network that does not trace keeps the hook reader
        reader = None
    _CACHE[key] = reader
    return reader


def _build(model: nn.Module, targets: list[Target], order: Sequence[str]) -> GraphReader | None:
    from torchvision.models.feature_extraction import NodePathTracer

    tracer = NodePathTracer()
    graph = tracer.trace(model)
    names = dict(tracer.node_to_qualname)
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
    module.graph.lint()
    module.recompile()
    rank = {name: i for i, name in enumerate(order)}
    deepest = max((t[0] for t in targets), key=lambda n: rank.get(n, -1))
    return GraphReader(module, targets, deepest)


def _agrees(reader: GraphReader, hooks: LayerReader, probe: torch.Tensor) -> bool:
    with torch.no_grad():
        a = reader(probe)
        b = hooks(probe)
    return all(a[t].shape == b[t].shape and torch.allclose(a[t], b[t], rtol=1e-5, atol=1e-6)
               for t in b)


__all__ = ["GraphReader", "graph_reader"]
