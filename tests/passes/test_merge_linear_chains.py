"""merge_linear_chains: random conv and linear chains merge exactly wherever the documented rule says they can.

The expected outcome is computed here from each chain's geometry with the rule in the module docstring
(a pair composes exactly when the second conv is unpadded, or the first is a bias-free unpadded 1x1),
independently of the pass's own code.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from depthfold import ir
from depthfold.passes import PassManager

RTOL = ir.TOLERANCE[torch.float32]  # 1e-4 of the output scale: float32 reordering of merged sums
PIPELINE = ["fold_bn", "merge_linear_chains:max_cost_ratio=inf"]
CONV = "aten.conv2d.default"
LINEAR = "aten.linear.default"
BN = "aten.batch_norm.default"


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max|out - ref| / max(1, max|ref|): the measure the pass manager verifies with."""
    return ir.compare_outputs(ref, out).max_rel


def count(gm: torch.fx.GraphModule, op: str) -> int:
    return ir.op_histogram(gm).get(op, 0)


def randomize_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Non-trivial statistics and affine parameters, so a wrong fold shows in the outputs."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.25, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


def init_layer(layer: nn.Conv2d | nn.Linear) -> None:
    """Variance-preserving weights and sizeable biases, so outputs stay O(1) along the chain."""
    fan_in = layer.weight[0].numel()
    with torch.no_grad():
        layer.weight.normal_(0.0, fan_in ** -0.5)
        if layer.bias is not None:
            layer.bias.uniform_(-0.5, 0.5)


def between_layers(kind: str) -> list[nn.Module]:
    return {"none": [], "dropout": [nn.Dropout(0.3)], "identity": [nn.Identity()],
            "both": [nn.Dropout(0.5), nn.Identity()]}[kind]


def run_pipeline(model: nn.Module, x: torch.Tensor, passes: list[str] | None = None):  # type: ignore[no-untyped-def]
    captured = ir.capture(model, (x,))
    result = PassManager(passes or PIPELINE).run(captured.graph_module, captured.example_inputs)
    return captured.graph_module, result


def assert_matches_model(model: nn.Module, gm: torch.fx.GraphModule, shape: tuple[int, ...], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 12345)
    with torch.no_grad():
        for _ in range(2):  # fresh inputs, not the ones the manager verified with
            x = torch.randn(shape, generator=gen)
            err = rel_err(model(x), gm(x))
            assert err <= RTOL, f"merged graph differs from the model by {err:.2e} (> {RTOL})"


# --- conv chains ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvSpec:
    cin: int
    cout: int
    k: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    bias: bool
    bn: bool
    """A BatchNorm2d directly after this conv."""
    after: str
    """Identity-like modules after this conv (and its BN): none, dropout, identity, both."""


def spec(cin: int, cout: int, k: int, stride: int, padding: int, groups: int, bias: bool, bn: bool,
         after: str) -> ConvSpec:
    """A square ConvSpec."""
    return ConvSpec(cin, cout, (k, k), (stride, stride), (padding, padding), groups, bias, bn, after)


channel_counts = st.one_of(st.integers(1, 12), st.sampled_from([16, 24, 32, 64]))


@st.composite
def conv_chains(draw: st.DrawFn) -> tuple[list[ConvSpec], tuple[int, int], int]:
    """2-3 convs (dense / grouped / depthwise), their input size and a seed for the weights."""
    n = draw(st.integers(2, 3))
    cin = draw(channel_counts)
    specs = []
    for i in range(n):
        kind = draw(st.sampled_from(["dense", "grouped", "depthwise"]))
        divisors = [g for g in range(2, cin + 1) if cin % g == 0 and g < cin]
        if kind == "depthwise" and cin > 1:
            groups, cout = cin, cin * draw(st.sampled_from([1, 2] if cin <= 32 else [1]))
        elif kind == "grouped" and divisors:
            groups = draw(st.sampled_from(divisors))
            cout = groups * draw(st.integers(1, min(4, 64 // groups)))
        else:
            groups, cout = 1, draw(channel_counts)
        # Mostly square kernels, sometimes not (every geometry rule is per spatial dimension); 1x1 often,
        # since a bias-free 1x1 is the one first conv that merges with a padded second conv.
        kh = draw(st.sampled_from([1, 1, 2, 3, 4, 5, 6, 7]))
        kw = draw(st.one_of(st.just(kh), st.integers(1, 7)))
        sh = draw(st.integers(1, 2))
        sw = draw(st.one_of(st.just(sh), st.integers(1, 2)))
        same = draw(st.booleans())  # "same"-like k // 2 padding, or none
        specs.append(ConvSpec(
            cin=cin, cout=cout, k=(kh, kw), stride=(sh, sw),
            padding=(kh // 2, kw // 2) if same else (0, 0), groups=groups, bias=draw(st.booleans()),
            bn=draw(st.booleans()),
            after=draw(st.sampled_from(["none", "dropout", "identity", "both"])) if i < n - 1 else "none",
        ))
        cin = cout
    # Smallest input size that keeps every conv's output non-empty, then a random size at least that big.
    sizes = []
    for dim in (0, 1):
        need = 1
        for s in reversed(specs):
            need = max(1, s.stride[dim] * (need - 1) + s.k[dim] - 2 * s.padding[dim])
        sizes.append(max(need, draw(st.integers(9, 16))))
    return specs, (sizes[0], sizes[1]), draw(st.integers(0, 2**16))


def build_conv_chain(specs: list[ConvSpec], seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for s in specs:
        conv = nn.Conv2d(s.cin, s.cout, s.k, stride=s.stride, padding=s.padding, groups=s.groups, bias=s.bias)
        init_layer(conv)
        layers.append(conv)
        if s.bn:
            bn = nn.BatchNorm2d(s.cout)
            randomize_bn(bn)
            layers.append(bn)
        layers.extend(between_layers(s.after))
    return nn.Sequential(*layers).eval()


@dataclass(frozen=True)
class Abstract:
    """What the exactness rule looks at: kernel is 1x1, padded at all, has a (non-zero) bias."""

    pointwise: bool
    padded: bool
    bias: bool


def merges_exactly(first: Abstract, second: Abstract) -> bool:
    """The documented rule: second conv unpadded, or first conv a bias-free unpadded 1x1."""
    return not second.padded or (first.pointwise and not first.padded and not first.bias)


def compose(first: Abstract, second: Abstract) -> Abstract:
    # k1 + (k2 - 1) * s1 is 1 only for two 1x1s; padding p1 + s1 * p2; bias b2 + W2 b1.
    return Abstract(first.pointwise and second.pointwise, first.padded or second.padded,
                    first.bias or second.bias)


@functools.cache
def fewest_convs(chain: tuple[Abstract, ...]) -> int:
    """Fewest convs reachable by exact pairwise merges, over every merge order."""
    best = len(chain)
    for i in range(len(chain) - 1):
        if merges_exactly(chain[i], chain[i + 1]):
            merged = chain[:i] + (compose(chain[i], chain[i + 1]),) + chain[i + 2:]
            best = min(best, fewest_convs(merged))
    return best


def abstract_chain(specs: list[ConvSpec]) -> tuple[Abstract, ...]:
    # After fold_bn a conv followed by a BN has a bias (the BN shift), whatever it had before.
    return tuple(Abstract(s.k == (1, 1), any(s.padding), s.bias or s.bn) for s in specs)


@settings(max_examples=80, deadline=None)
@given(conv_chains())
def test_merge_linear_chains_random_conv_chains(chain: tuple[list[ConvSpec], tuple[int, int], int]) -> None:
    specs, size, seed = chain
    model = build_conv_chain(specs, seed)
    x = torch.randn(1, specs[0].cin, *size, generator=torch.Generator().manual_seed(seed))
    _, result = run_pipeline(model, x)
    gm = result.graph_module
    fold, merge = result.records

    # (a) exact on inputs the manager never saw
    assert_matches_model(model, gm, tuple(x.shape), seed)
    # (b) a BN directly after a conv always folds
    assert count(gm, BN) == 0
    assert len(fold.changes) == sum(s.bn for s in specs)
    # (c) every merge the rule allows happens, and every pair left is skipped for its padding
    expected = fewest_convs(abstract_chain(specs))
    assert count(gm, CONV) == expected, (specs, merge.changes, merge.skipped)
    assert len(merge.changes) == len(specs) - expected
    convs = [n for n in gm.graph.nodes if str(n.target) == CONV]
    reasons = {s["site"]: s["reason"] for s in merge.skipped}
    for a, b in zip(convs, convs[1:]):
        reason = reasons.get(f"{a.name}->{b.name}", "")
        assert "zero-pads" in reason, (a.name, b.name, merge.skipped)


@st.composite
def pointwise_then_padded(draw: st.DrawFn) -> tuple[list[ConvSpec], tuple[int, int], int]:
    """A bias-free unpadded 1x1 (any stride and groups) then a padded conv: the rule's second exact case."""
    cin = draw(st.integers(1, 12))
    groups = draw(st.sampled_from([g for g in range(1, cin + 1) if cin % g == 0]))
    mid = groups * draw(st.integers(1, 3))
    k = (draw(st.integers(2, 7)), draw(st.integers(1, 7)))
    first = ConvSpec(cin, mid, (1, 1), (draw(st.integers(1, 2)), draw(st.integers(1, 2))), (0, 0), groups,
                     False, False, draw(st.sampled_from(["none", "dropout", "identity", "both"])))
    second = ConvSpec(mid, draw(st.integers(1, 12)), k, (draw(st.integers(1, 2)), draw(st.integers(1, 2))),
                      (k[0] // 2, k[1] // 2), 1, draw(st.booleans()), draw(st.booleans()), "none")
    size = (draw(st.integers(9, 16)), draw(st.integers(9, 16)))
    return [first, second], size, draw(st.integers(0, 2**16))


@settings(max_examples=20, deadline=None)
@given(pointwise_then_padded())
def test_merge_linear_chains_bias_free_pointwise_before_padded_conv_property(chain) -> None:  # type: ignore[no-untyped-def]
    specs, size, seed = chain
    assert fewest_convs(abstract_chain(specs)) == 1
    model = build_conv_chain(specs, seed)
    x = torch.randn(1, specs[0].cin, *size, generator=torch.Generator().manual_seed(seed))
    _, result = run_pipeline(model, x)
    assert count(result.graph_module, CONV) == 1, result.records[1].skipped
    assert count(result.graph_module, BN) == 0
    assert_matches_model(model, result.graph_module, tuple(x.shape), seed)


ONNX_CASES = [
    # (specs, size): padded dense 3x3 -> BN -> dropout -> unpadded 1x1 ...
    ([spec(3, 8, 3, 1, 1, 1, True, True, "dropout"), spec(8, 8, 1, 1, 0, 1, True, False, "none")], 10),
    # depthwise 3x3 stride 2 -> grouped 3x3 (unpadded)
    ([spec(8, 8, 3, 2, 1, 8, False, True, "identity"), spec(8, 4, 3, 1, 0, 2, True, False, "none")], 12),
    # bias-free 1x1 stride 2 -> padded 5x5 (exact through the padding)
    ([spec(4, 6, 1, 2, 0, 1, False, False, "none"), spec(6, 6, 5, 1, 2, 1, True, True, "none")], 11),
    # three convs, the middle pair not mergeable
    ([spec(5, 10, 3, 1, 1, 5, True, False, "none"), spec(10, 10, 3, 1, 1, 1, True, True, "both"),
      spec(10, 3, 1, 2, 0, 1, False, False, "none")], 9),
    # 7x7 stride 2 -> 2x2 (even kernel) stride 2
    ([spec(2, 4, 7, 2, 3, 1, True, True, "none"), spec(4, 4, 2, 2, 0, 4, True, False, "none")], 16),
]


@pytest.mark.parametrize("case", range(len(ONNX_CASES)))
def test_merge_linear_chains_onnx_runtime_agrees(case: int, tmp_path) -> None:  # type: ignore[no-untyped-def]
    onnx_backend = pytest.importorskip("depthfold.backends.onnx")
    ort = pytest.importorskip("onnxruntime")
    specs, size = ONNX_CASES[case]
    model = build_conv_chain(specs, seed=case)
    x = torch.randn(1, specs[0].cin, size, size, generator=torch.Generator().manual_seed(case))
    _, result = run_pipeline(model, x)
    gm = result.graph_module
    assert count(gm, CONV) == fewest_convs(abstract_chain(specs)) < len(specs)

    artifact = onnx_backend.export_onnx(gm, (x,), tmp_path / "chain.onnx")
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + case))
    (got,) = session.run(None, {artifact.input_names[0]: fresh.numpy()})
    with torch.no_grad():
        err = rel_err(model(fresh), torch.from_numpy(got))
    assert err <= RTOL, f"ONNX Runtime differs from the original model by {err:.2e}"


# --- fixed conv cases -----------------------------------------------------------------------------


def test_merge_linear_chains_padded_pair_skipped_with_reason() -> None:
    model = build_conv_chain([spec(4, 8, 3, 1, 1, 1, True, False, "none"),
                              spec(8, 8, 3, 1, 1, 1, True, False, "none")], seed=0)
    _, result = run_pipeline(model, torch.randn(1, 4, 10, 10))
    merge = result.records[1]
    assert count(result.graph_module, CONV) == 2
    assert merge.changes == []
    assert len(merge.skipped) == 1 and "zero-pads" in merge.skipped[0]["reason"]


def test_merge_linear_chains_bias_free_pointwise_before_padded_conv_merges() -> None:
    model = build_conv_chain([spec(4, 8, 1, 1, 0, 1, False, False, "none"),
                              spec(8, 8, 3, 1, 1, 1, True, False, "none")], seed=1)
    x = torch.randn(1, 4, 10, 10)
    _, result = run_pipeline(model, x)
    assert count(result.graph_module, CONV) == 1
    (change,) = result.records[1].changes
    assert change["kernel"] == [3, 3]
    assert_matches_model(model, result.graph_module, tuple(x.shape), seed=1)


def test_merge_linear_chains_dilated_conv_skipped() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, dilation=2), nn.Conv2d(4, 4, 1)).eval()
    _, result = run_pipeline(model, torch.randn(1, 3, 12, 12))
    assert count(result.graph_module, CONV) == 2
    assert any("dilated" in s["reason"] for s in result.records[1].skipped)


def test_merge_linear_chains_conv1d_chain_merges() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 6, 5, padding=2, stride=2), nn.Dropout(), nn.Conv1d(6, 4, 3)).eval()
    x = torch.randn(2, 3, 20)
    _, result = run_pipeline(model, x)
    assert count(result.graph_module, "aten.conv1d.default") == 1
    with torch.no_grad():
        assert rel_err(model(x), result.graph_module(x)) <= RTOL


def _depthwise_pointwise(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16),
                         nn.Conv2d(16, 32, 1)).eval()


def test_merge_linear_chains_cost_rule_skips_depthwise_pointwise() -> None:
    model = _depthwise_pointwise()
    randomize_bn(model[1])
    _, result = run_pipeline(model, torch.randn(1, 16, 12, 12), ["fold_bn", "merge_linear_chains"])
    merge = result.records[1]
    assert merge.config["max_cost_ratio"] == 1.0
    assert count(result.graph_module, CONV) == 2
    assert merge.changes == []
    (skip,) = merge.skipped
    assert "multiply-adds" in skip["reason"]


def test_merge_linear_chains_cost_rule_off_merges_depthwise_pointwise_exactly() -> None:
    model = _depthwise_pointwise()
    randomize_bn(model[1])
    x = torch.randn(1, 16, 12, 12)
    _, result = run_pipeline(model, x)
    (change,) = result.records[1].changes
    assert count(result.graph_module, CONV) == 1
    assert change["macs_after"] > change["macs_before"]  # the merge really is the more expensive layer
    assert change["groups"] == 1
    assert_matches_model(model, result.graph_module, tuple(x.shape), seed=3)


# --- negative cases -------------------------------------------------------------------------------


def test_merge_linear_chains_relu_between_never_merges() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1)).eval()
    _, result = run_pipeline(model, torch.randn(1, 3, 8, 8))
    assert count(result.graph_module, CONV) == 2
    assert result.records[1].changes == []


class TwoUsers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y) + y


class TwoUsersThroughDropout(TwoUsers):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.drop(self.a(x))
        return self.b(y) * y


@pytest.mark.parametrize("cls", [TwoUsers, TwoUsersThroughDropout])
def test_merge_linear_chains_conv_with_two_users_never_merges(cls: type[nn.Module]) -> None:
    model = cls().eval()
    x = torch.randn(1, 3, 8, 8)
    _, result = run_pipeline(model, x)
    assert count(result.graph_module, CONV) == 2
    assert result.records[1].changes == []
    with torch.no_grad():
        assert rel_err(model(x), result.graph_module(x)) <= RTOL


# --- linear chains --------------------------------------------------------------------------------


@st.composite
def linear_chains(draw: st.DrawFn) -> tuple[list[int], list[bool], list[bool], list[str], int]:
    n = draw(st.integers(2, 4))
    widths = draw(st.lists(st.integers(1, 32), min_size=n + 1, max_size=n + 1))
    biases = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    bns = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    afters = draw(st.lists(st.sampled_from(["none", "dropout", "identity", "both"]), min_size=n, max_size=n))
    return widths, biases, bns, afters, draw(st.integers(0, 2**16))


@settings(max_examples=20, deadline=None)
@given(linear_chains())
def test_merge_linear_chains_random_linear_chains(chain) -> None:  # type: ignore[no-untyped-def]
    widths, biases, bns, afters, seed = chain
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, bias in enumerate(biases):
        linear = nn.Linear(widths[i], widths[i + 1], bias=bias)
        init_layer(linear)
        layers.append(linear)
        if bns[i]:
            bn = nn.BatchNorm1d(widths[i + 1])
            randomize_bn(bn)
            layers.append(bn)
        layers.extend(between_layers(afters[i]))
    model = nn.Sequential(*layers).eval()
    x = torch.randn(3, widths[0], generator=torch.Generator().manual_seed(seed))
    _, result = run_pipeline(model, x)
    gm = result.graph_module
    assert count(gm, BN) == 0
    assert count(gm, LINEAR) == 1  # linear -> linear is always exact; the cost rule is off
    assert len(result.records[1].changes) == len(biases) - 1
    assert_matches_model(model, gm, tuple(x.shape), seed)


def test_merge_linear_chains_cost_rule_skips_linear_bottleneck() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 64)).eval()
    x = torch.randn(2, 64)
    _, result = run_pipeline(model, x, ["merge_linear_chains"])
    assert count(result.graph_module, LINEAR) == 2
    (skip,) = result.records[0].skipped
    assert "multiply-adds" in skip["reason"] and "bottleneck" in skip["reason"]
    _, result = run_pipeline(model, x)
    assert count(result.graph_module, LINEAR) == 1


def test_merge_linear_chains_options_disable_each_kind() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Flatten(),
                          nn.Linear(4 * 9, 8), nn.Linear(8, 8)).eval()
    x = torch.randn(1, 3, 3, 3)
    _, result = run_pipeline(model, x, ["merge_linear_chains:merge_convs=false,max_cost_ratio=inf"])
    assert (count(result.graph_module, CONV), count(result.graph_module, LINEAR)) == (2, 1)
    _, result = run_pipeline(model, x, ["merge_linear_chains:merge_linears=false,max_cost_ratio=inf"])
    assert (count(result.graph_module, CONV), count(result.graph_module, LINEAR)) == (1, 2)
    assert math.isinf(result.records[0].config["max_cost_ratio"])
