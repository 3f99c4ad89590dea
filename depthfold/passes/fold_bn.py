"""Fold inference-mode BatchNorm into the neighbouring convolution or linear layer.

Idea: an eval BatchNorm is the per-channel affine map ``y = s * x + t`` with
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``.

* BN after a conv/linear: ``W' = W * s`` (per output channel), ``b' = b * s + t``. Always exact,
  grouped and depthwise convs included.
* BN before a conv/linear: ``W' = W * s`` (per input channel), ``b' = b + sum(W * t)``. Exact for
  linears and for unpadded convs only: a padded conv zero-pads the BN output, and a folded conv
  would see ``t`` at the border instead of zero.

Before / after::

    conv2d -> batch_norm -> relu        conv2d' -> relu

Exactness: EXACT. Source: standard inference-time folding (e.g. onnxscript ``_fuse_batchnorm``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from .. import ir
from ..ir import ops
from .base import Change, Exactness, PassResult, Skip
from .registry import register_pass

__all__ = ["FoldBNConfig", "fold_bn"]


@dataclass(frozen=True)
class FoldBNConfig:
    fold_before: bool = True
    """Also fold a BN that precedes a linear or unpadded conv (when no producer can absorb it)."""


@dataclass(frozen=True)
class _BatchNorm:
    node: Node
    output: Node
    """The node whose value is the normalised tensor (the BN, or ``getitem(bn, 0)``)."""
    input: Node
    scale: torch.Tensor
    shift: torch.Tensor


@register_pass("fold_bn", exactness=Exactness.EXACT, config=FoldBNConfig)
def fold_bn(gm: GraphModule, config: FoldBNConfig) -> PassResult:
    """Fold inference-mode BatchNorm into the neighbouring conv or linear layer."""
    out = ir.clone(gm)
    changes: list[Change] = []
    skipped: list[Skip] = []
    for node in list(out.graph.nodes):
        if not ops.is_batch_norm(node):
            continue
        bn = _read_batch_norm(out, node)
        if isinstance(bn, str):
            skipped.append(Skip(node.name, bn))
            continue
        reason_after = _fold_into_producer(out, bn, changes)
        if reason_after is None:
            continue
        if not config.fold_before:
            skipped.append(Skip(node.name, reason_after))
            continue
        reason_before = _fold_into_consumer(out, bn, changes)
        if reason_before is not None:
            skipped.append(Skip(node.name, f"{reason_after}; {reason_before}"))
    out.graph.eliminate_dead_code()
    ir.prune_unused_attributes(out)
    out.recompile()
    return PassResult(out, changes, skipped)


def _read_batch_norm(gm: GraphModule, node: Node) -> _BatchNorm | str:
    args = list(node.args)
    if node.target is torch.ops.aten.batch_norm.default:
        x, weight, bias, mean, var, eps = args[0], args[1], args[2], args[3], args[4], args[7]
        output = node
    else:  # _native_batch_norm_legit_no_training -> (out, save_mean, save_rstd)
        x, weight, bias, mean, var, eps = args[0], args[1], args[2], args[3], args[4], args[6]
        getters = list(node.users)
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in getters) or len(getters) != 1:
            return "batch norm statistics outputs are used"
        output = getters[0]
    tensors = {}
    for key, value in (("weight", weight), ("bias", bias), ("mean", mean), ("var", var)):
        if value is None:
            tensors[key] = None
        elif isinstance(value, Node) and value.op == "get_attr":
            tensors[key] = ir.get_param(gm, value).detach().double()
        else:
            return f"batch norm {key} is computed, not a stored tensor"
    if tensors["mean"] is None or tensors["var"] is None:
        return "batch norm without running statistics"
    scale = torch.rsqrt(tensors["var"] + float(eps))
    if tensors["weight"] is not None:
        scale = scale * tensors["weight"]
    shift = -tensors["mean"] * scale
    if tensors["bias"] is not None:
        shift = shift + tensors["bias"]
    return _BatchNorm(node, output, x, scale, shift)


def _fold_into_producer(gm: GraphModule, bn: _BatchNorm, changes: list[Change]) -> str | None:
    """Fold ``bn`` into the conv/linear that produces its input; return a reason if it cannot."""
    producer = bn.input
    if not (ops.is_conv(producer) or ops.is_linear(producer)):
        return "input is not produced by a conv or linear"
    if len(producer.users) != 1:
        return f"{producer.name} output has other users"
    problem = ir.ownership_problem(gm, producer)
    if problem:
        return problem
    weight_node, bias_node = ops.weight_and_bias(producer)
    shape = ir.shape_of(producer)
    channels = bn.scale.numel()
    if ops.is_linear(producer) and (shape is None or len(shape) != 2):
        return "BatchNorm over a linear output with more than 2 dimensions normalises another axis"
    if shape is None or shape[1] != channels:
        return "channel count does not match the producer's output"
    weight = ir.get_param(gm, weight_node).detach()
    view = (-1,) + (1,) * (weight.dim() - 1)
    new_weight = (weight.double() * bn.scale.view(view)).to(weight.dtype)
    old_bias = ir.get_param(gm, bias_node).detach().double() if bias_node is not None else 0.0
    new_bias = (old_bias * bn.scale + bn.shift).to(weight.dtype)
    ir.set_param(gm, weight_node, new_weight)
    if bias_node is not None:
        ir.set_param(gm, bias_node, new_bias)
    else:
        bias_node = ir.new_param(gm, _owner(weight_node), "bias", new_bias, before=producer)
        _set_bias_arg(producer, bias_node)
    bn.output.replace_all_uses_with(producer)
    _erase(gm, bn)
    changes.append(Change("fold_bn_after", removed=(bn.node.name,), added=(),
                          detail={"into": producer.name}))
    return None


def _fold_into_consumer(gm: GraphModule, bn: _BatchNorm, changes: list[Change]) -> str | None:
    """Fold ``bn`` into the single conv/linear that consumes it; return a reason if it cannot."""
    users = list(bn.output.users)
    if len(users) != 1:
        return "output feeds several nodes"
    consumer = users[0]
    if not (ops.is_conv(consumer) or ops.is_linear(consumer)) or consumer.args[0] is not bn.output:
        return "output does not feed a conv or linear"
    problem = ir.ownership_problem(gm, consumer)
    if problem:
        return problem
    weight_node, bias_node = ops.weight_and_bias(consumer)
    weight = ir.get_param(gm, weight_node).detach()
    if ops.is_conv(consumer):
        params = ops.conv_params(consumer)
        if params.padded:
            return (f"{consumer.name} zero-pads its input, so folding the BN before it is not exact "
                    "at the borders")
        in_shape = ir.shape_of(bn.output)
        if in_shape is None or in_shape[1] != bn.scale.numel():
            return "channel count does not match the consumer's input"
        groups = params.groups
        per_group = weight.shape[1]
        # Input channel (group g, local i) is global channel g * per_group + i; output row o is in
        # group o // (out_channels / groups).
        rows = weight.shape[0] // groups
        scale = bn.scale.view(groups, per_group).repeat_interleave(rows, dim=0)
        shift = bn.shift.view(groups, per_group).repeat_interleave(rows, dim=0)
        view = scale.shape + (1,) * (weight.dim() - 2)
        new_weight = weight.double() * scale.view(view)
        bias_add = (weight.double().sum(dim=tuple(range(2, weight.dim()))) * shift).sum(dim=1)
    else:
        in_shape = ir.shape_of(bn.output)
        if in_shape is None or len(in_shape) != 2 or weight.shape[1] != bn.scale.numel():
            return "BatchNorm1d before a linear must normalise the linear's input features"
        new_weight = weight.double() * bn.scale.view(1, -1)
        bias_add = weight.double() @ bn.shift
    old_bias = ir.get_param(gm, bias_node).detach().double() if bias_node is not None else 0.0
    new_bias = (old_bias + bias_add).to(weight.dtype)
    ir.set_param(gm, weight_node, new_weight.to(weight.dtype))
    if bias_node is not None:
        ir.set_param(gm, bias_node, new_bias)
    else:
        bias_node = ir.new_param(gm, _owner(weight_node), "bias", new_bias, before=consumer)
        _set_bias_arg(consumer, bias_node)
    bn.output.replace_all_uses_with(bn.input)
    _erase(gm, bn)
    changes.append(Change("fold_bn_before", removed=(bn.node.name,), added=(),
                          detail={"into": consumer.name}))
    return None


def _owner(weight_node: Node) -> str:
    return str(weight_node.target).rpartition(".")[0]


def _set_bias_arg(node: Node, bias: Node) -> None:
    args = list(node.args)
    if len(args) > 2:
        args[2] = bias
        node.args = tuple(args)
    elif len(args) == 2:
        node.args = (*args, bias)
    else:
        node.kwargs = {**node.kwargs, "bias": bias}


def _erase(gm: GraphModule, bn: _BatchNorm) -> None:
    if bn.output is not bn.node:
        gm.graph.erase_node(bn.output)
    gm.graph.erase_node(bn.node)
