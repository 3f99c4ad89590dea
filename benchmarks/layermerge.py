"""LayerMerge end to end on ONNX Runtime CPU: speedup targets, accuracy after recovery, pipeline time.

Sections (each optional, ``--sections latency,accuracy,pipeline,importance_executors``):

* ``latency`` — zoo MobileNetV2-1.0 and ResNet-34 (random weights), batch 1, 224x224, targets 1.3 / 1.6 /
  2.0: the DP's predicted speedup vs the speedup of the exported ONNX models timed interleaved (original
  vs compressed, ``OptimizeResult.measure``). Importance is irrelevant to latency here, so it uses the
  cheap ``zero_shot`` estimator on 4 synthetic inputs and no recovery.
* ``accuracy`` — digits-trained ResNet-34 and MobileNetV2-1.0 at 64x64 (per-call overhead no longer
  dominates), target 1.5x, each importance estimator: test accuracy before / after, measured speedup,
  table build times.
* ``pipeline`` — the full pipeline (local estimator, solve, apply, recover, merge, export) for digits
  ResNet-34 at 64x64 with a cold latency cache, then again warm.
* ``importance_executors`` — the digits ResNet-34 importance table at 64x64 (``local`` estimator, the pass's
  default settings as in ``accuracy``, no cache) built serially in this process and as jobs on a local Ray
  (``ray.init(num_cpus=--ray-cpus)``): both build times, and whether the two tables match.

Writes ``benchmarks/results/layermerge.{json,md}``.

    python benchmarks/layermerge.py [--sections latency] [--rounds 20]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import depthfold
from depthfold import zoo
from depthfold.report import environment
from depthfold.zoo.data import digits_datasets
from depthfold.zoo.train import evaluate_accuracy, pretrained_digits

RESULTS = Path(__file__).parent / "results"


def _layermerge(result: depthfold.OptimizeResult) -> dict:
    return next(r for r in result.records if r.name == "layermerge").details


def bench_latency(models: list[str], targets: list[float], rounds: int) -> list[dict]:
    rows = []
    for name in models:
        torch.manual_seed(0)
        model = zoo.create(name).eval()
        x = torch.randn(1, 3, 224, 224)
        for target in targets:
            start = time.perf_counter()
            spec = f"layermerge:speedup={target},importance=zero_shot,eval_samples=4,recover_steps=0"
            result = depthfold.optimize(model, (x,), [spec], verify=False)
            seconds = time.perf_counter() - start
            details = _layermerge(result)
            measured = result.measure(rounds=rounds)
            speedup = measured["speedup"]
            predicted = details["latency"]["predicted_speedup"]
            rows.append({
                "model": name, "target": target, "predicted_speedup": predicted,
                "measured_speedup": speedup["median"], "measured_p10": speedup["p10"], "measured_p90": speedup["p90"],
                "measured_over_target": speedup["median"] / target,
                "measured_over_predicted": speedup["median"] / predicted,
                "segments_changed": len(result.records[0].changes), "optimize_s": seconds,
                "latency_table": details["tables"]["latency"] | {"probe": None},
                "plan": [p["label"] + f" ({p['start']},{p['end']}]" for p in details["plan"]
                         if p["kind"] not in ("original", "barrier")],
            })
            print(f"{name} x{target}: predicted {predicted:.3f}, measured {speedup['median']:.3f} "
                  f"(p10 {speedup['p10']:.3f}, p90 {speedup['p90']:.3f}), {seconds:.0f} s", flush=True)
    return rows


def bench_accuracy(models: list[str], estimators: list[str], target: float, resolution: int, rounds: int,
                   finetune_steps: int) -> list[dict]:
    rows = []
    train, test = digits_datasets(resolution=resolution)
    for name in models:
        model = pretrained_digits(name, resolution=resolution)
        original_acc = evaluate_accuracy(model, test)
        x = test.tensors[0][:1]
        for estimator in estimators:
            start = time.perf_counter()
            spec = f"layermerge:speedup={target},importance={estimator}"
            if estimator == "finetune":
                spec += f",importance_steps={finetune_steps}"
            result = depthfold.optimize(model, (x,), [spec], data=train, verify=False)
            seconds = time.perf_counter() - start
            details = _layermerge(result)
            measured = result.measure(rounds=rounds)
            acc = evaluate_accuracy(result.module, test)
            rows.append({
                "model": name, "estimator": estimator, "target": target, "test_accuracy_original": original_acc,
                "importance_steps": finetune_steps if estimator == "finetune" else None,
                "test_accuracy_compressed": acc, "accuracy_drop_points": 100 * (original_acc - acc),
                "calibration_accuracy_before_recovery": details["accuracy"]["compressed_before_recovery"],
                "measured_speedup": measured["speedup"]["median"],
                "predicted_speedup": details["latency"]["predicted_speedup"],
                "importance_table_s": details["timings"]["importance_table_s"],
                "latency_table_s": details["timings"]["latency_table_s"],
                "recover_s": details["timings"].get("recover_s"), "optimize_s": seconds,
            })
            print(f"{name} {estimator}: acc {original_acc:.4f} -> {acc:.4f}, speedup "
                  f"{measured['speedup']['median']:.3f}, importance {details['timings']['importance_table_s']:.0f} s, "
                  f"total {seconds:.0f} s", flush=True)
    return rows


def bench_pipeline(resolution: int) -> dict:
    train, test = digits_datasets(resolution=resolution)
    model = pretrained_digits("resnet34", resolution=resolution)
    x = test.tensors[0][:1]
    times = {}
    saved = os.environ.get("DEPTHFOLD_CACHE")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(saved) if saved else Path.home() / ".cache" / "depthfold"
        os.environ["DEPTHFOLD_CACHE"] = tmp  # a cold latency cache (trained weights were loaded above)
        try:
            for run in ("cold", "warm"):
                start = time.perf_counter()
                result = depthfold.optimize(model, (x,), ["layermerge:speedup=1.5", "fold_bn"], data=train)
                result.export_onnx(Path(tmp) / f"{run}.onnx")
                times[run] = time.perf_counter() - start
                print(f"pipeline {run}: {times[run]:.0f} s", flush=True)
        finally:
            if saved is None:
                os.environ.pop("DEPTHFOLD_CACHE", None)
            else:
                os.environ["DEPTHFOLD_CACHE"] = saved
            shutil.rmtree(Path(tmp) / "layermerge", ignore_errors=True)
        del root
    return {"model": "resnet34", "resolution": resolution, "cold_s": times["cold"], "warm_s": times["warm"],
            "test_accuracy": evaluate_accuracy(result.module, test)}


def bench_importance_executors(resolution: int, ray_cpus: int) -> dict:
    import ray

    from depthfold import ir
    from depthfold.passes.common.calibration import calibration_split
    from depthfold.passes.layermerge import LayerMergeConfig
    from depthfold.passes.layermerge.candidates import enumerate_choices
    from depthfold.passes.layermerge.importance import build_importance_table
    from depthfold.passes.layermerge.trunk import analyze_trunk

    train, test = digits_datasets(resolution=resolution)
    model = pretrained_digits("resnet34", resolution=resolution)
    x = test.tensors[0][:1]
    gm = ir.capture(model, (x,)).graph_module
    config = LayerMergeConfig()  # what the accuracy section's `layermerge:speedup=1.5,importance=local` uses
    trunk = analyze_trunk(gm)
    choices = enumerate_choices(trunk, mode=config.mode, max_span=config.max_span, max_kernel=config.max_kernel)
    calib = calibration_split(train, (x,), names=ir.input_names(gm), eval_samples=config.eval_samples,
                              train_samples=config.train_samples, batch_size=config.batch_size)

    def build(executor: str):
        return build_importance_table(gm, trunk, choices, calib, estimator="local", steps=config.importance_steps,
                                      lr=config.lr, use_cache=False, executor=executor)

    serial = build("serial")
    print(f"importance serial: {serial.seconds:.0f} s", flush=True)
    start = time.perf_counter()
    ray.init(num_cpus=ray_cpus, include_dashboard=False)
    ray_init_s = time.perf_counter() - start
    try:
        on_ray = build("ray")
    finally:
        ray.shutdown()
    print(f"importance ray ({ray_cpus} CPUs): {on_ray.seconds:.0f} s", flush=True)
    pairs = list(zip(serial.metric, on_ray.metric))
    return {
        "model": "resnet34", "resolution": resolution, "estimator": "local", "steps": config.importance_steps,
        "candidates": len(choices), "scored": sum(serial.ran_on.values()), "trained": serial.trained,
        "serial_s": serial.seconds, "serial_torch_threads": torch.get_num_threads(),
        "ray_s": on_ray.seconds, "ray_init_s": ray_init_s, "ray_cpus": ray_cpus, "ray_workers": len(on_ray.ran_on),
        "tables_match": all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in pairs)
        and serial.accuracy == on_ray.accuracy,
        "max_abs_metric_diff": max(abs(a - b) for a, b in pairs),
    }


def to_markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = ["# LayerMerge on ONNX Runtime CPU", "",
             f"{env.get('cpu_count')} CPU(s), onnxruntime {env.get('onnxruntime')}, torch {env.get('torch')}, "
             f"1 thread, batch 1.", ""]
    if payload.get("latency"):
        lines += ["## Speedup targets (224x224)", "",
                  "Random weights, `zero_shot` importance on 4 synthetic inputs, no recovery. Measured = median of "
                  "interleaved per-round ratios original / compressed ONNX (p10–p90). Predicted = the latency "
                  "table's prediction for the returned plan (each layer timed by its own kernels in ORT's "
                  "profiler; the whole model's latency minus the original layers' is the fixed part). The pass "
                  "also times each planned network interleaved with the original and re-solves with a corrected "
                  "budget (`replan`). With random weights the zero-shot importances are all ~0 (tied), so the DP "
                  "returns the fastest tied plan within the budget: ResNet-34 overshoots low targets.", "",
                  "| model | target | predicted | measured (p10–p90) | measured / target | measured / predicted |"
                  " segments changed | optimize s |", "|---|---|---|---|---|---|---|---|"]
        for r in payload["latency"]:
            lines.append(f"| {r['model']} | {r['target']} | {r['predicted_speedup']:.3f} | {r['measured_speedup']:.3f} "
                         f"({r['measured_p10']:.3f}–{r['measured_p90']:.3f}) | {r['measured_over_target']:.3f} | "
                         f"{r['measured_over_predicted']:.3f} | {r['segments_changed']} | {r['optimize_s']:.0f} |")
        lines.append("")
    if payload.get("accuracy"):
        lines += ["## Digits accuracy at 1.5x (64x64)", "",
                  "| model | estimator | test acc original | test acc compressed | drop (points) | measured speedup |"
                  " predicted | importance table s | recover s | total s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in payload["accuracy"]:
            estimator = r["estimator"] + (f" ({r['importance_steps']} steps)" if r.get("importance_steps") else "")
            lines.append(f"| {r['model']} | {estimator} | {r['test_accuracy_original']:.4f} | "
                         f"{r['test_accuracy_compressed']:.4f} | {r['accuracy_drop_points']:.2f} | "
                         f"{r['measured_speedup']:.3f} | {r['predicted_speedup']:.3f} | {r['importance_table_s']:.0f} | "
                         f"{r['recover_s'] or 0:.0f} | {r['optimize_s']:.0f} |")
        lines.append("")
    if payload.get("pipeline"):
        p = payload["pipeline"]
        lines += ["## Full pipeline, digits ResNet-34 64x64 (local estimator, recover, merge, export)", "",
                  f"Cold latency cache: **{p['cold_s']:.0f} s**; warm: **{p['warm_s']:.0f} s**; "
                  f"test accuracy {p['test_accuracy']:.4f}.", ""]
    if payload.get("importance_executors"):
        r = payload["importance_executors"]
        lines += ["## Importance table, serial vs Ray (digits ResNet-34 64x64, local estimator)", "",
                  f"{r['candidates']} candidates, {r['scored']} scored ({r['trained']} trained, {r['steps']} steps), "
                  "no cache. Serial: in this process with "
                  f"{r['serial_torch_threads']} torch threads; Ray: jobs on a local `ray.init(num_cpus={r['ray_cpus']})` "
                  f"({r['ray_workers']} worker processes, one torch thread each; Ray's {r['ray_init_s']:.0f} s start-up "
                  "not included).", "",
                  "| build | seconds |", "|---|---|",
                  f"| serial | {r['serial_s']:.0f} |", f"| ray | {r['ray_s']:.0f} |", "",
                  f"Tables match (rtol 1e-5, atol 1e-6; accuracies equal): **{r['tables_match']}** "
                  f"(max metric difference {r['max_abs_metric_diff']:.1e}).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="latency,accuracy,pipeline,importance_executors")
    parser.add_argument("--latency-models", default="mobilenetv2_100,resnet34")
    parser.add_argument("--targets", default="1.3,1.6,2.0")
    parser.add_argument("--accuracy-models", default="resnet34,mobilenetv2_100")
    parser.add_argument("--estimators", default="zero_shot,local,finetune")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--finetune-steps", type=int, default=10,
                        help="steps per candidate for the finetune estimator (its whole-network cost)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray for importance_executors")
    parser.add_argument("--out", default=str(RESULTS / "layermerge"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    sections = set(args.sections.split(","))
    out = Path(args.out)
    payload: dict = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    payload["environment"] = environment()
    if "latency" in sections:
        payload["latency"] = bench_latency(args.latency_models.split(","), [float(t) for t in args.targets.split(",")],
                                           args.rounds)
    if "accuracy" in sections:
        rows = bench_accuracy(args.accuracy_models.split(","), args.estimators.split(","), 1.5, args.resolution,
                              args.rounds, args.finetune_steps)
        fresh = {(r["model"], r["estimator"]) for r in rows}  # earlier runs' other rows are kept
        payload["accuracy"] = [r for r in payload.get("accuracy", []) if (r["model"], r["estimator"]) not in fresh]
        payload["accuracy"] += rows
    if "pipeline" in sections:
        payload["pipeline"] = bench_pipeline(args.resolution)
    if "importance_executors" in sections:
        payload["importance_executors"] = bench_importance_executors(args.resolution, args.ray_cpus)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(to_markdown(payload))
    print(to_markdown(payload))


if __name__ == "__main__":
    main()
