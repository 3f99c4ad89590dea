"""Shared pieces of the LayerMerge tests: a CNN the pass has never seen, captures and random plans."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from depthfold import ir
from depthfold.ir import ops
from depthfold.passes.layermerge.apply import META_SEGMENT, apply_plan, merge_segments
from depthfold.passes.layermerge.candidates import SegmentChoice
from depthfold.passes.layermerge.trunk import Join, Layer, Trunk


def conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout))


class UnseenCNN(nn.Module):
    """A CNN with no zoo counterpart: SiLU stem, a strided residual block with a 1x1 projection
    shortcut, a depthwise-separable residual block with hardswish, a non-residual fork (two branches
    concatenated), a GELU conv, then global pool + linear head."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        w = width
        self.stem = conv_bn(3, w, 3)
        self.stem_act = nn.SiLU()
        self.b1_conv1 = conv_bn(w, 2 * w, 3, stride=2)
        self.b1_act1 = nn.ReLU()
        self.b1_conv2 = conv_bn(2 * w, 2 * w, 3)
        self.b1_proj = conv_bn(w, 2 * w, 1, stride=2)
        self.b1_act2 = nn.ReLU()
        self.dw = conv_bn(2 * w, 2 * w, 3, groups=2 * w)
        self.dw_act = nn.Hardswish()
        self.pw = conv_bn(2 * w, 2 * w, 1)
        self.pw_act = nn.Hardswish()
        self.branch_a = nn.Conv2d(2 * w, w, 1)
        self.branch_b = nn.Conv2d(2 * w, w, 3, padding=1)
        self.after_cat = conv_bn(2 * w, 2 * w, 3)
        self.after_act = nn.GELU()
        self.head = nn.Linear(2 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem(x))
        x = self.b1_act2(self.b1_conv2(self.b1_act1(self.b1_conv1(x))) + self.b1_proj(x))
        x = self.pw_act(x + self.pw(self.dw_act(self.dw(x))))
        x = torch.cat([torch.relu(self.branch_a(x)), torch.relu(self.branch_b(x))], dim=1)
        x = self.after_act(self.after_cat(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


UNSEEN_CONVS = 9
"""Conv2d layers of UnseenCNN: stem, b1_conv1, b1_conv2, b1_proj, dw, pw, branch_a, branch_b, after_cat."""
UNSEEN_JOINS = 2


def capture(model: nn.Module, resolution: int, *, seed: int = 0) -> tuple[GraphModule, torch.Tensor]:
    x = torch.randn(1, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed))
    return ir.capture(model, (x,)).graph_module, x


def conv_nodes(gm: GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if ops.is_conv(n)]


def merge_cost(trunk: Trunk, choice: SegmentChoice) -> float:
    """Rough multiply-adds ``merge_segments`` spends composing this choice's convs (dense float64)."""
    if choice.kind != "merged":
        return 0.0
    kept = set(choice.kept)
    cin = int(trunk.positions[choice.start].shape[1])
    cost, channels, kernel, stride = 0.0, cin, 1, 1
    for item in trunk.between(choice.start, choice.end):
        layers = [item] if isinstance(item, Layer) and item.conv in kept else []
        if isinstance(item, Join) and item.entry >= choice.start:
            layers = list(item.side)
        for layer in layers:
            kernel += stride * (layer.kernel[0] - 1)
            stride *= layer.stride[0]
            cost += cin * layer.out_channels * channels * layer.kernel[0] ** 2 * kernel ** 2
            channels = layer.out_channels
    return cost


def random_plan(trunk: Trunk, choices: Sequence[SegmentChoice], seed: int, *, max_cost: float = math.inf
                ) -> list[SegmentChoice]:
    """A random tiling of ``[0, L]``: from position 0, repeatedly a random choice starting there.

    Choices whose merge would cost more than ``max_cost`` multiply-adds are left out (the original
    layers of every single-position segment always remain, so a tiling always exists)."""
    by_start: dict[int, list[SegmentChoice]] = {}
    for c in choices:
        if merge_cost(trunk, c) <= max_cost:
            by_start.setdefault(c.start, []).append(c)
    rng = random.Random(seed)
    plan, position = [], 0
    while position < trunk.num_positions:
        choice = rng.choice(by_start[position])
        plan.append(choice)
        position = choice.end
    return plan


aten = torch.ops.aten

MAX_MERGE_COST = 1e9
"""Random plans leave out merges that cost merge_segments more than this (dense float64 kernel
composition: a 7x7 merge of three 512-channel convs costs ~1e11 multiply-adds, tens of seconds)."""

REL_TOL = 1e-4


def conv_count(gm: torch.fx.GraphModule) -> int:
    return sum(ops.is_conv(n) for n in gm.graph.nodes)


def random_batches(x: torch.Tensor, count: int = 2) -> list[torch.Tensor]:
    return [torch.randn((2, *x.shape[1:]), generator=torch.Generator().manual_seed(100 + i)) for i in range(count)]


def check_merge(case, plan, *, share_params: bool = False) -> None:  # type: ignore[no-untyped-def]
    gm, trunk, x = case.gm, case.trunk, case.x
    batches = random_batches(x)
    code = gm.code
    with torch.no_grad():
        before = [ir.flatten_outputs(gm(b))[0] for b in batches]
    compressed, segments = apply_plan(gm, trunk, plan, share_params=share_params)
    assert compressed is not gm
    with torch.no_grad():
        after = [ir.flatten_outputs(gm(b))[0] for b in batches]
    assert gm.code == code, "apply_plan edited the input graph"
    for a, b in zip(before, after):
        assert torch.equal(a, b), "apply_plan changed the input graph's outputs"

    assert len(segments) == sum(c.kind == "merged" for c in plan)
    ir.annotate(compressed, (x,))
    # Every segment boundary of the compressed network has the original's shape.
    values = {n.name: n for n in compressed.graph.nodes}
    outputs = iter(seg.output for seg in segments)
    for choice in plan:
        name = next(outputs) if choice.kind == "merged" else trunk.positions[choice.end].node
        if name in values:
            assert ir.shape_of(values[name]) == trunk.positions[choice.end].shape, (choice, name)
    merged, merged_convs = merge_segments(compressed, segments)
    assert len(merged_convs) == len(segments)
    nodes = {n.name: n for n in compressed.graph.nodes}
    for seg, conv in zip(segments, merged_convs):
        if conv is None:  # the identity: every conv pruned, no residual add folded in
            assert not any(ops.is_conv(nodes[n]) or ops.is_residual_add(nodes[n]) for n in seg.nodes), seg
    residue = [n.name for n in merged.graph.nodes
               if META_SEGMENT in n.meta and n.target in (aten.constant_pad_nd.default, aten.slice.Tensor)]
    assert not residue, f"re-padding nodes left after the merge: {residue}"
    with torch.no_grad():
        for batch, reference in zip(batches, before):
            (want,) = ir.flatten_outputs(compressed(batch))
            (got,) = ir.flatten_outputs(merged(batch))
            assert got.shape == want.shape == reference.shape
            scale = float(want.abs().max())
            error = float((got - want).abs().max())
            assert error <= REL_TOL * scale, f"merge error {error:.3g} vs output scale {scale:.3g}"
    # A merged segment becomes at most one conv. The exception: a residual block whose body convs are all
    # pruned (identity shortcut) is ``x + x`` in the compressed network, no conv, and merge_segments emits a
    # 1x1 depthwise conv (weight 2) for it, as the latency table priced it.
    conv_free = sum(not any(ops.is_conv(nodes[name]) for name in seg.nodes) for seg in segments)
    assert conv_count(merged) <= conv_count(compressed) + conv_free
    if not conv_free:
        assert conv_count(merged) <= conv_count(compressed)
    if not any(c.kind in ("merged", "pruned") for c in plan):
        assert conv_count(compressed) == conv_count(gm)
