"""fold_bn: BatchNorm folds into its conv/linear neighbour exactly, and is left alone where that is not exact."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from depthfold import ir
from depthfold.passes import PassManager

RTOL = ir.TOLERANCE[torch.float32]  # 1e-4 of the output scale: folding reorders float32 products
BN = "aten.batch_norm.default"


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max|out - ref| / max(1, max|ref|): the measure the pass manager verifies with."""
    return ir.compare_outputs(ref, out).max_rel


def count(gm: torch.fx.GraphModule, op: str) -> int:
    return ir.op_histogram(gm).get(op, 0)


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm, seed: int = 0) -> None:
    """Non-trivial statistics and affine parameters, so a wrong fold shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    n = bn.num_features
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            bn.running_var.copy_(torch.rand(n, generator=gen) * 1.75 + 0.25)
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.bias.copy_(torch.rand(n, generator=gen) - 0.5)


def fold(model: nn.Module, x: torch.Tensor, spec: str = "fold_bn"):  # type: ignore[no-untyped-def]
    captured = ir.capture(model, (x,))
    result = PassManager([spec]).run(captured.graph_module, captured.example_inputs)
    return captured.graph_module, result.graph_module, result.records[0]


def assert_exact(model: nn.Module, gm: torch.fx.GraphModule, shape: tuple[int, ...], seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> None:
    gen = torch.Generator().manual_seed(seed + 999)
    tol = ir.TOLERANCE[dtype]
    with torch.no_grad():
        for _ in range(2):  # fresh inputs, not the ones the manager verified with
            x = (torch.randn(shape, generator=gen) * 2).to(dtype)
            err = rel_err(model(x), gm(x))
            assert err <= tol, f"folded graph differs from the model by {err:.2e} (> {tol})"


@st.composite
def conv_bn_cases(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["normal", "grouped", "depthwise"]))
    if kind == "normal":
        cin, cout, groups = draw(st.integers(1, 8)), draw(st.integers(1, 8)), 1
    elif kind == "grouped":
        groups = draw(st.sampled_from([2, 3]))
        cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    else:
        cin = draw(st.integers(1, 8))
        groups, cout = cin, cin * draw(st.sampled_from([1, 2]))
    return {
        "cin": cin, "cout": cout, "groups": groups, "k": draw(st.integers(1, 5)),
        "padding": draw(st.sampled_from([0, 1])), "bias": draw(st.booleans()),
        "stride": draw(st.sampled_from([1, 2])),
        "where": draw(st.sampled_from(["after", "before", "both"])), "seed": draw(st.integers(0, 2**16)),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
    }


@settings(max_examples=40, deadline=None)
@given(conv_bn_cases())
def test_fold_bn_conv_property(case: dict) -> None:
    torch.manual_seed(case["seed"])
    conv = nn.Conv2d(case["cin"], case["cout"], case["k"], stride=case["stride"], padding=case["padding"],
                     groups=case["groups"], bias=case["bias"])
    layers: list[nn.Module] = []
    if case["where"] in ("before", "both"):
        layers.append(nn.BatchNorm2d(case["cin"]))
    layers.append(conv)
    if case["where"] in ("after", "both"):
        layers.append(nn.BatchNorm2d(case["cout"]))
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.BatchNorm2d):
            randomize_bn(layer, case["seed"] + i)
    model = nn.Sequential(*layers).eval().to(case["dtype"])
    x = torch.randn(2, case["cin"], 8, 8, dtype=case["dtype"])
    before, gm, record = fold(model, x)

    before_kept = case["where"] in ("before", "both") and case["padding"] > 0
    assert count(before, BN) == (2 if case["where"] == "both" else 1)
    assert count(gm, BN) == int(before_kept)
    assert count(gm, "aten.conv2d.default") == 1
    kinds = sorted(c["kind"] for c in record.changes)
    expected = []
    if case["where"] in ("after", "both"):
        expected.append("fold_bn_after")
    if case["where"] in ("before", "both") and not before_kept:
        expected.append("fold_bn_before")
    assert kinds == sorted(expected)
    if before_kept:
        (skip,) = record.skipped
        assert "pads" in skip["reason"] and "border" in skip["reason"], skip
    else:
        assert record.skipped == []
    assert_exact(model, gm, tuple(x.shape), case["seed"], case["dtype"])
    for node in gm.graph.nodes:  # folded parameters keep the model's dtype
        if node.op == "get_attr":
            assert ir.get_param(gm, node).dtype in (case["dtype"], torch.int64), node.name


@pytest.mark.parametrize("dims", [1, 3])
def test_fold_bn_conv1d_conv3d(dims: int) -> None:
    torch.manual_seed(dims)
    conv_cls, bn_cls = {1: (nn.Conv1d, nn.BatchNorm1d), 3: (nn.Conv3d, nn.BatchNorm3d)}[dims]
    model = nn.Sequential(bn_cls(4), conv_cls(4, 6, 3, groups=2), bn_cls(6)).eval()
    randomize_bn(model[0], 1)
    randomize_bn(model[2], 2)
    x = torch.randn((2, 4) + (7,) * dims)
    _, gm, record = fold(model, x)
    assert count(gm, BN) == 0
    assert sorted(c["kind"] for c in record.changes) == ["fold_bn_after", "fold_bn_before"]
    assert_exact(model, gm, tuple(x.shape))


@pytest.mark.parametrize("where", ["after", "before", "both"])
@pytest.mark.parametrize("bias", [True, False])
def test_fold_bn_linear(where: str, bias: bool) -> None:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    if where != "after":
        layers.append(nn.BatchNorm1d(12))
    layers.append(nn.Linear(12, 5, bias=bias))
    if where != "before":
        layers.append(nn.BatchNorm1d(5))
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.BatchNorm1d):
            randomize_bn(layer, i)
    model = nn.Sequential(*layers).eval()
    x = torch.randn(4, 12)
    _, gm, record = fold(model, x)
    assert count(gm, BN) == 0
    assert count(gm, "aten.linear.default") == 1
    assert len(record.changes) == (2 if where == "both" else 1)
    assert_exact(model, gm, tuple(x.shape))


def test_fold_bn_affine_free_batch_norm_folds() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False)).eval()
    randomize_bn(model[1])
    x = torch.randn(1, 3, 6, 6)
    _, gm, record = fold(model, x)
    assert count(gm, BN) == 0 and len(record.changes) == 1
    assert_exact(model, gm, tuple(x.shape))


def test_fold_bn_batch_statistics_norm_is_not_folded() -> None:
    # track_running_stats=False normalises with the batch's own statistics, even in eval().
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    x = torch.randn(2, 3, 6, 6)
    _, gm, record = fold(model, x)
    assert record.changes == []
    assert ir.op_histogram(gm)[BN] == 1
    assert_exact(model, gm, tuple(x.shape))


class LinearOverLastAxisThenBN(nn.Module):
    """BatchNorm1d normalises dim 1 of a 3-D tensor; the linear maps dim 2: folding would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


def test_fold_bn_skips_batchnorm_over_another_axis_of_a_linear() -> None:
    model = LinearOverLastAxisThenBN().eval()
    randomize_bn(model.bn)
    x = torch.randn(2, 5, 6)
    _, gm, record = fold(model, x)
    assert count(gm, BN) == 1
    assert record.changes == []
    (skip,) = record.skipped
    assert "another axis" in skip["reason"]
    assert_exact(model, gm, tuple(x.shape))


def test_fold_bn_before_disabled_by_config() -> None:
    model = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 3)).eval()
    randomize_bn(model[0])
    _, gm, record = fold(model, torch.randn(4, 6), "fold_bn:fold_before=false")
    assert count(gm, BN) == 1
    assert record.changes == []
    assert "not produced by a conv or linear" in record.skipped[0]["reason"]


class BNFeedsTwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        return self.a(y) + self.b(y)


class ConvFeedsBNAndMore(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) * y


@pytest.mark.parametrize("cls, reason", [(BNFeedsTwoConvs, "several nodes"), (ConvFeedsBNAndMore, "other users")])
def test_fold_bn_skips_when_other_users(cls: type[nn.Module], reason: str) -> None:
    model = cls().eval()
    randomize_bn(model.bn)
    x = torch.randn(1, 3, 6, 6)
    _, gm, record = fold(model, x)
    assert count(gm, BN) == 1
    assert record.changes == []
    (skip,) = record.skipped
    assert reason in skip["reason"]
    assert_exact(model, gm, tuple(x.shape))


class SharedConv(nn.Module):
    """The same conv module called twice, with a BN between: its weight must not be rewritten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(self.conv(x)))


def test_fold_bn_shared_weight_skipped_and_graph_unchanged() -> None:
    model = SharedConv().eval()
    randomize_bn(model.bn)
    x = torch.randn(1, 4, 5, 5)
    before, gm, record = fold(model, x)
    assert record.changes == []
    (skip,) = record.skipped
    assert "shared" in skip["reason"]
    assert ir.op_histogram(gm) == ir.op_histogram(before)
    after_state, before_state = gm.state_dict(), before.state_dict()
    assert set(after_state) <= set(before_state)  # unused buffers (num_batches_tracked) may be pruned
    for name, value in after_state.items():
        assert torch.equal(before_state[name], value), name
    assert_exact(model, gm, tuple(x.shape))


def test_fold_bn_never_mutates_the_users_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 2, 1))
    randomize_bn(model[1], 1)
    randomize_bn(model[3], 2)
    model.train()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    captured = ir.capture(model, (x,))
    result = PassManager(["fold_bn"]).run(captured.graph_module, captured.example_inputs)
    assert count(result.graph_module, BN) == 0
    assert model.training and all(m.training for m in model.modules())
    assert state.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(state[name], value), f"{name} changed"
    model.eval()
    assert_exact(model, result.graph_module, tuple(x.shape))


def test_fold_bn_is_idempotent() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    randomize_bn(model[1])
    x = torch.randn(1, 3, 6, 6)
    captured = ir.capture(model, (x,))
    once = PassManager(["fold_bn"]).run(captured.graph_module, (x,)).graph_module
    again = PassManager(["fold_bn"]).run(once, (x,))
    assert again.records[0].changes == [] and again.records[0].skipped == []
    assert ir.op_histogram(again.graph_module) == ir.op_histogram(once)
