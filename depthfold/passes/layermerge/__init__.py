"""LayerMerge: depth compression by pruning and merging layers, chosen under a latency budget.

Source: "LayerMerge: Neural Network Depth Compression through Layer Pruning and Merging" (Kim et al.,
ICML 2024, arXiv:2406.12837), building on "Efficient Latency-Aware CNN Depth Compression via Two-Stage
Dynamic Programming" (Kim et al., ICML 2023).

This package currently holds the planning step only: :func:`solve_plan` picks, for each segment between
two non-linearities of the trunk, one replacement (merged layer, pruned layers, or the original) so that
total importance is maximal and total latency fits a budget. See :mod:`.solver` for the recurrence and
the discretisation rule. The graph pass that measures candidates and applies the plan comes later.
"""

from __future__ import annotations

from .solver import Candidate, InfeasibleBudgetError, Plan, solve_plan

__all__ = ["Candidate", "InfeasibleBudgetError", "Plan", "solve_plan"]
