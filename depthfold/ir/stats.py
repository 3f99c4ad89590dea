"""Size and cost of a graph: compute nodes, parameters, FLOPs and an op histogram."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch.fx import GraphModule
from torch.utils.flop_counter import FlopCounterMode

from .graph import compute_nodes

__all__ = ["graph_stats", "op_histogram"]


def op_histogram(gm: GraphModule) -> dict[str, int]:
    """How many nodes call each op (``"aten.conv2d.default": 20``), sorted by name."""
    counts = Counter(str(n.target) for n in compute_nodes(gm))
    return dict(sorted(counts.items()))


def graph_stats(gm: GraphModule, example_inputs: Sequence[torch.Tensor]) -> dict[str, int]:
    """``{"nodes", "params", "flops"}``: compute nodes, parameter elements, FLOPs of one forward."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        gm(*example_inputs)
    return {
        "nodes": len(compute_nodes(gm)),
        "params": sum(p.numel() for p in gm.parameters()),
        "flops": int(counter.get_total_flops()),
    }
