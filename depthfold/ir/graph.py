"""Graph-module helpers: cloning, metadata, parameter access and clean-up.

Every node carries namespaced metadata (``node.meta["depthfold.<key>"]``):
``depthfold.shape`` / ``depthfold.dtype`` (output tensor, or a tuple of them for multi-output ops),
``depthfold.module_path`` / ``depthfold.module_type`` (the ``nn.Module`` the op came from), on
nodes created by a pass ``depthfold.from`` = ``(pass_name, (source node names, ...))``, and on placeholders
``depthfold.dynamic_dims`` (the input's dimensions captured dynamic).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter, Node

__all__ = [
    "META_DTYPE",
    "META_DYNAMIC_DIMS",
    "META_FROM",
    "META_MODULE_PATH",
    "META_MODULE_TYPE",
    "META_SHAPE",
    "annotate",
    "clone",
    "compute_nodes",
    "get_param",
    "is_shared",
    "ownership_problem",
    "module_path",
    "new_param",
    "prune_unused_attributes",
    "record_origin",
    "set_param",
    "shape_of",
    "tap",
    "to_module",
]

META_SHAPE = "depthfold.shape"
META_DTYPE = "depthfold.dtype"
META_MODULE_PATH = "depthfold.module_path"
META_MODULE_TYPE = "depthfold.module_type"
META_FROM = "depthfold.from"
META_DYNAMIC_DIMS = "depthfold.dynamic_dims"


def clone(gm: GraphModule) -> GraphModule:
    """A deep copy (graph, metadata and parameters): passes edit the copy, never their input."""
    return copy.deepcopy(gm)


def compute_nodes(gm: GraphModule) -> list[Node]:
    """The ``call_function`` / ``call_method`` / ``call_module`` nodes, in graph order."""
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


def get_param(gm: GraphModule, node: Node) -> torch.Tensor:
    """The tensor behind a ``get_attr`` node (parameter, buffer or constant)."""
    if node.op != "get_attr":
        raise TypeError(f"node {node.name!r} is a {node.op} node, not get_attr")
    owner, _, attr = str(node.target).rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def set_param(gm: GraphModule, node: Node, value: torch.Tensor) -> None:
    """Replace the parameter behind get_attr ``node`` with a new ``nn.Parameter`` holding ``value``."""
    owner, _, attr = str(node.target).rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    setattr(module, attr, nn.Parameter(value.detach().clone(), requires_grad=True))
    node.meta[META_SHAPE] = tuple(value.shape)


def is_shared(gm: GraphModule, node: Node, *, allowed_users: Iterable[Node] = ()) -> bool:
    """Whether the tensor behind get_attr ``node`` is read by any node outside ``allowed_users``.

    Counts every get_attr node that resolves to the same tensor (tied weights under two names).
    """
    tensor = get_param(gm, node)
    allowed = set(allowed_users)
    for other in gm.graph.nodes:
        if other.op == "get_attr" and get_param(gm, other) is tensor:
            if any(user not in allowed for user in other.users):
                return True
    return False


def ownership_problem(gm: GraphModule, layer: Node, *, allowed_users: Iterable[Node] = ()) -> str | None:
    """Why the weight/bias of conv/linear ``layer`` cannot be rewritten in place, or ``None`` if it can.

    They must be stored tensors (not computed) read by no node outside ``layer`` and ``allowed_users``.
    """
    from .ops import is_stored, weight_and_bias

    allowed = [layer, *allowed_users]
    for tensor in weight_and_bias(layer):
        if tensor is None:
            continue
        if not is_stored(tensor):
            return f"{layer.name} weight or bias is computed, not stored"
        if is_shared(gm, tensor, allowed_users=allowed):
            return f"{layer.name} weight is shared with another layer"
    return None


def new_param(gm: GraphModule, owner: str, name: str, value: torch.Tensor, *, before: Node) -> Node:
    """Register ``value`` as a fresh ``nn.Parameter`` on submodule ``owner`` and return its get_attr node.

    The attribute name is ``name`` made unique on that submodule, so existing (possibly shared)
    parameters are never overwritten.
    """
    module = _get_or_create_submodule(gm, owner)
    attr, i = name, 0
    while hasattr(module, attr):
        i += 1
        attr = f"{name}_{i}"
    module.register_parameter(attr, nn.Parameter(value.detach().clone(), requires_grad=True))
    target = f"{owner}.{attr}" if owner else attr
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(target)
    node.meta[META_SHAPE] = tuple(value.shape)
    node.meta[META_DTYPE] = str(value.dtype)
    return node


def _get_or_create_submodule(gm: GraphModule, path: str) -> nn.Module:
    module: nn.Module = gm
    for part in path.split(".") if path else []:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    return module


def prune_unused_attributes(gm: GraphModule) -> None:
    """Delete parameters and buffers no ``get_attr`` node reads any more, then empty submodules."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        if name in used:
            continue
        owner, _, attr = name.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if attr in module._parameters:
            del module._parameters[attr]
        elif attr in module._buffers:
            del module._buffers[attr]
    gm.delete_all_unused_submodules()


def record_origin(new: Node, pass_name: str, sources: Sequence[Node], like: Node | None = None) -> None:
    """Give a node created by a pass its lineage and, from ``like``, its shape and module metadata."""
    if like is not None:
        for key, value in like.meta.items():
            new.meta.setdefault(key, value)
    new.meta[META_FROM] = (pass_name, tuple(s.name for s in sources))


def module_path(node: Node) -> str:
    """The dotted path of the ``nn.Module`` a node came from (``""`` for the root)."""
    return str(node.meta.get(META_MODULE_PATH, ""))


def shape_of(node: Node) -> tuple[int, ...] | None:
    """The output shape recorded by :func:`annotate` (``None`` for non-tensor outputs)."""
    shape = node.meta.get(META_SHAPE)
    return shape if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape) else None


class _ShapeRecorder(Interpreter):
    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        n.meta[META_SHAPE], n.meta[META_DTYPE] = _describe(result)
        return result


def _describe(value: Any) -> tuple[Any, Any]:
    if isinstance(value, torch.Tensor):
        return tuple(int(d) for d in value.shape), str(value.dtype)
    if isinstance(value, (list, tuple)):
        pairs = [_describe(v) for v in value]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return None, type(value).__name__


def tap(gm: GraphModule, names: Sequence[str]) -> GraphModule:
    """A GraphModule sharing ``gm``'s parameters whose output is ``(original output, [values of named nodes])``.

    Raises:
        KeyError: a name that is no node of ``gm``.
    """
    nodes = {node.name: node for node in gm.graph.nodes if node.op != "output"}
    graph = torch.fx.Graph()
    value_map: dict[Any, Any] = {}
    output = graph.graph_copy(gm.graph, value_map)
    graph.output((output, [value_map[nodes[name]] for name in names]))
    return GraphModule(gm, graph, class_name=f"{type(gm).__name__}WithFeatures")


def annotate(gm: GraphModule, example_inputs: Iterable[torch.Tensor]) -> GraphModule:
    """Run the graph once on ``example_inputs`` and record every node's output shape and dtype."""
    with torch.no_grad():
        _ShapeRecorder(gm).run(*example_inputs)
    return gm


def to_module(gm: GraphModule, *, trainable: bool = True) -> GraphModule:
    """A runnable, trainable ``nn.Module`` copy of the graph: parameters are ``nn.Parameter`` leaves.

    Batch norms captured in inference mode stay in inference mode (running statistics are constants
    of the graph), which is what fine-tuning a compressed network for deployment wants.
    """
    out = clone(gm)
    for p in out.parameters():
        p.requires_grad_(trainable)
    return out
