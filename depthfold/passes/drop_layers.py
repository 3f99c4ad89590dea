"""Static skip insertion: remove whole transformer blocks, or only their attention or MLP sublayers.

Idea: in a residual network ``h_{l+1} = h_l + f_l(h_l)`` a block whose output stays close to its input adds
little; removing it keeps the residual stream (``h_{l+1} = h_l``), deletes the block's compute and its
parameters. Which blocks, by ``strategy``:

* ``greedy`` — ShortGPT's Block Influence, ``BI_l = 1 - E[cos(h_l, h_{l+1})]`` over calibration tokens; the
  ``n`` lowest go (Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You
  Expect", arXiv:2403.03853).
* ``contiguous`` — Gromov et al.'s angular distance ``arccos(cos(h_l, h_{l+n})) / pi`` of every run of ``n``
  consecutive blocks; the closest run goes ("The Unreasonable Ineffectiveness of the Deeper Layers",
  arXiv:2403.17887).
* ``spread`` — ``n`` blocks evenly spaced between the first and the last (no data needed).

``sublayer=attention`` (or ``mlp``) scores and removes only that residual sublayer of each chosen block;
dropping a block's attention keeps its MLP.

``speedup=1.3`` applies LayerMerge's idea to transformer blocks instead of ranking by one score: every block is
a position with candidates {keep, drop attention, drop MLP, drop block} (with ``sublayer``: keep or drop that
sublayer); each candidate's latency saving is measured on the backend (every single-change variant timed
interleaved with the original), its importance on calibration data (mean per-token output cosine, or minus the
KL, of the model with only that change), and the latency-budgeted dynamic programme (``solve_plan``, Kim et al.
ICML 2023/2024) picks the most important set that fits ``original / speedup``; the planned model is then
measured and the budget corrected until it meets the target (``plan_with_feedback``).

Exactness: APPROXIMATE (error and task metrics reported; follow with ``recover`` to distil the original back in).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Literal

from torch.fx import GraphModule

from .. import ir
from ..errors import ConfigError, InfeasibleBudgetError
from .base import Change, Exactness, PassContext, PassResult
from .common.calibration import calibration_split
from .common.metrics import batched_outputs, check_metrics, evaluate, kl_divergence, token_cosine
from .common.replan import plan_with_feedback
from .common.stream import angular_distance, bypass, stream_states
from .layermerge.solver import Candidate, Plan, fastest_latency, solve_plan
from .registry import register_pass

__all__ = ["DropLayersConfig", "drop_layers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DropLayersConfig:
    n: int = 1
    """How many blocks (or sublayers, with ``sublayer``) to remove."""
    strategy: Literal["greedy", "contiguous", "spread"] = "greedy"
    """``greedy``: lowest Block Influence (ShortGPT); ``contiguous``: the run of ``n`` blocks with the smallest
    angular distance (Gromov et al.); ``spread``: evenly spaced."""
    sublayer: Literal["block", "attention", "mlp"] = "block"
    """What to remove of each chosen block: all of it, its attention sublayer or its MLP sublayer."""
    layers: tuple[int, ...] = ()
    """Remove exactly these block indices (``layers=3+5``) instead of choosing; ``n`` and ``strategy`` unused."""
    speedup: float = 0.0
    """Instead of ``n``: plan removals by DP over measured latency and importance tables to reach this measured
    speedup on the pipeline's backend (``n``, ``strategy`` and ``layers`` unused)."""
    importance: Literal["cosine", "kl"] = "cosine"
    """With ``speedup``: a candidate's importance is the output's mean per-token cosine to the original (``cosine``)
    or minus the KL of its softmax (``kl``: for logits)."""
    tolerance: float = 0.03
    """With ``speedup``: accept a plan measured within this relative distance of the target latency."""
    replan: int = 4
    """With ``speedup``: plans measured (and the budget corrected) at most this many times."""
    rounds: int = 10
    """Interleaved timing rounds per latency measurement."""
    eval_samples: int = 64
    """Calibration samples held out to report the task metrics on."""
    train_samples: int = 64
    """Calibration samples the scores are measured on."""
    batch_size: int = 8
    metrics: tuple[str, ...] = ("token_cosine", "cosine", "kl", "perplexity")
    """Reported on the held-out samples, original vs result (see ``passes.common.metrics``)."""

    def __post_init__(self) -> None:
        if self.speedup and not self.speedup > 1.0:
            raise ConfigError(f"drop_layers: speedup must be above 1, got {self.speedup}")
        if not self.speedup and not self.layers and self.n < 1:
            raise ConfigError(f"drop_layers: n must be at least 1, got {self.n} (or give layers=...)")
        if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"drop_layers: layers must be distinct block indices >= 0, got {list(self.layers)}")
        if self.eval_samples < 1 or self.train_samples < 1 or self.batch_size < 1:
            raise ConfigError("drop_layers: eval_samples, train_samples and batch_size must be at least 1")
        check_metrics(self.metrics)


@register_pass("drop_layers", exactness=Exactness.APPROXIMATE, config=DropLayersConfig, uses_context=True)
def drop_layers(gm: GraphModule, config: DropLayersConfig, context: PassContext) -> PassResult:
    """Remove transformer blocks or their attention/MLP sublayers, keeping the residual stream (ShortGPT,
    Gromov et al.)."""
    stack = ir.find_stack(gm)
    units = _units(stack, config.sublayer)
    count = len(config.layers) if config.layers else config.n
    if config.layers and max(config.layers) >= len(stack):
        raise ConfigError(f"drop_layers: layers={list(config.layers)} but the model has {len(stack)} blocks "
                          f"(indices 0..{len(stack) - 1})")
    if count > len(units) and not config.speedup:
        raise ConfigError(f"drop_layers: cannot remove {count} {config.sublayer} unit(s); the model has "
                          f"{len(units)} ({stack.prefix})")
    if config.sublayer == "block" and count >= len(stack) and not config.speedup:
        raise ConfigError(f"drop_layers: removing all {len(stack)} blocks of {stack.prefix!r} leaves no "
                          "transformer; drop fewer")
    calib = calibration_split(context.data, tuple(context.example_inputs), names=ir.input_names(gm),
                              free_dims=ir.free_dims(gm), eval_samples=config.eval_samples,
                              train_samples=config.train_samples, batch_size=config.batch_size, seed=context.seed)
    scores: dict[int, float] = {}
    planning: dict[str, object] = {}
    if config.speedup:
        actions, planning = _plan_by_budget(gm, stack, config, context, calib)
        chosen = sorted(actions)
    elif config.layers:
        chosen = sorted(config.layers)
        chosen = [i for i in chosen if i in units]
        missing = sorted(set(config.layers) - set(chosen))
        if missing:
            raise ConfigError(f"drop_layers: blocks {missing} have no {config.sublayer} sublayer to remove")
    elif config.strategy == "spread":
        chosen = _spread(sorted(units), count)
    else:
        names = sorted({name for span in units.values() for name in span})
        states = stream_states(gm, calib.train, names, calib.batch_size)
        if config.strategy == "greedy":
            scores = {i: 1.0 - token_cosine(states[a], states[b], calib.train) for i, (a, b) in units.items()}
            chosen = sorted(sorted(scores, key=lambda i: (scores[i], i))[:count])
        else:
            order = sorted(units)
            runs = {order[k]: angular_distance(states[units[order[k]][0]], states[units[order[k + count - 1]][1]],
                                               calib.train)
                    for k in range(len(order) - count + 1)}
            scores = runs
            start = min(runs, key=lambda i: (runs[i], i))
            chosen = order[order.index(start):order.index(start) + count]
    if not config.speedup:
        actions = {i: config.sublayer for i in chosen}
    out = _apply(gm, stack, actions)
    removed = {n.name for n in gm.graph.nodes} - {n.name for n in out.graph.nodes}
    changes = [Change(kind=f"drop_{actions[i]}", removed=tuple(sorted(n for n in removed
                                                                     if n in stack.blocks[i].nodes)),
                      added=(), detail={"block": stack.blocks[i].path, "index": i,
                                        **({"score": scores[i]} if i in scores else {})})
               for i in chosen]
    teacher = batched_outputs(gm, calib.held_out, calib.batch_size)
    student = batched_outputs(out, calib.held_out, calib.batch_size)
    quality = {k: v for k, v in evaluate(teacher, student, calib.held_out, config.metrics).items() if v is not None}
    strategy = "budget" if config.speedup else "given" if config.layers else config.strategy
    logger.info("drop_layers: removed %s of %d blocks (%s); held-out %s", actions, len(stack), strategy, quality)
    report = {"blocks": len(stack), "stack": stack.prefix, "unit": config.sublayer, "strategy": strategy,
              "removed": chosen, "actions": {str(i): actions[i] for i in chosen}, **planning,
              "scores": {str(k): v for k, v in scores.items()},
              "score": {"greedy": "block influence 1 - cos(h_in, h_out)",
                        "contiguous": "angular distance of the run starting here"}.get(config.strategy, None)
              if strategy in ("greedy", "contiguous") else None,
              "quality": quality, "calibration": {"samples": len(calib.train), "held_out": len(calib.held_out),
                                                  "synthetic": calib.synthetic}}
    return PassResult(out, changes=changes, report=report)


def _span(block: ir.TransformerBlock, action: str) -> tuple[str, str]:
    if action == "block":
        return block.input, block.output
    sub = block.sublayer(action)
    if sub is None:
        raise ConfigError(f"drop_layers: block {block.path} has no {action} sublayer")
    return sub.input, sub.output


def _apply(gm: GraphModule, stack: ir.TransformerStack, actions: dict[int, str]) -> GraphModule:
    """A copy of ``gm`` with ``actions`` (block index -> ``block`` / ``attention`` / ``mlp``) removed."""
    out = ir.clone(gm)
    # Later spans first, so an earlier span's output is still the node later ones were bypassed onto.
    spans = sorted((_span(stack.blocks[i], a) for i, a in actions.items()),
                   key=lambda span: _order(gm)[span[1]], reverse=True)
    for start, end in spans:
        bypass(out, end, start)
    ir.remove_dead(out)
    return out


def _order(gm: GraphModule) -> dict[str, int]:
    return {n.name: i for i, n in enumerate(gm.graph.nodes)}


def _plan_by_budget(gm: GraphModule, stack: ir.TransformerStack, config: DropLayersConfig, context: PassContext,
                    calib) -> tuple[dict[int, str], dict[str, object]]:  # type: ignore[no-untyped-def]
    """LayerMerge-style DP over blocks: measured savings and importances per candidate, budget from ``speedup``."""
    probe = context.latency_probe
    if probe is None:
        raise ConfigError("drop_layers:speedup needs a latency probe (the backend to plan for); run it through "
                          "depthfold.optimize(..., backend=...)")
    kinds = ["attention", "mlp", "block"] if config.sublayer == "block" else [config.sublayer]
    options = [(b.index, k) for b in stack.blocks for k in kinds
               if k == "block" or b.sublayer(k) is not None]
    inputs = tuple(context.example_inputs)
    variants = {f"{i}:{k}": _apply(gm, stack, {i: k}) for i, k in options}
    timing = probe.open().compare({"original": gm, **variants}, inputs, rounds=config.rounds, baseline="original",
                                  min_sample_ms=20.0)
    whole_ms = float(timing["measurements"]["original"].median_ms)
    saving = {key: whole_ms * (1.0 - float(statistics.median(timing["ratios"][key]["samples"])))
              for key in variants}
    teacher = batched_outputs(gm, calib.train, calib.batch_size)

    def importance(model: GraphModule) -> float:
        student = batched_outputs(model, calib.train, calib.batch_size)
        if config.importance == "kl":
            return -kl_divergence(teacher, student, calib.train)
        return token_cosine(teacher, student, calib.train) - 1.0

    value = {key: importance(model) for key, model in variants.items()}
    # A block's own cost: what removing all of it saves (at least what removing a sublayer saves).
    cost = {b.index: max([0.0, *(saving[f"{b.index}:{k}"] for k in kinds if f"{b.index}:{k}" in saving)])
            for b in stack.blocks}
    candidates = []
    for b in stack.blocks:
        candidates.append(Candidate(b.index, b.index + 1, cost[b.index], 0.0, None))
        for k in kinds:
            key = f"{b.index}:{k}"
            if key in saving:
                candidates.append(Candidate(b.index, b.index + 1, max(0.0, cost[b.index] - saving[key]),
                                            value[key], k))
    fixed_ms = max(0.0, whole_ms - sum(cost.values()))
    target_ms = whole_ms / config.speedup

    def solve(budget: float) -> Plan:
        return solve_plan(candidates, len(stack), max(budget, 1e-9))

    def measure(plan: Plan) -> float:
        actions = {c.start: c.choice for c in plan.chosen if c.choice is not None}
        return whole_ms / probe.speedup(gm, _apply(gm, stack, actions), inputs, rounds=config.rounds)["median"]

    try:
        result = plan_with_feedback(solve, measure, budget=target_ms - fixed_ms, target_ms=target_ms,
                                    tolerance=config.tolerance, rounds=config.replan,
                                    predicted_ms=lambda plan: plan.latency + fixed_ms,
                                    score=lambda plan: plan.importance, identity=lambda plan: plan.chosen)
    except InfeasibleBudgetError as err:
        fastest = whole_ms / (fixed_ms + fastest_latency(candidates, len(stack)))
        raise ConfigError(f"drop_layers: speedup {config.speedup} is out of reach: removing every candidate the "
                          f"plan may remove gives at most {fastest:.2f}x on {probe.backend} (measured per "
                          "candidate); ask for less") from err
    actions = {c.start: c.choice for c in result.plan.chosen if c.choice is not None}
    if len(actions) == len(stack) and all(a == "block" for a in actions.values()):
        raise ConfigError("drop_layers: the plan removes every block; ask for a smaller speedup")
    planning = {"target_speedup": config.speedup, "original_ms": whole_ms, "fixed_ms": fixed_ms,
                "predicted_speedup": whole_ms / (result.plan.latency + fixed_ms), "attempts": result.attempts,
                "measured_speedup": whole_ms / result.attempts[-1]["measured_ms"] if result.attempts else None,
                "table": {key: {"saving_ms": saving[key], "importance": value[key]} for key in variants},
                "importance_metric": config.importance, "backend": probe.backend}
    return actions, planning


def _units(stack: ir.TransformerStack, sublayer: str) -> dict[int, tuple[str, str]]:
    """Block index -> (input node, output node) of what would be removed."""
    units: dict[int, tuple[str, str]] = {}
    for block in stack.blocks:
        if sublayer == "block":
            units[block.index] = (block.input, block.output)
        elif (sub := block.sublayer(sublayer)) is not None:
            units[block.index] = (sub.input, sub.output)
    return units


def _spread(indices: list[int], count: int) -> list[int]:
    """``count`` of ``indices`` evenly spaced, keeping the first and last where there is room."""
    inner = indices[1:-1] if len(indices) - 2 >= count else indices
    if count == 1:
        return [inner[len(inner) // 2]]
    step = (len(inner) - 1) / (count - 1)
    return sorted({inner[round(k * step)] for k in range(count)})
