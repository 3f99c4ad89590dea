#!/usr/bin/env bash
# GPU benchmark: ONNX Runtime's CUDA execution provider vs TVM CUDA on the zoo image models, batch 1.
#
#   bash benchmarks/gpu.sh [OUT_DIR]        default OUT_DIR: docs/results
#
# Run on a machine with an NVIDIA GPU, nvcc and this repo's venv (make install). It installs onnxruntime-gpu
# into the venv if the CUDA EP is missing, checks every TVM CUDA build against torch (1e-4 relative), times
# both backends interleaved (median of per-round ratios, like benchmarks/backends.py) and writes
# OUT_DIR/gpu.{json,md} with the GPU's name. Nothing here runs without a GPU: it stops with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-docs/results}
MODELS=${MODELS:-mobilenetv2_100,mobilenetv2_140,resnet18,resnet34,resnet50,vgg19_bn,vit_tiny}
RES=${RES:-224}
ROUNDS=${ROUNDS:-30}

command -v nvidia-smi >/dev/null || { echo "gpu.sh: no nvidia-smi: this needs a machine with an NVIDIA GPU" >&2; exit 1; }
command -v nvcc >/dev/null || { echo "gpu.sh: no nvcc: install the CUDA toolkit (TVM compiles CUDA kernels with it)" >&2; exit 1; }
if ! "$PY" -c 'import onnxruntime as o; import sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())'; then
    echo "gpu.sh: installing onnxruntime-gpu (the CUDA execution provider)"
    "$PY" -m pip install -q onnxruntime-gpu
fi
mkdir -p "$OUT"

"$PY" - "$OUT" "$MODELS" "$RES" "$ROUNDS" <<'EOF'
import json, subprocess, sys, tempfile
from pathlib import Path

import torch

from depthfold import zoo
from depthfold.backends import latency, ort
from depthfold.backends import tvm as tvm_backend
from depthfold.backends.onnx import to_onnx_model
from depthfold.report import environment

out, models, res, rounds = Path(sys.argv[1]), sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
if not tvm_backend.gpu_available():
    sys.exit("gpu.sh: TVM sees no CUDA GPU (is this apache-tvm built with CUDA?)")
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                     text=True, check=True).stdout.strip().splitlines()[0]
rows = []
with tempfile.TemporaryDirectory() as tmp:
    for name in models:
        torch.manual_seed(0)
        kwargs = {"img_size": res} if zoo.spec(name).family == "vit" else {}
        model = zoo.create(name, **kwargs)
        inputs = zoo.example_inputs(name, batch=1, resolution=res)
        ep = torch.export.export(model, inputs)
        session = ort.create_session(to_onnx_model(ep.module(), inputs), device="cuda", threads=1)
        feed = ort.feeds(session, inputs)
        art = tvm_backend.compile(ep, inputs, "cuda", out_dir=Path(tmp) / name)  # verified on this GPU
        call, _, sync = tvm_backend.prepare(art, inputs)

        def tvm_call(c=call, s=sync):
            c()
            s()

        timed = latency.compare_interleaved({"ort_cuda": lambda: session.run(None, feed), "tvm_cuda": tvm_call},
                                            rounds=rounds, warmup=5, min_sample_ms=50.0, baseline="ort_cuda",
                                            backend="ort-vs-tvm", device="cuda")
        r = timed["ratios"]["tvm_cuda"]
        row = {"model": name, "input": list(inputs[0].shape), "arch": art.meta["target_json"]["arch"],
               "max_rel_error": art.meta["verification"]["max_rel_error"],
               "latency_ms": {k: {"median": m.median_ms, "p90": m.p90_ms, "n": m.n}
                              for k, m in timed["measurements"].items()},
               "tvm_vs_ort": {q: r[q] for q in ("median", "p10", "p90")}}
        print(f"{name}: ORT CUDA {row['latency_ms']['ort_cuda']['median']:.3f} ms, TVM CUDA "
              f"{row['latency_ms']['tvm_cuda']['median']:.3f} ms, TVM/ORT {r['median']:.2f}", flush=True)
        rows.append(row)
payload = {"benchmark": "gpu", "gpu": gpu, "resolution": res, "rounds": rounds, "environment": environment(),
           "models": rows}
(out / "gpu.json").write_text(json.dumps(payload, indent=2) + "\n")
lines = [f"# ORT CUDA EP vs TVM CUDA on {gpu}, batch 1, {res}×{res}", "",
         "Produced by `bash benchmarks/gpu.sh`; ratios are medians (p10–p90) of per-round `t_tvm / t_ort` "
         f"over {rounds} interleaved rounds. TVM builds are untuned (default dlight GPU schedules).", "",
         "| model | ORT CUDA ms | TVM CUDA ms | TVM / ORT (p10–p90) | TVM max rel error |", "|---|---|---|---|---|"]
for row in rows:
    lat, t = row["latency_ms"], row["tvm_vs_ort"]
    lines.append(f"| {row['model']} | {lat['ort_cuda']['median']:.3f} | {lat['tvm_cuda']['median']:.3f} | "
                 f"**{t['median']:.2f}** ({t['p10']:.2f}–{t['p90']:.2f}) | {row['max_rel_error']:.1e} |")
(out / "gpu.md").write_text("\n".join(lines) + "\n")
print(f"wrote {out / 'gpu.json'} and {out / 'gpu.md'}")
EOF
