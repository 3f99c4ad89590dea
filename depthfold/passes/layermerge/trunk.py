"""The trunk of a captured CNN as LayerMerge sees it: convs, activations, residual joins and barriers.

Walking the fx graph from the image input to the output gives a sequence of *items*:

* :class:`Layer` — a 2-D convolution with the zero pad before it (TF-style 'same' padding) and the batch
  norm (and eval no-ops) after it, or a linear on the last dim of a channels-last map or token sequence
  (ConvNeXt and transformer MLPs) with its per-channel layer scale: an affine map;
* :class:`Act` — a pointwise non-linearity (the thing LayerMerge removes);
* :class:`Join` — the ``add`` closing a residual block, whose shortcut starts at an earlier position and
  is either the identity or a chain of convs (a ResNet downsample). Its body is a nested trunk: barriers
  inside it (a squeeze-excite gate, a norm, a permute) split it into chains that are segments too;
* :class:`Barrier` — anything else on the path (pooling, flatten, the classifier, a norm, a layout
  permute, a squeeze-excite gate, a fork that is not a residual block, a dilated or 1-D conv): segments
  never cross one.

*Positions* ``0..L`` are the boundaries where a segment may start or end: the input, after every
activation, join and barrier, before every barrier, at every fork that feeds a shortcut, and the end.
Nothing here is model-specific: the walk follows data flow, forks are resolved with post-dominators
(the node where both branches of a fork meet again), and a fork that does not look like ``x + f(x)`` or
``g(x) + f(x)`` (``g`` linear) becomes one barrier.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from ... import ir
from ...errors import ConfigError
from ...ir import ops

__all__ = ["Act", "Barrier", "Item", "Join", "Layer", "Position", "Trunk", "analyze_trunk", "POINTWISE_ACTIVATIONS"]

aten = torch.ops.aten

POINTWISE_ACTIVATIONS = frozenset({
    aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default, aten.hardtanh_.default,
    aten.gelu.default, aten.silu.default, aten.silu_.default, aten.sigmoid.default, aten.tanh.default,
    aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default, aten.leaky_relu.default,
    aten.leaky_relu_.default, aten.elu.default, aten.softplus.default, aten.mish.default, aten.selu.default,
})
"""Elementwise non-linearities LayerMerge may remove (softmax and friends are not elementwise: barriers)."""


@dataclass(frozen=True)
class Layer:
    """A conv2d (plus the batch norm right after it) on the trunk or on a shortcut."""

    conv: str
    bn: str | None
    out: str
    """The last node of the layer (bn, conv, or an eval no-op after them): its output value."""
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    pad: str | None = None
    """A constant-zero ``pad`` node folded into the conv (TF-style 'same' padding): ``in_shape`` is its input."""
    padding_end: tuple[int, int] | None = None
    """Bottom and right padding when they differ from ``padding`` (top, left)."""
    linear: bool = False
    """An ``aten.linear`` on the last dim of a channels-last map or token sequence (a 1x1 conv there)."""
    scale: str | None = None
    """A ``mul`` by a stored per-channel tensor after the layer (ConvNeXt's layer scale)."""

    @property
    def first(self) -> str:
        """The layer's first node: the one reading the layer's input."""
        return self.pad or self.conv

    @property
    def end_padding(self) -> tuple[int, int]:
        return self.padding_end if self.padding_end is not None else self.padding

    @property
    def prunable(self) -> bool:
        """Replacing it by the identity keeps every shape: same channels and same spatial size."""
        return self.in_shape == self.out_shape

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels == self.out_channels


@dataclass(frozen=True)
class Act:
    """A pointwise activation node."""

    node: str
    out: str


@dataclass(frozen=True)
class Join:
    """The residual ``add`` of a block whose shortcut starts at position ``entry``."""

    node: str
    out: str
    entry: int
    """Position index where the shortcut forks off the trunk."""
    body_arg: int
    """Which argument of the add (0 or 1) is the body branch."""
    side: tuple[Layer, ...]
    """Convs on the shortcut, in order (empty: identity shortcut)."""
    side_nodes: tuple[str, ...]
    """Every node of the shortcut branch (convs, batch norms, no-ops)."""


@dataclass(frozen=True)
class Barrier:
    """Nodes a segment may not cross, and why."""

    nodes: tuple[str, ...]
    out: str
    reason: str


Item = Layer | Act | Join | Barrier


@dataclass(frozen=True)
class Position:
    """A boundary between trunk items where segments start and end."""

    index: int
    boundary: int
    """Number of items before this position."""
    node: str
    """The fx node whose value is the tensor at this position."""
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Trunk:
    """The analysed trunk: items in order and the positions between them."""

    items: tuple[Item, ...]
    positions: tuple[Position, ...]
    input_node: str
    barriers: tuple[Barrier, ...] = field(default=())

    @property
    def num_positions(self) -> int:
        """``L``: positions are numbered ``0..L``."""
        return len(self.positions) - 1

    def between(self, start: int, end: int) -> tuple[Item, ...]:
        """The items of segment ``(start, end]``."""
        return self.items[self.positions[start].boundary:self.positions[end].boundary]

    def position_of_boundary(self, boundary: int) -> int:
        for p in self.positions:
            if p.boundary == boundary:
                return p.index
        raise KeyError(boundary)

    def layers(self) -> list[Layer]:
        return [i for i in self.items if isinstance(i, Layer)]

    def summary(self) -> dict[str, object]:
        return {
            "positions": self.num_positions,
            "convs": sum(not layer.linear for layer in self.layers()),
            "linears": sum(layer.linear for layer in self.layers()),
            "activations": sum(isinstance(i, Act) for i in self.items),
            "residual_joins": sum(isinstance(i, Join) for i in self.items),
            "barriers": [{"nodes": list(b.nodes), "reason": b.reason} for b in self.barriers],
        }


def analyze_trunk(gm: GraphModule) -> Trunk:
    """Walk ``gm`` (annotated with shapes) from its image input to its output and return the trunk.

    Raises:
        ConfigError: the graph has no tensor input feeding a 2-D convolution (nothing to merge).
    """
    start = _trunk_input(gm)
    walker = _Walker(gm)
    items: list[Item] = []
    forks: set[int] = set()
    walker.walk(start, None, None, items, forks)
    boundaries = {0, len(items), *forks}
    for i, item in enumerate(items):
        if isinstance(item, (Act, Join, Barrier)):
            boundaries.add(i + 1)
        if isinstance(item, Barrier):
            boundaries.add(i)
    ordered = sorted(boundaries)
    names = [items[b - 1].out if b else start.name for b in ordered]
    positions = tuple(Position(k, b, name, _shape(walker.nodes[name])) for k, (b, name) in enumerate(zip(ordered, names)))
    by_boundary = {p.boundary: p.index for p in positions}
    # Joins were recorded with the boundary of their fork; translate to position indices.
    fixed: list[Item] = [
        Join(i.node, i.out, by_boundary[i.entry], i.body_arg, i.side, i.side_nodes) if isinstance(i, Join) else i
        for i in items
    ]
    if not any(isinstance(i, Layer) for i in fixed):
        raise ConfigError("layermerge found no 2-D convolution on the path from the input to the output; "
                          "it compresses CNN trunks (conv -> activation chains). Barriers met: "
                          + "; ".join(f"{b.nodes[0]} ({b.reason})" for b in walker.barriers[:5]))
    return Trunk(tuple(fixed), positions, start.name, tuple(walker.barriers))


def _shape(node: Node) -> tuple[int, ...]:
    shape = ir.shape_of(node)
    return tuple(shape) if shape is not None else ()


def _trunk_input(gm: GraphModule) -> Node:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        shape = ir.shape_of(node)
        if shape is not None and len(shape) == 4 and any(ops.is_conv(u) for u in _downstream(node, 8)):
            return node
    raise ConfigError("layermerge found nothing to merge: it needs a 4-D image input (N, C, H, W) followed "
                      "(within a few ops) by a 2-D convolution, and the inputs "
                      + ", ".join(f"{n.name} {ir.shape_of(n)}" for n in placeholders)
                      + " feed none; LayerMerge compresses CNNs (use the exact passes for other models)")


def _downstream(node: Node, depth: int) -> list[Node]:
    seen, frontier = [], [node]
    for _ in range(depth):
        frontier = [u for n in frontier for u in n.users]
        seen.extend(frontier)
    return seen


class _Walker:
    def __init__(self, gm: GraphModule):
        self.gm = gm
        self.nodes = {n.name: n for n in gm.graph.nodes}
        view = ir.to_networkx(gm)
        # Shape queries (a dynamic batch size read for a reshape) carry no data: not a fork.
        view.remove_nodes_from([n.name for n in gm.graph.nodes if ops.is_shape_query(n)])
        output = next(n.name for n in gm.graph.nodes if n.op == "output")
        # Post-dominators: dominators of the reversed graph rooted at the output.
        self.ipdom = nx.immediate_dominators(view.reverse(copy=True), output)
        self.view = view
        self.barriers: list[Barrier] = []

    def walk(self, prev: Node, end: Node | None, first: Node | None, items: list, forks: set[int]) -> Node:
        """Consume nodes after ``prev`` until ``end`` (``None``: the output); return the last node."""
        while prev is not end:
            users = [u for u in prev.users if not ops.is_shape_query(u)]
            if first is not None:
                users, first = [first], None
            if not users or any(u.op == "output" for u in users) and len(users) == 1:
                return prev
            if len(users) == 1:
                prev = self._step(users[0], prev, end, items)
            else:
                prev = self._fork(prev, items, forks)
        return prev

    def _barrier(self, nodes: list[Node], reason: str, items: list) -> Node:
        barrier = Barrier(tuple(n.name for n in nodes), nodes[-1].name, reason)
        items.append(barrier)
        self.barriers.append(barrier)
        return nodes[-1]

    def _step(self, node: Node, prev: Node, end: Node | None, items: list) -> Node:
        if node.op == "output":
            return prev
        data_inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if data_inputs != [prev] or node.args[0] is not prev:
            return self._barrier([node], f"{_target_name(node)} reads other tensors besides the trunk", items)
        if ops.is_identity(node):
            return node
        pads = _zero_pad(node)
        if pads is not None and len(node.users) == 1 and ops.is_conv(next(iter(node.users))) \
                and next(iter(node.users)).args[0] is node:
            layer = self._layer(next(iter(node.users)), end, pad=node, pads=pads)
            if isinstance(layer, str):
                return self._barrier([node], f"zero pad before a conv that is not merged: {layer}", items)
            items.append(layer)
            return self.nodes[layer.out]
        if ops.is_linear(node) and len(ir.shape_of(node) or ()) >= 3:
            layer = self._linear(node, end)
            if isinstance(layer, str):
                return self._barrier([node], layer, items)
            items.append(layer)
            return self.nodes[layer.out]
        if node.op == "call_function" and node.target is aten.permute.default:
            return self._barrier([node], f"layout change: permute {tuple(node.args[1])}", items)  # type: ignore[arg-type]
        if ops.is_conv(node):
            layer = self._layer(node, end)
            if isinstance(layer, str):
                return self._barrier([node], layer, items)
            items.append(layer)
            return self.nodes[layer.out]
        if node.op == "call_function" and node.target in POINTWISE_ACTIVATIONS:
            items.append(Act(node.name, node.name))
            return node
        kind = ops.kind_of(node)
        if kind == "norm":
            return self._barrier([node], f"normalisation {_target_name(node)} (divides by statistics of its input: "
                                         "not affine)", items)
        if kind == "pool":
            return self._barrier([node], f"pooling {_target_name(node)}", items)
        return self._barrier([node], f"{_target_name(node)} is not a conv, linear or pointwise activation", items)

    def _layer(self, conv: Node, end: Node | None, pad: Node | None = None,
               pads: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Layer | str:
        """The layer starting at ``conv`` (or at the zero ``pad`` feeding it: ``pads`` top, left, bottom,
        right), or why it is not one."""
        if ops.spatial_dims(conv) != 2:
            return f"conv{ops.spatial_dims(conv)}d (only 2-D convolutions are merged)"
        p = ops.conv_params(conv)
        if any(d != 1 for d in p.dilation):
            return "dilated conv"
        if not ops.is_stored(p.weight) or (p.bias is not None and not ops.is_stored(p.bias)):
            return "conv weight is computed, not stored"
        in_shape, out_shape = ir.shape_of(pad.args[0] if pad is not None else p.input), ir.shape_of(conv)
        if in_shape is None or out_shape is None:
            return "conv shapes unknown"
        weight = ir.get_param(self.gm, p.weight)
        last, bn = conv, None
        if conv is not end and len(conv.users) == 1:
            (user,) = conv.users
            if ops.is_batch_norm(user) and user.args[0] is conv and all(ops.is_stored(a) for a in user.args[1:5]):
                bn = user
                last = user
        while last is not end and len(last.users) == 1:
            (user,) = last.users
            if not (ops.is_identity(user) and user.args[0] is last):
                break
            last = user
        if isinstance(p.padding, str):  # 'same' with an even kernel: the extra pixel goes bottom/right, as in ATen
            totals = [k - 1 for k in weight.shape[2:]]
            own_begin, own_end = tuple(t // 2 for t in totals), tuple(t - t // 2 for t in totals)
        else:
            own_begin = own_end = p.padding
        begin = (pads[0] + own_begin[0], pads[1] + own_begin[1])
        finish = (pads[2] + own_end[0], pads[3] + own_end[1])
        return Layer(conv.name, bn.name if bn is not None else None, last.name, int(in_shape[1]),
                     int(out_shape[1]), tuple(int(k) for k in weight.shape[2:]), p.stride, begin,  # type: ignore[arg-type]
                     p.groups, tuple(in_shape), tuple(out_shape), pad.name if pad is not None else None,
                     finish if finish != begin else None)

    def _linear(self, node: Node, end: Node | None) -> Layer | str:
        """A linear layer on the last dim (a 1x1 conv of a channels-last map), with a layer scale after it."""
        weight, bias = ops.weight_and_bias(node)
        if not ops.is_stored(weight) or (bias is not None and not ops.is_stored(bias)):
            return "linear weight is computed, not stored"
        in_shape, out_shape = ir.shape_of(node.args[0]), ir.shape_of(node)  # type: ignore[arg-type]
        if in_shape is None or out_shape is None:
            return "linear shapes unknown"
        last, scale = node, None
        if node is not end and len(node.users) == 1:
            (user,) = node.users
            if _channel_scale(self.gm, user, node):
                last = scale = user
        return Layer(node.name, None, last.name, int(in_shape[-1]), int(out_shape[-1]), (1, 1), (1, 1), (0, 0), 1,
                     tuple(in_shape), tuple(out_shape), linear=True, scale=scale.name if scale is not None else None)

    def _fork(self, fork: Node, items: list, forks: set[int]) -> Node:
        join_name = self.ipdom.get(fork.name)
        join = self.nodes.get(join_name) if join_name else None
        if join is None or join.op == "output":
            return self._barrier([fork], "fork whose branches never meet before the output", items)
        region = self._region(fork, join)
        if _is_squeeze_excite(fork, join, region):
            return self._barrier([*region, join], "squeeze-excite gate (pool -> 1x1 -> act -> 1x1 -> sigmoid -> mul)",
                                 items)
        parsed = self._residual(fork, join, region)
        if isinstance(parsed, str):
            return self._barrier([*region, join], parsed, items)
        body_first, body_last, body_arg, side, side_nodes = parsed
        entry_boundary = len(items)
        forks.add(entry_boundary)
        # The body is walked into ``items`` itself, so blocks nested in it record their forks at their
        # boundaries in the whole trunk. A body with barriers inside (a squeeze-excite gate, a pool, a norm) is
        # a nested trunk: its chains between the barriers are segments, and the block's fork and join stay positions.
        last = self.walk(fork, body_last, body_first, items, forks)
        if last is not body_last:
            # Roll back: the block is opaque. Drop what the body walk recorded.
            body_items = items[entry_boundary:]
            del items[entry_boundary:]
            self.barriers = [b for b in self.barriers if b not in body_items]
            forks.discard(entry_boundary)
            forks -= {b for b in forks if b > entry_boundary}
            return self._barrier([*region, join], "residual body does not lead to its add", items)
        out = join
        while len(out.users) == 1 and ops.is_identity(next(iter(out.users))):
            out = next(iter(out.users))
        items.append(Join(join.name, out.name, entry_boundary, body_arg, tuple(side), tuple(side_nodes)))
        return out

    def _region(self, fork: Node, join: Node) -> list[Node]:
        names = nx.descendants(self.view, fork.name) & nx.ancestors(self.view, join.name)
        return [n for n in self.gm.graph.nodes if n.name in names]

    def _residual(self, fork: Node, join: Node, region: list[Node]
                  ) -> tuple[Node, Node, int, list[Layer], list[str]] | str:
        if not ops.is_residual_add(join):
            return f"branches meet at {_op_name(join)}, not a residual add"
        branches = []
        for arg in join.args[:2]:
            branches.append(self._linear_branch(fork, arg))  # type: ignore[arg-type]
        side_index = next((i for i, b in enumerate(branches) if b is not None), None)
        if side_index is None:
            return "neither branch of the residual block is an identity or a conv chain"
        if branches[0] is not None and branches[1] is not None:
            # Both linear: the shorter one is the shortcut.
            side_index = 0 if len(branches[0]) <= len(branches[1]) else 1
        body_arg = 1 - side_index
        side_chain = branches[side_index] or []
        side_layers = []
        for node in side_chain:
            if ops.is_conv(node):
                layer = self._layer(node, None)
                if isinstance(layer, str):
                    return f"shortcut {layer}"
                side_layers.append(layer)
        body_last = join.args[body_arg]
        body_users = [u for u in fork.users if u.name not in {n.name for n in side_chain} and u is not join]
        if len(body_users) != 1 or body_last is fork:
            return "residual block with several body branches"
        return body_users[0], body_last, body_arg, side_layers, [n.name for n in side_chain]  # type: ignore[return-value]

    def _linear_branch(self, fork: Node, last: Node) -> list[Node] | None:
        """Nodes from ``fork`` (exclusive) to ``last`` if they form a conv/bn/no-op chain, else ``None``."""
        chain: list[Node] = []
        node = last
        while node is not fork:
            if len(node.users) != 1 or not (ops.is_conv(node) or ops.is_batch_norm(node) or ops.is_identity(node)):
                return None
            chain.append(node)
            node = node.args[0]  # type: ignore[assignment]
            if not isinstance(node, Node):
                return None
        return list(reversed(chain))


def _channel_scale(gm: GraphModule, node: Node, value: Node) -> bool:
    """``node`` multiplies ``value`` by a stored tensor of one scale per channel (last dim)."""
    if node.op != "call_function" or node.target is not aten.mul.Tensor or value not in node.args[:2]:
        return False
    other = node.args[1] if node.args[0] is value else node.args[0]
    channels = (ir.shape_of(value) or (0,))[-1]
    return ops.is_stored(other) and tuple(ir.get_param(gm, other).shape) == (channels,)  # type: ignore[arg-type]


_GATES = frozenset({aten.sigmoid.default, aten.hardsigmoid.default, aten.sigmoid_.default, aten.hardsigmoid_.default})


def _is_squeeze_excite(fork: Node, join: Node, region: list[Node]) -> bool:
    """``x * gate(pool(x))``: the fork feeds the ``mul`` directly and a branch that starts with a global
    pool and ends with a sigmoid (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018)."""
    if join.op != "call_function" or join.target not in (aten.mul.Tensor, aten.mul_.Tensor) or fork not in join.args:
        return False
    gate = join.args[1] if join.args[0] is fork else join.args[0]
    first = [n for n in region if fork in n.all_input_nodes]
    return (isinstance(gate, Node) and gate.target in _GATES and len(first) == 1
            and ops.kind_of(first[0]) == "pool")


def _zero_pad(node: Node) -> tuple[int, int, int, int] | None:
    """(top, left, bottom, right) of a constant-zero, non-negative pad of the two spatial dims of a 4-D map."""
    if node.op != "call_function":
        return None
    if node.target is aten.constant_pad_nd.default:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
    elif node.target is aten.pad.default:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        if mode != "constant":
            return None
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    else:
        return None
    if not all(isinstance(v, int) for v in node.args[1]):  # type: ignore[union-attr]
        return None  # pad amounts computed at run time
    pad = list(node.args[1])  # type: ignore[arg-type]
    shape = ir.shape_of(node.args[0])  # type: ignore[arg-type]
    if (value or 0) != 0 or shape is None or len(shape) != 4 or len(pad) not in (2, 4) or min(pad) < 0:
        return None
    left, right, top, bottom = (pad + [0, 0])[:4]
    return top, left, bottom, right


def _target_name(node: Node) -> str:
    """``layer_norm.default`` for ``aten.layer_norm.default``."""
    return str(getattr(node.target, "__name__", node.target))


def _op_name(node: Node) -> str:
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"
