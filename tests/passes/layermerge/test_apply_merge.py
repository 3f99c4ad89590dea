"""apply_plan builds the compressed network for any valid plan; merge_segments turns each of its re-padded
segments into one conv without changing the outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthfold import ir
from depthfold.ir import ops
from depthfold.passes.layermerge.apply import META_SEGMENT, apply_plan, merge_segments

from .helpers import merge_cost, random_plan

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
        before = [gm(b) for b in batches]
    compressed, segments = apply_plan(gm, trunk, plan, share_params=share_params)
    assert compressed is not gm
    with torch.no_grad():
        after = [gm(b) for b in batches]
    assert gm.code == code, "apply_plan edited the input graph"
    for a, b in zip(before, after):
        assert torch.equal(a, b), "apply_plan changed the input graph's outputs"

    assert len(segments) == sum(c.kind == "merged" for c in plan)
    ir.annotate(compressed, (x,))
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


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["unseen", "resnet18", "mobilenetv2_100", "vgg19_bn"])
def test_random_plans_merge_exactly(cnn_case, name: str, seed: int) -> None:
    case = cnn_case(name)
    plan = random_plan(case.trunk, case.enumerate(), seed, max_cost=MAX_MERGE_COST)
    assert plan[0].start == 0 and plan[-1].end == case.trunk.num_positions
    assert all(a.end == b.start for a, b in zip(plan, plan[1:]))
    # vgg19_bn holds 140 M parameters (its 4096-wide head): share them instead of copying 560 MB per plan.
    check_merge(case, plan, share_params=name == "vgg19_bn")


def fill(trunk, choices, chosen):  # type: ignore[no-untyped-def]
    """``chosen`` (in order, non-overlapping) completed to a tiling with single-position originals."""
    singles = {c.start: c for c in choices if c.end == c.start + 1 and c.kind in ("original", "barrier")}
    plan, position = [], 0
    for choice in [*chosen, None]:
        stop = trunk.num_positions if choice is None else choice.start
        while position < stop:
            plan.append(singles[position])
            position += 1
        if choice is not None:
            plan.append(choice)
            position = choice.end
    return plan


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100"])
def test_chained_merged_segments(cnn_case, name: str) -> None:
    """A merged segment whose input is the previous merged segment's output (both become convs)."""
    case = cnn_case(name)
    merged = [c for c in case.enumerate() if c.kind == "merged" and c.kept
              and merge_cost(case.trunk, c) <= MAX_MERGE_COST]
    pairs = [(a, b) for a in merged for b in merged if a.end == b.start]
    assert pairs
    plan = fill(case.trunk, case.enumerate(), list(pairs[0]))
    check_merge(case, plan)


def test_every_candidate_of_the_unseen_cnn_merges_exactly(cnn_case) -> None:
    """Each non-trivial candidate alone (the rest of the network as it is)."""
    case = cnn_case("unseen")
    choices = [c for c in case.enumerate() if c.kind in ("merged", "pruned")]
    assert any(c.absorbed for c in choices), "some candidate folds a residual block into one conv"
    for choice in choices:
        check_merge(case, [choice])


@pytest.mark.parametrize("name", ["unseen", "resnet18"])
def test_compressed_network_is_trainable(cnn_case, name: str) -> None:
    case = cnn_case(name)
    plan = random_plan(case.trunk, case.enumerate(), 0, max_cost=MAX_MERGE_COST)
    if not any(c.kind == "merged" for c in plan):
        plan = random_plan(case.trunk, case.enumerate(), 1, max_cost=MAX_MERGE_COST)
    compressed, _ = apply_plan(case.gm, case.trunk, plan)
    params = dict(compressed.named_parameters())
    assert params
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in params.values())
    gm_params = list(case.gm.parameters())
    assert not any(p is q for p in params.values() for q in gm_params), "apply_plan copies the parameters"
    compressed.train()
    out = compressed(torch.randn((4, *case.x.shape[1:]), generator=torch.Generator().manual_seed(0)))
    loss = out.square().mean()
    loss.backward()
    conv_weights = {str(n.args[1].target) for n in compressed.graph.nodes if ops.is_conv(n)}
    for name_, p in params.items():
        if name_ in conv_weights:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name_
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    # One optimiser step changes the outputs (the network really trains) and leaves the original alone.
    with torch.no_grad():
        reference = case.gm(case.x)
        before = compressed(case.x)
    torch.optim.SGD(compressed.parameters(), lr=1e-2).step()
    with torch.no_grad():
        assert not torch.equal(compressed(case.x), before)
        assert torch.equal(case.gm(case.x), reference)


def test_shared_params_network_returns_what_the_original_returns(cnn_case) -> None:
    case = cnn_case("unseen")
    plan = random_plan(case.trunk, case.enumerate(), 0)
    shared, _ = apply_plan(case.gm, case.trunk, plan, share_params=True)
    copied, _ = apply_plan(case.gm, case.trunk, plan)
    with torch.no_grad():
        assert type(copied(case.x)) is type(case.gm(case.x))
        assert type(shared(case.x)) is type(case.gm(case.x))
