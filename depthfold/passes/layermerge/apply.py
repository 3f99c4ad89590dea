"""Build the compressed network for a plan, and merge each of its segments into one conv (exactly).

:func:`apply_plan` rewrites the captured graph: pruned convs become the identity, removed activations
disappear, and each ``merged`` segment is *re-padded* — one zero pad of the segment's total padding at
its input, every inner conv unpadded, residual shortcuts cropped to the body's window — so that it is
an affine map of its input that one conv reproduces exactly. The result is a trainable network (batch
norms kept) for :func:`depthfold.recover`.

:func:`merge_segments` then replaces every such segment by its single conv. It tracks each value inside
the segment as ``conv(pad(x), W, b, stride S)`` (unpadded, anchored at the window origin):

* conv ``(W2, s)``: ``W <- W2 (*) W`` (kernel composition, :func:`compose_convs`), ``S <- S*s``;
* batch norm: scale and shift ``W, b`` per output channel;
* crop by ``c`` pixels: the window moves, ``W`` gains ``S*c`` leading zeros;
* add: kernels padded to one size and summed (same stride).

The merged conv is ``conv2d(x, W, b, S, padding=P)``; the pass checks it numerically against the
compressed network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node

from ... import ir
from ...errors import PassError
from ...ir import ops
from ..merge_linear_chains import AffineLayer, compose_convs, dense_weight, grouped_weight
from .candidates import SegmentChoice, segment_geometry
from .trunk import Act, Join, Layer, Trunk

__all__ = ["META_SEGMENT", "AppliedSegment", "apply_plan", "merge_segments", "share_graph"]

aten = torch.ops.aten
META_SEGMENT = "depthfold.layermerge.segment"
"""Node meta: index of the re-padded segment a node belongs to (set by :func:`apply_plan`)."""


@dataclass(frozen=True)
class AppliedSegment:
    """Where a merged segment sits in the compressed graph."""

    index: int
    choice: SegmentChoice
    input: str
    output: str
    """The segment's last node (its kept activation, or the last affine node)."""
    nodes: tuple[str, ...]


def share_graph(gm: GraphModule) -> GraphModule:
    """A new GraphModule with a copy of ``gm``'s graph and metadata but the *same* parameter tensors.

    Cheap (no tensor copies): for evaluating many candidate networks that only read the weights.
    """
    graph = Graph()
    remap = graph.graph_copy(gm.graph, {})
    graph.output(remap)
    graph.set_codegen(gm.graph._codegen)  # keep the captured module's input/output packing
    for old, new in zip(gm.graph.nodes, graph.nodes):
        new.meta = dict(old.meta)
    return GraphModule(gm, graph, class_name=type(gm).__name__)


def apply_plan(gm: GraphModule, trunk: Trunk, choices: Sequence[SegmentChoice], *, share_params: bool = False
               ) -> tuple[GraphModule, list[AppliedSegment]]:
    """The compressed network for ``choices`` (any subset of a tiling; segments not named stay as they are).

    Args:
        gm: the captured, shape-annotated graph ``trunk`` was analysed from (not modified).
        share_params: reuse ``gm``'s parameter tensors instead of copying them (read-only evaluation).

    Returns:
        The new graph module (shapes annotated on the next :func:`ir.annotate`) and one record per
        merged segment.
    """
    out = share_graph(gm) if share_params else ir.clone(gm)
    nodes = _Nodes(out)
    _functional_trunk(nodes, trunk)
    items_by_name = _items_by_node(trunk)
    applied: list[AppliedSegment] = []
    for choice in choices:
        if choice.kind == "pruned":
            for conv in choice.pruned:
                layer = items_by_name[conv]
                assert isinstance(layer, Layer)
                nodes.replace(layer.out, nodes[layer.first].args[0])  # type: ignore[arg-type]
        elif choice.kind == "merged":
            applied.append(_rewrite_merged(out, nodes, trunk, choice, len(applied)))
    out.graph.eliminate_dead_code()
    if not share_params:
        ir.prune_unused_attributes(out)
    out.recompile()
    return out, applied


class _Nodes:
    """Nodes by original name, following replacements (a rewritten segment's output replaces its end)."""

    def __init__(self, gm: GraphModule):
        self._by_name = {n.name: n for n in gm.graph.nodes}
        self._redirect: dict[str, Node] = {}

    def __getitem__(self, name: str) -> Node:
        node = self._by_name[name]
        while node.name in self._redirect:
            node = self._redirect[node.name]
        return node

    def replace(self, name: str, new: Node) -> None:
        old = self[name]
        old.replace_all_uses_with(new)
        self._redirect[old.name] = new


def _functional_trunk(nodes: _Nodes, trunk: Trunk) -> None:
    """Make the trunk's in-place activations and residual adds (``relu_``, ``x += shortcut``) functional.

    Exact: the walk only admits single-user chains, so nothing reads a mutated tensor afterwards; and an
    in-place node left without users would survive dead-code elimination, still mutating its input."""
    for item in trunk.items:
        if isinstance(item, (Act, Join)):
            node = nodes[item.node]
            node.target = ops.out_of_place(node.target)


def _items_by_node(trunk: Trunk) -> dict[str, object]:
    found: dict[str, object] = {}
    for item in trunk.items:
        if isinstance(item, Layer):
            found[item.conv] = item
        elif isinstance(item, Join):
            for layer in item.side:
                found[layer.conv] = layer
    return found


def _rewrite_merged(gm: GraphModule, nodes: _Nodes, trunk: Trunk, choice: SegmentChoice,
                    index: int) -> AppliedSegment:
    geometry = segment_geometry(trunk, choice.start, choice.end, set(choice.kept))
    if isinstance(geometry, str):
        raise PassError(f"layermerge: segment ({choice.start}, {choice.end}] cannot be merged: {geometry}")
    graph = gm.graph
    x = nodes[trunk.positions[choice.start].node]
    last = nodes[trunk.positions[choice.end].node]
    total = list(geometry.padding)
    created: list[Node] = []
    kept = set(choice.kept)

    def emit(target: object, args: tuple, like: Node | None, sources: Sequence[Node], kwargs: dict | None = None
             ) -> Node:
        with graph.inserting_before(last):
            node = graph.call_function(target, args, kwargs or {})  # type: ignore[arg-type]
        ir.record_origin(node, "layermerge", list(sources), like=like)
        node.meta[META_SEGMENT] = index
        node.meta[ir.META_SHAPE] = _meta_shape(gm, node)
        created.append(node)
        return node

    end = list(geometry.end_padding)
    cur = x
    if any(total) or any(end):
        cur = emit(aten.constant_pad_nd.default, (x, [total[1], end[1], total[0], end[0]], 0.0), None, [x])
    # (value node, stride, pad) of the map at each item boundary of the segment.
    stride, pad = [1, 1], [0, 0]
    boundary = trunk.positions[choice.start].boundary
    states = {boundary: (cur, list(stride), list(pad))}
    items = trunk.between(choice.start, choice.end)
    for i, item in enumerate(items):
        boundary += 1
        if isinstance(item, Layer) and item.conv in kept:
            cur, stride, pad = _emit_layer(emit, nodes, item, cur, stride, pad)
        elif isinstance(item, Act) and i == len(items) - 1:
            act = nodes[item.node]
            cur = emit(act.target, (cur, *act.args[1:]), act, [act], dict(act.kwargs))
        elif isinstance(item, Join):
            add = nodes[item.node]
            if item.entry < choice.start:  # shortcut from outside: keep it, add it to the new body
                args = [None, None]
                args[item.body_arg] = cur
                args[1 - item.body_arg] = add.args[1 - item.body_arg]
                cur = emit(add.target, tuple(args), add, [add])
            else:
                entry, s_stride, s_pad = states[trunk.positions[item.entry].boundary]
                side = entry
                for layer in item.side:
                    side, s_stride, s_pad = _emit_layer(emit, nodes, layer, side, s_stride, s_pad)
                join_pad = [max(a, b) for a, b in zip(pad, s_pad)]
                body_c, side_c = cur, side
                if not geometry.linear:  # channels-last linears keep every position: nothing to align
                    body_c = _emit_crop(emit, cur, [(p - b) // s for p, b, s in zip(join_pad, pad, stride)], add)
                    side_c = _emit_crop(emit, side, [(p - b) // s for p, b, s in zip(join_pad, s_pad, stride)], add)
                    body_c, side_c = _emit_match(emit, body_c, side_c, add)
                args = [None, None]
                args[item.body_arg], args[1 - item.body_arg] = body_c, side_c
                cur = emit(add.target, tuple(args), add, [add])
                pad = join_pad
        states[boundary] = (cur, list(stride), list(pad))
    want = tuple(trunk.positions[choice.end].shape)
    if _value_shape(cur)[1:] != want[1:]:
        raise PassError(f"layermerge: segment ({choice.start}, {choice.end}] would produce {_value_shape(cur)} "
                        f"where the network has {want}; this is a bug in the re-padding, please report it with "
                        "the model")
    nodes.replace(trunk.positions[choice.end].node, cur)
    return AppliedSegment(index, choice, x.name, cur.name, tuple(n.name for n in created))


def _emit_layer(emit, nodes: _Nodes, layer: Layer, cur: Node, stride: list[int], pad: list[int]
                ) -> tuple[Node, list[int], list[int]]:
    conv = nodes[layer.conv]
    if layer.linear:
        cur = emit(aten.linear.default, (cur, *conv.args[1:]), conv, [conv])
        if layer.scale is not None:
            scale = nodes[layer.scale]
            cur = emit(scale.target, tuple(cur if a is conv else a for a in scale.args), scale, [scale])
        return cur, stride, pad
    p = ops.conv_params(conv)
    cur = emit(aten.conv2d.default, (cur, p.weight, p.bias, list(p.stride), [0, 0], [1, 1], p.groups), conv, [conv])
    if layer.bn is not None:
        bn = nodes[layer.bn]
        cur = emit(bn.target, (cur, *bn.args[1:]), bn, [bn], dict(bn.kwargs))
    new_pad = [q + s * lp for q, s, lp in zip(pad, stride, layer.padding)]
    new_stride = [s * ls for s, ls in zip(stride, layer.stride)]
    return cur, new_stride, new_pad


def _emit_crop(emit, value: Node, starts: list[int], like: Node) -> Node:
    for dim, start in zip((2, 3), starts):
        if start:
            value = emit(aten.slice.Tensor, (value, dim, start, 2 ** 62), like, [like])
    return value


def _emit_match(emit, a: Node, b: Node, like: Node) -> tuple[Node, Node]:
    """Trim both maps to their common spatial size (the window origin already matches)."""
    sa, sb = _value_shape(a), _value_shape(b)
    for dim in (2, 3):
        size = min(sa[dim], sb[dim])
        if sa[dim] > size:
            a = emit(aten.slice.Tensor, (a, dim, 0, size), like, [like])
        if sb[dim] > size:
            b = emit(aten.slice.Tensor, (b, dim, 0, size), like, [like])
    return a, b


def _value_shape(node: Node) -> tuple[int, ...]:
    shape = ir.shape_of(node)
    if shape is None:
        raise PassError(f"layermerge: shape of {node.name} unknown while building the segment")
    return shape


def _meta_shape(gm: GraphModule, node: Node) -> tuple[int, ...]:
    """The output shape of a new node, computed on meta tensors from its inputs' recorded shapes."""
    def meta(arg: object) -> object:
        if isinstance(arg, Node):
            shape = tuple(ir.get_param(gm, arg).shape) if arg.op == "get_attr" else ir.shape_of(arg)
            return torch.empty(shape, device="meta")
        if isinstance(arg, (list, tuple)):
            return type(arg)(meta(a) for a in arg)
        return arg
    result = node.target(*meta(node.args), **{k: meta(v) for k, v in node.kwargs.items()})  # type: ignore[operator]
    return tuple(int(d) for d in result.shape)


def merge_segments(gm: GraphModule, segments: Sequence[AppliedSegment]
                   ) -> tuple[GraphModule, list[Node | None]]:
    """Replace each re-padded segment of a compressed network by one conv (its activation and an add of an
    outside shortcut stay after it). Returns the new graph and, per segment, its merged conv node (``None``
    where the segment is the identity: every conv pruned, nothing absorbed)."""
    out = ir.clone(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    merged_nodes: list[Node | None] = []
    for seg in segments:
        members = [nodes[name] for name in seg.nodes]
        x = nodes[seg.input]  # may be the merged conv of the segment before (it replaced that segment's output)
        linear = seg.choice.geometry is not None and seg.choice.geometry.linear
        channels = int(ir.shape_of(x)[-1 if linear else 1])  # type: ignore[index]
        values: dict[Node, _Affine] = {x: _Affine.identity(channels)}
        affine_out = x
        for node in members:
            if node.target not in _AFFINE_TARGETS or any(
                    isinstance(a, Node) and a.op != "get_attr" and a not in values for a in node.args):
                break  # the kept activation, or the add of a shortcut from outside the segment
            values[node] = _affine_step(out, node, values)
            affine_out = node
        if affine_out is x:
            merged_nodes.append(None)  # every conv pruned and nothing absorbed: the segment is the identity
            continue
        affine = values[affine_out]
        if linear:
            owner = _owner(members)
            anchor = affine_out.next
            w_node = ir.new_param(out, owner, "merged_weight", affine.weight[:, :, 0, 0].to(torch.float32), before=anchor)
            b_node = ir.new_param(out, owner, "merged_bias", affine.bias.to(torch.float32), before=anchor)
            with out.graph.inserting_before(anchor):
                layer = out.graph.call_function(aten.linear.default, (x, w_node, b_node))
            ir.record_origin(layer, "layermerge", [n for n in members if ops.is_linear(n)], like=affine_out)
            affine_out.replace_all_uses_with(layer)
            nodes[affine_out.name] = layer
            merged_nodes.append(layer)
            continue
        groups = _largest_groups(affine.weight)
        weight = grouped_weight(affine.weight, groups).to(torch.float32)
        owner = _owner(members)
        anchor = affine_out.next
        w_node = ir.new_param(out, owner, "merged_weight", weight, before=anchor)
        b_node = ir.new_param(out, owner, "merged_bias", affine.bias.to(torch.float32), before=anchor)
        pads = _segment_padding(members, x)  # left, right, top, bottom
        with out.graph.inserting_before(anchor):
            source, padding = x, [pads[2], pads[0]]
            if pads[0] != pads[1] or pads[2] != pads[3]:
                # Asymmetric (TF 'same') padding: torch convs pad symmetrically, so an explicit pad and a
                # valid conv (ONNX Runtime fuses the two into one Conv with asymmetric pads).
                source, padding = out.graph.call_function(aten.constant_pad_nd.default, (x, pads, 0.0)), [0, 0]
                ir.record_origin(source, "layermerge", [x], like=None)
            conv = out.graph.call_function(aten.conv2d.default, (source, w_node, b_node, list(affine.stride),
                                                                  padding, [1, 1], groups))
        ir.record_origin(conv, "layermerge", [n for n in members if ops.is_conv(n)], like=affine_out)
        affine_out.replace_all_uses_with(conv)
        nodes[affine_out.name] = conv
        merged_nodes.append(conv)
    out.graph.eliminate_dead_code()
    ir.prune_unused_attributes(out)
    out.recompile()
    return out, merged_nodes


_AFFINE_TARGETS = {aten.conv2d.default, aten.constant_pad_nd.default, aten.slice.Tensor, aten.add.Tensor,
                   aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
                   aten.linear.default, aten.mul.Tensor}


@dataclass(frozen=True)
class _Affine:
    """``conv2d(padded_input, weight, bias, stride)``, unpadded, dense float64 weight."""

    weight: torch.Tensor
    bias: torch.Tensor
    stride: tuple[int, int]

    @staticmethod
    def identity(channels: int) -> _Affine:
        return _Affine(torch.eye(channels, dtype=torch.float64)[:, :, None, None],
                       torch.zeros(channels, dtype=torch.float64), (1, 1))


def _affine_step(gm: GraphModule, node: Node, values: dict[Node, _Affine]) -> _Affine:
    if node.target is aten.mul.Tensor:  # a per-channel layer scale (the only mul a segment holds)
        value, scale = (node.args[0], node.args[1]) if node.args[0] in values else (node.args[1], node.args[0])
        src, factor = values[value], ir.get_param(gm, scale).detach().double()  # type: ignore[index,arg-type]
        return _Affine(src.weight * factor[:, None, None, None], src.bias * factor, src.stride)
    src = values[node.args[0]]  # type: ignore[index]
    if node.target is aten.constant_pad_nd.default:
        return src
    if ops.is_linear(node):
        w, b = (ir.get_param(gm, a).detach().double() if a is not None else None for a in ops.weight_and_bias(node))
        weight = torch.einsum("oc,cikl->oikl", w, src.weight)
        bias = w @ src.bias + (b if b is not None else 0.0)
        return _Affine(weight, bias, src.stride)
    if ops.is_conv(node):
        p = ops.conv_params(node)
        w = ir.get_param(gm, p.weight).detach().double()
        b = ir.get_param(gm, p.bias).detach().double() if p.bias is not None else None
        composed = compose_convs(AffineLayer(src.weight, src.bias, src.stride, (0, 0), 1),
                                 AffineLayer(w, b, p.stride, (0, 0), p.groups))
        return _Affine(dense_weight(composed.weight, composed.groups), composed.bias, composed.stride)  # type: ignore[arg-type]
    if ops.is_batch_norm(node):
        gamma, beta, mean, var = (ir.get_param(gm, a).detach().double() for a in node.args[1:5])  # type: ignore[arg-type]
        eps = float(node.args[7]) if node.target is aten.batch_norm.default else float(node.args[6])  # type: ignore[arg-type]
        scale = gamma / torch.sqrt(var + eps)
        return _Affine(src.weight * scale[:, None, None, None], (src.bias - mean) * scale + beta, src.stride)
    if node.target is aten.slice.Tensor:
        dim, start = int(node.args[1]), int(node.args[2])  # type: ignore[arg-type]
        if start == 0:
            return src
        shift = [0, 0]
        shift[dim - 2] = src.stride[dim - 2] * start
        weight = F.pad(src.weight, [shift[1], 0, shift[0], 0])
        return _Affine(weight, src.bias, src.stride)
    if node.target is aten.add.Tensor:
        a, b = values[node.args[0]], values[node.args[1]]  # type: ignore[index]
        if a.stride != b.stride:
            raise PassError(f"layermerge: {node.name} adds maps of different strides")
        kh = max(a.weight.shape[2], b.weight.shape[2])
        kw = max(a.weight.shape[3], b.weight.shape[3])

        def grow(w: torch.Tensor) -> torch.Tensor:
            return F.pad(w, [0, kw - w.shape[3], 0, kh - w.shape[2]])

        return _Affine(grow(a.weight) + grow(b.weight), a.bias + b.bias, a.stride)
    raise PassError(f"layermerge: unexpected node {node.name} ({node.target}) inside a merged segment")


def _segment_padding(members: list[Node], x: Node) -> list[int]:
    """The re-padding of the segment at its input, as ``constant_pad_nd`` writes it (left, right, top, bottom)."""
    for node in members:
        if node.target is aten.constant_pad_nd.default and node.args[0] is x:
            return [int(p) for p in node.args[1]]  # type: ignore[union-attr]
    return [0, 0, 0, 0]


def _largest_groups(dense: torch.Tensor) -> int:
    """The largest group count whose block-diagonal structure holds every non-zero of ``dense``."""
    cout, cin = dense.shape[:2]
    nonzero = dense.abs().sum(dim=(2, 3)) > 0
    for groups in sorted((g for g in range(1, math.gcd(cout, cin) + 1) if cout % g == 0 and cin % g == 0),
                         reverse=True):
        rows = torch.arange(cout) // (cout // groups)
        cols = torch.arange(cin) // (cin // groups)
        if not (nonzero & (rows[:, None] != cols[None, :])).any():
            return groups
    return 1


def _owner(members: list[Node]) -> str:
    for node in members:
        if ops.is_conv(node) or ops.is_linear(node):
            return str(node.args[1].target).rpartition(".")[0]  # type: ignore[union-attr]
    return ""
