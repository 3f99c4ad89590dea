"""The networkx analysis view: data-flow edges, linear chains, residual blocks, repeated blocks, dominators."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from depthfold import ir
from depthfold.ir.view import ROOT


def view_of(model: nn.Module, *inputs: torch.Tensor):  # type: ignore[no-untyped-def]
    captured = ir.capture(model.eval(), inputs)
    return captured.graph_module, ir.to_networkx(captured.graph_module)


def by_path(view, path: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [n for n, d in view.nodes(data=True) if d["module_path"] == path and d["op"] == "call_function"]


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout()
        self.c2 = nn.Conv2d(4, 4, 1)
        self.c3 = nn.Conv2d(4, 4, 1)
        self.c4 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(self.drop(self.bn(self.c1(x))))
        z = self.c3(torch.relu(y))
        return self.c4(z) + z  # z has two consumers: the chain stops at c3


def test_view_nodes_edges_and_params() -> None:
    gm, view = view_of(Chain(), torch.randn(1, 3, 5, 5))
    assert not [n for n in gm.graph.nodes if n.op == "get_attr" and n.name in view]
    (c1,) = by_path(view, "c1")
    data = view.nodes[c1]
    assert data["kind"] == "conv" and data["shape"] == (1, 4, 5, 5)
    assert data["params"] == ("c1.weight", "c1.bias")
    assert list(view.predecessors(c1)) == ["x"]
    assert view.nodes["output"]["kind"] == "output"
    # every data edge of the fx graph is in the view, and nothing else
    expected = {(src.name, n.name) for n in gm.graph.nodes if n.op != "get_attr"
                for src in n.all_input_nodes if src.op != "get_attr"}
    assert set(view.edges) == expected


def test_view_linear_chains() -> None:
    _, view = view_of(Chain(), torch.randn(1, 3, 5, 5))
    chains = ir.linear_chains(view)
    c1, bn, c2, c3, c4 = (by_path(view, p)[0] for p in ("c1", "bn", "c2", "c3", "c4"))
    drop = by_path(view, "drop")[0]
    assert [c1, bn, drop, c2] in chains
    assert [c3] in chains  # stops: c3's output feeds both c4 and the add
    assert [c4] in chains
    flat = [n for chain in chains for n in chain]
    assert len(flat) == len(set(flat))  # each node in one chain only
    kinds = {view.nodes[n]["kind"] for n in flat}
    assert kinds <= {"conv", "linear", "batch_norm", "identity"}


class Residual(nn.Module):
    def __init__(self, projection: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8 if projection else 4, 3, padding=1)
        self.proj = nn.Conv2d(4, 8, 1) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        y = self.conv2(torch.relu(self.conv1(h)))
        shortcut = self.proj(h) if self.proj is not None else h
        return torch.relu(y + shortcut)


def test_view_residual_block_identity_shortcut() -> None:
    _, view = view_of(Residual(), torch.randn(1, 3, 5, 5))
    (block,) = ir.residual_blocks(view)
    entry = next(iter(view.successors(by_path(view, "stem")[0])))  # the relu after the stem
    assert block.entry == entry
    assert view.nodes[block.join]["kind"] == "add"
    assert block.identity_shortcut
    conv1, conv2 = by_path(view, "conv1")[0], by_path(view, "conv2")[0]
    assert {conv1, conv2} <= block.body
    assert block.entry not in block.body and block.join not in block.body


def test_view_residual_block_projection_shortcut() -> None:
    _, view = view_of(Residual(projection=True), torch.randn(1, 3, 5, 5))
    (block,) = ir.residual_blocks(view)
    assert not block.identity_shortcut
    assert by_path(view, "proj")[0] in block.body


class Block(nn.Module):
    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.extra = extra

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.fc(x))
        return torch.tanh(y) if self.extra else y


class Stack(nn.Module):
    def __init__(self, extras: tuple[bool, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(e) for e in extras)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def test_view_repeated_blocks_same_structure() -> None:
    _, view = view_of(Stack((False, False, False)), torch.randn(2, 6))
    (group,) = ir.repeated_blocks(view)
    assert group.prefix == "blocks"
    assert [path for path, _ in group.members] == ["blocks.0", "blocks.1", "blocks.2"]
    assert group.same_structure
    assert all(len(nodes) == 2 for _, nodes in group.members)  # linear + gelu each
    assert ir.repeated_blocks(view, min_count=4) == []


def test_view_repeated_blocks_different_structure() -> None:
    _, view = view_of(Stack((False, True)), torch.randn(2, 6))
    (group,) = ir.repeated_blocks(view)
    assert not group.same_structure


class Diamond(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = torch.sin(x)
        b = torch.cos(a)
        c = torch.exp(a)
        return (b * c) + y


def test_view_immediate_dominators() -> None:
    gm, view = view_of(Diamond(), torch.randn(3), torch.randn(3))
    idom = ir.immediate_dominators(view)
    names = {str(n.target).split(".")[1]: n.name for n in gm.graph.nodes if n.op == "call_function"}
    assert idom["x"] == ROOT and idom["y"] == ROOT
    assert idom[names["cos"]] == names["sin"] and idom[names["exp"]] == names["sin"]
    assert idom[names["mul"]] == names["sin"]  # the join of the diamond
    assert idom[names["add"]] == ROOT  # reachable from x and from y
    assert ROOT not in view  # the analysis does not edit the view


def test_view_attention_sites() -> None:
    class Attn(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, q, q)

    captured = ir.capture(Attn(), (torch.randn(1, 2, 4, 8),))
    (site,) = ir.attention_sites(captured.graph_module)
    assert "scaled_dot_product_attention" in str(site.target)
    assert ir.attention_sites(ir.capture(Block(), (torch.randn(2, 6),)).graph_module) == []


@pytest.mark.parametrize("model, x", [(Chain(), torch.randn(1, 3, 5, 5)), (Stack((False,)), torch.randn(2, 6))])
def test_view_op_histogram_counts_compute_nodes(model: nn.Module, x: torch.Tensor) -> None:
    gm, view = view_of(model, x)
    histogram = ir.op_histogram(gm)
    assert sum(histogram.values()) == len(ir.compute_nodes(gm))
    assert list(histogram) == sorted(histogram)
    assert sum(1 for _, d in view.nodes(data=True) if d["op"] == "call_function") == sum(histogram.values())
