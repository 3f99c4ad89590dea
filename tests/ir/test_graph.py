"""Graph-module helpers: cloning, parameter access, sharing, new parameters, pruning, lineage."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from depthfold import ir


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight  # tied under two names
        self.scale = nn.Parameter(torch.ones(4, 4))
        self.c = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.a(x))
        x = F.linear(x, self.scale * 2)  # a computed weight
        return self.c(x)


@pytest.fixture(scope="module")
def tied() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return ir.capture(Tied().eval(), (torch.randn(2, 4),)).graph_module


def _linears(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if ir.ops.is_linear(n)]


def test_graph_ownership_problems(tied: torch.fx.GraphModule) -> None:
    a, b, computed, c = _linears(tied)
    assert "shared" in (ir.ownership_problem(tied, a) or "")
    assert "shared" in (ir.ownership_problem(tied, b) or "")
    assert ir.ownership_problem(tied, a, allowed_users=[b]) is None  # both users are part of the match
    assert "computed" in (ir.ownership_problem(tied, computed) or "")
    assert ir.ownership_problem(tied, c) is None
    assert ir.is_shared(tied, a.args[1], allowed_users=[a])
    assert not ir.is_shared(tied, c.args[1], allowed_users=[c])
    assert ir.is_shared(tied, c.args[1])  # c itself reads it, and c is not allowed here


def test_graph_clone_is_independent(tied: torch.fx.GraphModule) -> None:
    copy = ir.clone(tied)
    node = _linears(copy)[3]
    ir.set_param(copy, node.args[1], torch.zeros(4, 4))
    assert bool(ir.get_param(tied, _linears(tied)[3].args[1]).detach().any())
    assert isinstance(ir.get_param(copy, node.args[1]), nn.Parameter)
    assert ir.get_param(copy, node.args[1]).requires_grad
    with pytest.raises(TypeError, match="not get_attr"):
        ir.get_param(copy, node)


def test_graph_new_param_never_overwrites(tied: torch.fx.GraphModule) -> None:
    gm = ir.clone(tied)
    c = _linears(gm)[3]
    first = ir.new_param(gm, "c", "weight", torch.ones(4, 4), before=c)
    second = ir.new_param(gm, "c", "weight", torch.full((4, 4), 2.0), before=c)
    assert first.target == "c.weight_1" and second.target == "c.weight_2"
    assert torch.equal(gm.c.weight, ir.get_param(tied, _linears(tied)[3].args[1]))
    assert ir.shape_of(first) == (4, 4) and first.meta[ir.META_DTYPE] == "torch.float32"
    made = ir.new_param(gm, "fresh.sub", "w", torch.zeros(3), before=c)
    assert made.target == "fresh.sub.w" and torch.equal(gm.fresh.sub.w, torch.zeros(3))


def test_graph_prune_unused_attributes(tied: torch.fx.GraphModule) -> None:
    gm = ir.clone(tied)
    c = _linears(gm)[3]
    c.args = (c.args[0], c.args[1], None)  # drop c's bias
    gm.graph.eliminate_dead_code()
    ir.prune_unused_attributes(gm)
    names = {name for name, _ in gm.named_parameters()}
    assert "c.bias" not in names and "c.weight" in names
    gm.recompile()
    ir.structural_check(gm)


def test_graph_record_origin(tied: torch.fx.GraphModule) -> None:
    gm = ir.clone(tied)
    a, b = _linears(gm)[:2]
    with gm.graph.inserting_after(b):
        new = gm.graph.call_function(torch.ops.aten.relu.default, (b,))
    ir.record_origin(new, "my_pass", [a, b], like=b)
    assert new.meta[ir.META_FROM] == ("my_pass", (a.name, b.name))
    assert ir.module_path(new) == "b" and ir.shape_of(new) == (2, 4)
