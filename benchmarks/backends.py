"""ORT CPU vs TVM x86 latency per zoo model: depthfold's default schedules, TVM's stock pipeline, and
MetaSchedule-tuned TVM with a small trial budget.

Variants per model, batch 1, timed interleaved in rotated rounds in one process (``latency.compare_interleaved``):

* ``ort``        — ``torch.onnx.export(dynamo=True)`` model in ONNX Runtime (CPU EP, ORT_ENABLE_ALL);
* ``tvm``        — ``depthfold.backends.tvm.compile(model, target="x86")``: channels-last, register-tiled
  default schedules (``depthfold.backends.tvm.schedules``) with each inverted residual fused into one kernel
  (``depthfold.backends.tvm.block_fusion``), untuned;
* ``tvm_per_layer`` — ``schedules="per_layer"``: the same schedules, one kernel per layer, with ``--per-layer``;
* ``tvm_stock``  — ``schedules="tvm"``: TVM's own CPU pipeline (unscheduled loops), with ``--stock``;
* ``tvm_tuned``  — default schedules + ``tune_trials=N`` (MetaSchedule here; the faster of tuned and default is
  kept), when ``--tune-trials N > 0``.

Also per TVM build: compile seconds and achieved GFLOP/s against this machine's measured peak (square
MatMul in ONNX Runtime on the same thread count), from the artifact's ``efficiency`` record.

All variants run with the same fixed thread count (ORT ``intra_op_num_threads``; TVM's thread pool). Each sample
averages enough calls to cover ``MIN_SAMPLE_MS``. Reported: median / p90 per variant and the median (p10, p90) of
per-round ratios ``t_variant / t_ort`` (below 1: TVM faster). Every TVM build is checked against torch (1e-4
relative) before it is timed. Writes ``benchmarks/results/backends.{json,md}``.

    python benchmarks/backends.py [--models resnet18,vit_tiny] [--resolution 224] [--rounds 20] [--tune-trials 64]
                                  [--stock] [--per-layer]

Tuning costs minutes per model (MetaSchedule builds and measures ``N`` candidates per run; records are cached
per target under ``$DEPTHFOLD_CACHE/tvm-tuning``). Numbers are for the machine that ran it only.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from depthfold import zoo
from depthfold.backends import latency, ort
from depthfold.backends import tvm as tvm_backend
from depthfold.backends.onnx import to_onnx_model
from depthfold.errors import BackendUnavailableError
from depthfold.report import environment

RESULTS = Path(__file__).parent / "results"
MIN_SAMPLE_MS = 50.0
"""Each latency sample averages enough calls to cover at least this long."""
IMAGE_MODELS = [n for n in zoo.list_models() if zoo.spec(n).family != "llm"]


def bench_model(name: str, *, rounds: int, warmup: int, threads: int, resolution: int, tune_trials: int,
                stock: bool, per_layer: bool, work: Path) -> dict:
    torch.manual_seed(0)
    kwargs: dict = {"num_classes": 10}
    if zoo.spec(name).family == "vit":
        kwargs.update(img_size=resolution, patch_size=max(4, resolution // 8))
    model = zoo.create(name, **kwargs)
    inputs = zoo.example_inputs(name, batch=1, resolution=resolution)
    ep = torch.export.export(model, inputs)
    session = ort.create_session(to_onnx_model(ep.module(), inputs), threads=threads)
    feed = ort.feeds(session, inputs)
    fns = {"ort": lambda: session.run(None, feed)}
    builds: dict[str, dict] = {}
    variants = [("tvm", 0, "depthfold")] + ([("tvm_per_layer", 0, "per_layer")] if per_layer else []) \
        + ([("tvm_stock", 0, "tvm")] if stock else []) \
        + ([("tvm_tuned", tune_trials, "depthfold")] if tune_trials else [])
    for label, trials, schedules in variants:
        start = time.perf_counter()
        try:
            art = tvm_backend.compile(ep, inputs, "x86", tune_trials=trials, schedules=schedules,
                                      out_dir=work / name / label)
        except BackendUnavailableError as err:  # e.g. MetaSchedule crashing in another apache-tvm build
            builds[label] = {"tune_trials": trials, "unavailable": str(err)}
            print(f"{name}: {label} unavailable: {err}", flush=True)
            continue
        builds[label] = {"compile_seconds": time.perf_counter() - start, "tune_trials": trials,
                         "schedules": schedules, "max_rel_error": art.meta["verification"]["max_rel_error"],
                         "efficiency": art.meta.get("efficiency"), "tuning": art.meta.get("tuning")}
        fns[label] = tvm_backend.prepare(art, inputs, threads=threads)[0]
    timed = latency.compare_interleaved(fns, rounds=rounds, warmup=warmup, min_sample_ms=MIN_SAMPLE_MS,
                                        baseline="ort", threads=threads, backend="ort-vs-tvm", device="cpu")
    flops = next(b["efficiency"]["gflop"] for b in builds.values() if b.get("efficiency"))
    return {
        "model": name,
        "input": list(inputs[0].shape),
        "gflop": flops,
        "gflops": {k: flops / (m.median_ms * 1e-3) for k, m in timed["measurements"].items()},
        "peak_gflops": latency.peak_gflops(threads),
        "calls_per_sample": timed["inner"],
        "builds": builds,
        "latency_ms": {k: {"median": m.median_ms, "p90": m.p90_ms, "n": m.n} for k, m in timed["measurements"].items()},
        "ratio_vs_ort": {k: {q: timed["ratios"][k][q] for q in ("median", "p10", "p90")} for k in fns if k != "ort"},
    }


def to_markdown(payload: dict) -> str:
    env = payload["environment"]
    models = payload["models"]
    labels = [k for k in ("tvm", "tvm_per_layer", "tvm_stock", "tvm_tuned")
              if any(k in row["latency_ms"] for row in models)]
    names = {"tvm": "TVM default schedules", "tvm_per_layer": "TVM one kernel per layer",
             "tvm_stock": "TVM stock pipeline",
             "tvm_tuned": f"TVM tuned ({payload['tune_trials']} trials)"}
    peak = models[0]["peak_gflops"] if models else float("nan")
    lines = [
        "# ORT CPU vs TVM x86, batch 1",
        "",
        f"{payload['threads']} thread(s), {payload['rounds']} interleaved rounds per model (each sample averages "
        f"≥{MIN_SAMPLE_MS:.0f} ms of calls), input {payload['resolution']}×{payload['resolution']}, "
        f"onnxruntime {env.get('onnxruntime')}, apache-tvm {payload['tvm']}, torch {env.get('torch')}, "
        f"{env.get('processor') or env.get('machine')}. Ratios are medians (p10–p90) of per-round "
        "`t_tvm / t_ort`: below 1 means TVM is faster. GFLOP/s = the model's FLOPs (torch's counter) / median "
        "latency; this machine's measured peak (best of 256–512 square MatMuls in ONNX Runtime, same threads): "
        f"{peak:.1f} GFLOP/s.",
        "",
        "Produced by `python benchmarks/backends.py " + payload["argv"] + "`.",
        "",
        "| model | GFLOP | ORT ms (GFLOP/s) |" + "".join(f" {names[k]} ms (GFLOP/s) | / ORT (p10–p90) |"
                                                   for k in labels) + " compile s |",
        "|---|---|---|" + "---|---|" * len(labels) + "---|",
    ]
    for row in models:
        lat, r, g = row["latency_ms"], row["ratio_vs_ort"], row["gflops"]
        line = f"| {row['model']} | {row['gflop']:.2f} | {lat['ort']['median']:.2f} ({g['ort']:.1f}) |"
        for k in labels:
            if k not in lat:
                line += " – | – |"
                continue
            line += (f" {lat[k]['median']:.2f} ({g[k]:.1f}) | **{r[k]['median']:.2f}** "
                     f"({r[k]['p10']:.2f}–{r[k]['p90']:.2f}) |")
        compile_s = " / ".join(f"{row['builds'][k]['compile_seconds']:.0f}" for k in labels
                               if "compile_seconds" in row["builds"].get(k, {}))
        lines.append(line + f" {compile_s} |")
    tuned = [row for row in models if (row["builds"].get("tvm_tuned") or {}).get("tuning")]
    if tuned:
        lines += ["", "Tuning: " + "; ".join(
            f"{row['model']}: {t['tasks']} tasks ({t['tuned_now']} tuned now), tuned/default "
            f"{t['tuned_over_default']:.2f}, kept {t['kept']}"
            for row in tuned for t in [row["builds"]["tvm_tuned"]["tuning"]])]
    skipped = {row["builds"]["tvm_tuned"]["unavailable"] for row in models
               if "unavailable" in row["builds"].get("tvm_tuned", {})}
    for why in sorted(skipped):
        lines += ["", f"Tuned TVM ({payload['tune_trials']} trials) was not measured: {why}"]
    lines += ["", "Compile seconds are per TVM variant in column order (tuned: including tuning). Emulated "
              "aarch64 runs are never timed.", ""]
    return "\n".join(lines)


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(IMAGE_MODELS))
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule budget per model (0: skip)")
    parser.add_argument("--stock", action="store_true", help="also time TVM's stock CPU pipeline (slow)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also time the default schedules without block fusion (one kernel per layer)")
    parser.add_argument("--out", default=str(RESULTS / "backends"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="depthfold-bench-") as tmp:
        for name in args.models.split(","):
            row = bench_model(name, rounds=args.rounds, warmup=args.warmup, threads=args.threads,
                              resolution=args.resolution, tune_trials=args.tune_trials, stock=args.stock,
                              per_layer=args.per_layer, work=Path(tmp))
            r = row["ratio_vs_ort"]
            print(f"{name}: ORT {row['latency_ms']['ort']['median']:.2f} ms, TVM {row['latency_ms']['tvm']['median']:.2f}"
                  f" ms (TVM/ORT median {r['tvm']['median']:.2f}, p10 {r['tvm']['p10']:.2f}, p90 {r['tvm']['p90']:.2f})"
                  + (f", per-layer/ORT {r['tvm_per_layer']['median']:.2f}" if "tvm_per_layer" in r else "")
                  + (f", tuned/ORT {r['tvm_tuned']['median']:.2f}" if "tvm_tuned" in r else ""), flush=True)
            rows.append(row)
    import importlib.metadata

    payload = {"benchmark": "backends", "threads": args.threads, "rounds": args.rounds,
               "resolution": args.resolution, "tune_trials": args.tune_trials,
               "tvm": importlib.metadata.version("apache-tvm"), "argv": " ".join(sys.argv[1:]),
               "environment": environment(), "models": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(to_markdown(payload))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
