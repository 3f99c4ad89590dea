"""Fuse sibling linears (or 1x1/kxk convs) that read the same tensor into one wider layer plus a split.

Idea: horizontal fusion. ``q = x Wq^T``, ``k = x Wk^T``, ``v = x Wv^T`` equal the slices of
``x [Wq; Wk; Wv]^T``, so three GEMMs become one larger, better-utilised GEMM followed by a split.
The same holds for gate/up projections of a gated MLP and, opt-in (``fuse_convs=true``), for parallel
convs with identical geometry (concatenate along output channels). Missing biases are filled with zeros.

Before / after::

    x -> linear(Wq), x -> linear(Wk), x -> linear(Wv)      x -> linear([Wq;Wk;Wv]) -> split -> q, k, v

Exactness: EXACT. Source: standard horizontal operator fusion (e.g. TVM's ``CombineParallelDense``,
fused QKV projections in Megatron-LM and FasterTransformer).
"""

from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from .. import ir
from ..ir import ops
from .base import Change, Exactness, PassResult, Skip
from .registry import register_pass

__all__ = ["FuseQKVConfig", "fuse_qkv"]

aten = torch.ops.aten
_CONV_TARGET = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}


@dataclass(frozen=True)
class FuseQKVConfig:
    min_group: int = 2
    """Fuse only when at least this many siblings share the input."""
    fuse_convs: bool = False
    """Also fuse sibling convolutions with identical geometry (groups == 1). Off by default: on CPU
    ONNX Runtime the split after a fused conv blocks its Conv+Add/ReLU fusions, and ResNet-50's
    fused bottleneck/downsample pair measured 2.6% slower (benchmarks/exact_fusion.py)."""


@register_pass("fuse_qkv", exactness=Exactness.EXACT, config=FuseQKVConfig)
def fuse_qkv(gm: GraphModule, config: FuseQKVConfig) -> PassResult:
    """Fuse sibling linears or convs reading the same input into one layer followed by a split."""
    if config.min_group < 2:
        raise ValueError("fuse_qkv: min_group must be at least 2")
    out = ir.clone(gm)
    changes: list[Change] = []
    skipped: list[Skip] = []
    for source in list(out.graph.nodes):
        for key, siblings in _sibling_groups(source, config).items():
            usable = []
            for node in siblings:
                problem = ir.ownership_problem(out, node)
                if problem:
                    skipped.append(Skip(node.name, problem))
                else:
                    usable.append(node)
            if len(usable) >= config.min_group:
                changes.append(_fuse(out, source, usable, key))
            elif len(siblings) >= config.min_group:
                skipped.append(Skip(",".join(n.name for n in siblings),
                                    f"fewer than {config.min_group} siblings can be fused"))
    out.graph.eliminate_dead_code()
    ir.prune_unused_attributes(out)
    out.recompile()
    return PassResult(out, changes, skipped)


def _sibling_groups(source: Node, config: FuseQKVConfig) -> dict[tuple, list[Node]]:
    groups: dict[tuple, list[Node]] = defaultdict(list)
    for user in source.users:
        if user.args[0] is not source:
            continue
        if ops.is_linear(user):
            weight = user.args[1]
            dtype = weight.meta.get(ir.META_DTYPE) if isinstance(weight, Node) else None
            groups[("linear", dtype)].append(user)
        elif config.fuse_convs and ops.is_conv(user):
            p = ops.conv_params(user)
            if p.groups != 1 or isinstance(p.padding, str):
                continue
            kernel = ir.shape_of(p.weight)
            groups[("conv", ops.spatial_dims(user), kernel[2:] if kernel else None, p.stride,
                    p.padding, p.dilation)].append(user)
    return {k: v for k, v in groups.items() if len(v) >= 2}


def _fuse(gm: GraphModule, source: Node, siblings: list[Node], key: tuple) -> Change:
    weights, biases, sizes = [], [], []
    for node in siblings:
        weight_node, bias_node = ops.weight_and_bias(node)
        weight = ir.get_param(gm, weight_node).detach()
        weights.append(weight)
        sizes.append(int(weight.shape[0]))
        biases.append(ir.get_param(gm, bias_node).detach() if bias_node is not None else None)
    weight = torch.cat(weights, dim=0)
    has_bias = any(b is not None for b in biases)
    bias = (torch.cat([b if b is not None else weight.new_zeros(n) for b, n in zip(biases, sizes)])
            if has_bias else None)
    first = min(siblings, key=_position)
    owner = _common_owner([str(ops.weight_and_bias(n)[0].target) for n in siblings])
    weight_node = ir.new_param(gm, owner, "fused_weight", weight, before=first)
    bias_node = ir.new_param(gm, owner, "fused_bias", bias, before=first) if bias is not None else None
    with gm.graph.inserting_before(first):
        if key[0] == "linear":
            fused = gm.graph.call_function(aten.linear.default, (source, weight_node, bias_node))
            split_dim = -1
        else:
            p = ops.conv_params(first)
            # The default overload takes integer padding; aten.convNd.padding (from padding="same"/"valid")
            # takes a string, and p.padding is already normalised to integers here.
            target = _CONV_TARGET[ops.spatial_dims(first)]
            fused = gm.graph.call_function(target, (source, weight_node, bias_node, list(p.stride),
                                                    list(p.padding), list(p.dilation), 1))
            split_dim = 1
        split = gm.graph.call_function(aten.split_with_sizes.default, (fused, sizes, split_dim))
        parts = [gm.graph.call_function(operator.getitem, (split, i)) for i in range(len(siblings))]
    ir.record_origin(fused, "fuse_qkv", siblings, like=first)
    ir.record_origin(split, "fuse_qkv", siblings, like=first)
    for node, part in zip(siblings, parts):
        ir.record_origin(part, "fuse_qkv", [node], like=node)
        node.replace_all_uses_with(part)
        gm.graph.erase_node(node)
    return Change("fuse", removed=tuple(n.name for n in siblings),
                  added=(fused.name, split.name, *(p.name for p in parts)),
                  detail={"kind": key[0], "input": source.name, "sizes": sizes})


def _position(node: Node) -> int:
    return next(i for i, n in enumerate(node.graph.nodes) if n is node)


def _common_owner(targets: list[str]) -> str:
    """The deepest module path containing every weight (``layers.0.attn`` for q/k/v projections)."""
    parts = [t.split(".")[:-2] for t in targets]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)
