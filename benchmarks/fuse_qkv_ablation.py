"""Does horizontal fusion pay on CPU ONNX Runtime? fuse_qkv on/off, interleaved, medians of ratios.

Per model, against ``ort_opt`` (the plain export with ORT's graph optimizations):

* ``default``   — ``depthfold.DEFAULT_PASSES`` (fold_bn, merge_linear_chains);
* ``+fuse_qkv`` — plus ``fuse_qkv`` (sibling linears: Q/K/V, gate/up);
* ``+fuse_qkv(convs)`` — plus ``fuse_qkv:fuse_convs=true`` (CNNs only: parallel convs too).

Writes ``benchmarks/results/fuse_qkv_ablation.{json,md}``.

    python benchmarks/fuse_qkv_ablation.py [--models vit_tiny,llama_tiny,resnet50] [--rounds 100]
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

import depthfold
from depthfold import zoo
from depthfold.backends import latency, ort
from depthfold.backends.onnx import to_onnx_model
from depthfold.report import environment

RESULTS = Path(__file__).parent / "results"


def ablate(name: str, *, rounds: int, threads: int) -> dict:
    torch.manual_seed(0)
    model, inputs = zoo.create(name), zoo.example_inputs(name)
    pipelines = {"default": list(depthfold.DEFAULT_PASSES),
                 "+fuse_qkv": [*depthfold.DEFAULT_PASSES, "fuse_qkv"]}
    if zoo.spec(name).family == "cnn":
        pipelines["+fuse_qkv(convs)"] = [*depthfold.DEFAULT_PASSES, "fuse_qkv:fuse_convs=true"]
    results = {k: depthfold.optimize(model, inputs, p) for k, p in pipelines.items()}
    sessions = {"ort_opt": ort.create_session(to_onnx_model(results["default"].original, inputs), threads=threads)}
    sessions |= {k: ort.create_session(to_onnx_model(r.module, inputs), threads=threads) for k, r in results.items()}
    feeds = ort.feeds(sessions["ort_opt"], inputs)
    timed = latency.compare_interleaved({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()},
                                        rounds=rounds, warmup=5, min_sample_ms=50.0, baseline="ort_opt",
                                        threads=threads, backend="onnxruntime", device="cpu")
    fusions = {k: sum(len(rec.changes) for rec in r.records if rec.name == "fuse_qkv") for k, r in results.items()}
    return {"model": name, "rounds": rounds, "calls_per_sample": timed["inner"], "fusions": fusions,
            "vs_ort_opt": {k: {q: v[q] for q in ("median", "p10", "p90")} for k, v in timed["ratios"].items()
                           if k != "ort_opt"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="vit_tiny,llama_tiny,resnet50")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        row = ablate(name, rounds=args.rounds, threads=args.threads)
        print(name, {k: round(v["median"], 4) for k, v in row["vs_ort_opt"].items()}, flush=True)
        rows.append(row)
    payload = {"benchmark": "fuse_qkv_ablation", "threads": args.threads, "environment": environment(),
               "models": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fuse_qkv_ablation.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = ["# fuse_qkv ablation: ORT CPU, batch 1", "",
             f"{args.threads} thread(s), {args.rounds} interleaved rounds (samples average ≥50 ms of calls), "
             f"onnxruntime {payload['environment']['onnxruntime']}. Median (p10–p90) of per-round latency ratios "
             "against the plain export with ORT's graph optimizations; below 1 is faster.", "",
             "| model | pipeline | fusions | vs ORT-opt |", "|---|---|---|---|"]
    for row in rows:
        for k, v in row["vs_ort_opt"].items():
            lines.append(f"| {row['model']} | {k} | {row['fusions'][k]} | "
                         f"{v['median']:.3f} ({v['p10']:.3f}–{v['p90']:.3f}) |")
    (RESULTS / "fuse_qkv_ablation.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'fuse_qkv_ablation.md'}")


if __name__ == "__main__":
    main()
