"""The ``layermerge`` pass: measure, solve, apply, recover, merge.

1. analyse the trunk and enumerate every segment's candidates (:mod:`.trunk`, :mod:`.candidates`);
2. time each candidate layer on the target backend (:mod:`.latency_table`) and the whole model;
3. score each candidate's importance on calibration data (:mod:`.importance`);
4. pick the plan with the DP (:mod:`.solver`) under ``budget = target - fixed``, where ``fixed`` is the
   whole model's latency minus the table's latency of the original layers (stem, pooling, head, ...);
5. build the re-padded compressed network (:mod:`.apply`), fine-tune it towards the original
   (:func:`depthfold.recover`), then merge each segment into one conv exactly and check it numerically.

Source: "LayerMerge: Neural Network Depth Compression through Layer Pruning and Merging" (Kim et al.,
ICML 2024, arXiv:2406.12837); the ``depth`` mode is "Efficient Latency-Aware CNN Depth Compression via
Two-Stage Dynamic Programming" (Kim et al., ICML 2023).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.fx import GraphModule

from ... import ir
from ...errors import ConfigError, PassError
from ...ir import ops
from ..base import Change, Exactness, PassContext, PassResult, Skip
from ..common import metrics
from ..common.calibration import calibration_split
from ..common.replan import plan_with_feedback
from ..recover import recalibrate_batch_norm, recover
from ..registry import register_pass
from .apply import META_SEGMENT, apply_plan, merge_segments
from .candidates import Mode, SegmentChoice, enumerate_choices
from .importance import build_importance_table
from .latency_table import LatencyTable, build_latency_table
from .solver import Candidate, InfeasibleBudgetError, Plan, fastest_latency, solve_plan
from .trunk import Trunk, analyze_trunk

__all__ = ["LayerMergeConfig", "layermerge"]

_REPAD_TARGETS = (torch.ops.aten.constant_pad_nd.default, torch.ops.aten.slice.Tensor)
_WHOLE_MEASUREMENTS = 3
_RECALIBRATION_SAMPLES = 512
_MERGE_RTOL = 1e-4
"""The deployment merge must reproduce the compressed network to this error relative to its output scale."""


@dataclass(frozen=True)
class LayerMergeConfig:
    speedup: float | None = None
    """Target speedup over the input model's latency measured on the same backend (e.g. 1.8)."""
    latency_ms: float | None = None
    """Or an absolute latency target in milliseconds."""
    mode: Literal["layermerge", "depth", "layer"] = "layermerge"
    """``layermerge``: prune convs and activations; ``depth``: remove activations and merge, never prune
    (Kim et al. 2023); ``layer``: prune convs only."""
    importance: Literal["zero_shot", "local", "finetune"] = "local"
    importance_steps: int = 20
    """Training steps per candidate for the ``local`` and ``finetune`` estimators."""
    max_span: int = 8
    """Longest segment, in positions."""
    max_kernel: int = 9
    """Largest merged kernel considered."""
    recover_steps: int = 200
    """Distillation steps on the compressed network before the final merge (0: none)."""
    lr: float = 1e-3
    """Learning rate of the ``local`` and ``finetune`` importance estimators' training."""
    recover_lr: float = 1e-4
    """Peak learning rate of the recovery fine-tune (cosine decay). On digits ResNet-34 at 1.5x, 1e-3 undid
    the batch-norm recalibration (held-out accuracy 98.4 -> 96.9%); 1e-4 reached 100%."""
    recalibrate_bn: bool = True
    """Re-estimate the compressed network's batch-norm statistics on calibration data before recovery."""
    recover_label_weight: float = 0.5
    """Weight of the cross-entropy on the data's labels during recovery, when it has labels (KL on the
    original's logits always)."""
    resolution: float | None = None
    """DP latency step in ms (default: budget / 5000)."""
    batch_size: int = 64
    eval_samples: int = 128
    """Held-out calibration samples that importance and accuracy are measured on."""
    train_samples: int = 2048
    """Calibration samples used for training (local importance, recovery)."""
    use_cache: bool = True
    """Reuse cached table entries: latency keyed by backend, device, versions and layer; importance by
    graph, weights, calibration data, estimator settings and candidate."""
    time_budget_s: float = 0.0
    """Stop building the latency and importance tables after this many seconds (0: no limit) with a
    :class:`~depthfold.errors.TimeBudgetError`; the entries finished by then are cached, so rerunning continues."""
    replan: int = 4
    """Measure the planned network and re-solve with the budget corrected by the error, up to this many
    times (0: trust the table)."""
    tolerance: float = 0.02
    """Replanning stops once the measured latency is within this fraction of the target."""


def _check(config: LayerMergeConfig) -> None:
    if (config.speedup is None) == (config.latency_ms is None):
        raise ConfigError("layermerge needs exactly one budget: speedup=... (e.g. layermerge:speedup=1.8) or "
                          "latency_ms=...")
    if config.speedup is not None and not config.speedup > 1.0:
        raise ConfigError(f"layermerge speedup must be > 1, got {config.speedup}")
    if config.latency_ms is not None and not config.latency_ms > 0:
        raise ConfigError(f"layermerge latency_ms must be > 0, got {config.latency_ms}")
    for name in ("max_span", "max_kernel", "batch_size", "eval_samples", "train_samples"):
        if getattr(config, name) < 1:
            raise ConfigError(f"layermerge {name} must be >= 1, got {getattr(config, name)}")
    if not 0.0 <= config.tolerance < 1.0:
        raise ConfigError(f"layermerge tolerance must lie in [0, 1), got {config.tolerance}")
    if not config.time_budget_s >= 0.0:
        raise ConfigError(f"layermerge time_budget_s must be >= 0 (0: no limit), got {config.time_budget_s}")
    for name in ("importance_steps", "recover_steps", "replan"):
        if getattr(config, name) < 0:
            raise ConfigError(f"layermerge {name} must be >= 0, got {getattr(config, name)}")


@register_pass("layermerge", exactness=Exactness.APPROXIMATE, config=LayerMergeConfig, uses_context=True)
def layermerge(gm: GraphModule, config: LayerMergeConfig, context: PassContext) -> PassResult:
    """Remove activations and convs under a latency budget, chosen by DP on measured tables (LayerMerge)."""
    _check(config)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    inputs = tuple(context.example_inputs)
    if len(inputs) != 1 or not inputs[0].dtype.is_floating_point:
        raise ConfigError("layermerge compresses single-input CNNs: give one example image batch, e.g. "
                          "(torch.randn(1, 3, 224, 224),)")
    trunk = analyze_trunk(gm)
    mode: Mode = config.mode
    rejected: Counter[str] = Counter()
    choices = enumerate_choices(trunk, mode=mode, max_span=config.max_span, max_kernel=config.max_kernel,
                                rejected=rejected)
    if not any(c.kind in ("merged", "pruned") for c in choices):
        reasons = "; ".join(f"{b.nodes[0]}: {b.reason}" for b in trunk.barriers[:8])
        left_out = "; ".join(f"{reason} ({n}x)" for reason, n in rejected.most_common(3))
        raise ConfigError(f"layermerge found nothing to compress: no segment of the trunk ({len(trunk.layers())} "
                          f"layers, {trunk.num_positions} positions) can remove an activation or prune a layer in "
                          f"mode={config.mode}. Barriers: {reasons or 'none'}"
                          + (f". Merges left out: {left_out}" if left_out else "")
                          + ". Try mode=layermerge, a larger max_span or max_kernel, or the exact passes")
    timings["enumerate_s"] = time.perf_counter() - clock
    calib = calibration_split(context.data, inputs, names=ir.input_names(gm), eval_samples=config.eval_samples,
                              train_samples=config.train_samples, batch_size=config.batch_size, seed=context.seed)
    deadline = time.monotonic() + config.time_budget_s if config.time_budget_s else None
    latency = build_latency_table(gm, trunk, choices, context.latency_probe, executor=context.executor,
                                  use_cache=config.use_cache, progress=context.progress, deadline=deadline)
    # The median of separate measurements: every target and the fixed part hang on this one number, and a
    # single measurement on a shared machine is sometimes 10-20% slow.
    whole_ms = statistics.median(float(context.latency_probe.measure(gm, inputs)["median_ms"])
                                 for _ in range(_WHOLE_MEASUREMENTS))
    importance = build_importance_table(gm, trunk, choices, calib, estimator=config.importance,
                                        steps=config.importance_steps, lr=config.lr, use_cache=config.use_cache,
                                        executor=context.executor, progress=context.progress, deadline=deadline)

    originals = {c.start: i for i, c in enumerate(choices)
                 if c.end == c.start + 1 and c.kind in ("original", "barrier")}
    missing = [s for s in range(trunk.num_positions) if s not in originals]
    if missing:
        raise PassError(f"layermerge: segment ({missing[0]}, {missing[0] + 1}] has no 'original' candidate; "
                        "cannot relate the table to the whole model's latency")
    calibration = _calibrate(gm, inputs, context.latency_probe, latency, [latency.median_ms[i] for i in originals.values()],
                             whole_ms)
    layer_ms = [calibration["scale"] * ms for ms in latency.median_ms]
    table_original_ms = sum(layer_ms[i] for i in originals.values())
    fixed_ms = whole_ms - table_original_ms
    target_ms = whole_ms / config.speedup if config.speedup is not None else float(config.latency_ms)  # type: ignore[arg-type]
    candidates = [Candidate(c.start, c.end, layer_ms[i], importance.metric[i], i)
                  for i, c in enumerate(choices)]
    clock = time.perf_counter()
    plan, attempts = _plan_with_feedback(gm, trunk, choices, candidates, inputs, context, config,
                                         target_ms=target_ms, fixed_ms=fixed_ms, whole_ms=whole_ms)
    timings["plan_s"] = time.perf_counter() - clock  # DP solves and the replanning measurements
    chosen = [choices[c.choice] for c in plan.chosen]

    held_out = calib.held_out

    def held_out_logits(model: GraphModule) -> torch.Tensor:
        return metrics.batched_outputs(model, held_out, calib.batch_size)

    def held_out_accuracy(model: GraphModule) -> float | None:
        logits = held_out_logits(model)
        return metrics.accuracy(logits, logits, held_out)

    compressed, segments = apply_plan(gm, trunk, chosen)
    ir.annotate(compressed, inputs)
    accuracy_compressed = held_out_accuracy(compressed)
    recalibrated = 0
    if config.recalibrate_bn:
        recalibrated = recalibrate_batch_norm(compressed, calib.train.inputs[0][:_RECALIBRATION_SAMPLES],
                                              batch_size=calib.batch_size)
    accuracy_before = held_out_accuracy(compressed) if recalibrated else accuracy_compressed
    recovery = None
    if config.recover_steps:
        clock = time.perf_counter()
        labelled = calib.train.labels is not None and config.recover_label_weight > 0
        recovery = recover(compressed, gm, (calib.train.inputs[0], calib.train.labels) if labelled else calib.train.inputs[0],
                           steps=config.recover_steps, lr=config.recover_lr, batch_size=calib.batch_size,
                           label_weight=config.recover_label_weight if labelled else 0.0, seed=context.seed,
                           progress=context.progress)
        timings["recover_s"] = time.perf_counter() - clock
    merged, merged_nodes = merge_segments(compressed, segments)
    ir.annotate(merged, inputs)
    merge_error = _check_merge(compressed, merged, held_out.inputs[0][: calib.batch_size], inputs)
    residue = [n.name for n in merged.graph.nodes if META_SEGMENT in n.meta and n.target in _REPAD_TARGETS]
    if residue:
        raise PassError(f"layermerge: re-padding nodes {', '.join(residue[:5])} survived the merge; this is a bug "
                        "in the merge, please report it with the model")
    speedup = context.latency_probe.speedup(gm, merged, inputs)
    measured_ms = whole_ms / speedup["median"]
    teacher = held_out_logits(gm)
    student = held_out_logits(merged)
    predicted_ms = plan.latency + fixed_ms
    changes = []
    merged_by_segment = {seg.index: node.name for seg, node in zip(segments, merged_nodes) if node is not None}
    seg_index = 0
    for cand, choice in zip(plan.chosen, chosen):
        if choice.kind in ("original", "barrier"):
            continue
        added: tuple[str, ...] = ()
        if choice.kind == "merged":
            name = merged_by_segment.get(seg_index)
            added = (name,) if name else ()
            seg_index += 1
        changes.append(Change(choice.kind, (*choice.kept, *choice.pruned, *choice.removed_acts), added,
                              {**choice.to_dict(), "label": choice.label, "latency_ms": cand.latency,
                               "importance": importance.importance[cand.choice]}))
    skipped = [Skip(b.nodes[0], f"barrier: {b.reason}") for b in trunk.barriers]
    report = {
        "mode": config.mode, "budget": {"speedup": config.speedup, "latency_ms": config.latency_ms,
                                        "target_ms": target_ms},
        "latency": {"original_ms": whole_ms, "predicted_ms": predicted_ms, "measured_ms": measured_ms,
                    "predicted_speedup": whole_ms / predicted_ms, "measured_speedup": speedup["median"],
                    "measured_speedup_p10": speedup["p10"], "measured_speedup_p90": speedup["p90"],
                    "prediction_error": measured_ms / predicted_ms - 1.0, "fixed_ms": fixed_ms,
                    "fastest_predicted_speedup": whole_ms / (fastest_latency(candidates, trunk.num_positions)
                                                             + fixed_ms)},
        "plan": [{**choices[c.choice].to_dict(), "label": choices[c.choice].label, "latency_ms": c.latency,
                  "importance": importance.importance[c.choice]} for c in plan.chosen],
        "importance_sum": sum(importance.importance[c.choice] for c in plan.chosen),
        "log_importance_sum": plan.importance,
        "trunk": trunk.summary(),
        "coverage": _coverage(gm, trunk, choices, layer_ms, whole_ms),
        "rejected_merges": dict(rejected.most_common(10)),
        "tables": {"latency": latency.summary() | {"calibration": calibration}, "importance": importance.summary()},
        "timings": {**timings, "latency_table_s": latency.seconds, "importance_table_s": importance.seconds},
        "accuracy": {"original": importance.original_accuracy, "compressed": accuracy_compressed,
                     "batch_norms_recalibrated": recalibrated, "compressed_before_recovery": accuracy_before,
                     "after_recovery": metrics.accuracy(teacher, student, held_out),
                     "output_kl": metrics.kl_divergence(teacher, student, held_out),
                     "samples": len(held_out), "synthetic_data": calib.synthetic},
        "recovery": recovery.to_dict() if recovery else None,
        "replanning": attempts,
        "merge_max_rel_error": merge_error,
    }
    return PassResult(merged, changes, skipped, report=report)


def _solve(candidates: list[Candidate], num_positions: int, budget: float, config: LayerMergeConfig, *,
           target_ms: float, fixed_ms: float, whole_ms: float) -> Plan:
    try:
        # A target below the fixed part is infeasible; a tiny positive budget lets the solver say by how much.
        return solve_plan(candidates, num_positions=num_positions, budget=max(budget, 1e-9),
                          resolution=config.resolution)
    except InfeasibleBudgetError as err:
        fastest = err.min_latency + fixed_ms
        raise InfeasibleBudgetError(
            f"layermerge: no plan reaches {target_ms:.3f} ms (the model measures {whole_ms:.3f} ms); the fastest "
            f"plan is predicted at {fastest:.3f} ms (speedup {whole_ms / fastest:.2f}x). Ask for less, or allow "
            "more candidates (max_span, max_kernel, mode=layermerge)", min_latency=fastest,
            budget=target_ms) from err


def _plan_with_feedback(gm: GraphModule, trunk: Trunk, choices: list[SegmentChoice], candidates: list[Candidate],
                        inputs: tuple[torch.Tensor, ...], context: PassContext, config: LayerMergeConfig, *,
                        target_ms: float, fixed_ms: float, whole_ms: float) -> tuple[Plan, list[dict]]:
    """Solve, then measure the planned network and re-solve with a corrected budget, up to ``config.replan``
    times (:func:`~depthfold.passes.common.replan.plan_with_feedback`). The planned network is timed merged
    with untrained weights (latency does not depend on them), interleaved with the original as a speedup, so
    machine drift cancels."""
    kwargs = {"target_ms": target_ms, "fixed_ms": fixed_ms, "whole_ms": whole_ms}

    def measure(plan: Plan) -> float:
        draft, segments = apply_plan(gm, trunk, [choices[c.choice] for c in plan.chosen], share_params=True)
        ir.annotate(draft, inputs)
        merged, _ = merge_segments(draft, segments)
        return whole_ms / context.latency_probe.speedup(gm, merged, inputs)["median"]

    result = plan_with_feedback(lambda budget: _solve(candidates, trunk.num_positions, budget, config, **kwargs),
                                measure, budget=target_ms - fixed_ms, target_ms=target_ms,
                                tolerance=config.tolerance, rounds=config.replan,
                                predicted_ms=lambda plan: plan.latency + fixed_ms,
                                score=lambda plan: plan.importance, identity=lambda plan: plan.chosen)
    return result.plan, result.attempts


def _calibrate(gm: GraphModule, inputs: tuple[torch.Tensor, ...], probe: Any, latency: LatencyTable,
               original_ms: list[float], whole_ms: float) -> dict[str, float]:
    """Put a table of profiled kernel times in the units of the whole model's end-to-end latency.

    A backend timing layers by their kernels (ORT CPU's profiler) reports each kernel with the profiler's
    own per-node cost, which on a network of tiny layers is a large share: the layers then sum to more than
    the whole model. Profiling the whole network the same way gives ``K``; every entry is scaled by
    ``whole / max(K, sum of the original layers)``, so the original layers keep their share of ``K`` and
    never exceed the whole model (the part outside the trunk stays >= 0)."""
    if probe.layer_scope != "kernels":
        return {"scale": 1.0}
    network_ms = statistics.median(float(probe.measure_layer(gm, inputs, cold=latency.cold)["median_ms"])
                                   for _ in range(_WHOLE_MEASUREMENTS))
    table_ms = sum(original_ms)
    return {"scale": whole_ms / max(network_ms, table_ms), "network_kernels_ms": network_ms,
            "original_layers_ms": table_ms}


def _coverage(gm: GraphModule, trunk: Trunk, choices: list[SegmentChoice], latency_ms: list[float],
              whole_ms: float) -> dict[str, object]:
    """How much of the network LayerMerge can touch: the convs/linears lying on a segment with a merged or
    pruned candidate, their share of all the network's convs/linears, and the share of the measured latency
    the single-position segments holding them take."""
    layers = [n for n in gm.graph.nodes if ops.is_conv(n) or ops.is_linear(n)]
    on_trunk = {layer.conv for layer in trunk.layers()}
    compressible = {name for c in choices if c.kind in ("merged", "pruned") for name in (*c.kept, *c.pruned)}
    by_layer = {layer.conv: layer for layer in trunk.layers()}
    covered_ms = 0.0
    for choice, ms in zip(choices, latency_ms):
        if choice.kind == "original" and choice.end == choice.start + 1 and set(choice.kept) & compressible:
            covered_ms += ms
    return {"layers": len(layers), "on_trunk": len(on_trunk), "compressible": len(compressible),
            "compressible_share": len(compressible) / len(layers) if layers else 0.0,
            "compressible_linears": sum(by_layer[n].linear for n in compressible if n in by_layer),
            "compressible_latency_ms": covered_ms,
            "compressible_latency_share": covered_ms / whole_ms if whole_ms > 0 else 0.0,
            "barriers": [{"node": b.nodes[0], "nodes": len(b.nodes), "reason": b.reason} for b in trunk.barriers]}


def _check_merge(compressed: GraphModule, merged: GraphModule, batch: torch.Tensor,
                 inputs: tuple[torch.Tensor, ...]) -> float:
    """Largest error of the merged network relative to the compressed one's output scale (must be tiny)."""
    worst = 0.0
    with torch.no_grad():
        for x in (inputs[0], batch):
            a = ir.flatten_outputs(compressed(x))[0].double()
            b = ir.flatten_outputs(merged(x))[0].double()
            worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-12)))
    if worst > _MERGE_RTOL:
        raise PassError(f"layermerge: merging the segments changed the output by {worst:.2e} (relative); this "
                        "is a bug in the merge, please report it with the model")
    return worst
