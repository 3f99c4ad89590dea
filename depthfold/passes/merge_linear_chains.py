"""Merge consecutive convolutions (or linears) with no non-linearity between them into one layer.

Idea (LayerMerge / depth compression): two linear maps compose into one. For convs with weights
``W1`` (kernel k1, stride s1) and ``W2`` (kernel k2, stride s2) the merged conv has kernel
``k1 + (k2 - 1) * s1``, stride ``s1 * s2`` and weight ``K[o, i] = sum_m W2[o, m] (*) W1[m, i]`` (full
correlation of the kernels, ``W2`` dilated by ``s1``); the bias becomes ``b2 + sum W2 * b1``. Grouped
and depthwise convs compose through their block structure; the merged group count is the largest
one the composed channel connectivity allows. Linears: ``W = W2 @ W1``, ``b = W2 @ b1 + b2``.
Identity ops between (eval dropout, clones, ``nn.Identity``) are dropped.

Exactness: zero padding of the *intermediate* map breaks composition at the borders (the original
sees zeros there, a merged conv would see the first conv's values). So this pass merges only:
a second conv that is unpadded (any first conv, any padding), or a first conv that is a bias-free
unpadded 1x1; every other pair is skipped with that reason. LayerMerge re-pads its segments before
fine-tuning so that they merge exactly.

Cost: a merge that would need more multiply-adds than the pair (e.g. depthwise 3x3 + pointwise 1x1
into a dense 3x3, or a low-rank linear bottleneck) is skipped, with both counts in the reason.

Before / after::

    conv2d(3x3) -> dropout(eval) -> conv2d(1x1)      conv2d(3x3)'

Exactness: EXACT. Sources: "LayerMerge: Neural Network Depth Compression through Layer Pruning and
Merging" (Kim et al., ICML 2024, arXiv:2406.12837); "Efficient Latency-Aware CNN Depth Compression
via Two-Stage Dynamic Programming" (Kim et al., ICML 2023, arXiv:2301.12187).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.fx import GraphModule, Node

from .. import ir
from ..ir import ops
from .base import Change, Exactness, PassResult, Skip
from .registry import register_pass

__all__ = ["MergeLinearChainsConfig", "merge_linear_chains", "compose_convs", "compose_linears", "merged_groups", "dense_weight", "grouped_weight", "AffineLayer"]

aten = torch.ops.aten
_CONV_TARGET = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


@dataclass(frozen=True)
class MergeLinearChainsConfig:
    max_cost_ratio: float = 1.0
    """Merge only if the merged layer needs at most this many times the pair's multiply-adds."""
    merge_convs: bool = True
    """Merge conv -> conv chains."""
    merge_linears: bool = True
    """Merge linear -> linear chains."""


@dataclass(frozen=True)
class AffineLayer:
    """A conv or linear layer's tensors and geometry (linears: ``spatial == 0``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    groups: int = 1

    @property
    def spatial(self) -> int:
        return self.weight.dim() - 2


@register_pass("merge_linear_chains", exactness=Exactness.EXACT, config=MergeLinearChainsConfig)
def merge_linear_chains(gm: GraphModule, config: MergeLinearChainsConfig) -> PassResult:
    """Merge consecutive convs (or linears) with no non-linearity between them into one layer."""
    out = ir.clone(gm)
    changes: list[Change] = []
    skipped: dict[tuple[str, str], Skip] = {}
    progress = True
    while progress:  # each merge can enable the next one along a longer chain
        progress = False
        for first in list(out.graph.nodes):
            pair = _next_layer(first, config)
            if pair is None:
                continue
            between, second = pair
            if (first.name, second.name) in skipped:
                continue
            outcome = _merge_pair(out, first, between, second, config)
            if isinstance(outcome, Change):
                changes.append(outcome)
                progress = True
                break
            skipped[(first.name, second.name)] = Skip(f"{first.name}->{second.name}", outcome)
    out.graph.eliminate_dead_code()
    ir.prune_unused_attributes(out)
    out.recompile()
    # Report only pairs that still exist (an earlier skip may have been superseded by a merge).
    names = {n.name for n in out.graph.nodes}
    remaining = [s for (a, b), s in skipped.items() if a in names and b in names]
    return PassResult(out, changes, remaining)


def _next_layer(first: Node, config: MergeLinearChainsConfig) -> tuple[list[Node], Node] | None:
    """If ``first`` is a conv/linear whose only consumer path (through identities) is another one."""
    is_conv = ops.is_conv(first) and config.merge_convs
    is_linear = ops.is_linear(first) and config.merge_linears
    if not (is_conv or is_linear):
        return None
    between: list[Node] = []
    node = first
    while len(node.users) == 1:
        (user,) = node.users
        if ops.is_identity(user) and user.args[0] is node:
            between.append(user)
            node = user
            continue
        if user.args[0] is not node:
            return None
        if is_conv and ops.is_conv(user) and ops.spatial_dims(user) == ops.spatial_dims(first):
            return between, user
        if is_linear and ops.is_linear(user):
            return between, user
        return None
    return None


def _merge_pair(gm: GraphModule, first: Node, between: list[Node], second: Node,
                config: MergeLinearChainsConfig) -> Change | str:
    for layer_node in (first, second):
        problem = ir.ownership_problem(gm, layer_node)
        if problem:
            return problem
    if ops.is_conv(first):
        merged = _merge_convs(gm, first, second, config)
    else:
        merged = _merge_linears(gm, first, second, config)
    if isinstance(merged, str):
        return merged
    layer, cost_before, cost_after = merged
    owner = str(first.args[1].target).rpartition(".")[0]
    weight_node = ir.new_param(gm, owner, "merged_weight", layer.weight, before=second)
    bias_node = (ir.new_param(gm, owner, "merged_bias", layer.bias, before=second)
                 if layer.bias is not None else None)
    if layer.spatial:
        nd = layer.spatial
        args = (first.args[0], weight_node, bias_node, list(layer.stride), list(layer.padding),
                [1] * nd, layer.groups)
        target = _CONV_TARGET[nd]
    else:
        args, target = (first.args[0], weight_node, bias_node), aten.linear.default
    with gm.graph.inserting_before(second):
        new = gm.graph.call_function(target, args)
    ir.record_origin(new, "merge_linear_chains", [first, *between, second], like=second)
    second.replace_all_uses_with(new)
    for node in (second, *reversed(between), first):
        gm.graph.erase_node(node)
    detail = {"kind": "conv" if layer.spatial else "linear", "macs_before": cost_before,
              "macs_after": cost_after}
    if layer.spatial:
        detail.update(kernel=list(layer.weight.shape[2:]), stride=list(layer.stride),
                      groups=layer.groups)
    return Change("merge", removed=(first.name, *(n.name for n in between), second.name),
                  added=(new.name,), detail=detail)


def _merge_linears(gm: GraphModule, first: Node, second: Node, config: MergeLinearChainsConfig
                   ) -> tuple[AffineLayer, int, int] | str:
    l1, l2 = _read_linear(gm, first), _read_linear(gm, second)
    hidden, inp = l1.weight.shape
    out = l2.weight.shape[0]
    before, after = inp * hidden + hidden * out, inp * out
    if after > config.max_cost_ratio * before:
        return (f"merged linear needs {after} multiply-adds per row vs {before} for the pair "
                f"(a {hidden}-wide bottleneck); merging would be slower")
    return compose_linears(l1, l2), before, after


def _merge_convs(gm: GraphModule, first: Node, second: Node, config: MergeLinearChainsConfig
                 ) -> tuple[AffineLayer, int, int] | str:
    p1, p2 = ops.conv_params(first), ops.conv_params(second)
    for node, p in ((first, p1), (second, p2)):
        if any(d != 1 for d in p.dilation):
            return f"{node.name} is dilated"
        if isinstance(p.padding, str):
            return f"{node.name} pads asymmetrically ('same' with an even kernel)"
    l1, l2 = _read_conv(gm, first), _read_conv(gm, second)
    second_padded = any(p != 0 for p in l2.padding)
    first_is_plain_pointwise = (all(k == 1 for k in l1.weight.shape[2:]) and not any(l1.padding)
                                and (l1.bias is None or not bool(l1.bias.any())))
    if second_padded and not first_is_plain_pointwise:
        return (f"{second.name} zero-pads the intermediate map, so merging it with {first.name} is not "
                "exact at the borders (only an unpadded second conv, or a bias-free unpadded 1x1 first "
                "conv, compose exactly; LayerMerge re-pads segments before fine-tuning)")
    merged = compose_convs(l1, l2)
    out_shape = ir.shape_of(second)
    in_shape = ir.shape_of(first.args[0])  # type: ignore[arg-type]
    if out_shape is None or in_shape is None:
        return "shapes unknown (annotate the graph first)"
    expected = [
        (size + 2 * pad - k) // s + 1
        for size, pad, k, s in zip(in_shape[2:], merged.padding, merged.weight.shape[2:], merged.stride)
    ]
    if tuple(expected) != tuple(out_shape[2:]):
        return (f"the merged conv would produce spatial size {tuple(expected)} instead of "
                f"{tuple(out_shape[2:])} (strided 1x1 before a padded conv)")
    before = _conv_macs(l1, ir.shape_of(first)) + _conv_macs(l2, out_shape)
    after = _conv_macs(merged, out_shape)
    if after > config.max_cost_ratio * before:
        return (f"merged conv (kernel {tuple(merged.weight.shape[2:])}, groups {merged.groups}) needs "
                f"{after} multiply-adds vs {before} for the pair; merging would be slower")
    return merged, before, after


def compose_linears(l1: AffineLayer, l2: AffineLayer) -> AffineLayer:
    """The linear layer equal to ``l2(l1(x))``."""
    w1, w2 = l1.weight.double(), l2.weight.double()
    weight = w2 @ w1
    bias = None
    if l1.bias is not None or l2.bias is not None:
        bias = torch.zeros(w2.shape[0], dtype=torch.float64)
        if l1.bias is not None:
            bias = bias + w2 @ l1.bias.double()
        if l2.bias is not None:
            bias = bias + l2.bias.double()
    dtype = l1.weight.dtype
    return AffineLayer(weight.to(dtype), None if bias is None else bias.to(dtype))


def compose_convs(l1: AffineLayer, l2: AffineLayer) -> AffineLayer:
    """The conv equal to ``conv2(conv1(x))`` where the composition is exact (see module docstring).

    Padding of the result is the first conv's, plus ``s1 * p2`` for a padded second conv after a
    bias-free 1x1 first conv.
    """
    nd = l1.spatial
    w1 = dense_weight(l1.weight.double(), l1.groups)  # [C1, Cin, *k1]
    w2 = dense_weight(l2.weight.double(), l2.groups)  # [C2, C1, *k2]
    k2 = w2.shape[2:]
    s1 = l1.stride
    # K[o, i, p] = sum_m sum_{s1 * t + u = p} W2[o, m, t] W1[m, i, u]: correlate W1 (channels as batch)
    # with the flipped, s1-dilated W2.
    merged = _CONV_FN[nd](w1.transpose(0, 1), w2.flip(dims=tuple(range(2, 2 + nd))),
                          dilation=s1, padding=[s * (k - 1) for s, k in zip(s1, k2)]).transpose(0, 1)
    bias = None
    if l1.bias is not None or l2.bias is not None:
        bias = torch.zeros(w2.shape[0], dtype=torch.float64)
        if l1.bias is not None:
            bias = bias + w2.sum(dim=tuple(range(2, 2 + nd))) @ l1.bias.double()
        if l2.bias is not None:
            bias = bias + l2.bias.double()
    groups = merged_groups(l1.weight.shape[0], l1.groups, l2.groups, w2.shape[0], w1.shape[1])
    weight = grouped_weight(merged, groups).to(l1.weight.dtype)
    padding = tuple(p1 + s * p2 for p1, s, p2 in zip(l1.padding, s1, l2.padding))
    stride = tuple(a * b for a, b in zip(s1, l2.stride))
    return AffineLayer(weight, None if bias is None else bias.to(l1.weight.dtype), stride, padding, groups)


def dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """Expand a grouped conv weight ``[Cout, Cin/g, *k]`` to its block-diagonal ``[Cout, Cin, *k]``."""
    if groups == 1:
        return weight
    cout, cin_g = weight.shape[:2]
    dense = weight.new_zeros((cout, cin_g * groups, *weight.shape[2:]))
    rows = cout // groups
    for g in range(groups):
        dense[g * rows:(g + 1) * rows, g * cin_g:(g + 1) * cin_g] = weight[g * rows:(g + 1) * rows]
    return dense


@functools.lru_cache(maxsize=4096)
def merged_groups(c1: int, g1: int, g2: int, c2: int, cin: int) -> int:
    """Largest group count whose block structure contains the composed channel connectivity.

    Conv 1 (``cin -> c1``, ``g1`` groups) then conv 2 (``c1 -> c2``, ``g2`` groups): output channel ``o``
    reads the middle channels of its ``g2`` block, which read a contiguous range of input channels (the
    ``g1`` blocks they fall in). The answer is the largest ``G`` dividing ``c2`` and ``cin`` whose blocks
    contain every output channel's range.
    """
    out = np.arange(c2)
    mid_lo = (out // (c2 // g2)) * (c1 // g2)
    mid_hi = mid_lo + c1 // g2 - 1
    in_lo = (mid_lo // (c1 // g1)) * (cin // g1)
    in_hi = (mid_hi // (c1 // g1) + 1) * (cin // g1)
    for groups in sorted({g for g in range(1, math.gcd(c2, cin) + 1) if c2 % g == 0 and cin % g == 0},
                         reverse=True):
        block = out // (c2 // groups)
        if np.all(in_lo >= block * (cin // groups)) and np.all(in_hi <= (block + 1) * (cin // groups)):
            return groups
    return 1


def grouped_weight(dense: torch.Tensor, groups: int) -> torch.Tensor:
    """The grouped weight ``[Cout, Cin/g, *k]`` of a block-diagonal dense weight."""
    if groups == 1:
        return dense
    cout, cin = dense.shape[:2]
    rows, cols = cout // groups, cin // groups
    return torch.cat([dense[g * rows:(g + 1) * rows, g * cols:(g + 1) * cols] for g in range(groups)])


def _conv_macs(layer: AffineLayer, out_shape: tuple[int, ...] | None) -> int:
    positions = math.prod(out_shape[2:]) * out_shape[0] if out_shape else 1
    return int(layer.weight.numel() * positions)


def _read_conv(gm: GraphModule, node: Node) -> AffineLayer:
    p = ops.conv_params(node)
    bias = ops.weight_and_bias(node)[1]
    return AffineLayer(ir.get_param(gm, p.weight).detach(),
                  ir.get_param(gm, bias).detach() if bias is not None else None,
                  p.stride, p.padding, p.groups)  # type: ignore[arg-type]


def _read_linear(gm: GraphModule, node: Node) -> AffineLayer:
    bias = ops.weight_and_bias(node)[1]
    return AffineLayer(ir.get_param(gm, node.args[1]).detach(),  # type: ignore[arg-type]
                  ir.get_param(gm, bias).detach() if bias is not None else None)

