"""apply_plan builds the compressed network for any valid plan; merge_segments turns each of its re-padded
segments into one conv without changing the outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthfold.ir import ops
from depthfold.passes.layermerge.apply import apply_plan

from .helpers import MAX_MERGE_COST, check_merge, merge_cost, random_plan

aten = torch.ops.aten

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
