"""Measured replanning: solve a plan under a latency budget, time the planned network on the real backend,
and re-solve with a corrected budget until the measured latency meets the target.

Tables of layers timed alone miss effects of the whole network (which weights stay cached, per-node dispatch
on tiny layers), so a plan's predicted latency can be off by tens of percent; measuring the planned network
and correcting the budget closes that gap on the user's backend. Any pass that plans under a latency budget
(``layermerge``, layer dropping, block collapse) gives :func:`plan_with_feedback` its solver and its
measurement.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ...errors import InfeasibleBudgetError

__all__ = ["Replanned", "next_budget", "plan_with_feedback"]

PlanT = TypeVar("PlanT")


@dataclass
class Replanned(Generic[PlanT]):
    """The plan chosen and every attempt (``budget_ms``, ``predicted_ms``, ``measured_ms``, ``score``)."""

    plan: PlanT
    attempts: list[dict[str, Any]]


def plan_with_feedback(solve: Callable[[float], PlanT], measure: Callable[[PlanT], float], *, budget: float,
                       target_ms: float, tolerance: float, rounds: int, predicted_ms: Callable[[PlanT], float],
                       score: Callable[[PlanT], float], identity: Callable[[PlanT], Any] = lambda p: p
                       ) -> Replanned[PlanT]:
    """Solve at ``budget``, then up to ``rounds`` times: measure the plan, stop if it is within ``tolerance``
    (relative) of ``target_ms``, else re-solve at the next budget (:func:`next_budget`).

    ``solve(budget)`` returns a plan or raises :class:`~depthfold.errors.InfeasibleBudgetError` (which the
    first solve passes on: the target cannot be met); ``measure(plan)`` is its latency on the backend in ms;
    ``identity(plan)`` is what makes two plans the same (a repeated plan ends the search). Returns the highest-``score`` measured plan
    within tolerance of the target, else the fastest measured one (with ``rounds=0``: the first solve's).
    """
    plan = solve(budget)
    attempts: list[dict[str, Any]] = []
    measured: list[tuple[PlanT, float]] = []
    points: list[tuple[float, float]] = []  # (budget, measured latency) of each measured plan
    for _ in range(rounds):
        ms = measure(plan)
        attempts.append({"budget_ms": budget, "predicted_ms": predicted_ms(plan), "measured_ms": ms,
                         "score": score(plan)})
        measured.append((plan, ms))
        points.append((budget, ms))
        if abs(ms / target_ms - 1.0) <= tolerance:
            break
        budget = next_budget(points, target_ms)
        try:
            plan = solve(budget)
        except InfeasibleBudgetError:
            break
        if any(identity(p) == identity(plan) for p, _ in measured):
            break
    if not measured:
        return Replanned(plan, attempts)
    within = [(p, ms) for p, ms in measured if ms <= target_ms * (1.0 + tolerance)]
    best = max(within, key=lambda pm: score(pm[0]))[0] if within else min(measured, key=lambda pm: pm[1])[0]
    return Replanned(best, attempts)


def next_budget(points: list[tuple[float, float]], target_ms: float) -> float:
    """The budget to try next: interpolated between the closest plans measured faster and slower than the
    target when there are both, else the last budget shifted by the last plan's measured error."""
    fast = [p for p in points if p[1] < target_ms]
    slow = [p for p in points if p[1] > target_ms]
    if fast and slow:
        (b0, m0), (b1, m1) = max(fast, key=lambda p: p[1]), min(slow, key=lambda p: p[1])
        if m1 > m0:
            return b0 + (target_ms - m0) * (b1 - b0) / (m1 - m0)
    budget, measured = points[-1]
    return budget + target_ms - measured
