"""KV-cache insertion: derive the decode-step graph of a captured causal decoder.

The captured graph computes all positions of one sequence. Generation instead feeds a few new tokens at a
time with the keys and values of the earlier ones cached (Pope et al., "Efficiently Scaling Transformer
Inference", arXiv:2211.05102). The decode step takes ``input_ids [batch, seq]``, ``attention_mask [batch,
past + seq]`` and, per layer that owns a cache, ``past_key_values.{i}.key`` / ``.value`` ``[batch, kv_heads,
past, head_dim]``; it returns ``logits`` and ``present.{i}.key`` / ``.value`` (past and new, concatenated),
with the names Optimum and onnxruntime-genai use. In the graph:

* at every attention site the key/value *cache point* (before grouped-query head repetition) becomes
  ``cat(past, new)``; repetition ops downstream of it take the total length instead of the new one;
* layers that reuse another layer's K/V (``kv_share``) read that owner's concatenated cache and have no
  cache I/O of their own;
* positions are offset by the past length: ``arange(seq)`` becomes ``past + arange(seq)``, and slices of
  constant tables (rotary ``cos``/``sin``) by the sequence length start at ``past``;
* every attention call gets the causal mask of the new rows against all ``past + seq`` columns, combined
  with ``attention_mask`` (padding), in place of the model's own mask.

The derivation is checked numerically by whoever exports it (the decode step must reproduce the full
model's logits); a model whose positions or masks are computed otherwise fails that check.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule, Node

from .. import ir
from ..errors import PreconditionError

__all__ = ["DecodeStep", "decode_step"]

aten = torch.ops.aten


@dataclass
class DecodeStep:
    """A decode-step graph and its cache layout."""

    graph_module: GraphModule
    input_names: tuple[str, ...]
    """``input_ids``, ``attention_mask``, then ``past_key_values.{i}.key`` / ``.value`` per owner layer."""
    output_names: tuple[str, ...]
    """``logits``, then ``present.{i}.key`` / ``.value`` per owner layer."""
    sources: list[int]
    """Per attention layer, the layer whose cache it reads (itself for owners)."""
    owners: list[int]
    layout: list[dict[str, int]] = field(default_factory=list)
    """Per layer: heads, kv_heads, head_dim."""
    dtype: str = "float32"
    vocab_size: int = 0
    max_length: int | None = None
    """Longest past + seq the captured graph supports (the capture's sequence bound), if known."""

    @property
    def kv_bytes_per_token(self) -> int:
        size = torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        return sum(2 * self.layout[i]["kv_heads"] * self.layout[i]["head_dim"] * size for i in self.owners)


def decode_step(gm: GraphModule) -> DecodeStep:
    """The decode-step graph of causal decoder ``gm`` (not modified): see the module docstring.

    Raises:
        PreconditionError: no attention, attention not as ``scaled_dot_product_attention``, inputs other than
            token ids and an attention mask, or a sequence length captured static.
    """
    out = ir.clone(gm)
    stack = ir.find_stack(out)
    sites = [b.attention for b in stack.blocks]
    if any(s is None for s in sites):
        raise PreconditionError(f"blocks {[b.path for b in stack.blocks if b.attention is None]} have no attention")
    if any(s.form != "sdpa" for s in sites):  # type: ignore[union-attr]
        raise PreconditionError("decode-step export needs attention as aten.scaled_dot_product_attention; this "
                                "model computes it as matmul -> softmax -> matmul (use attn_implementation='sdpa')")
    nodes = {n.name: n for n in out.graph.nodes}
    placeholders = [n for n in out.graph.nodes if n.op == "placeholder"]
    tokens, mask_input = _inputs(placeholders)
    seq_nodes = [n for n in out.graph.nodes if n.op == "call_function" and n.target is aten.sym_size.int
                 and n.args[0] in (tokens, mask_input) and n.args[1] == 1]
    if not seq_nodes:
        raise PreconditionError("the sequence length was captured static; capture the model with a dynamic "
                                "sequence dimension (ir.capture does so for token inputs by default)")
    cache_of = [nodes[s.key_cache] for s in sites]  # type: ignore[union-attr]
    owners = [i for i, node in enumerate(cache_of) if cache_of.index(node) == i]
    sources = [owners[[cache_of[o] for o in owners].index(node)] for node in cache_of]
    graph = out.graph
    # New inputs after the existing ones, in Optimum's order.
    with graph.inserting_after(placeholders[-1]):
        if mask_input is None:
            mask_input = graph.placeholder("attention_mask")
    past: dict[int, tuple[Node, Node]] = {}
    anchor = mask_input if mask_input.op == "placeholder" and mask_input not in placeholders else placeholders[-1]
    for i in owners:
        with graph.inserting_after(anchor):
            key = graph.placeholder(f"past_key_values_{i}_key")
        with graph.inserting_after(key):
            value = graph.placeholder(f"past_key_values_{i}_value")
        past[i], anchor = (key, value), value
    with graph.inserting_before(anchor.next):
        seq = graph.call_function(aten.sym_size.int, (tokens, 1))
        past_len = graph.call_function(aten.sym_size.int, (past[owners[0]][0], 2))
        total = graph.call_function(operator.add, (past_len, seq))
    for node in seq_nodes:
        node.replace_all_uses_with(seq)
        graph.erase_node(node)
    _offset_positions(graph, seq, past_len, total)
    presents: list[Node] = []
    for i in owners:
        site = sites[i]
        for cache, past_input in ((nodes[site.key_cache], past[i][0]), (nodes[site.value_cache], past[i][1])):  # type: ignore[union-attr]
            with graph.inserting_after(cache):
                full = graph.call_function(aten.cat.default, ([past_input, cache], 2))
            cache.replace_all_uses_with(full, delete_user_cb=lambda user, full=full: user is not full)
            presents.append(full)
    with graph.inserting_before(nodes[sites[0].node]):  # type: ignore[union-attr]
        mask = _causal_mask(graph, mask_input, seq, past_len, total)
    for site in sites:
        attention = nodes[site.node]  # type: ignore[union-attr]
        for operand in (attention.args[1], attention.args[2]):
            _retarget_lengths(operand, seq, total)
        kwargs = {k: v for k, v in attention.kwargs.items() if k in ("scale", "enable_gqa")}
        attention.args = (*attention.args[:3], mask)
        attention.kwargs = kwargs
    output = next(n for n in graph.nodes if n.op == "output")
    logits = next(leaf for leaf in torch.utils._pytree.tree_leaves(output.args[0]) if isinstance(leaf, Node))
    graph.erase_node(output)
    graph.output((logits, *presents))
    graph._codegen = torch.fx.graph.CodeGen()
    ir.remove_dead(out)
    graph.lint()
    out.recompile()
    names = ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{kind}" for i in owners
                                                for kind in ("key", "value")]
    outputs = ["logits"] + [f"present.{i}.{kind}" for i in owners for kind in ("key", "value")]
    layout = [{"heads": s.heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim} for s in sites]  # type: ignore[union-attr]
    dtype = str(cache_of[0].meta.get(ir.META_DTYPE, "torch.float32")).removeprefix("torch.")
    vocab = (ir.shape_of(logits) or (0,))[-1]
    return DecodeStep(out, tuple(names), tuple(outputs), sources, owners, layout, dtype, vocab)


def _inputs(placeholders: list[Node]) -> tuple[Node, Node | None]:
    by_name = {p.name: p for p in placeholders}
    tokens = by_name.get("input_ids") or next(
        (p for p in placeholders if "int" in str(p.meta.get(ir.META_DTYPE, "")) and p.name != "attention_mask"), None)
    if tokens is None:
        raise PreconditionError("decode-step export needs integer token ids as the model's input; found inputs "
                                f"{[p.name for p in placeholders]}")
    mask = by_name.get("attention_mask")
    extra = [p.name for p in placeholders if p is not tokens and p is not mask]
    if extra:
        raise PreconditionError(f"decode-step export takes token ids and an attention mask only; the model also "
                                f"takes {extra} (capture it with just input_ids / attention_mask)")
    return tokens, mask


def _offset_positions(graph: torch.fx.Graph, seq: Node, past_len: Node, total: Node) -> None:
    """``arange(seq)`` -> ``past + arange(seq)``; ``table[0:seq]`` of a constant table -> ``table[past:total]``."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.arange.default and node.args and node.args[0] is seq:
            with graph.inserting_after(node):
                shifted = graph.call_function(aten.add.Tensor, (node, past_len))
            node.replace_all_uses_with(shifted, delete_user_cb=lambda user, s=shifted: user is not s)
        elif (node.target is aten.slice.Tensor and len(node.args) >= 4 and node.args[0].op == "get_attr"
              and node.args[2] in (0, None) and node.args[3] is seq):
            node.args = (node.args[0], node.args[1], past_len, total, *node.args[4:])


def _causal_mask(graph: torch.fx.Graph, attention_mask: Node, seq: Node, past_len: Node, total: Node) -> Node:
    """Boolean ``[batch, 1, seq, past + seq]``: row ``r`` (position ``past + r``) sees the columns ``<= past + r``
    that ``attention_mask`` keeps (nodes go at the graph's current insertion point)."""
    call = graph.call_function
    rows = call(aten.add.Tensor, (call(aten.arange.default, (seq,)), past_len))
    causal = call(aten.le.Tensor, (call(aten.unsqueeze.default, (call(aten.arange.default, (total,)), 0)),
                                   call(aten.unsqueeze.default, (rows, 1))))
    keep = call(aten.ne.Scalar, (attention_mask, 0))
    keep = call(aten.unsqueeze.default, (call(aten.unsqueeze.default, (keep, 1)), 2))
    return call(aten.logical_and.default, (keep, causal))


def _retarget_lengths(operand: Any, seq: Node, total: Node) -> None:
    """In the head-repetition ops between a cache point and an attention call, sizes given as the new length
    become the total length."""
    node = operand
    while isinstance(node, Node) and node.op == "call_function" and node.target is not aten.cat.default:
        node.args = tuple(_swap(a, seq, total) for a in node.args)
        if not node.args or not isinstance(node.args[0], Node):
            break
        node = node.args[0]


def _swap(value: Any, old: Node, new: Node) -> Any:
    if value is old:
        return new
    if isinstance(value, (list, tuple)):
        return type(value)(_swap(v, old, new) for v in value)
    return value
