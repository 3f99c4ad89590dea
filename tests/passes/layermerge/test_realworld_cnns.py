"""LayerMerge on CNNs nobody here wrote: Hugging Face ``transformers`` ResNet, MobileNetV2 (TF padding),
EfficientNet, RegNet-Y and ConvNeXt from small configs — explicit zero pads, squeeze-excite gates inside
residual bodies, grouped convs, channels-last linear MLPs, in-place residual adds."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn

from depthfold import ir
from depthfold.errors import ConfigError
from depthfold.ir import ops
from depthfold.passes import PassContext, PassManager
from depthfold.passes.layermerge.apply import apply_plan, merge_segments
from depthfold.passes.layermerge.candidates import enumerate_choices
from depthfold.passes.layermerge.latency_table import choice_spec
from depthfold.passes.layermerge.trunk import Barrier, Join, Layer, analyze_trunk

from .conftest import Case
from .helpers import MAX_MERGE_COST, check_merge, merge_cost, random_plan

HF_MODELS = ["resnet_basic", "resnet_bottleneck", "mobilenetv2_tf_padding", "mobilenetv2", "efficientnet_b0",
             "regnet_y", "convnext"]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", HF_MODELS)
def test_random_plans_keep_every_boundary_shape_and_merge_exactly(hf_case, name: str, seed: int) -> None:
    """The property that would have caught the HF ResNet bug (an in-place residual add left behind; a
    segment's re-padding changing a spatial size): every boundary keeps its shape, the merge is exact."""
    case = hf_case(name)
    plan = random_plan(case.trunk, case.enumerate(), seed, max_cost=MAX_MERGE_COST)
    check_merge(case, plan)


def test_every_candidate_of_the_basic_block_resnet_merges_exactly(hf_case) -> None:
    """HF ResNet writes ``hidden_state += residual`` (``aten.add_``) and has odd map sizes at 80 px."""
    case = hf_case("resnet_basic")
    inplace = [n for n in case.gm.graph.nodes if n.target is torch.ops.aten.add_.Tensor]
    assert inplace, "the captured HF ResNet keeps its in-place residual adds"
    choices = [c for c in case.enumerate() if c.kind in ("merged", "pruned")]
    assert any(c.absorbed for c in choices)
    for choice in choices:
        check_merge(case, [choice])


def test_tf_padding_folds_into_the_convs(hf_case) -> None:
    """MobileNetV2 with ``tf_padding=True`` pads explicitly (asymmetric on stride 2): each pad becomes its
    conv's padding, and the trunk is the one the same network without explicit pads has."""
    padded, plain = hf_case("mobilenetv2_tf_padding").trunk, hf_case("mobilenetv2").trunk
    assert not [b for b in padded.barriers if "pad" in b.reason]
    summary = {k: v for k, v in padded.summary().items() if k != "barriers"}
    assert summary == {k: v for k, v in plain.summary().items() if k != "barriers"}
    folded = [layer for layer in padded.layers() if layer.pad is not None]
    assert folded and any(layer.padding != layer.end_padding for layer in folded), "asymmetric pads folded"
    merged = [c for c in hf_case("mobilenetv2_tf_padding").enumerate() if c.kind == "merged"]
    assert any(c.geometry.padding != c.geometry.end_padding for c in merged)


def test_asymmetric_segment_padding_is_explicit_in_the_deployed_conv(hf_case) -> None:
    case = hf_case("mobilenetv2_tf_padding")
    choice = next(c for c in case.enumerate() if c.kind == "merged" and c.kept
                  and c.geometry.padding != c.geometry.end_padding and merge_cost(case.trunk, c) <= MAX_MERGE_COST)
    compressed, segments = apply_plan(case.gm, case.trunk, [choice])
    ir.annotate(compressed, (case.x,))
    merged, (conv,) = merge_segments(compressed, segments)
    pad = conv.args[0]
    assert pad.target is torch.ops.aten.constant_pad_nd.default and list(conv.args[4]) == [0, 0]
    g = choice.geometry
    assert list(pad.args[1]) == [g.padding[1], g.end_padding[1], g.padding[0], g.end_padding[0]]
    check_merge(case, [choice])


@pytest.mark.parametrize("name", ["efficientnet_b0", "regnet_y"])
def test_squeeze_excite_is_one_barrier_inside_a_residual_body(hf_case, name: str) -> None:
    trunk = hf_case(name).trunk
    gates = [b for b in trunk.barriers if b.reason.startswith("squeeze-excite")]
    assert gates
    assert not [b for b in trunk.barriers if "residual body" in b.reason]
    # Some residual block holds a gate: its body is a nested trunk, the join still a position.
    joins = [(b, item) for b, item in enumerate(trunk.items) if isinstance(item, Join)]
    assert joins
    nested = [item for b, item in joins
              if any(isinstance(i, Barrier) and i in gates
                     for i in trunk.items[trunk.positions[item.entry].boundary:b])]
    assert nested, "a squeeze-excite gate lies inside a residual body"
    # ... and the chains around the gate are compressible.
    choices = hf_case(name).enumerate()
    assert any(c.kind == "merged" for c in choices)


def test_grouped_convs_merge_with_the_priced_group_count(hf_case) -> None:
    """RegNet's 3x3 convs are grouped (groups = channels / 8): merged exactly, and the deployed conv has the
    group count the latency table priced (block-diagonal composition kept, else densified)."""
    case = hf_case("regnet_y")
    grouped = [layer for layer in case.trunk.layers() if 1 < layer.groups < layer.in_channels]
    assert grouped
    names = {layer.conv for layer in grouped}
    merged = [c for c in case.enumerate() if c.kind == "merged" and c.kept and set(c.kept) & names
              and merge_cost(case.trunk, c) <= MAX_MERGE_COST]
    assert merged
    seen = set()
    for choice in merged[:12]:
        compressed, segments = apply_plan(case.gm, case.trunk, [choice])
        ir.annotate(compressed, (case.x,))
        _, (conv,) = merge_segments(compressed, segments)
        assert conv.args[6] == choice.geometry.groups, choice.label
        seen.add(choice.geometry.groups)
        check_merge(case, [choice])
    assert any(g > 1 for g in seen) and 1 in seen, seen


def test_convnext_mlp_linears_are_segments(hf_case) -> None:
    """ConvNeXt: dw conv -> permute -> LayerNorm -> Linear -> GELU -> Linear -> layer scale -> permute. The
    linears are layers, LayerNorm and the permutes barriers, and removing the GELU merges the MLP into one
    Linear(C -> C) with the layer scale folded in."""
    case = hf_case("convnext")
    linears = [layer for layer in case.trunk.layers() if layer.linear]
    assert linears and all(layer.scale for layer in linears[1::2])
    assert any(b.reason.startswith("layout change: permute") for b in case.trunk.barriers)
    merged = [c for c in case.enumerate() if c.kind == "merged" and c.geometry.linear]
    assert merged and all(c.removed_acts for c in merged)
    choice = merged[0]
    compressed, segments = apply_plan(case.gm, case.trunk, [choice])
    ir.annotate(compressed, (case.x,))
    merged, (layer,) = merge_segments(compressed, segments)
    assert ops.is_linear(layer)
    width = case.trunk.positions[choice.start].shape[-1]
    assert tuple(ir.get_param(merged, layer.args[1]).shape) == (width, width)
    check_merge(case, [choice])


class _PlainNorm(nn.Module):
    """Strided convs separated by GroupNorm: no activation to remove, no conv that keeps its shape."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 16, 3, 2, 1)
        self.na, self.nb = nn.GroupNorm(2, 8), nn.GroupNorm(2, 16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.nb(self.b(self.na(self.a(x))))
        return self.head(x.mean((2, 3)))


def test_nothing_compressible_says_why_with_the_barriers() -> None:
    x = torch.randn(1, 3, 16, 16)
    gm = ir.capture(_PlainNorm(), (x,)).graph_module
    context = PassContext(example_inputs=(x,), latency_probe=object())
    with pytest.raises(ConfigError, match="nothing to compress") as info:
        PassManager(["layermerge:speedup=1.2,importance=zero_shot,recover_steps=0"], context=context).run(gm, (x,))
    assert "group_norm" in str(info.value)


class _OddBody(nn.Module):
    """A residual block whose body ends in an op LayerMerge does not know (cumsum)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        body = torch.cumsum(torch.relu(self.c2(torch.relu(self.c1(x)))), dim=1)
        x = torch.relu(x + body)
        return torch.relu(self.c3(x)).mean((2, 3))


def test_unknown_op_inside_a_body_is_a_named_barrier_and_the_block_stays() -> None:
    x = torch.randn(1, 3, 16, 16)
    gm = ir.capture(_OddBody(), (x,)).graph_module
    trunk = analyze_trunk(gm)
    (barrier,) = [b for b in trunk.barriers if "cumsum" in b.reason]
    assert barrier.nodes == ("cumsum",)
    assert sum(isinstance(i, Join) for i in trunk.items) == 1
    assert len([i for i in trunk.items if isinstance(i, Layer)]) == 4  # stem, c1, c2, c3
    choices = enumerate_choices(trunk)
    assert not any(c.absorbed for c in choices), "a block with a barrier inside cannot be folded into one conv"
    # The chain before the barrier still merges: c1 and c2 across the ReLU between them, inside the body.
    assert any(c.kind == "merged" and len(c.kept) == 2 for c in choices)


def test_merges_beyond_the_kernel_bound_are_counted_with_their_reason(hf_case) -> None:
    trunk = hf_case("resnet_basic").trunk
    rejected: Counter[str] = Counter()
    bounded = enumerate_choices(trunk, max_kernel=3, rejected=rejected)
    assert rejected["merged kernel larger than max_kernel=3"] > 0
    assert all(c.geometry is None or max(c.geometry.kernel) <= 3 for c in bounded)


@pytest.mark.parametrize(("name", "kind"), [("convnext", "linear"), ("mobilenetv2_tf_padding", "pad"),
                                            ("regnet_y", "conv")])
def test_new_layer_kinds_are_priced_as_deployed(hf_case, name: str, kind: str) -> None:
    """The latency table's layer graph of a candidate holds what deployment runs (a linear, an explicit pad
    before a valid conv, a grouped conv) and yields the segment's output shape."""
    case = hf_case(name)
    wanted = {"linear": lambda op: op[0] == "linear", "pad": lambda op: op[0] == "pad",
              "conv": lambda op: op[0] == "conv" and 1 < op[-1] and op[-1] != op[1]}[kind]
    specs = [(c, choice_spec(case.gm, case.trunk, c)) for c in case.enumerate()]
    found = [(c, s) for c, s in specs if s is not None and any(wanted(op) for op in s.ops)]
    assert found, f"no {kind} layer in the table"
    for choice, spec in found[:5]:
        with torch.no_grad():
            out = spec.to_graph()(*spec.example_inputs())
        assert tuple(out.shape) == case.trunk.positions[choice.end].shape, (choice.label, spec.ops)


class _SamePadded(nn.Module):
    """A conv with ``padding="same"`` and an even kernel: torch pads one pixel more at the bottom/right."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 4, padding="same")
        self.c = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x))))))
        return x.mean((2, 3))


def test_even_kernel_same_padding_is_an_asymmetric_layer_that_merges_exactly() -> None:
    x = torch.randn(1, 3, 15, 15)
    model = _SamePadded().eval()
    gm = ir.capture(model, (x,)).graph_module
    case = Case("same", model, gm, x, analyze_trunk(gm), {})
    (even,) = [layer for layer in case.trunk.layers() if layer.kernel == (4, 4)]
    assert (even.padding, even.end_padding) == ((1, 1), (2, 2))
    h = torch.randn(1, 8, 15, 15)
    with torch.no_grad():  # torch's convention, which the folded padding must match
        explicit = nn.functional.conv2d(nn.functional.pad(h, [1, 2, 1, 2]), model.b.weight, model.b.bias)
        torch.testing.assert_close(model.b(h), explicit)
    merged = [c for c in case.enumerate() if c.kind == "merged" and even.conv in c.kept]
    assert merged
    for choice in merged:
        check_merge(case, [choice])


class _ChannelsLastMixer(nn.Module):
    """Conv stem, then residual MLP blocks ``x + fc2(gelu(fc1(x)))`` (no norm) on channels-last maps or on
    (batch, tokens, channels) sequences: a residual block of linears folds into one Linear (I + W2 W1)."""

    def __init__(self, tokens: bool) -> None:
        super().__init__()
        self.tokens = tokens
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.fc3, self.fc4 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x.flatten(2).transpose(1, 2) if self.tokens else x.permute(0, 2, 3, 1)
        x = x + self.fc2(nn.functional.gelu(self.fc1(x)))
        x = torch.relu(x + self.fc4(torch.relu(self.fc3(x))))
        return self.head(x.mean(1) if self.tokens else x.mean((1, 2)))


@pytest.mark.parametrize("tokens", [False, True])
def test_residual_linear_blocks_fold_into_one_linear(tokens: bool) -> None:
    x = torch.randn(1, 3, 16, 16)
    model = _ChannelsLastMixer(tokens).eval()
    gm = ir.capture(model, (x,)).graph_module
    case = Case("mixer", model, gm, x, analyze_trunk(gm), {})
    assert sum(layer.linear for layer in case.trunk.layers()) == 4  # the classifier on a flat vector is not
    absorbed = [c for c in case.enumerate() if c.kind == "merged" and c.absorbed]
    assert absorbed and all(c.geometry.linear for c in absorbed)
    for choice in [c for c in case.enumerate() if c.kind in ("merged", "pruned")]:
        check_merge(case, [choice])
