"""Transformer structure in a captured graph: the stack of blocks, their residual sublayers and attention sites.

A transformer is a stack of repeated blocks (``model.layers.0``, ``encoder.layer.0``, ``transformer.h.0``) on a
residual stream. Each block is found from the module paths torch.export records; inside it the *stream path*
runs from the block's input to its output through residual adds, norms and no-op casts only, which covers
pre-norm (``x + f(norm(x))``: Llama, GPT-2) and post-norm (``norm(x + f(x))``: BERT) blocks alike. Each
residual add on that path closes a sublayer; a sublayer whose branch holds an attention site is attention,
one with linears is the MLP. An attention site is a ``scaled_dot_product_attention`` call or a
``matmul -> softmax -> matmul`` chain; its *cache points* are the key/value tensors ``[batch, kv_heads, seq,
head_dim]`` before any grouped-query head repetition (what a KV cache stores, Ainslie et al. 2023).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.fx import GraphModule, Node

from ..errors import PreconditionError
from . import ops
from .graph import META_MODULE_PATH, shape_of

__all__ = ["AttentionSite", "Sublayer", "TransformerBlock", "TransformerStack", "attention_site", "find_stack",
           "remove_dead"]

aten = torch.ops.aten

# Ops between a key/value projection's heads and the attention call that only repeat or re-view heads
# (grouped-query ``repeat_kv``: unsqueeze -> expand -> reshape, or repeat_interleave).
_HEAD_REPEAT = {aten.repeat_interleave.self_int, aten.repeat_interleave.self_Tensor, aten.expand.default,
                aten.reshape.default, aten.view.default, aten.unsqueeze.default, aten.slice.Tensor,
                aten.repeat.default, aten._unsafe_view.default, aten.clone.default, aten.contiguous.default,
                aten.alias.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_NORMS = {aten.layer_norm.default, aten.rms_norm.default}


@dataclass(frozen=True)
class AttentionSite:
    """One attention computation and what feeds it."""

    node: str
    """The ``scaled_dot_product_attention`` node, or the second matmul of a matmul-softmax-matmul chain."""
    form: Literal["sdpa", "matmul"]
    query: str
    key: str
    """The key tensor as the attention consumes it (after head repetition)."""
    value: str
    key_cache: str
    """The key before head repetition: ``[batch, kv_heads, seq, head_dim]``, what a KV cache holds."""
    value_cache: str
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    """``is_causal=True`` on the call (masks passed as tensors are not inspected)."""


@dataclass(frozen=True)
class Sublayer:
    """A residual sublayer: ``output = stream_op(input + branch(input))``; dropping it makes ``output = input``."""

    kind: Literal["attention", "mlp", "other"]
    input: str
    output: str
    add: str
    """The residual add that closes it."""


@dataclass(frozen=True)
class TransformerBlock:
    index: int
    path: str
    """Module path, e.g. ``model.layers.3``."""
    input: str
    output: str
    sublayers: tuple[Sublayer, ...]
    attention: AttentionSite | None
    nodes: frozenset[str]
    params: dict[str, str] = field(default_factory=dict)
    """Parameter name relative to the block (``self_attn.q_proj.weight``) -> get_attr target."""

    def sublayer(self, kind: str) -> Sublayer | None:
        return next((s for s in self.sublayers if s.kind == kind), None)


@dataclass(frozen=True)
class TransformerStack:
    prefix: str
    """The container's module path (``model.layers``)."""
    blocks: tuple[TransformerBlock, ...]

    def __len__(self) -> int:
        return len(self.blocks)


def attention_site(node: Node) -> AttentionSite | None:
    """The attention site ``node`` closes (an SDPA call or the ``softmax @ v`` matmul), else ``None``."""
    if node.op != "call_function":
        return None
    if node.target is aten.scaled_dot_product_attention.default:
        q, k, v = node.args[:3]
        causal = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
        return _site(node, "sdpa", q, k, v, causal)
    if node.target in _MATMUL and isinstance(node.args[0], Node):
        probs = _skip(node.args[0], lambda n: ops.is_identity(n) or str(n.target).startswith("aten.to."))
        if probs.op == "call_function" and probs.target in _SOFTMAX:
            scores = _skip(probs.args[0], lambda n: n.target in (aten.add.Tensor, aten.div.Tensor, aten.mul.Tensor,
                                                                 aten.masked_fill.Scalar, aten.where.self)
                           or ops.is_identity(n))
            if scores.op == "call_function" and scores.target in _MATMUL:
                key = scores.args[1]
                if isinstance(key, Node) and key.target is aten.transpose.int:
                    key = key.args[0]
                return _site(node, "matmul", scores.args[0], key, node.args[1], False)
    return None


def _skip(node: Node, through) -> Node:  # type: ignore[no-untyped-def]
    while isinstance(node, Node) and through(node) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _site(node: Node, form: Literal["sdpa", "matmul"], q: object, k: object, v: object,
          causal: bool) -> AttentionSite | None:
    if not all(isinstance(t, Node) for t in (q, k, v)):
        return None
    q_shape = shape_of(q)  # type: ignore[arg-type]
    key_cache, value_cache = _cache_point(k), _cache_point(v)  # type: ignore[arg-type]
    k_shape = shape_of(key_cache)
    if q_shape is None or k_shape is None or len(q_shape) != 4 or len(k_shape) != 4:
        return None
    return AttentionSite(node=node.name, form=form, query=q.name, key=k.name, value=v.name,  # type: ignore[union-attr]
                         key_cache=key_cache.name, value_cache=value_cache.name, heads=q_shape[1],
                         kv_heads=k_shape[1], head_dim=k_shape[3], causal=causal)


def _cache_point(node: Node) -> Node:
    """Walk back from an attention operand through head-repetition ops to the 4-D per-KV-head tensor."""
    current = node
    while (current.op == "call_function" and current.target in _HEAD_REPEAT and current.args
           and isinstance(current.args[0], Node)):
        parent = current.args[0]
        shape = shape_of(parent)
        if shape is None or len(shape) not in (4, 5):
            break
        current = parent
    # A 5-D node is the unsqueezed middle of repeat_kv; the 4-D tensor before it is the cache point.
    while len(shape_of(current) or ()) == 5 and isinstance(current.args[0], Node):
        current = current.args[0]
    return current


def _block_groups(gm: GraphModule) -> dict[str, dict[int, list[Node]]]:
    groups: dict[str, dict[int, list[Node]]] = defaultdict(lambda: defaultdict(list))
    for node in gm.graph.nodes:
        path = node.meta.get(META_MODULE_PATH, "") or ""
        for match in re.finditer(r"(?:^|\.)(\d+)(?=\.|$)", path):
            groups[path[: match.start(1)].rstrip(".")][int(match.group(1))].append(node)
    return groups


def find_stack(gm: GraphModule) -> TransformerStack:
    """The transformer block stack of ``gm``: its blocks in order, each with stream path, sublayers and attention.

    Raises:
        PreconditionError: no attention site (SDPA or matmul-softmax-matmul) in the graph, or the attention
            sites are not inside repeated blocks whose residual stream can be followed.
    """
    sites = {n.name: s for n in gm.graph.nodes if (s := attention_site(n)) is not None}
    if not sites:
        raise PreconditionError(
            "no attention found: searched for aten.scaled_dot_product_attention calls and matmul -> softmax -> "
            "matmul chains with 4-D [batch, heads, seq, head_dim] operands; this pass needs a transformer")
    best: tuple[int, int, str] | None = None
    groups = _block_groups(gm)
    for prefix, members in groups.items():
        with_attention = sum(any(n.name in sites for n in nodes) for nodes in members.values())
        if with_attention and (best is None or (with_attention, -len(prefix)) > (best[0], best[1])):
            best = (with_attention, -len(prefix), prefix)
    if best is None:
        raise PreconditionError(f"found {len(sites)} attention site(s) but none inside a repeated block "
                                "(module paths like 'layers.0'); cannot tell the transformer blocks apart")
    prefix = best[2]
    blocks = []
    by_name = {n.name: n for n in gm.graph.nodes}
    for index, (number, nodes) in enumerate(sorted(groups[prefix].items())):
        path = f"{prefix}.{number}" if prefix else str(number)
        blocks.append(_block(gm, index, path, nodes, sites, by_name))
    return TransformerStack(prefix, tuple(blocks))


def _is_stream_op(node: Node) -> bool:
    """Ops the residual stream passes through unchanged in kind: casts, eval dropout, copies, norms."""
    return node.op == "call_function" and (ops.is_identity(node) or str(node.target).startswith("aten.to.")
                                           or node.target in _NORMS)


def _block(gm: GraphModule, index: int, path: str, nodes: list[Node], sites: dict[str, AttentionSite],
           by_name: dict[str, Node]) -> TransformerBlock:
    inside = set(nodes)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    leaving = [n for n in nodes if not ops.is_shape_query(n) and n.op == "call_function"
               and any(u not in inside and u.target is not aten._assert_tensor_metadata.default for u in n.users)]
    if not leaving:
        raise PreconditionError(f"block {path!r} has no output used outside it")
    output = max(leaving, key=order.__getitem__)
    stream = _stream_path(output, inside)
    if stream is None:
        raise PreconditionError(f"block {path!r}: no residual stream from its output {output.name!r} back to its "
                                "input through adds, norms and casts; not a residual transformer block")
    block_input = stream[0]
    sublayers = []
    adds = [i for i, n in enumerate(stream) if i > 0 and ops.is_residual_add(n)]
    for k, i in enumerate(adds):
        add, sub_in = stream[i], stream[i - 1]
        sub_out = stream[adds[k + 1] - 1] if k + 1 < len(adds) else stream[-1]
        branch = next(a for a in add.args[:2] if isinstance(a, Node) and a is not sub_in)
        sublayers.append(Sublayer(_branch_kind(branch, sub_in, sites, inside), sub_in.name, sub_out.name, add.name))
    site = next((sites[n.name] for n in nodes if n.name in sites), None)
    params = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr" and str(n.target).startswith(path + "."):
            params[str(n.target)[len(path) + 1:]] = str(n.target)
    return TransformerBlock(index, path, block_input.name, output.name, tuple(sublayers), site,
                            frozenset(n.name for n in nodes), params)


def _stream_path(output: Node, inside: set[Node]) -> list[Node] | None:
    """Nodes from the block input to ``output`` along residual adds, norms and casts (input first)."""
    path = [output]
    current = output
    while current in inside:
        if ops.is_residual_add(current):
            nxt = None
            for operand in current.args[:2]:
                if isinstance(operand, Node) and _reaches_outside(operand, inside):
                    nxt = operand
                    break
        elif _is_stream_op(current) and isinstance(current.args[0], Node):
            nxt = current.args[0]
        else:
            return None
        if nxt is None:
            return None
        path.append(nxt)
        current = nxt
    path.reverse()
    return path


def _reaches_outside(node: Node, inside: set[Node]) -> bool:
    while node in inside:
        if ops.is_residual_add(node):
            return any(isinstance(a, Node) and _reaches_outside(a, inside) for a in node.args[:2])
        if not (_is_stream_op(node) and isinstance(node.args[0], Node)):
            return False
        node = node.args[0]
    return True


def _branch_kind(branch: Node, start: Node, sites: dict[str, AttentionSite], inside: set[Node]
                 ) -> Literal["attention", "mlp", "other"]:
    seen: set[Node] = set()
    todo = [branch]
    has_linear = False
    while todo:
        node = todo.pop()
        if node in seen or node is start or node not in inside:
            continue
        seen.add(node)
        if node.name in sites:
            return "attention"
        has_linear = has_linear or ops.is_linear(node) or node.target is aten.addmm.default
        todo.extend(a for a in node.all_input_nodes)
    return "mlp" if has_linear else "other"


def remove_dead(gm: GraphModule) -> None:
    """Dead-code elimination that also drops metadata asserts (``_assert_tensor_metadata``), inference-mode
    dropout and unread attention calls, which fx keeps as impure (keeping everything they read alive), then
    unused parameters."""
    from .graph import prune_unused_attributes

    def impure(node: Node) -> bool:
        if node.target is aten._assert_tensor_metadata.default or ops.is_identity(node):
            return False
        # Random-tagged ops (SDPA is tagged nondeterministic_seeded for its dropout) are pure at inference.
        return node.is_impure(impure_random=False)

    gm.graph.eliminate_dead_code(is_impure_node=impure)
    prune_unused_attributes(gm)
    gm.recompile()
