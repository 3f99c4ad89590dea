"""A read-only ``networkx.DiGraph`` view of the IR, and the analyses passes plan with.

Nodes are fx node names of compute nodes, placeholders and the output; parameters (``get_attr``)
become the ``params`` attribute of the op that reads them. Edges follow data flow. Analyses:
linear chains between non-linearities, residual blocks (via immediate dominators), repeated blocks
(``ModuleList`` children with the same op sequence), attention sites.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import networkx as nx
from torch.fx import GraphModule, Node

from .graph import META_MODULE_PATH, shape_of
from .ops import kind_of

__all__ = [
    "ResidualBlock",
    "RepeatedBlocks",
    "attention_sites",
    "immediate_dominators",
    "linear_chains",
    "repeated_blocks",
    "residual_blocks",
    "to_networkx",
]

ROOT = "__root__"
"""Virtual source joined to every placeholder, so dominators are defined for multi-input graphs."""

# Kinds that do not break a linear chain: they are affine maps of their single tensor input.
_CHAIN_KINDS = {"conv", "linear", "batch_norm", "identity"}


def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """Build the analysis view. Node attributes: op, target, kind, shape, module_path, params."""
    view = nx.DiGraph()
    params: dict[str, list[str]] = defaultdict(list)
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            for user in node.users:
                params[user.name].append(str(node.target))
            continue
        view.add_node(node.name, op=node.op, target=str(node.target), kind=kind_of(node),
                      shape=shape_of(node), module_path=str(node.meta.get(META_MODULE_PATH, "")))
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            continue
        view.nodes[node.name]["params"] = tuple(params.get(node.name, ()))
        for src in node.all_input_nodes:
            if src.op != "get_attr":
                view.add_edge(src.name, node.name)
    return view


def linear_chains(view: nx.DiGraph) -> list[list[str]]:
    """Maximal paths of conv/linear/batch-norm/identity nodes with no non-linearity between them.

    Inner nodes have exactly one consumer, so the chain can be rewritten without changing any other
    consumer. Chains of length one are included (a lone conv between two activations).
    """
    chains: list[list[str]] = []
    seen: set[str] = set()
    for name in nx.topological_sort(view):
        if name in seen or view.nodes[name]["kind"] not in _CHAIN_KINDS:
            continue
        chain = [name]
        seen.add(name)
        current = name
        while view.out_degree(current) == 1:
            (nxt,) = view.successors(current)
            if view.nodes[nxt]["kind"] not in _CHAIN_KINDS or view.in_degree(nxt) != 1 or nxt in seen:
                break
            chain.append(nxt)
            seen.add(nxt)
            current = nxt
        chains.append(chain)
    return chains


def immediate_dominators(view: nx.DiGraph) -> dict[str, str]:
    """Immediate dominator of every node, from a virtual root feeding all placeholders."""
    graph = view.copy()
    for name, data in view.nodes(data=True):
        if data["op"] == "placeholder" or view.in_degree(name) == 0:
            graph.add_edge(ROOT, name)
    return nx.immediate_dominators(graph, ROOT)


@dataclass(frozen=True)
class ResidualBlock:
    """A residual block: ``entry`` forks, the branches rejoin at the ``join`` add."""

    entry: str
    join: str
    body: frozenset[str]
    identity_shortcut: bool
    """True when one input of the join is the entry itself (``y = x + f(x)``)."""


def residual_blocks(view: nx.DiGraph) -> list[ResidualBlock]:
    """Every residual add with the nodes strictly between its fork point and the join."""
    idom = immediate_dominators(view)
    blocks = []
    for name in nx.topological_sort(view):
        if view.nodes[name]["kind"] != "add":
            continue
        entry = idom.get(name)
        if entry is None or entry == ROOT:
            continue
        between = nx.descendants(view, entry) & nx.ancestors(view, name)
        blocks.append(ResidualBlock(entry=entry, join=name, body=frozenset(between),
                                    identity_shortcut=entry in set(view.predecessors(name))))
    return blocks


@dataclass(frozen=True)
class RepeatedBlocks:
    """Children ``prefix.0``, ``prefix.1``, ... of one container and the compute nodes of each."""

    prefix: str
    members: tuple[tuple[str, tuple[str, ...]], ...]
    """(module path, node names) per child, in index order."""
    same_structure: bool
    """Whether every child has the same sequence of node kinds."""


def repeated_blocks(view: nx.DiGraph, *, min_count: int = 2) -> list[RepeatedBlocks]:
    """Group nodes by ``<prefix>.<index>`` module paths (``nn.ModuleList`` / ``nn.Sequential`` children)."""
    groups: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name in nx.topological_sort(view):
        path = view.nodes[name]["module_path"]
        for match in re.finditer(r"(?:^|\.)(\d+)(?=\.|$)", path):
            prefix = path[: match.start(1)].rstrip(".")
            groups[prefix][int(match.group(1))].append(name)
    found = []
    for prefix, members in groups.items():
        if len(members) < min_count:
            continue
        ordered = sorted(members.items())
        signatures = {tuple(view.nodes[n]["kind"] for n in nodes) for _, nodes in ordered}
        found.append(RepeatedBlocks(
            prefix=prefix,
            members=tuple((f"{prefix}.{i}" if prefix else str(i), tuple(nodes)) for i, nodes in ordered),
            same_structure=len(signatures) == 1,
        ))
    return found


def attention_sites(gm: GraphModule) -> list[Node]:
    """Scaled-dot-product attention calls (the sites KV-sharing passes rewrite)."""
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and "scaled_dot_product_attention" in str(n.target)]
