"""Trunk analysis and candidate enumeration on zoo CNNs and on a CNN the pass has never seen.

Nothing in ``analyze_trunk`` is per-architecture: the expected counts below come from the zoo's source.
"""

from __future__ import annotations

from collections import Counter

import pytest
from torch import nn

from depthfold.errors import ConfigError
from depthfold.passes.layermerge.candidates import enumerate_choices
from depthfold.passes.layermerge.latency_table import choice_spec
from depthfold.passes.layermerge.trunk import Act, Barrier, Join, Layer, Trunk, analyze_trunk
from depthfold.zoo.mobilenetv2 import InvertedResidual
from depthfold.zoo.resnet import BasicBlock, Bottleneck

from .helpers import UNSEEN_CONVS, UNSEEN_JOINS, capture, conv_nodes

# (conv2d layers, residual adds), read off depthfold/zoo/*.py:
# resnet18: stem + 8 BasicBlocks x 2 convs + 3 downsample 1x1 (first block of layers 2-4) = 20; 8 adds.
# resnet34: stem + 16 BasicBlocks x 2 + 3 downsample = 36; 16 adds.
# resnet50: stem + 16 Bottlenecks x 3 + 4 downsample (layer1's first block widens 64 -> 256) = 53; 16 adds.
# mobilenetv2_100/140: stem + 17 InvertedResiduals (the t=1 one has no expand conv: 2 + 16 x 3) + final 1x1
#   = 52; adds where stride 1 and in == out: 1 + 2 + 3 + 2 + 2 = 10 (the same at width 1.4).
# vgg19_bn: 16 convs, no residual adds.
ZOO_EXPECTED = {
    "resnet18": (20, 8),
    "resnet34": (36, 16),
    "resnet50": (53, 16),
    "mobilenetv2_100": (52, 10),
    "mobilenetv2_140": (52, 10),
    "vgg19_bn": (16, 0),
}


def residual_blocks_in(model: nn.Module) -> int:
    """Residual adds the eager model performs (the zoo's own flags, independent of the trunk walk)."""
    return sum(isinstance(m, (BasicBlock, Bottleneck)) or (isinstance(m, InvertedResidual) and m.use_res_connect)
               for m in model.modules())


def convs_by_role(trunk: Trunk) -> Counter[str]:
    """Every conv the trunk mentions: trunk layers, shortcut layers and convs hidden inside barriers."""
    seen: Counter[str] = Counter()
    for item in trunk.items:
        if isinstance(item, Layer):
            seen[item.conv] += 1
        elif isinstance(item, Join):
            seen.update(layer.conv for layer in item.side)
    return seen


@pytest.mark.parametrize("name", sorted(ZOO_EXPECTED))
def test_analyze_trunk_on_zoo_cnns(cnn_case, name: str) -> None:
    case = cnn_case(name)
    trunk = case.trunk
    n_convs, n_joins = ZOO_EXPECTED[name]
    convs = conv_nodes(case.gm)
    assert len(convs) == n_convs
    assert residual_blocks_in(case.model) == n_joins
    assert trunk.num_positions > 0
    seen = convs_by_role(trunk)
    assert sorted(seen) == sorted(convs), "every conv is a trunk layer or a shortcut layer"
    assert set(seen.values()) == {1}, f"convs listed twice: {[c for c, k in seen.items() if k > 1]}"
    joins = [i for i in trunk.items if isinstance(i, Join)]
    assert len(joins) == n_joins
    assert trunk.summary()["residual_joins"] == n_joins
    assert trunk.summary()["convs"] + sum(len(j.side) for j in joins) == n_convs
    for barrier in trunk.barriers:  # pools and the head only: no conv is hidden in a barrier
        assert not any(node.startswith("conv") for node in barrier.nodes), barrier
    # Positions: numbered 0..L, increasing boundaries, each with the shape of its node.
    assert [p.index for p in trunk.positions] == list(range(trunk.num_positions + 1))
    boundaries = [p.boundary for p in trunk.positions]
    assert boundaries == sorted(set(boundaries)) and boundaries[0] == 0 and boundaries[-1] == len(trunk.items)
    assert trunk.positions[0].shape == tuple(case.x.shape)
    for join in joins:
        assert 0 <= join.entry < trunk.num_positions


def test_analyze_trunk_on_an_unseen_cnn(cnn_case) -> None:
    case = cnn_case("unseen")
    trunk = case.trunk
    items = trunk.items
    convs = conv_nodes(case.gm)
    assert len(convs) == UNSEEN_CONVS
    joins = [i for i in items if isinstance(i, Join)]
    assert len(joins) == UNSEEN_JOINS
    projection, depthwise_block = joins
    assert [(s.kernel, s.stride) for s in projection.side] == [((1, 1), (2, 2))], "1x1 stride-2 projection"
    assert depthwise_block.side == (), "identity shortcut"
    layers = [i for i in items if isinstance(i, Layer)]
    assert any(layer.depthwise for layer in layers)
    assert {type(i).__name__ for i in items} == {"Layer", "Act", "Join", "Barrier"}
    nodes = {n.name: n for n in case.gm.graph.nodes}
    act_ops = {nodes[i.node].target.__name__ for i in items if isinstance(i, Act)}
    assert {"silu.default", "hardswish.default", "gelu.default", "relu.default"} <= act_ops

    # The concat fork is one barrier holding both branches (and their convs), with a reason.
    (fork,) = [b for b in trunk.barriers if "cat" in b.nodes]
    assert "cat" in fork.reason and "residual" in fork.reason
    assert fork in items
    # Every conv exactly once: trunk layer, shortcut layer, or inside the concat barrier.
    seen = convs_by_role(trunk)
    seen.update(n for b in trunk.barriers for n in b.nodes if n in convs)
    assert sorted(seen) == sorted(convs) and set(seen.values()) == {1}
    summary = trunk.summary()
    assert {"nodes": list(fork.nodes), "reason": fork.reason} in summary["barriers"]
    # Pool, flatten and linear head are barriers too; positions surround every barrier.
    barrier_items = [i for i, item in enumerate(items) if isinstance(item, Barrier)]
    boundaries = {p.boundary for p in trunk.positions}
    for i in barrier_items:
        assert i in boundaries and i + 1 in boundaries


def test_analyze_trunk_without_convs_is_a_config_error() -> None:
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10))
    gm, _ = capture(mlp, 8)
    with pytest.raises(ConfigError, match="nothing to merge"):
        analyze_trunk(gm)


def test_convs_only_inside_a_fork_means_nothing_to_merge() -> None:
    class ForkOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):  # type: ignore[no-untyped-def]
            return nn.functional.adaptive_avg_pool2d(nn.functional.relu(self.a(x)) * self.b(x), 1)

    gm, _ = capture(ForkOnly(), 8)
    with pytest.raises(ConfigError, match="no 2-D convolution"):
        analyze_trunk(gm)


# ------------------------------------------------------------------------------------------ candidates

ENUMERATED = ["unseen", "resnet18", "mobilenetv2_100", "vgg19_bn"]


def check_choices(trunk: Trunk, choices) -> None:  # type: ignore[no-untyped-def]
    L = trunk.num_positions
    for c in choices:
        assert 0 <= c.start < c.end <= L, c
    for s in range(L):
        singles = [c for c in choices if (c.start, c.end) == (s, s + 1) and c.kind in ("original", "barrier")]
        assert len(singles) == 1, f"position {s}: {singles}"


@pytest.mark.parametrize("name", ENUMERATED)
def test_enumerate_choices_modes(cnn_case, name: str) -> None:
    case = cnn_case(name)
    trunk = case.trunk
    layermerge = case.enumerate("layermerge")
    check_choices(trunk, layermerge)
    assert any(c.kind == "merged" for c in layermerge)
    assert any(c.pruned for c in layermerge)
    for c in layermerge:
        assert c.end - c.start <= 8
        if c.kind == "merged":
            assert c.geometry is not None and max(c.geometry.kernel) <= 9
            assert c.geometry.in_shape == trunk.positions[c.start].shape
            assert c.geometry.out_shape == trunk.positions[c.end].shape
        if c.kind == "barrier":
            assert len(trunk.between(c.start, c.end)) == 1

    depth = case.enumerate("depth")
    check_choices(trunk, depth)
    assert all(not c.pruned for c in depth), "depth mode never prunes a conv"
    assert any(c.removed_acts for c in depth)

    layer = case.enumerate("layer")
    check_choices(trunk, layer)
    assert all(not c.removed_acts for c in layer), "layer mode keeps every activation"
    assert any(c.pruned for c in layer)


# ------------------------------------------------------------------------------- found by the fuzzer


class _Residual(nn.Module):
    def __init__(self, *body: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*body)

    def forward(self, x):  # type: ignore[no-untyped-def]
        return x + self.body(x)


def test_a_residual_nested_in_a_residual_body_keeps_its_own_shortcut_position() -> None:
    """The inner block forks after the outer body's first conv: its add reads that position (8 channels), not
    the outer block's entry (4 channels)."""
    inner = _Residual(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
    outer = _Residual(nn.Conv2d(4, 8, 1), nn.ReLU(), inner, nn.ReLU(), nn.Conv2d(8, 4, 1))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), outer, nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    gm, _ = capture(model, 8)
    trunk = analyze_trunk(gm)
    joins = [i for i in trunk.items if isinstance(i, Join)]
    assert len(joins) == 2
    for join in joins:
        node = next(n for n in gm.graph.nodes if n.name == join.node)
        shortcut = node.args[1 - join.body_arg]
        assert trunk.positions[join.entry].node == shortcut.name, join
    check_choices(trunk, enumerate_choices(trunk))


def test_a_residual_block_without_activation_inside_has_an_original_candidate() -> None:
    """``x + dwconv(x)`` lies inside one position, its add included: that position still has its original."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), _Residual(nn.Conv2d(6, 6, 3, padding=1, groups=6)),
                          nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    gm, _ = capture(model, 8)
    trunk = analyze_trunk(gm)
    choices = enumerate_choices(trunk)
    check_choices(trunk, choices)
    (original,) = [c for c in choices if c.kind == "original" and any(isinstance(i, Join) for i in
                                                                      trunk.between(c.start, c.end))]
    spec = choice_spec(gm, trunk, original)
    assert [op[0] for op in spec.ops] == ["conv", "add"]  # timed with its add
