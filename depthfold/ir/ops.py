"""Classify ATen-level fx nodes: convolutions, linears, norms, activations, identities, joins.

The IR is ``torch.export``'s ATen graph (training IR, not decomposed), so a ``nn.Conv2d`` is one
``aten.conv2d`` node whose weight and bias are ``get_attr`` nodes. Passes and analyses ask these
predicates instead of matching targets themselves.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from .graph import shape_of

__all__ = [
    "ConvParams",
    "NodeKind",
    "conv_params",
    "is_activation",
    "is_batch_norm",
    "is_conv",
    "is_identity",
    "is_linear",
    "is_stored",
    "is_residual_add",
    "is_shape_query",
    "kind_of",
    "out_of_place",
    "spatial_dims",
    "weight_and_bias",
]

aten = torch.ops.aten

_CONV_SPATIAL = {
    aten.conv1d.default: 1,
    aten.conv2d.default: 2,
    aten.conv3d.default: 3,
    aten.conv1d.padding: 1,
    aten.conv2d.padding: 2,
    aten.conv3d.padding: 3,
}
_LINEAR = {aten.linear.default}
_BATCH_NORM = {aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default}
_LAYER_NORM = {aten.layer_norm.default, aten.group_norm.default, aten.rms_norm.default}
_ACTIVATIONS = {
    aten.relu.default, aten.relu_.default, aten.relu6.default, aten.hardtanh.default,
    aten.hardtanh_.default, aten.gelu.default, aten.silu.default, aten.silu_.default,
    aten.sigmoid.default, aten.tanh.default, aten.hardswish.default, aten.hardswish_.default,
    aten.hardsigmoid.default, aten.leaky_relu.default, aten.leaky_relu_.default, aten.elu.default,
    aten.softplus.default, aten.mish.default, aten.prelu.default, aten.selu.default,
    aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
}
# Ops that return their input unchanged at inference (dropout with train=False, copies, aliases).
_ALWAYS_IDENTITY = {
    aten.clone.default, aten.alias.default, aten.detach.default, aten.detach_.default,
    aten.lift_fresh_copy.default, aten.contiguous.default,
}
_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default}
_ADDS = {aten.add.Tensor, aten.add_.Tensor, operator.add}
_POOLS = {aten.max_pool2d.default, aten.avg_pool2d.default, aten.adaptive_avg_pool2d.default,
          aten.max_pool1d.default, aten.avg_pool1d.default, aten.adaptive_avg_pool1d.default,
          aten.mean.dim}
_MATMULS = {aten.matmul.default, aten.bmm.default, aten.mm.default, aten.addmm.default,
            aten.scaled_dot_product_attention.default}

NodeKind = str
"""One of: conv, linear, batch_norm, norm, activation, identity, add, pool, matmul, placeholder,
param, output, other."""


def _is_call(node: Node) -> bool:
    return node.op == "call_function"


def is_conv(node: Node) -> bool:
    """An ``aten.convN`` node (not transposed, not the generic ``aten.convolution``)."""
    return _is_call(node) and node.target in _CONV_SPATIAL


def is_linear(node: Node) -> bool:
    """An ``aten.linear`` node."""
    return _is_call(node) and node.target in _LINEAR


def is_batch_norm(node: Node) -> bool:
    """An inference-mode batch norm (``aten.batch_norm`` with ``training=False``)."""
    if not (_is_call(node) and node.target in _BATCH_NORM):
        return False
    if node.target is aten.batch_norm.default:
        return not _arg(node, 5, "training", False)
    return True


def is_activation(node: Node) -> bool:
    """A pointwise (or softmax) non-linearity."""
    return _is_call(node) and node.target in _ACTIVATIONS


def is_identity(node: Node) -> bool:
    """An op that returns its first input unchanged at inference time (eval dropout, clone, alias)."""
    if not _is_call(node):
        return False
    if node.target in _ALWAYS_IDENTITY:
        return True
    if node.target in _DROPOUTS:
        p = _arg(node, 1, "p", 0.0)
        train = _arg(node, 2, "train", False)
        return (not train) or p == 0.0
    return False


def is_residual_add(node: Node) -> bool:
    """An elementwise add of two computed tensors (a residual join), not a bias or scalar add."""
    if not (_is_call(node) and node.target in _ADDS):
        return False
    tensors = [a for a in node.args[:2] if isinstance(a, Node) and a.op != "get_attr"]
    return len(tensors) == 2 and node.kwargs.get("alpha", 1) == 1


def is_shape_query(node: Node) -> bool:
    """A size query (``aten.sym_size``: a dynamic batch size read for a reshape): carries no tensor data."""
    return _is_call(node) and node.target in (aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int)


def kind_of(node: Node) -> NodeKind:
    """A coarse kind for analyses and op histograms."""
    if node.op == "placeholder":
        return "placeholder"
    if node.op == "get_attr":
        return "param"
    if node.op == "output":
        return "output"
    if is_conv(node):
        return "conv"
    if is_linear(node):
        return "linear"
    if is_batch_norm(node):
        return "batch_norm"
    if _is_call(node) and node.target in _LAYER_NORM:
        return "norm"
    if is_activation(node):
        return "activation"
    if is_identity(node):
        return "identity"
    if is_residual_add(node):
        return "add"
    if _is_call(node) and node.target in _POOLS:
        return "pool"
    if _is_call(node) and node.target in _MATMULS:
        return "matmul"
    return "other"


def out_of_place(target: Any) -> Any:
    """The functional form of an in-place ATen op (``aten.add_.Tensor`` -> ``aten.add.Tensor``); any other
    target unchanged. Replacing one by the other is exact when nothing reads the mutated tensor afterwards."""
    if not isinstance(target, torch._ops.OpOverload):
        return target
    name = target._opname
    if not name.endswith("_") or name.startswith("_"):
        return target
    packet = getattr(aten, name[:-1], None)
    return getattr(packet, target._overloadname, target) if packet is not None else target


def spatial_dims(node: Node) -> int:
    """Number of spatial dimensions of a conv node (1, 2 or 3)."""
    return _CONV_SPATIAL[node.target]  # type: ignore[index]


@dataclass(frozen=True)
class ConvParams:
    """The geometry of an ``aten.convN`` node, normalised to per-dimension tuples."""

    input: Node
    weight: Node
    bias: Node | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int

    @property
    def padded(self) -> bool:
        """True when the conv zero-pads its input (``'same'`` counts as padded unless it pads nothing)."""
        if isinstance(self.padding, str):
            return self.padding == "same"
        return any(p != 0 for p in self.padding)


def conv_params(node: Node) -> ConvParams:
    """Read stride, padding, dilation and groups of a conv node (ATen defaults filled in)."""
    nd = spatial_dims(node)

    def tup(value: Any, default: int) -> tuple[int, ...]:
        if value is None:
            value = default
        if isinstance(value, int):
            return (value,) * nd
        value = tuple(int(v) for v in value)
        return value * nd if len(value) == 1 else value

    dilation = tup(_arg(node, 5, "dilation", 1), 1)
    padding = _arg(node, 4, "padding", 0)
    if padding == "valid":
        padding = 0
    elif padding == "same":
        weight: Node = node.args[1]  # type: ignore[assignment]
        # Recorded shapes first: a graph read back from bytes has no export ``val`` metadata.
        kernel = tuple((shape_of(weight) or tuple(weight.meta["val"].shape))[2:])
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        # Symmetric 'same' padding is ordinary integer padding; odd totals pad asymmetrically.
        padding = tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else "same"
    return ConvParams(
        input=node.args[0],  # type: ignore[arg-type]
        weight=node.args[1],  # type: ignore[arg-type]
        bias=_arg(node, 2, "bias", None),
        stride=tup(_arg(node, 3, "stride", 1), 1),
        padding=padding if isinstance(padding, str) else tup(padding, 0),
        dilation=dilation,
        groups=int(_arg(node, 6, "groups", 1)),
    )


def weight_and_bias(node: Node) -> tuple[Any, Any]:
    """The weight and bias arguments of a conv or linear node (bias may be ``None``)."""
    return node.args[1], _arg(node, 2, "bias", None)


def is_stored(value: Any) -> bool:
    """Whether an argument is a stored tensor (a ``get_attr`` node) rather than a computed one."""
    return isinstance(value, Node) and value.op == "get_attr"


def _arg(node: Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)
