"""Latency-constrained dynamic programme that picks one replacement per segment of a network trunk.

Source: "LayerMerge: Neural Network Depth Compression through Layer Pruning and Merging" (Kim et al.,
ICML 2024, arXiv:2406.12837), which extends the first stage of "Efficient Latency-Aware CNN Depth
Compression via Two-Stage Dynamic Programming" (Kim et al., ICML 2023).

Problem. Positions ``0..L`` are the non-linearities along the trunk. A candidate ``c`` replaces the
segment ``(s_c, e_c]`` (merged convolution, pruned layers, or the original layers) and has a latency
``t_c >= 0`` and an importance ``I_c``. A plan is a sequence of candidates whose segments tile ``[0, L]``
in order. We want::

    maximise  sum_c I_c   subject to  sum_c t_c <= T   (T = budget)

Discretisation. With a resolution ``r`` every latency becomes a whole number of steps, rounded **up**,
and the budget a whole number of steps, rounded **down**::

    k_c = ceil(t_c / r)          B = floor(T / r)

Rounding this way is conservative: ``sum t_c <= r * sum k_c <= r * B <= T``, so any plan the DP accepts
also meets the true budget. (The reference implementation truncates latencies instead, ``k_c =
floor(t_c / r)``, which lets its plans run over the budget; it reports ~3%.) A quotient within 1e-9
(relative) of a whole number counts as that number, so float noise such as ``0.6 / 0.3 =
2.0000000000000004`` does not cost a step (the budget's steps are never snapped above ``T``); this guard
on latencies is the only way a returned plan can exceed ``T``, and then by at most ~1e-9 relative. ``resolution=None`` uses ``r = T / 5000`` (``B = 5000`` steps), which
costs at most one step per chosen candidate, i.e. about ``n_chosen / 5000`` of the budget. With integer
latencies and ``r = 1`` the answer is exactly optimal.

Recurrence. ``D[e, b]`` is the best importance of a tiling of ``[0, e]`` that uses **at most** ``b``
steps (``-inf`` if none exists), for ``e = 0..L`` and ``b = 0..B``::

    D[0, b] = 0                                                for all b
    D[e, b] = max_{c : e_c = e, k_c <= b}  D[s_c, b - k_c] + I_c

Because ``D[0, .]`` is constant, every row is non-decreasing in ``b``, and ``D[L, B]`` is the optimum
over all plans within budget. Ties in importance are broken towards lower *true* latency: a second
table ``Lat[e, b]`` holds the true latency of the plan behind ``D[e, b]`` and the DP maximises the pair
``(D, -Lat)`` lexicographically. Adding one candidate adds the same vector to every plan ending at
``s_c``, so the lexicographic order has optimal substructure and the recurrence stays exact. Importance
differences below ``1e-12 * L * max|I_c|`` (summation noise) count as ties. A back-pointer table
``P[e, b]`` (index of the winning candidate) lets us walk back from ``(L, B)``: ``c = P[e, b]``,
``b -= k_c``, ``e = s_c``.

Vectorisation. Row ``e`` depends only on candidates ending at ``e``; each contributes its source row
shifted right by ``k_c`` (``-inf`` in the first ``k_c`` slots) plus ``I_c``. Those rows are stacked
and reduced over the whole budget axis at once with NumPy (max, then arg-min latency among the rows
within the tie tolerance); no Python loop runs over budget steps. Cost: ``O(n_candidates * B)`` time
and ``O(L * B)`` memory (two float64 tables and one int32 table).

Feasibility is checked on true latencies first: the minimum-latency tiling (a shortest path over
positions, computed without discretisation) tells the user the smallest budget that can work.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ...errors import ConfigError, DepthfoldError, InfeasibleBudgetError

__all__ = ["Candidate", "Plan", "solve_plan", "fastest_latency", "InfeasibleBudgetError", "DEFAULT_STEPS"]

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 5000
"""``resolution=None`` uses ``budget / DEFAULT_STEPS``: at most one step (0.02% of the budget) is lost per
chosen candidate, and a 60-position, 1,000-candidate table still solves in tens of milliseconds."""

_SNAP_RTOL = 1e-9
"""A latency / resolution quotient this close (relative) to a whole number counts as that number."""

_TIE_RTOL = 1e-12
"""Importance sums closer than ``_TIE_RTOL * L * max|importance|`` are ties (then lower latency wins)."""

_MAX_CELLS = 50_000_000
"""Largest DP table (positions x budget steps) we allocate: ~1 GB across the three tables."""


@dataclass(frozen=True)
class Candidate:
    """One possible replacement of the trunk segment ``(start, end]``.

    Attributes:
        start: Position (non-linearity index) where the segment begins, exclusive.
        end: Position where the segment ends, inclusive; ``start < end``.
        latency: Measured latency of this replacement (any unit, e.g. ms), finite and ``>= 0``.
        importance: Score to maximise (e.g. negative accuracy drop), finite; plans sum it.
        choice: Opaque payload for the caller (kernel size, which layers are kept, ...).
    """

    start: int
    end: int
    latency: float
    importance: float
    choice: object = None


@dataclass(frozen=True)
class Plan:
    """The chosen tiling of ``[0, L]``.

    Attributes:
        chosen: Candidates in trunk order; their segments tile ``[0, L]``.
        importance: Sum of the chosen candidates' importances.
        latency: Sum of the chosen candidates' true (undiscretised) latencies.
        resolution: Latency step the DP used.
        budget: The latency budget the plan was solved for.
    """

    chosen: tuple[Candidate, ...]
    importance: float
    latency: float
    resolution: float
    budget: float


def solve_plan(
    candidates: Sequence[Candidate],
    num_positions: int,
    budget: float,
    resolution: float | None = None,
) -> Plan:
    """Return the most important plan whose latency fits ``budget``.

    Among plans of equal importance the one with the lowest true latency is returned; remaining ties go
    to the candidate listed first. The result is deterministic.

    Args:
        candidates: Candidate replacements; several may share a segment.
        num_positions: ``L``; positions run ``0..L`` and plans tile ``[0, L]``. At least 1.
        budget: Latency budget, same unit as ``Candidate.latency``; finite and ``> 0``.
        resolution: Latency step of the DP. Latencies are rounded up and the budget down to whole steps,
            so the plan never exceeds ``budget``. ``None`` uses ``budget / 5000`` (5,000 steps).

    Returns:
        The optimal :class:`Plan` (optimal exactly for latencies that are multiples of ``resolution``).

    Raises:
        ConfigError: An argument or candidate is malformed, the table would be too large, or no sequence
            of candidates tiles ``[0, L]`` at all.
        InfeasibleBudgetError: The budget is below the smallest achievable latency, or only becomes
            infeasible after rounding latencies up at this ``resolution``.
    """
    started = time.perf_counter()
    num_positions = _check_positions(num_positions)
    budget = _check_positive("budget", budget)
    if resolution is None:
        resolution = budget / DEFAULT_STEPS
    else:
        resolution = _check_positive("resolution", resolution)
    cands = list(candidates)
    starts, ends, lats, imps = _check_candidates(cands, num_positions)

    min_latency = _min_latency(starts, ends, lats, num_positions)
    if budget < min_latency:
        raise InfeasibleBudgetError(
            f"budget {budget:.6g} is below the smallest achievable latency {min_latency:.6g}; "
            "raise the budget or allow more candidates",
            min_latency=min_latency,
            budget=budget,
        )

    steps = _floor_steps(budget / resolution)
    if steps * resolution > budget:  # the snap must never let the steps cover more than the budget
        steps -= 1
    if (num_positions + 1) * (steps + 1) > _MAX_CELLS:
        raise ConfigError(
            f"resolution {resolution:.6g} gives {steps} budget steps x {num_positions + 1} positions, "
            f"more than {_MAX_CELLS:,} DP cells; pass a coarser resolution (e.g. budget / {DEFAULT_STEPS})"
        )
    costs = _ceil_steps_array(lats / resolution, cap=steps + 1)

    best_imp, best_lat, pointer = _fill_tables(starts, ends, costs, lats, imps, num_positions, steps)
    if not np.isfinite(best_imp[num_positions, steps]):
        min_steps = _min_steps(starts, ends, costs, num_positions)
        raise InfeasibleBudgetError(
            f"budget {budget:.6g} admits a plan in true latency (smallest achievable {min_latency:.6g}), "
            f"but not after rounding each latency up to a multiple of resolution {resolution:.6g}: the "
            f"fastest rounded plan needs {min_steps} steps, the budget allows {steps}; pass a finer "
            f"resolution (e.g. {resolution / 10:.3g}) or raise the budget",
            min_latency=min_latency,
            budget=budget,
        )

    chosen = _backtrack(pointer, starts, costs, num_positions, steps)
    plan = Plan(
        chosen=tuple(cands[i] for i in chosen),
        importance=math.fsum(cands[i].importance for i in chosen),
        latency=math.fsum(cands[i].latency for i in chosen),
        resolution=resolution,
        budget=budget,
    )
    logger.debug(
        "solve_plan: %d positions, %d candidates, %d steps -> %d chosen, importance %.6g, "
        "latency %.6g / %.6g, %.3f s",
        num_positions, len(cands), steps, len(chosen), plan.importance, plan.latency, budget,
        time.perf_counter() - started,
    )
    return plan


def _fill_tables(
    starts: np.ndarray,
    ends: np.ndarray,
    costs: np.ndarray,
    lats: np.ndarray,
    imps: np.ndarray,
    num_positions: int,
    steps: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fill ``D`` (importance), ``Lat`` (true latency) and ``P`` (back-pointer) row by row."""
    width = steps + 1
    best_imp = np.full((num_positions + 1, width), -np.inf)
    best_lat = np.full((num_positions + 1, width), np.inf)
    pointer = np.full((num_positions + 1, width), -1, dtype=np.int32)
    best_imp[0] = 0.0
    best_lat[0] = 0.0
    max_abs = float(np.max(np.abs(imps))) if imps.size else 0.0
    tie_tol = _TIE_RTOL * num_positions * max_abs

    usable = costs <= steps  # a candidate dearer than the whole budget can never be chosen
    by_end: list[list[int]] = [[] for _ in range(num_positions + 1)]
    for index in np.flatnonzero(usable):  # input order, so equal plans resolve to the first listed
        by_end[int(ends[index])].append(int(index))
    group = max((len(g) for g in by_end), default=0)
    stack_imp = np.empty((max(group, 1), width))
    stack_lat = np.empty((max(group, 1), width))
    columns = np.arange(width)

    for end in range(1, num_positions + 1):
        members = by_end[end]
        if not members:
            continue
        rows = len(members)
        cand_imp = stack_imp[:rows]
        cand_lat = stack_lat[:rows]
        for row, index in enumerate(members):
            shift, source = int(costs[index]), int(starts[index])
            cand_imp[row, :shift] = -np.inf
            cand_lat[row, :shift] = np.inf
            np.add(best_imp[source, : width - shift], imps[index], out=cand_imp[row, shift:])
            np.add(best_lat[source, : width - shift], lats[index], out=cand_lat[row, shift:])
        top = cand_imp.max(axis=0)
        # Among rows within the tie tolerance of the best importance, take the lowest true latency;
        # argmin returns the first such row, i.e. the candidate listed first. Rows outside the tolerance
        # get latency inf in place: they can never win, so their latency is not needed afterwards.
        np.copyto(cand_lat, np.inf, where=cand_imp < top - tie_tol)
        winner = cand_lat.argmin(axis=0)
        flat = winner * width + columns
        best_imp[end] = cand_imp.ravel().take(flat)
        best_lat[end] = cand_lat.ravel().take(flat)
        pointer[end] = np.where(np.isfinite(top), np.asarray(members, dtype=np.int32)[winner], -1)
    return best_imp, best_lat, pointer


def _backtrack(
    pointer: np.ndarray, starts: np.ndarray, costs: np.ndarray, num_positions: int, steps: int
) -> list[int]:
    """Walk the back-pointers from ``(L, B)`` to position 0; return candidate indices in trunk order."""
    chosen: list[int] = []
    position, budget_left = num_positions, steps
    while position > 0:
        index = int(pointer[position, budget_left])
        if index < 0:  # cannot happen for a finite D[L, B]; guard against silent garbage
            raise DepthfoldError(f"layermerge DP back-pointer missing at position {position}, step {budget_left}")
        chosen.append(index)
        budget_left -= int(costs[index])
        position = int(starts[index])
    chosen.reverse()
    return chosen


def fastest_latency(candidates: Sequence[Candidate], num_positions: int) -> float:
    """The smallest latency of any tiling of ``[0, num_positions]`` by ``candidates`` (the fastest plan)."""
    starts, ends, lats, _ = _check_candidates(list(candidates), _check_positions(num_positions))
    return _min_latency(starts, ends, lats, num_positions)


def _min_latency(starts: np.ndarray, ends: np.ndarray, lats: np.ndarray, num_positions: int) -> float:
    """Exact smallest true latency of any tiling; ConfigError if no tiling exists."""
    best = [math.inf] * (num_positions + 1)
    best[0] = 0.0
    order = np.argsort(ends, kind="stable")
    for index in order:  # ends ascending and start < end: every source is final before it is read
        s, e = int(starts[index]), int(ends[index])
        value = best[s] + float(lats[index])
        if value < best[e]:
            best[e] = value
    if math.isinf(best[num_positions]):
        raise ConfigError(_no_tiling_message(starts, ends, num_positions))
    return best[num_positions]


def _min_steps(starts: np.ndarray, ends: np.ndarray, costs: np.ndarray, num_positions: int) -> int:
    """Smallest number of discretised steps of any tiling (for the error message)."""
    best = [math.inf] * (num_positions + 1)
    best[0] = 0
    for index in np.argsort(ends, kind="stable"):
        s, e = int(starts[index]), int(ends[index])
        best[e] = min(best[e], best[s] + int(costs[index]))
    return int(best[num_positions])


def _no_tiling_message(starts: np.ndarray, ends: np.ndarray, num_positions: int) -> str:
    forward = {0}
    for index in np.argsort(ends, kind="stable"):
        if int(starts[index]) in forward:
            forward.add(int(ends[index]))
    backward = {num_positions}
    for index in np.argsort(-starts, kind="stable"):
        if int(ends[index]) in backward:
            backward.add(int(starts[index]))
    return (
        f"no sequence of candidates tiles positions 0..{num_positions}: chaining candidates from 0 reaches "
        f"only {_short(forward)}, and {num_positions} can be reached only from {_short(backward)}; add a "
        "candidate (start, end] with start in the first set and end in the second"
    )


def _short(values: set[int], limit: int = 12) -> str:
    ordered = sorted(values)
    text = ", ".join(str(v) for v in ordered[:limit])
    return "{" + text + (", ..." if len(ordered) > limit else "") + "}"


def _snap(quotient: float) -> int | None:
    """The whole number ``quotient`` is within float noise of, else None."""
    nearest = round(quotient)
    if abs(quotient - nearest) <= _SNAP_RTOL * max(1.0, abs(quotient)):
        return int(nearest)
    return None


def _ceil_steps_array(quotients: np.ndarray, cap: int) -> np.ndarray:
    """``ceil`` of each quotient (snapping float noise to the whole number), clipped to ``cap``."""
    nearest = np.rint(quotients)
    snapped = np.abs(quotients - nearest) <= _SNAP_RTOL * np.maximum(1.0, np.abs(quotients))
    # Clipping before the cast keeps huge latency / resolution ratios from overflowing int64; anything
    # above the budget's step count is unusable either way.
    return np.minimum(np.where(snapped, nearest, np.ceil(quotients)), cap).astype(np.int64)


def _floor_steps(quotient: float) -> int:
    snapped = _snap(quotient)
    return snapped if snapped is not None else math.floor(quotient)


def _check_positions(num_positions: int) -> int:
    if isinstance(num_positions, bool) or not isinstance(num_positions, numbers.Integral):
        raise ConfigError(f"num_positions must be an int >= 1 (positions run 0..L), got {num_positions!r}")
    if num_positions < 1:
        raise ConfigError(f"num_positions must be >= 1 (positions run 0..L), got {num_positions}")
    return int(num_positions)


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_candidates(
    cands: list[Candidate], num_positions: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate the candidates and return their starts, ends, latencies and importances as arrays."""
    if not cands:
        raise ConfigError(f"no candidates given: a plan must tile positions 0..{num_positions}")
    # Fast path: plain ints and floats pass through vectorised range checks; anything unusual (or any
    # failure) is re-checked one candidate at a time to name the culprit.
    if all(type(c) is Candidate for c in cands):
        starts = [c.start for c in cands]
        ends = [c.end for c in cands]
        lats = [c.latency for c in cands]
        imps = [c.importance for c in cands]
        if (all(type(v) is int for v in starts) and all(type(v) is int for v in ends)
                and all(type(v) in (float, int) for v in lats) and all(type(v) in (float, int) for v in imps)):
            arrays = (np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64),
                      np.asarray(lats, dtype=np.float64), np.asarray(imps, dtype=np.float64))
            s, e, t, i = arrays
            if (np.all(s >= 0) and np.all(s < e) and np.all(e <= num_positions) and np.all(np.isfinite(t))
                    and np.all(t >= 0) and np.all(np.isfinite(i))):
                return arrays
    for index, candidate in enumerate(cands):
        _check_candidate(index, candidate, num_positions)
    return (np.asarray([int(c.start) for c in cands], dtype=np.int64),
            np.asarray([int(c.end) for c in cands], dtype=np.int64),
            np.asarray([float(c.latency) for c in cands], dtype=np.float64),
            np.asarray([float(c.importance) for c in cands], dtype=np.float64))


def _check_candidate(index: int, c: object, num_positions: int) -> None:
    if not isinstance(c, Candidate):
        raise ConfigError(f"candidates[{index}] is a {type(c).__name__}, expected layermerge.Candidate")
    where = f"candidates[{index}] (segment ({c.start!r}, {c.end!r}])"
    for field in ("start", "end"):
        value = getattr(c, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ConfigError(f"{where}: {field} must be an int, got {value!r}")
    if not 0 <= c.start < c.end <= num_positions:
        raise ConfigError(f"{where}: need 0 <= start < end <= num_positions={num_positions}; fix the segment bounds")
    for field in ("latency", "importance"):
        value = getattr(c, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ConfigError(f"{where}: {field} must be a finite number, got {value!r}")
    if c.latency < 0:
        raise ConfigError(f"{where}: latency must be >= 0, got {c.latency!r}")
