"""Numerical verification helpers: random inputs, output comparison, divergence location, structure checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthfold import ir
from depthfold.errors import VerificationError


def test_verify_tolerance_table() -> None:
    assert ir.TOLERANCE[torch.float32] == 1e-4
    assert ir.TOLERANCE[torch.float64] < ir.TOLERANCE[torch.float32] < ir.TOLERANCE[torch.float16]
    assert set(ir.TOLERANCE) == {torch.float32, torch.float64, torch.float16, torch.bfloat16}


def test_random_inputs_like_preserves_shape_dtype_and_range() -> None:
    examples = (
        torch.randn(2, 3, 4) * 5 + 10,
        torch.randint(3, 10, (2, 7)),
        torch.tensor([[True, False, True]]),
        torch.randn(4, dtype=torch.float64),
        torch.randint(0, 2, (3,), dtype=torch.int32),
    )
    batches = ir.random_inputs_like(examples, 4, seed=1)
    assert len(batches) == 4
    for batch in batches:
        assert len(batch) == len(examples)
        for got, ex in zip(batch, examples):
            assert got.shape == ex.shape and got.dtype == ex.dtype
        ids = batch[1]
        assert int(ids.min()) >= 3 and int(ids.max()) <= 9  # within the example's observed range
        assert int(batch[4].min()) >= 0 and int(batch[4].max()) <= 1
    floats = torch.cat([b[0].flatten() for b in batches])
    assert 7 < float(floats.mean()) < 13  # the example's mean (10) and spread (5) are kept
    assert 3 < float(floats.std()) < 7
    assert not torch.equal(batches[0][0], batches[1][0])  # every tuple is new


def test_random_inputs_like_is_seeded() -> None:
    examples = (torch.randn(3, 3), torch.randint(0, 5, (4,)))
    a = ir.random_inputs_like(examples, 2, seed=3)
    b = ir.random_inputs_like(examples, 2, seed=3)
    c = ir.random_inputs_like(examples, 2, seed=4)
    assert all(torch.equal(x, y) for ba, bb in zip(a, b) for x, y in zip(ba, bb))
    assert not torch.equal(a[0][0], c[0][0])


def test_random_inputs_like_constant_int_scalar_and_empty_examples() -> None:
    examples = (torch.full((5,), 7), torch.tensor(2.5), torch.zeros(2, 0, dtype=torch.long), torch.zeros(0))
    (batch,) = ir.random_inputs_like(examples, 1)
    assert torch.equal(batch[0], torch.full((5,), 7))
    assert batch[1].shape == () and batch[1].dtype == torch.float32
    assert batch[2].shape == (2, 0) and batch[2].dtype == torch.long
    assert batch[3].shape == (0,)


def test_compare_outputs_on_nested_outputs() -> None:
    ref = {"a": torch.zeros(3), "b": (torch.ones(2, 2) * 4, [torch.tensor([-10.0, 0.0])])}
    cand = {"a": torch.tensor([0.0, 0.5, 0.0]), "b": (torch.ones(2, 2) * 4, [torch.tensor([-10.0, 0.05])])}
    stats = ir.compare_outputs(ref, cand)
    assert stats.max_abs == pytest.approx(0.5)
    # per output: 0.5 / max(1, 0) = 0.5; 0 / 4 = 0; 0.05 / 10 = 0.005 -> worst is 0.5
    assert stats.max_rel == pytest.approx(0.5)
    assert stats.frac_over_1e2 == pytest.approx(1 / 2)  # worst per output: one of two elements of the last
    assert stats.frac_over_1e1 == pytest.approx(1 / 3)
    assert ir.compare_outputs(ref, ref).max_abs == 0.0
    assert [tuple(t.shape) for t in ir.flatten_outputs(ref)] == [(3,), (2, 2), (2,)]


def test_compare_outputs_relative_to_output_scale() -> None:
    stats = ir.compare_outputs(torch.tensor([100.0, 1.0]), torch.tensor([100.5, 1.0]))
    assert stats.max_abs == pytest.approx(0.5) and stats.max_rel == pytest.approx(0.005)


def test_compare_outputs_nan_and_inf_are_errors_unless_matched() -> None:
    nan, inf = float("nan"), float("inf")
    ones = torch.ones(3)
    # A NaN the reference does not have must not compare as "within tolerance" (NaN > tol is False).
    assert ir.compare_outputs(ones, torch.tensor([1.0, nan, 1.0])).max_rel == inf
    assert ir.compare_outputs(ones, torch.tensor([1.0, inf, 1.0])).max_rel == inf
    assert ir.compare_outputs(torch.tensor([inf, 1.0]), torch.tensor([1.0, 1.0])).max_rel == inf
    assert ir.compare_outputs(torch.tensor([nan, inf, 2.0]), torch.tensor([nan, inf, 2.0])).max_abs == 0.0
    assert ir.compare_outputs(torch.zeros(0), torch.zeros(0)).max_abs == 0.0


def test_compare_outputs_structure_changes_raise() -> None:
    with pytest.raises(VerificationError, match="output count"):
        ir.compare_outputs((torch.zeros(2), torch.zeros(2)), torch.zeros(2))
    with pytest.raises(VerificationError, match=r"shape changed: \(2,\) -> \(1, 2\)"):
        ir.compare_outputs(torch.zeros(2), torch.zeros(1, 2))


class Three(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture(scope="module")
def captured() -> ir.CapturedModel:
    torch.manual_seed(0)
    return ir.capture(Three().eval(), (torch.randn(4, 6),))


def _linear(gm: torch.fx.GraphModule, index: int) -> torch.fx.Node:
    return [n for n in gm.graph.nodes if ir.ops.is_linear(n)][index]


def test_locate_divergence_finds_the_perturbed_node(captured: ir.CapturedModel) -> None:
    gm = captured.graph_module
    broken = ir.clone(gm)
    node = _linear(broken, 1)
    ir.set_param(broken, node.args[1], ir.get_param(broken, node.args[1]) + 0.1)
    name, err = ir.locate_divergence(gm, broken, captured.example_inputs, 1e-4)
    assert name == node.name and err > 1e-4
    assert ir.locate_divergence(gm, ir.clone(gm), captured.example_inputs, 1e-4) == (None, 0.0)


def test_locate_divergence_follows_lineage_of_rewritten_nodes(captured: ir.CapturedModel) -> None:
    gm = captured.graph_module
    broken = ir.clone(gm)
    old = _linear(broken, 0)
    with broken.graph.inserting_after(old):
        new = broken.graph.call_function(torch.ops.aten.mul.Tensor, (old, 1.5))
    old.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    ir.record_origin(new, "test", [old])
    broken.recompile()
    # mul has no counterpart by name; its lineage points at the linear it came from.
    name, _ = ir.locate_divergence(gm, broken, captured.example_inputs, 1e-4)
    assert name == new.name


def test_check_equivalent(captured: ir.CapturedModel) -> None:
    gm = captured.graph_module
    inputs = [captured.example_inputs, *ir.random_inputs_like(captured.example_inputs, 2)]
    same = ir.clone(gm)
    stats, outputs = ir.check_equivalent(gm, same, inputs)
    assert stats.max_abs == 0.0
    assert len(outputs) == len(inputs)
    assert all(torch.equal(o, same(*batch)) for o, batch in zip(outputs, inputs))  # ``after``'s outputs
    broken = ir.clone(gm)
    node = _linear(broken, 2)
    ir.set_param(broken, node.args[2], ir.get_param(broken, node.args[2]) + 1e-3)
    with pytest.raises(VerificationError, match=f"first diverging node: '{node.name}'") as info:
        ir.check_equivalent(gm, broken, inputs, what="the test graph")
    assert str(info.value).startswith("the test graph is not equivalent")
    stats, _ = ir.check_equivalent(gm, broken, inputs, rtol=1e-2)
    assert stats.max_abs == pytest.approx(1e-3, rel=1e-2)
    # A known reference is used instead of re-running ``before``.
    with pytest.raises(VerificationError):
        ir.check_equivalent(gm, same, inputs, reference=[o + 1 for o in outputs])


def test_check_equivalent_uses_dtype_tolerance() -> None:
    class Scale(nn.Module):
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factor

    x = (torch.ones(3, dtype=torch.float64),)
    ref = ir.capture(Scale(1.0), x).graph_module
    off = ir.capture(Scale(1.0 + 1e-6), x).graph_module
    with pytest.raises(VerificationError):  # 1e-6 is far above float64's 1e-9
        ir.check_equivalent(ref, off, [x])
    x32 = (torch.ones(3),)
    stats, _ = ir.check_equivalent(ir.capture(Scale(1.0), x32).graph_module,
                                   ir.capture(Scale(1.0 + 1e-6), x32).graph_module, [x32])
    assert 0 < stats.max_rel < ir.TOLERANCE[torch.float32]


def test_structural_check(captured: ir.CapturedModel) -> None:
    gm = ir.clone(captured.graph_module)
    ir.structural_check(gm)
    del gm.b._parameters["weight"]
    with pytest.raises(VerificationError, match="b.weight"):
        ir.structural_check(gm)
