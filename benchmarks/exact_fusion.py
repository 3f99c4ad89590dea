"""ORT CPU latency per zoo model: plain export, ORT's own graph optimizations, depthfold's exact passes.

Four variants per model, batch 1, timed interleaved in rotated rounds in one process:

* ``plain``     — the ``torch.onnx.export(dynamo=True)`` model, ORT graph optimizations disabled;
* ``ort_opt``   — the same file with ORT's graph optimizations (``ORT_ENABLE_ALL``);
* ``depthfold`` — ``depthfold.optimize(model)`` (``DEFAULT_PASSES``) exported the same way, ORT_ENABLE_ALL;
* ``depthfold_all`` — every exact pass (``EXACT_PASSES``, adds ``fuse_qkv``), same export and session.

Each sample averages enough calls to cover ``MIN_SAMPLE_MS`` (single runs of a few-ms model jitter by ~5%).

Reported: median / p90 latency per variant and the median (p10, p90) of per-round ratios against
``ort_opt`` (and ``depthfold / plain``). Writes ``benchmarks/results/exact_fusion.{json,md}``.

    python benchmarks/exact_fusion.py [--models resnet18,vit_tiny] [--rounds 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

import depthfold
from depthfold import zoo
from depthfold.backends import latency, ort
from depthfold.backends.onnx import to_onnx_model
from depthfold.report import environment

RESULTS = Path(__file__).parent / "results"
MIN_SAMPLE_MS = 50.0
"""Each latency sample averages enough calls to cover at least this long."""


def bench_model(name: str, *, rounds: int, warmup: int, threads: int, resolution: int | None) -> dict:
    torch.manual_seed(0)
    model = zoo.create(name)
    inputs = zoo.example_inputs(name, resolution=resolution)
    start = time.perf_counter()
    result = depthfold.optimize(model, inputs, depthfold.DEFAULT_PASSES)
    optimize_s = time.perf_counter() - start
    every = depthfold.optimize(model, inputs, depthfold.EXACT_PASSES)
    plain_proto = to_onnx_model(result.original, inputs)
    sessions = {
        "plain": ort.create_session(plain_proto, threads=threads, graph_optimization="disable"),
        "ort_opt": ort.create_session(plain_proto, threads=threads, graph_optimization="all"),
        "depthfold": ort.create_session(to_onnx_model(result.module, inputs), threads=threads),
        "depthfold_all": ort.create_session(to_onnx_model(every.module, inputs), threads=threads),
    }
    feeds = {k: ort.feeds(s, inputs) for k, s in sessions.items()}
    calls = {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()}
    timed = latency.compare_interleaved(calls, rounds=rounds, warmup=warmup, min_sample_ms=MIN_SAMPLE_MS,
                                        baseline="ort_opt", threads=threads, backend="onnxruntime", device="cpu")
    plain_ratio = [d / p for d, p in zip(timed["measurements"]["depthfold"].samples_ms,
                                         timed["measurements"]["plain"].samples_ms)]
    summary = result.report["summary"]
    return {
        "model": name,
        "input": list(inputs[0].shape),
        "optimize_seconds": optimize_s,
        "calls_per_sample": timed["inner"],
        "nodes": [summary["before"]["nodes"], summary["after"]["nodes"]],
        "params": [summary["before"]["params"], summary["after"]["params"]],
        "max_rel_error": summary["verification"]["max_rel"],
        "rewrites": {r.name: len(r.changes) for r in every.records},
        "latency_ms": {k: {"median": m.median_ms, "p90": m.p90_ms, "n": m.n}
                       for k, m in timed["measurements"].items()},
        "depthfold_vs_ort_opt": {k: timed["ratios"]["depthfold"][k] for k in ("median", "p10", "p90")},
        "depthfold_all_vs_ort_opt": {k: timed["ratios"]["depthfold_all"][k] for k in ("median", "p10", "p90")},
        "depthfold_vs_plain": {"median": latency.quantile(plain_ratio, 0.5),
                               "p10": latency.quantile(plain_ratio, 0.1),
                               "p90": latency.quantile(plain_ratio, 0.9)},
    }


def to_markdown(payload: dict) -> str:
    lines = [
        "# Exact fusion: ORT CPU latency, batch 1",
        "",
        f"{payload['threads']} thread(s), {payload['rounds']} interleaved rounds per model (each sample "
        f"averages ≥{MIN_SAMPLE_MS:.0f} ms of calls), "
        f"onnxruntime {payload['environment']['onnxruntime']}, torch {payload['environment']['torch']}, "
        f"{payload['environment']['processor'] or payload['environment']['machine']}.",
        "",
        "`depthfold` is the default pipeline (fold_bn, merge_linear_chains); `+fuse_qkv` runs every exact pass.",
        "",
        "| model | input | nodes | plain ms | ORT-opt ms | depthfold ms | depthfold / ORT-opt (p10–p90) "
        "| +fuse_qkv / ORT-opt (p10–p90) | depthfold / plain | rewrites (all exact passes) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["models"]:
        lat, r, rp = row["latency_ms"], row["depthfold_vs_ort_opt"], row["depthfold_vs_plain"]
        ra = row["depthfold_all_vs_ort_opt"]
        rewrites = ", ".join(f"{k} {v}" for k, v in row["rewrites"].items() if v) or "none"
        lines.append(
            f"| {row['model']} | {'×'.join(map(str, row['input']))} | {row['nodes'][0]} → {row['nodes'][1]} | "
            f"{lat['plain']['median']:.2f} | {lat['ort_opt']['median']:.2f} | {lat['depthfold']['median']:.2f} | "
            f"**{r['median']:.3f}** ({r['p10']:.3f}–{r['p90']:.3f}) | {ra['median']:.3f} ({ra['p10']:.3f}–{ra['p90']:.3f}) "
            f"| {rp['median']:.3f} | {rewrites} |")
    worst = max(row["depthfold_vs_ort_opt"]["median"] for row in payload["models"])
    worst_all = max(row["depthfold_all_vs_ort_opt"]["median"] for row in payload["models"])
    lines += ["", f"Worst median ratio depthfold / ORT-opt: **{worst:.3f}** (target ≤ 1.02); "
              f"with fuse_qkv: {worst_all:.3f}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(zoo.list_models()))
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=None, help="vision input size (default: zoo's, 224)")
    parser.add_argument("--out", default=str(RESULTS / "exact_fusion"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        row = bench_model(name, rounds=args.rounds, warmup=args.warmup, threads=args.threads,
                          resolution=args.resolution)
        r = row["depthfold_vs_ort_opt"]
        print(f"{name}: plain {row['latency_ms']['plain']['median']:.2f} ms, ORT-opt "
              f"{row['latency_ms']['ort_opt']['median']:.2f} ms, depthfold {row['latency_ms']['depthfold']['median']:.2f} ms;"
              f" depthfold/ORT-opt median {r['median']:.3f} (p10 {r['p10']:.3f}, p90 {r['p90']:.3f}); +fuse_qkv "
              f"{row['depthfold_all_vs_ort_opt']['median']:.3f}", flush=True)
        rows.append(row)
    payload = {"benchmark": "exact_fusion", "threads": args.threads, "rounds": args.rounds,
               "environment": environment(), "models": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(payload))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
