"""Peak resident memory (RSS) of depthfold's main jobs on the zoo's largest model (VGG-19-BN, 144 M parameters).

Each job runs in a fresh Python process, so its peak is its own (``ru_maxrss`` of the process, or of a worker
process it started if that was larger); every job is
repeated ``--repeats`` times, the jobs interleaved, and the median (min, max) reported, with the ratio to the
``eager`` baseline (build the model and run one forward pass in torch). Jobs:

* ``eager``      — the baseline;
* ``capture``    — ``torch.export`` capture into depthfold's IR;
* ``exact``      — ``depthfold.optimize`` with the default exact passes (verified numerically);
* ``export``     — the same, then the ONNX export verified in ONNX Runtime;
* ``layermerge`` — LayerMerge at ``--layermerge-resolution`` (latency and importance tables, merge, checks).

Writes ``benchmarks/results/memory.{json,md}``.

    python benchmarks/memory.py [--model vgg19_bn] [--resolution 224] [--repeats 3] [--jobs eager,capture,...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from depthfold import zoo
from depthfold._atomic import atomic_write
from depthfold.report import environment

RESULTS = Path(__file__).parent / "results"
JOBS = ("eager", "capture", "exact", "export", "layermerge")
LAYERMERGE = "layermerge:speedup=1.15,importance=zero_shot,eval_samples=32,train_samples=64,recover_steps=0"

CHILD = '''
import json, resource, sys, tempfile, time
from pathlib import Path
import torch
import depthfold
from depthfold import ir, zoo

job, name, resolution, lm_resolution = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
torch.manual_seed(0)
model = zoo.create(name).eval()
x = zoo.example_inputs(name, resolution=lm_resolution if job == "layermerge" else resolution)
start = time.perf_counter()
if job == "eager":
    with torch.no_grad():
        model(*x)
elif job == "capture":
    ir.capture(model, x)
elif job in ("exact", "export"):
    result = depthfold.optimize(model, x, depthfold.DEFAULT_PASSES)
    if job == "export":
        with tempfile.TemporaryDirectory() as tmp:
            result.export_onnx(Path(tmp) / "model.onnx")
else:
    depthfold.optimize(model, x, [sys.argv[5]])
peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_kib / 1024}))
'''


def run_job(job: str, args: argparse.Namespace, cache: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEPTHFOLD_CACHE": cache}
    proc = subprocess.run([sys.executable, "-c", CHILD, job, args.model, str(args.resolution),
                           str(args.layermerge_resolution), LAYERMERGE],
                          env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg19_bn")
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--layermerge-resolution", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jobs", default=",".join(JOBS))
    parser.add_argument("--out", default=str(RESULTS / "memory"))
    args = parser.parse_args()
    jobs = [j for j in args.jobs.split(",") if j]
    unknown = set(jobs) - set(JOBS)
    if unknown:
        parser.error(f"unknown jobs {sorted(unknown)}; jobs are {', '.join(JOBS)}")
    model = zoo.create(args.model)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    del model
    runs: dict[str, list[dict]] = {j: [] for j in jobs}
    with tempfile.TemporaryDirectory() as cache:  # a cold table cache: LayerMerge measures every time
        for r in range(args.repeats):
            for job in jobs:
                runs[job].append(run_job(job, args, f"{cache}/{r}"))
                print(f"round {r + 1}/{args.repeats} {job}: {runs[job][-1]}", flush=True)
    rows = []
    base = statistics.median(x["peak_rss_mb"] for x in runs["eager"]) if "eager" in runs else None
    for job in jobs:
        peaks = [x["peak_rss_mb"] for x in runs[job]]
        rows.append({"job": job, "peak_rss_mb": statistics.median(peaks), "min_mb": min(peaks), "max_mb": max(peaks),
                     "over_eager": statistics.median(peaks) / base if base else None,
                     "seconds": statistics.median(x["seconds"] for x in runs[job]), "runs": runs[job]})
    payload = {"model": args.model, "resolution": args.resolution,
               "layermerge_resolution": args.layermerge_resolution, "layermerge": LAYERMERGE,
               "weights_mb": weights_mb, "repeats": args.repeats, "torch": torch.__version__,
               "environment": environment(), "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
               "rows": rows, "date": time.strftime("%Y-%m-%d")}
    out = Path(args.out)
    atomic_write(out.with_suffix(".json"), lambda p: p.write_text(json.dumps(payload, indent=2) + "\n"))
    atomic_write(out.with_suffix(".md"), lambda p: p.write_text(to_markdown(payload)))
    print(to_markdown(payload))


def to_markdown(payload: dict) -> str:
    lines = [f"# Peak RSS: {payload['model']} ({payload['weights_mb']:.0f} MB of float32 weights)", "",
             f"`{payload['command']}` — {payload['date']}. Input {payload['resolution']}x{payload['resolution']} "
             f"(LayerMerge at {payload['layermerge_resolution']}x{payload['layermerge_resolution']}: "
             f"`{payload['layermerge']}`). Each job in a fresh process, {payload['repeats']} runs interleaved; "
             "median (min-max) of each process's peak resident set.", "",
             "| job | peak RSS MB | min-max | / eager | / weights | s |", "|---|---|---|---|---|---|"]
    for row in payload["rows"]:
        over = f"{row['over_eager']:.2f}" if row["over_eager"] else "-"
        lines.append(f"| {row['job']} | {row['peak_rss_mb']:.0f} | {row['min_mb']:.0f}-{row['max_mb']:.0f} | {over} "
                     f"| {row['peak_rss_mb'] / payload['weights_mb']:.1f} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
