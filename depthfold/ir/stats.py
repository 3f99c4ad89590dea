"""Size and cost of a graph: compute nodes, parameters, FLOPs and an op histogram."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch.fx import GraphModule, Interpreter
from torch.utils.flop_counter import FlopCounterMode

from .graph import compute_nodes

__all__ = ["graph_stats", "op_histogram"]


def op_histogram(gm: GraphModule) -> dict[str, int]:
    """How many nodes call each op (``"aten.conv2d.default": 20``), sorted by name."""
    counts = Counter(str(n.target) for n in compute_nodes(gm))
    return dict(sorted(counts.items()))


def graph_stats(gm: GraphModule, example_inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """``{"nodes", "params", "flops"}``: compute nodes, parameter elements, FLOPs of one forward on the example
    inputs (through the ``torch.cond`` branches those inputs take)."""
    # Parameters are frozen while counting: the counter's module tracker hooks autograd on inputs that require
    # grad, which fails for parameters handed to torch.cond branches under no_grad.
    trainable = [p for p in gm.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            _TakenBranches(gm).run(*example_inputs)
    finally:
        for p in trainable:
            p.requires_grad_(True)
    return {
        "nodes": len(compute_nodes(gm)),
        "params": sum(p.numel() for p in gm.parameters()),
        "flops": int(counter.get_total_flops()),
    }


class _TakenBranches(Interpreter):
    """Runs a graph calling only the taken branch of each ``torch.cond`` (a FLOP counter would run both, and a
    branch may assert what its predicate guarantees)."""

    def call_function(self, target, args, kwargs):  # type: ignore[no-untyped-def]
        if target is torch.ops.higher_order.cond:
            pred, true_fn, false_fn, operands = args
            branch = true_fn if bool(pred) else false_fn
            return _TakenBranches(branch).run(*operands)
        return super().call_function(target, args, kwargs)
