"""ORT CPU vs TVM x86 latency per zoo model: untuned TVM, and MetaSchedule-tuned TVM with a small trial budget.

Variants per model, batch 1, timed interleaved in rotated rounds in one process (``latency.compare_interleaved``):

* ``ort``        — ``torch.onnx.export(dynamo=True)`` model in ONNX Runtime (CPU EP, ORT_ENABLE_ALL);
* ``tvm``        — ``depthfold.backends.tvm.compile(model, target="x86")``: TVM's default pipeline, untuned;
* ``tvm_tuned``  — the same with ``tune_trials=N`` (MetaSchedule on this machine), when ``--tune-trials N > 0``.

All variants run with the same fixed thread count (ORT ``intra_op_num_threads``; TVM's thread pool). Each sample
averages enough calls to cover ``MIN_SAMPLE_MS``. Reported: median / p90 per variant and the median (p10, p90) of
per-round ratios ``t_variant / t_ort`` (below 1: TVM faster). Every TVM build is checked against torch (1e-4
relative) before it is timed. Writes ``benchmarks/results/backends.{json,md}``.

    python benchmarks/backends.py [--models resnet18,vit_tiny] [--resolution 64] [--rounds 20] [--tune-trials 64]

Tuning costs minutes per model (MetaSchedule builds and measures ``N`` candidates per run); untuned TVM on CPU
uses TVM's generic schedules, so expect it to be slower than ORT. Numbers are for the machine that ran it only.
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
                work: Path) -> dict:
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
    variants = [("tvm", 0)] + ([("tvm_tuned", tune_trials)] if tune_trials else [])
    for label, trials in variants:
        start = time.perf_counter()
        try:
            art = tvm_backend.compile(ep, inputs, "x86", tune_trials=trials, out_dir=work / name / label)
        except BackendUnavailableError as err:  # e.g. MetaSchedule crashing in this apache-tvm build
            builds[label] = {"tune_trials": trials, "unavailable": str(err)}
            print(f"{name}: {label} unavailable: {err}", flush=True)
            continue
        builds[label] = {"compile_seconds": time.perf_counter() - start, "tune_trials": trials,
                         "max_rel_error": art.meta["verification"]["max_rel_error"]}
        fns[label] = tvm_backend.prepare(art, inputs, threads=threads)[0]
    timed = latency.compare_interleaved(fns, rounds=rounds, warmup=warmup, min_sample_ms=MIN_SAMPLE_MS,
                                        baseline="ort", threads=threads, backend="ort-vs-tvm", device="cpu")
    return {
        "model": name,
        "input": list(inputs[0].shape),
        "calls_per_sample": timed["inner"],
        "builds": builds,
        "latency_ms": {k: {"median": m.median_ms, "p90": m.p90_ms, "n": m.n} for k, m in timed["measurements"].items()},
        "ratio_vs_ort": {k: {q: timed["ratios"][k][q] for q in ("median", "p10", "p90")} for k in fns if k != "ort"},
    }


def to_markdown(payload: dict) -> str:
    env = payload["environment"]
    tuned = any("tvm_tuned" in row["latency_ms"] for row in payload["models"])
    lines = [
        "# ORT CPU vs TVM x86, batch 1",
        "",
        f"{payload['threads']} thread(s), {payload['rounds']} interleaved rounds per model (each sample averages "
        f"≥{MIN_SAMPLE_MS:.0f} ms of calls), input {payload['resolution']}×{payload['resolution']}, "
        f"onnxruntime {env.get('onnxruntime')}, apache-tvm {payload['tvm']}, torch {env.get('torch')}, "
        f"{env.get('processor') or env.get('machine')}. Ratios are medians (p10–p90) of per-round "
        "`t_tvm / t_ort`: below 1 means TVM is faster.",
        "",
        "Produced by `python benchmarks/backends.py " + payload["argv"] + "`.",
        "",
        "| model | ORT ms | TVM untuned ms | TVM / ORT (p10–p90) |"
        + (f" TVM tuned ({payload['tune_trials']} trials) ms | tuned / ORT (p10–p90) |" if tuned else ""),
        "|---|---|---|---|" + ("---|---|" if tuned else ""),
    ]
    for row in payload["models"]:
        lat, r = row["latency_ms"], row["ratio_vs_ort"]
        line = (f"| {row['model']} | {lat['ort']['median']:.2f} | {lat['tvm']['median']:.2f} | "
                f"**{r['tvm']['median']:.2f}** ({r['tvm']['p10']:.2f}–{r['tvm']['p90']:.2f}) |")
        if tuned:
            t = r["tvm_tuned"]
            line += (f" {lat['tvm_tuned']['median']:.2f} | **{t['median']:.2f}** ({t['p10']:.2f}–{t['p90']:.2f}) |")
        lines.append(line)
    skipped = {row["builds"]["tvm_tuned"]["unavailable"] for row in payload["models"]
               if "unavailable" in row["builds"].get("tvm_tuned", {})}
    for why in sorted(skipped):
        lines += ["", f"Tuned TVM ({payload['tune_trials']} trials) was not measured: {why}"]
    lines += ["", "Untuned TVM uses the default Relax pipeline's generic CPU schedules; MetaSchedule tuning with a "
              "small budget covers only some kernels. Emulated aarch64 runs are never timed.", ""]
    return "\n".join(lines)


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(IMAGE_MODELS))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tune-trials", type=int, default=0, help="MetaSchedule budget per model (0: skip)")
    parser.add_argument("--out", default=str(RESULTS / "backends"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="depthfold-bench-") as tmp:
        for name in args.models.split(","):
            row = bench_model(name, rounds=args.rounds, warmup=args.warmup, threads=args.threads,
                              resolution=args.resolution, tune_trials=args.tune_trials, work=Path(tmp))
            r = row["ratio_vs_ort"]
            print(f"{name}: ORT {row['latency_ms']['ort']['median']:.2f} ms, TVM {row['latency_ms']['tvm']['median']:.2f}"
                  f" ms (TVM/ORT median {r['tvm']['median']:.2f}, p10 {r['tvm']['p10']:.2f}, p90 {r['tvm']['p90']:.2f})"
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
