"""Cuts of a captured graph into a prefix and a suffix that meet in one activation: where early exits go.

A cut *after* a node splits the graph in node order: the prefix is every node up to and including it, the
suffix the rest. It is clean when exactly one tensor flows from the prefix into the suffix (shape queries of
the batch size are recomputed from that tensor); a skip connection or a graph input read again later crosses
it too, and such cuts are refused, naming the crossing edges.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from ..errors import ConfigError, suggest
from .graph import module_path

__all__ = ["Cut", "block_cuts", "crossing_edges", "cut_points", "resolve_cut", "split_graph"]


@dataclass(frozen=True)
class Cut:
    """A clean cut: the prefix ends at ``node``, whose value is the only activation the suffix reads."""

    node: str
    paths: tuple[str, ...]
    """Module paths whose last node this is, outermost first (how users name the cut)."""
    position: int
    """Index of ``node`` in graph order."""
    shape: tuple[int, ...]
    """The crossing tensor's shape on the example inputs (batch first)."""

    @property
    def name(self) -> str:
        return self.paths[0] if self.paths else self.node


def _order(gm: GraphModule) -> dict[Node, int]:
    return {node: i for i, node in enumerate(gm.graph.nodes)}


def _batch_symbol(node: Node) -> object | None:
    val = node.meta.get("val")
    return val.shape[0] if isinstance(val, torch.Tensor) and val.dim() > 0 else None


def _is_batch_query(node: Node, batch: object | None) -> bool:
    """A SymInt node that equals the batch size (recomputable from the crossing tensor)."""
    val = node.meta.get("val")
    return isinstance(val, torch.SymInt) and batch is not None and str(val) == str(batch)


def crossing_edges(gm: GraphModule, after: Node) -> list[tuple[Node, Node]]:
    """Edges ``(producer, consumer)`` from nodes up to ``after`` (in graph order) into later nodes, except
    parameter reads and batch-size queries."""
    order = _order(gm)
    limit = order[after]
    batch = _batch_symbol(after)
    edges = []
    for node in gm.graph.nodes:
        if order[node] > limit or node.op == "get_attr" or _is_batch_query(node, batch):
            continue
        edges.extend((node, user) for user in node.users if order[user] > limit)
    return edges


def _module_ends(gm: GraphModule) -> dict[Node, list[str]]:
    """For every module path, its last node in graph order; grouped by node."""
    last: dict[str, Node] = {}
    for node in gm.graph.nodes:
        path = module_path(node)
        if node.op != "call_function" or not path:
            continue
        parts = path.split(".")
        for i in range(1, len(parts) + 1):
            last[".".join(parts[:i])] = node
    ends: dict[Node, list[str]] = {}
    for path, node in last.items():
        ends.setdefault(node, []).append(path)
    return {node: sorted(paths, key=lambda p: (p.count("."), p)) for node, paths in ends.items()}


def _clean(gm: GraphModule, node: Node) -> bool:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or not val.is_floating_point() or val.dim() < 2:
        return False
    edges = crossing_edges(gm, node)
    if not edges or any(producer is not node for producer, _ in edges):
        return False
    return not any(user.op == "output" for _, user in edges)


def cut_points(gm: GraphModule) -> list[Cut]:
    """Every clean cut at the end of a module, in graph order (the last layer before the output excluded)."""
    order = _order(gm)
    cuts = []
    for node, paths in sorted(_module_ends(gm).items(), key=lambda item: order[item[0]]):
        if _clean(gm, node):
            cuts.append(Cut(node.name, tuple(paths), order[node], tuple(int(d) for d in node.meta["val"].shape)))
    return cuts


def block_cuts(gm: GraphModule) -> list[Cut]:
    """The cuts at the ends of the network's blocks: modules that are items of a container (a path ending in an
    index, such as ``layer2.1`` or ``features.7``) and lie in no other such block that is a cut itself."""
    cuts = cut_points(gm)
    indexed = {p for c in cuts for p in c.paths if p.rsplit(".", 1)[-1].isdigit()}

    def outermost(path: str) -> bool:
        parts = path.split(".")
        return not any(".".join(parts[:i]) in indexed for i in range(1, len(parts)))

    blocks = []
    for c in cuts:
        named = [p for p in c.paths if p in indexed and outermost(p)]
        if named:
            blocks.append(dataclasses.replace(c, paths=(named[0], *(p for p in c.paths if p != named[0]))))
    return blocks


def _listing(cuts: Sequence[Cut], limit: int = 12) -> str:
    names = [c.name for c in cuts]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "none"


def resolve_cut(gm: GraphModule, spec: str | int) -> Cut:
    """The cut a user named: a block index (into :func:`block_cuts`), a module path, or a node name.

    Raises:
        ConfigError: an unknown name, or a point that is no clean cut (naming the edges that cross it).
    """
    cuts = cut_points(gm)
    text = str(spec).strip()
    if isinstance(spec, int) or text.lstrip("-").isdigit():
        blocks = block_cuts(gm)
        index = int(text)
        if not 0 <= index < len(blocks):
            raise ConfigError(f"exit point {index} is out of range: the network has {len(blocks)} blocks that cut "
                              f"it cleanly (0..{len(blocks) - 1}: {', '.join(c.name for c in blocks)})")
        return blocks[index]
    for cut in cuts:
        if text in cut.paths or text == cut.node:
            return cut
    nodes = {n.name: n for n in gm.graph.nodes}
    ends = {p: n for n, paths in _module_ends(gm).items() for p in paths}
    node = ends.get(text) or nodes.get(text)
    if node is None:
        known = sorted(ends)
        raise ConfigError(f"exit point {text!r} names no module or node of the graph{suggest(text, known)} "
                          f"Block ends that cut it cleanly: {_listing(block_cuts(gm) or cuts)}")
    edges = crossing_edges(gm, node)
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor) and val.dim() < 2:
        why = f"its output has shape {tuple(val.shape)}, not (batch, features...)"
    elif not edges or all(user.op == "output" for _, user in edges):
        why = "nothing after it but the output"
    else:
        crossing = [f"{p.name} ({module_path(p) or p.op}) -> {u.name} ({module_path(u) or u.op})"
                    for p, u in edges if p is not node]
        why = (f"besides its own output, these edges cross the cut: {'; '.join(crossing[:4])}"
               f"{' ...' if len(crossing) > 4 else ''} (a skip connection or an input read later)")
    raise ConfigError(f"exit point {text!r} does not cut the graph into a prefix and a suffix: {why}. "
                      f"Block ends that cut it cleanly: {_listing(block_cuts(gm) or cuts)}")


def split_graph(gm: GraphModule, cuts: Sequence[Cut]) -> list[GraphModule]:
    """The segments between consecutive cuts: segment 0 takes the graph's inputs and returns the value at the
    first cut; segment i takes that value and returns the next; the last returns the graph's output. Segments
    share ``gm``'s parameters (copy ``gm`` first to keep them apart). A graph whose output is one tensor in a
    tuple ends in a segment returning the tensor itself."""
    order = _order(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    ends = [by_name[c.node] for c in sorted(cuts, key=lambda c: c.position)]
    bounds = [-1, *(order[n] for n in ends), len(order)]
    starts: list[Node | None] = [None, *ends]
    return [_segment(gm, order, bounds[i], bounds[i + 1], starts[i], ends[i] if i < len(ends) else None, i)
            for i in range(len(bounds) - 1)]


def _segment(gm: GraphModule, order: dict[Node, int], lo: int, hi: int, start: Node | None, end: Node | None,
             index: int) -> GraphModule:
    """The nodes at positions ``(lo, hi]`` as a graph reading ``start`` (or the graph inputs) and returning
    ``end`` (or the graph output)."""
    graph = Graph()
    env: dict[Node, Node] = {}

    def inside(node: Node) -> bool:
        return lo < order[node] <= hi

    def copy(node: Node) -> None:
        env[node] = graph.node_copy(node, lambda n: env[n])

    batch = None
    if start is not None:
        env[start] = graph.placeholder(start.name)
        env[start].meta = dict(start.meta)
        batch = _batch_symbol(start)
    for node in gm.graph.nodes:
        read_here = any(inside(u) for u in node.users)
        if node.op == "get_attr":
            if read_here:
                copy(node)
        elif node.op == "output":
            if end is None:
                values = torch.fx.node.map_arg(node.args[0], lambda n: env[n])
                flat = values if isinstance(values, Node) else list(torch.utils._pytree.tree_leaves(values))
                graph.output(flat if isinstance(flat, Node) else flat[0] if len(flat) == 1 else values)
        elif inside(node):
            copy(node)
        elif start is not None and read_here and _is_batch_query(node, batch):
            env[node] = graph.call_function(torch.ops.aten.sym_size.int, (env[start], 0))
            env[node].meta = dict(node.meta)
    if end is not None:
        graph.output(env[end])
    segment = GraphModule(gm, graph, class_name=f"Segment{index}")
    segment.graph.eliminate_dead_code()
    segment.recompile()
    return segment
