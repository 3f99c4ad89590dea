"""The LayerMerge DP solver against exhaustive search, plus its error paths and discretisation rule."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from depthfold.errors import ConfigError, DepthfoldError
from depthfold.passes.layermerge import Candidate, InfeasibleBudgetError, Plan, solve_plan

# Importances are multiples of 1/100 in the property tests, so distinct plan sums differ by ~0.01 and
# equal ones differ only by float noise (< 1e-12); 1e-9 separates the two cases.
IMPORTANCE_TOL = 1e-9


# ---------------------------------------------------------------------------------------------- helpers


def all_plans(candidates: list[Candidate], num_positions: int) -> Iterator[tuple[Candidate, ...]]:
    """Every sequence of candidates that tiles [0, L] (plain depth-first enumeration)."""
    by_start: dict[int, list[Candidate]] = {}
    for c in candidates:
        by_start.setdefault(c.start, []).append(c)

    def extend(position: int, prefix: tuple[Candidate, ...]) -> Iterator[tuple[Candidate, ...]]:
        if position == num_positions:
            yield prefix
            return
        for c in by_start.get(position, []):
            yield from extend(c.end, prefix + (c,))

    yield from extend(0, ())


def totals(plan: tuple[Candidate, ...]) -> tuple[float, float]:
    return math.fsum(c.importance for c in plan), math.fsum(c.latency for c in plan)


def assert_tiles(plan: Plan, num_positions: int) -> None:
    assert plan.chosen, "a plan has at least one candidate"
    assert plan.chosen[0].start == 0
    assert plan.chosen[-1].end == num_positions
    for before, after in zip(plan.chosen, plan.chosen[1:]):
        assert before.end == after.start


@st.composite
def instances(draw: st.DrawFn) -> tuple[list[Candidate], int]:
    """A random sparse candidate table over <= 10 positions that always contains one tiling."""
    num_positions = draw(st.integers(1, 10))
    cuts = sorted(draw(st.sets(st.integers(1, num_positions - 1)))) if num_positions > 1 else []
    bounds = [0, *cuts, num_positions]
    segments = list(zip(bounds, bounds[1:]))  # the guaranteed tiling
    pairs = st.integers(0, num_positions - 1).flatmap(
        lambda s: st.tuples(st.just(s), st.integers(s + 1, num_positions)))
    segments += draw(st.lists(pairs, max_size=8))
    importance = st.integers(-500, 300).map(lambda x: x / 100)
    candidates = []
    for start, end in segments:
        for _ in range(draw(st.integers(1, 2))):
            candidates.append(Candidate(start, end, float(draw(st.integers(0, 9))), draw(importance),
                                        choice=len(candidates)))
    return draw(st.permutations(candidates)), num_positions


# ------------------------------------------------------------------------------------ property tests


@settings(max_examples=500, deadline=None)
@given(instance=instances(), data=st.data())
def test_solve_plan_matches_exhaustive_search(instance: tuple[list[Candidate], int], data: st.DataObject) -> None:
    candidates, num_positions = instance
    plans = [(*totals(p), p) for p in all_plans(candidates, num_positions)]
    min_latency = min(lat for _, lat, _ in plans)
    max_latency = max(lat for _, lat, _ in plans)
    budget = data.draw(st.integers(max(1, int(min_latency)), int(max_latency) + 2), label="budget")
    budget += data.draw(st.sampled_from([0.0, 0.5]), label="fraction")

    plan = solve_plan(candidates, num_positions, budget, resolution=1)

    assert_tiles(plan, num_positions)
    assert set(plan.chosen) <= set(candidates)
    assert plan.latency <= budget
    feasible = [(imp, lat) for imp, lat, _ in plans if lat <= budget]
    best = max(imp for imp, _ in feasible)
    assert plan.importance == pytest.approx(best, abs=IMPORTANCE_TOL)
    fastest_optimal = min(lat for imp, lat in feasible if imp >= best - IMPORTANCE_TOL)
    assert plan.latency == fastest_optimal
    assert (plan.importance, plan.latency) == totals(plan.chosen)
    assert plan.resolution == 1.0 and plan.budget == budget


@settings(max_examples=200, deadline=None)
@given(instance=instances(), data=st.data())
def test_solve_plan_infeasible_budget_reports_exhaustive_minimum(
    instance: tuple[list[Candidate], int], data: st.DataObject
) -> None:
    candidates, num_positions = instance
    min_latency = min(totals(p)[1] for p in all_plans(candidates, num_positions))
    if min_latency == 0:
        candidates = [Candidate(c.start, c.end, c.latency + 1, c.importance) for c in candidates]
        min_latency = min(totals(p)[1] for p in all_plans(candidates, num_positions))
    budget = data.draw(st.floats(0.01, min_latency - 0.01), label="budget")

    with pytest.raises(InfeasibleBudgetError) as info:
        solve_plan(candidates, num_positions, budget, resolution=data.draw(st.sampled_from([None, 1.0, 0.1])))

    assert info.value.min_latency == min_latency
    assert info.value.budget == budget
    assert f"smallest achievable latency {min_latency:.6g}" in str(info.value)


@settings(max_examples=200, deadline=None)
@given(instance=instances(), data=st.data())
def test_solve_plan_importance_grows_with_budget(instance: tuple[list[Candidate], int], data: st.DataObject) -> None:
    candidates, num_positions = instance
    max_latency = max(totals(p)[1] for p in all_plans(candidates, num_positions))
    budget = float(max(1, int(max_latency)))
    full = solve_plan(candidates, num_positions, budget, resolution=1)
    assert full.importance == pytest.approx(max(totals(p)[0] for p in all_plans(candidates, num_positions)))
    smaller = data.draw(st.floats(0.5, budget), label="smaller")
    try:
        tight = solve_plan(candidates, num_positions, smaller, resolution=1)
    except InfeasibleBudgetError as err:
        # Genuinely infeasible: no plan fits, on true latencies or on the resolution's whole steps.
        steps = min(sum(math.ceil(c.latency - 1e-9) for c in p) for p in all_plans(candidates, num_positions))
        assert err.min_latency > smaller or steps > math.floor(smaller + 1e-9)
        return
    assert tight.importance <= full.importance + IMPORTANCE_TOL
    assert tight.latency <= smaller


# -------------------------------------------------------------------------------- hand-made instances


def test_solve_plan_prefers_lower_latency_on_importance_tie() -> None:
    candidates = [
        Candidate(0, 2, 5.0, -1.0, choice="slow"),
        Candidate(0, 1, 1.0, -0.5, choice="a"),
        Candidate(1, 2, 1.0, -0.5, choice="b"),
        Candidate(0, 2, 3.0, -1.0, choice="medium"),
    ]
    plan = solve_plan(candidates, 2, budget=10.0, resolution=1)
    assert plan.latency == 2.0
    assert [c.choice for c in plan.chosen] == ["a", "b"]


def test_solve_plan_tie_break_uses_true_latency_within_one_step() -> None:
    # Both whole-segment candidates cost one step of 1.0; the true latencies still decide.
    candidates = [Candidate(0, 1, 0.9, 0.0, "slower"), Candidate(0, 1, 0.2, 0.0, "faster")]
    plan = solve_plan(candidates, 1, budget=1.0, resolution=1.0)
    assert plan.chosen[0].choice == "faster"


def test_solve_plan_rounds_latencies_up_not_down() -> None:
    resolution, budget = 0.3, 1.2  # 4 steps
    candidates = [
        Candidate(0, 1, 0.65, -0.05, "merge-a"),  # 0.65 / 0.3 = 2.17 steps: 3 rounded up, 2 truncated
        Candidate(1, 2, 0.65, -0.05, "merge-b"),
        Candidate(0, 2, 0.9, -1.0, "prune"),  # exactly 3 steps
    ]
    plan = solve_plan(candidates, 2, budget, resolution=resolution)
    assert plan.latency <= budget
    assert [c.choice for c in plan.chosen] == ["prune"]

    # The truncating rule of the reference implementation, emulated by pre-flooring the latencies,
    # accepts the two merges, whose true latency 1.3 exceeds the budget.
    floored = [Candidate(c.start, c.end, math.floor(c.latency / resolution) * resolution, c.importance, c)
               for c in candidates]
    truncated = solve_plan(floored, 2, budget, resolution=resolution)
    true_latency = math.fsum(c.choice.latency for c in truncated.chosen)
    assert [c.choice.choice for c in truncated.chosen] == ["merge-a", "merge-b"]
    assert true_latency > budget


def test_solve_plan_snaps_float_noise_to_whole_steps() -> None:
    # 0.6 / 0.3 == 2.0000000000000004 and 1.2 / 0.3 == 3.9999999999999996: still 2 + 2 <= 4 steps.
    candidates = [Candidate(0, 1, 0.6, 0.0), Candidate(1, 2, 0.6, 0.0), Candidate(0, 2, 0.3, -1.0)]
    plan = solve_plan(candidates, 2, budget=1.2, resolution=0.3)
    assert plan.importance == 0.0


def test_solve_plan_default_resolution_is_budget_over_5000() -> None:
    candidates = [Candidate(0, 1, 1.0, 0.0), Candidate(0, 1, 0.5, -1.0)]
    plan = solve_plan(candidates, 1, budget=2.5)
    assert plan.resolution == pytest.approx(2.5 / 5000)
    assert plan.importance == 0.0


def test_solve_plan_budget_equal_to_min_latency_is_feasible() -> None:
    candidates = [Candidate(0, 1, 3.0, -2.0), Candidate(1, 2, 4.0, -1.0), Candidate(0, 2, 9.0, 0.0)]
    plan = solve_plan(candidates, 2, budget=7.0, resolution=1)
    assert plan.latency == 7.0 and plan.importance == -3.0


def test_solve_plan_infeasible_budget_message() -> None:
    candidates = [Candidate(0, 1, 2.5, 0.0), Candidate(1, 2, 1.6, 0.0), Candidate(0, 2, 5.0, 0.0)]
    with pytest.raises(InfeasibleBudgetError, match=r"budget 3\.2 is below the smallest achievable latency 4\.1;"
                       r" raise the budget") as info:
        solve_plan(candidates, 2, budget=3.2)
    assert info.value.min_latency == pytest.approx(4.1)
    assert isinstance(info.value, DepthfoldError)


def test_solve_plan_infeasible_only_after_rounding_suggests_finer_resolution() -> None:
    # True latency 2 x 0.55 = 1.1 <= 1.2, but each rounds up to 1.0 at resolution 1.0: 2 steps > 1.
    candidates = [Candidate(0, 1, 0.55, 0.0), Candidate(1, 2, 0.55, 0.0)]
    with pytest.raises(InfeasibleBudgetError, match="finer resolution") as info:
        solve_plan(candidates, 2, budget=1.2, resolution=1.0)
    assert info.value.min_latency == pytest.approx(1.1)
    plan = solve_plan(candidates, 2, budget=1.2, resolution=0.05)
    assert plan.latency == pytest.approx(1.1)


def test_solve_plan_is_deterministic_and_sums_match() -> None:
    candidates = [Candidate(s, e, 0.1 + 0.05 * k * (e - s), -0.3 * (e - s) / (k + 1), (s, e, k))
                  for s in range(6) for e in range(s + 1, min(s + 4, 7)) for k in range(3)]
    plans = [solve_plan(candidates, 6, budget=0.45) for _ in range(3)]
    assert plans[0] == plans[1] == plans[2]
    plan = plans[0]
    assert_tiles(plan, 6)
    assert plan.importance == math.fsum(c.importance for c in plan.chosen)
    assert plan.latency == math.fsum(c.latency for c in plan.chosen)
    assert plan.latency <= 0.45


def test_solve_plan_zero_latency_candidates() -> None:
    candidates = [Candidate(0, 1, 0.0, -1.0), Candidate(0, 1, 2.0, 0.0), Candidate(1, 2, 0.0, 0.0)]
    assert solve_plan(candidates, 2, budget=1.0, resolution=1).importance == -1.0
    assert solve_plan(candidates, 2, budget=2.0, resolution=1).importance == 0.0


# --------------------------------------------------------------------------------------- validation

GOOD = [Candidate(0, 1, 1.0, 0.0), Candidate(1, 2, 1.0, 0.0)]


@pytest.mark.parametrize(
    ("candidates", "num_positions", "budget", "resolution", "message"),
    [
        (GOOD, 0, 5.0, None, "num_positions must be >= 1"),
        (GOOD, 2.0, 5.0, None, "num_positions must be an int"),
        (GOOD + [Candidate(1, 1, 1.0, 0.0)], 2, 5.0, None, r"candidates\[2\].*start < end"),
        (GOOD + [Candidate(-1, 1, 1.0, 0.0)], 2, 5.0, None, r"candidates\[2\].*0 <= start"),
        (GOOD + [Candidate(1, 3, 1.0, 0.0)], 2, 5.0, None, r"candidates\[2\].*end <= num_positions=2"),
        (GOOD + [Candidate(0, 1.5, 1.0, 0.0)], 2, 5.0, None, r"end must be an int"),
        (GOOD + [Candidate(0, 1, -0.1, 0.0)], 2, 5.0, None, r"latency must be >= 0"),
        (GOOD + [Candidate(0, 1, math.inf, 0.0)], 2, 5.0, None, r"latency must be a finite number"),
        (GOOD + [Candidate(0, 1, 1.0, math.nan)], 2, 5.0, None, r"importance must be a finite number"),
        (GOOD + ["not a candidate"], 2, 5.0, None, r"candidates\[2\] is a str"),
        (GOOD, 2, 0.0, None, "budget must be a finite number > 0"),
        (GOOD, 2, -1.0, None, "budget must be a finite number > 0"),
        (GOOD, 2, math.nan, None, "budget must be a finite number > 0"),
        (GOOD, 2, math.inf, None, "budget must be a finite number > 0"),
        (GOOD, 2, 5.0, 0.0, "resolution must be a finite number > 0"),
        (GOOD, 2, 5.0, -1.0, "resolution must be a finite number > 0"),
        ([], 2, 5.0, None, "no candidates given"),
        (GOOD, 2, 5.0, 1e-9, "pass a coarser resolution"),
    ],
)
def test_solve_plan_rejects_bad_input(candidates, num_positions, budget, resolution, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match=message):
        solve_plan(candidates, num_positions, budget, resolution)


def test_solve_plan_no_tiling_names_the_gap() -> None:
    candidates = [Candidate(0, 1, 1.0, 0.0), Candidate(0, 2, 1.0, 0.0), Candidate(3, 4, 1.0, 0.0)]
    with pytest.raises(ConfigError, match=r"no sequence of candidates tiles positions 0\.\.4") as info:
        solve_plan(candidates, 4, budget=10.0)
    assert "reaches only {0, 1, 2}" in str(info.value)
    assert "reached only from {3, 4}" in str(info.value)


def test_solve_plan_accepts_numpy_scalars_and_huge_latencies() -> None:
    candidates = [
        Candidate(np.int64(0), np.int64(1), np.float32(1.0), np.float64(-1.0), "numpy"),
        Candidate(0, 1, 1e300, 5.0, "far too slow"),  # 1e300 / resolution must not overflow the step count
    ]
    plan = solve_plan(candidates, 1, budget=2.0)
    assert [c.choice for c in plan.chosen] == ["numpy"]
    assert plan.latency == 1.0 and plan.importance == -1.0
