"""LayerMerge DP solver: wall time on a LayerMerge-sized table, and what truncating latencies costs.

Tables mimic the LayerMerge search space: ``--positions`` non-linearities (60), every segment of at most
``--max-span`` layers (8) has candidates:

* span 1: the original layer (latency ~ lognormal, median 0.2 ms; importance 0) and pruning it
  (0.01 ms; importance < 0);
* span n > 1: a merged convolution (one larger kernel: latency ~ the slowest layer x (1 + 0.25 (n - 1)),
  importance falls with n), plus two variants that prune some of the layers before merging (faster,
  less important).

Importances are <= 0 (negative estimated accuracy drop). The budget is ``--budget-share`` (55%) of the
slowest tiling's latency; the resolution is ``budget / steps`` (5,000 steps).

1. Timing: median (p10, p90) of ``--repeats`` (30) calls of ``solve_plan`` on one table, after warm-up.
2. Rounding: on ``--tables`` (50) random tables, for 500 and 5,000 steps, our rule (latencies rounded
   up) against the reference implementation's (latencies truncated, emulated by passing latencies
   pre-floored to the resolution grid), and both against a 50,000-step solve as the near-exact optimum.
   Reported: how often and by how much the truncated plan's true latency overshoots the budget, and the
   importance each rule gets.

Writes ``benchmarks/results/layermerge_solver.{json,md}``.

    python benchmarks/layermerge_solver.py [--positions 60] [--tables 50] [--repeats 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import numpy as np

from depthfold.passes.layermerge import Candidate, solve_plan
from depthfold.report import environment

RESULTS = Path(__file__).parent / "results"
REFERENCE_STEPS = 50_000
"""Steps of the fine solve that stands in for the undiscretised optimum."""


def random_table(rng: np.random.Generator, positions: int, max_span: int) -> list[Candidate]:
    """A LayerMerge-like candidate table (see module docstring); latencies in ms."""
    layer_ms = rng.lognormal(mean=math.log(0.2), sigma=0.5, size=positions)
    layer_drop = rng.lognormal(mean=math.log(0.3), sigma=0.6, size=positions)  # cost of touching a layer
    table = []
    for start in range(positions):
        for end in range(start + 1, min(start + max_span, positions) + 1):
            span = end - start
            seg_ms, seg_drop = layer_ms[start:end], layer_drop[start:end]
            if span == 1:
                table.append(Candidate(start, end, float(seg_ms[0]), 0.0, ("original",)))
                table.append(Candidate(start, end, 0.01, -float(seg_drop[0]) * rng.uniform(1.5, 3.0), ("prune",)))
                continue
            merged_ms = float(seg_ms.max()) * (1 + 0.25 * (span - 1)) * rng.uniform(0.8, 1.2)
            merged_imp = -float(seg_drop.sum()) * 0.25 * (span - 1) ** 0.7 * rng.uniform(0.7, 1.3)
            table.append(Candidate(start, end, merged_ms, merged_imp, ("merge", span)))
            for kept in (0.65, 0.35):
                table.append(Candidate(start, end, merged_ms * kept * rng.uniform(0.85, 1.15),
                                       merged_imp * (1 + (1 - kept) * rng.uniform(1.0, 3.0)),
                                       ("prune+merge", span, kept)))
    return table


def slowest_tiling_ms(table: list[Candidate], positions: int) -> float:
    slowest = [-math.inf] * (positions + 1)
    slowest[0] = 0.0
    for c in sorted(table, key=lambda c: c.end):
        slowest[c.end] = max(slowest[c.end], slowest[c.start] + c.latency)
    return slowest[positions]


def truncated(table: list[Candidate], resolution: float) -> list[Candidate]:
    """The reference rule, floor(latency / resolution), expressed as latencies already on the grid.

    ``solve_plan`` snaps ``floor(t / r) * r / r`` back to the same whole number, so it then solves the
    truncated problem; ``choice`` keeps the original candidate to recover the true latency.
    """
    return [Candidate(c.start, c.end, math.floor(c.latency / resolution) * resolution, c.importance, c)
            for c in table]


def quantiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> float:
        return float(np.quantile(ordered, p))

    return {"median": q(0.5), "p10": q(0.1), "p90": q(0.9), "max": ordered[-1], "n": len(ordered)}


def bench_time(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed)
    table = random_table(rng, args.positions, args.max_span)
    budget = args.budget_share * slowest_tiling_ms(table, args.positions)
    resolution = budget / args.steps
    for _ in range(3):
        plan = solve_plan(table, args.positions, budget, resolution)
    samples = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        solve_plan(table, args.positions, budget, resolution)
        samples.append(time.perf_counter() - start)
    return {
        "positions": args.positions,
        "candidates": len(table),
        "steps": args.steps,
        "budget_ms": budget,
        "plan": {"segments": len(plan.chosen), "latency_ms": plan.latency, "importance": plan.importance},
        "seconds": {k: v for k, v in quantiles(samples).items()},
    }


def bench_rounding(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(args.seed + 1)
    rows: dict[int, list[dict]] = {steps: [] for steps in args.compare_steps}
    for _ in range(args.tables):
        table = random_table(rng, args.positions, args.max_span)
        budget = args.budget_share * slowest_tiling_ms(table, args.positions)
        fine = solve_plan(table, args.positions, budget, budget / REFERENCE_STEPS)
        for steps in args.compare_steps:
            resolution = budget / steps
            ours = solve_plan(table, args.positions, budget, resolution)
            trunc = solve_plan(truncated(table, resolution), args.positions, budget, resolution)
            trunc_ms = math.fsum(c.choice.latency for c in trunc.chosen)
            rows[steps].append({
                "ours_over_pct": 100 * (ours.latency - budget) / budget,
                "trunc_over_pct": 100 * (trunc_ms - budget) / budget,
                "ours_importance_gap": fine.importance - ours.importance,
                "trunc_importance_gap": fine.importance - trunc.importance,
                "fine_importance": fine.importance,
            })
    summary = {}
    for steps, per_table in rows.items():
        over = [r["trunc_over_pct"] for r in per_table if r["trunc_over_pct"] > 0]
        summary[str(steps)] = {
            "tables": len(per_table),
            "ours_max_latency_over_budget_pct": max(r["ours_over_pct"] for r in per_table),
            "trunc_over_budget_share": len(over) / len(per_table),
            "trunc_overshoot_pct_all_tables": quantiles([max(0.0, r["trunc_over_pct"]) for r in per_table]),
            "trunc_overshoot_pct_when_over": quantiles(over) if over else None,
            "ours_importance_gap_vs_fine": quantiles([r["ours_importance_gap"] for r in per_table]),
            "trunc_importance_gap_vs_fine": quantiles([r["trunc_importance_gap"] for r in per_table]),
            "median_fine_importance": statistics.median(r["fine_importance"] for r in per_table),
        }
    return summary


def to_markdown(payload: dict) -> str:
    t = payload["timing"]
    s = t["seconds"]
    env = payload["environment"]
    lines = [
        "# LayerMerge DP solver",
        "",
        f"Python {env['python']}, NumPy {payload['numpy']}, {env['cpu_count']} CPU(s), {env['machine']}.",
        "",
        "## Wall time of `solve_plan`",
        "",
        f"{t['positions']} positions, {t['candidates']} candidates (segments of up to "
        f"{payload['max_span']} layers), {t['steps']} budget steps, budget {t['budget_ms']:.2f} ms "
        f"({100 * payload['budget_share']:.0f}% of the slowest tiling): median **{1e3 * s['median']:.1f} ms** "
        f"(p10 {1e3 * s['p10']:.1f}, p90 {1e3 * s['p90']:.1f}, max {1e3 * s['max']:.1f}; n = {s['n']}).",
        "",
        f"## Rounding latencies up vs truncating them ({payload['tables']} random tables)",
        "",
        "Overshoot = (true latency of the plan − budget) / budget; importance gap = importance of a "
        f"{REFERENCE_STEPS:,}-step solve − importance of the plan (lower is better; negative means the plan "
        "beats the fine solve by breaking the budget).",
        "",
        "| steps | ours: worst (latency − budget) / budget | truncated: tables over budget | truncated: median overshoot "
        "(all / when over) | truncated: max overshoot | ours: median importance gap | truncated: median "
        "importance gap |",
        "|---|---|---|---|---|---|---|",
    ]
    for steps, r in payload["rounding"].items():
        when_over = r["trunc_overshoot_pct_when_over"]
        lines.append(
            f"| {int(steps):,} | {r['ours_max_latency_over_budget_pct']:+.3f}% | "
            f"{100 * r['trunc_over_budget_share']:.0f}% | "
            f"{r['trunc_overshoot_pct_all_tables']['median']:.3f}% / "
            f"{when_over['median'] if when_over else 0.0:.3f}% | "
            f"{r['trunc_overshoot_pct_all_tables']['max']:.3f}% | "
            f"{r['ours_importance_gap_vs_fine']['median']:.4f} | "
            f"{r['trunc_importance_gap_vs_fine']['median']:.4f} |")
    lines += ["", f"Median importance of the {REFERENCE_STEPS:,}-step plan: "
              f"{next(iter(payload['rounding'].values()))['median_fine_importance']:.3f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--positions", type=int, default=60)
    parser.add_argument("--max-span", type=int, default=8)
    parser.add_argument("--budget-share", type=float, default=0.55)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--compare-steps", type=lambda s: [int(x) for x in s.split(",")], default=[500, 5000])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--tables", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "layermerge_solver"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    timing = bench_time(args)
    s = timing["seconds"]
    print(f"solve_plan: {timing['positions']} positions, {timing['candidates']} candidates, {timing['steps']} "
          f"steps: median {1e3 * s['median']:.1f} ms (p10 {1e3 * s['p10']:.1f}, p90 {1e3 * s['p90']:.1f}, "
          f"n={s['n']})", flush=True)
    rounding = bench_rounding(args)
    for steps, r in rounding.items():
        when_over = r["trunc_overshoot_pct_when_over"]
        print(f"{int(steps):>6} steps: truncation over budget in {100 * r['trunc_over_budget_share']:.0f}% of "
              f"{r['tables']} tables, median overshoot {r['trunc_overshoot_pct_all_tables']['median']:.3f}% "
              f"(when over {when_over['median'] if when_over else 0.0:.3f}%, max "
              f"{r['trunc_overshoot_pct_all_tables']['max']:.3f}%); ours max "
              f"{r['ours_max_latency_over_budget_pct']:+.3f}% vs budget; median importance gap vs "
              f"{REFERENCE_STEPS} steps: ours {r['ours_importance_gap_vs_fine']['median']:.4f}, truncated "
              f"{r['trunc_importance_gap_vs_fine']['median']:.4f}")
    payload = {
        "benchmark": "layermerge_solver",
        "max_span": args.max_span,
        "budget_share": args.budget_share,
        "tables": args.tables,
        "seed": args.seed,
        "numpy": np.__version__,
        "environment": environment(),
        "timing": timing,
        "rounding": rounding,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(payload))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
