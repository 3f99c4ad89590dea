"""LayerMerge: depth compression by pruning and merging layers, chosen under a latency budget.

Source: "LayerMerge: Neural Network Depth Compression through Layer Pruning and Merging" (Kim et al.,
ICML 2024, arXiv:2406.12837), building on "Efficient Latency-Aware CNN Depth Compression via Two-Stage
Dynamic Programming" (Kim et al., ICML 2023).

The pass ``layermerge`` (:mod:`.compress`) analyses the trunk (:mod:`.trunk`), enumerates each segment's
candidates (:mod:`.candidates`), measures latency (:mod:`.latency_table`) and importance
(:mod:`.importance`) tables, picks the plan with the DP (:func:`solve_plan`, :mod:`.solver`), applies it
(:mod:`.apply`), recovers accuracy (:func:`depthfold.recover`) and merges each segment into one conv.
"""

from __future__ import annotations

from .compress import LayerMergeConfig, layermerge
from .solver import Candidate, InfeasibleBudgetError, Plan, solve_plan

__all__ = ["Candidate", "InfeasibleBudgetError", "LayerMergeConfig", "Plan", "layermerge", "solve_plan"]
