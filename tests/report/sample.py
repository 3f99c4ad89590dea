"""A realistic `depthfold bench` report (bench-1 schema) for renderer tests, built without running anything.

Two vision models and one decoder, every `details` kind, every runtime, a failed cell and a failed variant.
Timings are drawn with a fixed seed; per-round samples share a round factor (the rounds are interleaved), and
speed-ups and GFLOP/s are derived from the samples the way the runner derives them.
"""

from __future__ import annotations

import random
import statistics
from typing import Any

__all__ = ["sample_report"]

PEAK_GFLOPS = 615.0  # 4 AVX-512 cores at 2.9 GHz, about 80% of the 742 GFLOP/s on paper
ROUNDS = 20
LANES = ["onnxruntime", "tvm"]
BASELINES = ["torch_eager/original", "torch_compile/original", "onnxruntime/original", "onnxslim/original",
             "tvm/original"]
# Original-model latency (ms) per runtime; onnxruntime and tvm are also the lanes every pipeline runs on.
RUNTIME_MS = {
    "resnet18": {"torch_eager": 14.2, "torch_compile": 11.5, "onnxruntime": 9.8, "onnxslim": 9.6, "tvm": 8.9},
    "mobilenetv2_100": {"torch_eager": 6.1, "torch_compile": 4.4, "onnxruntime": 2.9, "onnxslim": 2.85,
                        "tvm": 3.1},
    "llama_tiny": {"torch_eager": 11.8, "torch_compile": 8.1, "onnxruntime": 6.5, "onnxslim": 6.3,
                   "tvm": 7.2},
}


def _percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "p10": _percentile(values, 10),
            "p90": _percentile(values, 90)}


def _layers(rng: random.Random, prefix: str, ops: dict[str, tuple[int, float]]) -> list[dict[str, Any]]:
    """ONNX Runtime profiler rows: per op type, `count` nodes sharing about `total_ms`."""
    rows = []
    for op_type, (count, total_ms) in ops.items():
        weights = [rng.uniform(0.5, 1.5) for _ in range(count)]
        for i, w in enumerate(weights):
            rows.append({"name": f"/{prefix}.{i}/{op_type}", "op_type": op_type,
                         "ms": round(total_ms * w / sum(weights), 5)})
    return rows


def _cell(model: str, pipeline: str, passes: list[str], *, optimize_s: float, graph: tuple[int, int, int],
          quality: tuple[str, float, float], fidelity: tuple[float, float, float],
          **details: Any) -> dict[str, Any]:
    nodes, params, flops = graph
    metric, value, original = quality
    max_abs, max_rel, agreement = fidelity
    return {"model": model, "pipeline": pipeline, "passes": passes, "status": "ok", "error": None,
            "optimize_s": optimize_s, "graph": {"nodes": nodes, "params": params, "flops": flops},
            "quality": {"metric": metric, "value": value, "original": original},
            "fidelity": {"max_abs": max_abs, "max_rel": max_rel, "agreement": agreement}, "details": details}


def _vision_cells(rng: random.Random) -> list[dict[str, Any]]:
    r18, mb2 = "resnet18", "mobilenetv2_100"
    r18_ops = {"Conv": (20, 7.1), "BatchNormalization": (20, 0.9), "Relu": (17, 0.55), "Add": (8, 0.32),
               "MaxPool": (1, 0.21), "GlobalAveragePool": (1, 0.04), "Flatten": (1, 0.01), "Gemm": (1, 0.08)}
    mb2_ops = {"Conv": (52, 2.05), "BatchNormalization": (52, 0.31), "Clip": (35, 0.22), "Add": (10, 0.07),
               "GlobalAveragePool": (1, 0.02), "Flatten": (1, 0.01), "Gemm": (1, 0.05)}
    no_bn = {op: n for op, n in r18_ops.items() if op != "BatchNormalization"}
    mb2_no_bn = {op: n for op, n in mb2_ops.items() if op != "BatchNormalization"}
    return [
        _cell(r18, "original", [], optimize_s=0.0, graph=(69, 11_689_512, 3_642_000_000),
              quality=("accuracy", 0.912, 0.912), fidelity=(0.0, 0.0, 1.0),
              layers=_layers(rng, "layer", r18_ops)),
        _cell(r18, "exact", ["fold_bn", "merge_linear_chains"], optimize_s=1.8,
              graph=(49, 11_684_712, 3_622_000_000), quality=("accuracy", 0.912, 0.912),
              fidelity=(2.4e-6, 3.1e-7, 1.0), layers=_layers(rng, "layer", no_bn)),
        _cell(r18, "layermerge@1.3", ["fold_bn", "layermerge"], optimize_s=48.6,
              graph=(41, 10_950_120, 2_790_000_000), quality=("accuracy", 0.904, 0.912),
              fidelity=(0.83, 0.41, 0.962),
              layermerge={"original_ms": 9.8, "predicted_ms": 7.4, "measured_ms": 7.7, "target_speedup": 1.3,
                          "segments": 5},
              layers=_layers(rng, "layer", {**no_bn, "Conv": (15, 5.6), "Relu": (12, 0.41)})),
        _cell(r18, "layermerge@1.6", ["fold_bn", "layermerge"], optimize_s=52.1,
              graph=(33, 9_870_664, 2_240_000_000), quality=("accuracy", 0.881, 0.912),
              fidelity=(1.62, 0.77, 0.918),
              layermerge={"original_ms": 9.8, "predicted_ms": 6.1, "measured_ms": 6.6, "target_speedup": 1.6,
                          "segments": 7},
              layers=_layers(rng, "layer", {**no_bn, "Conv": (12, 4.7), "Relu": (9, 0.33),
                                            "Add": (6, 0.24)})),
        _cell(r18, "early_exit", ["fold_bn", "early_exit"], optimize_s=22.4,
              graph=(58, 11_702_348, 3_623_000_000), quality=("accuracy", 0.897, 0.912),
              fidelity=(2.9, 0.88, 0.951),
              early_exit={"histogram": {"layer2": 0.12, "layer3": 0.34, "final": 0.54},
                          "expected_compute": 0.78}),
        _cell(mb2, "original", [], optimize_s=0.0, graph=(155, 3_504_872, 627_000_000),
              quality=("accuracy", 0.874, 0.874), fidelity=(0.0, 0.0, 1.0),
              layers=_layers(rng, "features", mb2_ops)),
        _cell(mb2, "exact", ["fold_bn"], optimize_s=2.3, graph=(103, 3_487_816, 615_000_000),
              quality=("accuracy", 0.874, 0.874), fidelity=(3.8e-6, 4.4e-7, 1.0),
              layers=_layers(rng, "features", mb2_no_bn)),
        _cell(mb2, "layermerge@1.3", ["fold_bn", "layermerge"], optimize_s=63.0,
              graph=(88, 3_391_208, 498_000_000), quality=("accuracy", 0.861, 0.874),
              fidelity=(0.64, 0.35, 0.955),
              layermerge={"original_ms": 2.9, "predicted_ms": 2.25, "measured_ms": 2.18,
                          "target_speedup": 1.3, "segments": 4},
              layers=_layers(rng, "features", {**mb2_no_bn, "Conv": (43, 1.58), "Clip": (26, 0.16)})),
        {"model": mb2, "pipeline": "layermerge@1.6", "passes": ["fold_bn", "layermerge"], "status": "failed",
         "error": "PassError: pass 'layermerge' (after fold_bn) failed: no plan reaches 1.60x under the "
                  "latency table (best 1.42x at 11 segments); lower target_speedup or allow more merges",
         "optimize_s": 41.3, "graph": None, "quality": None, "fidelity": None, "details": {}},
        _cell(mb2, "early_exit", ["fold_bn", "early_exit"], optimize_s=19.7,
              graph=(118, 3_541_000, 617_000_000),
              quality=("accuracy", 0.866, 0.874), fidelity=(2.2, 0.81, 0.958),
              early_exit={"histogram": {"features.7": 0.08, "features.14": 0.29, "final": 0.63},
                          "expected_compute": 0.86}),
    ]


def _decoder_cells(rng: random.Random) -> list[dict[str, Any]]:
    name = "llama_tiny"
    ops = {"MatMul": (28, 4.4), "SimplifiedLayerNormalization": (9, 0.45), "Softmax": (4, 0.6),
           "Mul": (24, 0.5), "Add": (12, 0.25), "Sigmoid": (4, 0.1), "Gather": (1, 0.02)}
    kv = 2 * 4 * 4 * 16 * 4  # K and V x 4 layers x 4 kv heads x head dim 16 x float32
    return [
        _cell(name, "original", [], optimize_s=0.0, graph=(412, 4_198_400, 1_050_000_000),
              quality=("perplexity", 18.42, 18.42), fidelity=(0.0, 0.0, 1.0),
              layers=_layers(rng, "model.layers", ops)),
        _cell(name, "kv_share@cla2", ["kv_share"], optimize_s=12.9, graph=(396, 4_165_632, 1_018_000_000),
              quality=("perplexity", 19.21, 18.42), fidelity=(1.9, 0.35, 0.87),
              kv={"bytes_per_token": kv // 2, "original_bytes_per_token": kv, "sources": [0, 0, 2, 2]},
              layers=_layers(rng, "model.layers", {**ops, "MatMul": (24, 4.0)})),
        _cell(name, "drop_layers@1.3", ["drop_layers"], optimize_s=8.4, graph=(311, 3_149_824, 788_000_000),
              quality=("perplexity", 21.3, 18.42), fidelity=(3.4, 0.52, 0.81),
              kv={"bytes_per_token": kv * 3 // 4, "original_bytes_per_token": kv},
              layers=_layers(rng, "model.layers", {**ops, "MatMul": (21, 3.4), "Softmax": (3, 0.45)})),
        _cell(name, "collapse_blocks@2", ["collapse_blocks"], optimize_s=31.5,
              graph=(215, 2_101_248, 530_000_000), quality=("perplexity", 24.9, 18.42),
              fidelity=(5.1, 0.69, 0.74), kv={"bytes_per_token": kv // 2, "original_bytes_per_token": kv},
              layers=_layers(rng, "model.layers", {**ops, "MatMul": (14, 2.3), "Softmax": (2, 0.3)})),
    ]


# A pipeline's latency over the original's on each lane (tvm fuses differently, so it gains differently).
_PIPELINE_FACTOR = {"original": (1.0, 1.0), "exact": (0.93, 0.97), "layermerge@1.3": (0.78, 0.8),
                    "layermerge@1.6": (0.66, 0.7), "early_exit": (0.8, None), "kv_share@cla2": (0.95, 0.96),
                    "drop_layers@1.3": (0.76, 0.78), "collapse_blocks@2": (0.52, 0.55)}
_TVM_EARLY_EXIT = ("BackendError: tvm: relax.build failed at 'exit_gate_0' (If with a data-dependent "
                   "condition); early_exit pipelines run on onnxruntime only")


def _variant(runtime: str, pipeline: str, samples: list[float] | None, flops: int) -> dict[str, Any]:
    if samples is None:
        return {"name": f"{runtime}/{pipeline}", "runtime": runtime, "pipeline": pipeline, "status": "failed",
                "error": _TVM_EARLY_EXIT, "median_ms": None, "p10_ms": None, "p90_ms": None, "samples_ms": [],
                "gflops": None, "fraction_of_peak": None}
    spread = _spread(samples)
    gflops = flops / (spread["median"] / 1e3) / 1e9
    return {"name": f"{runtime}/{pipeline}", "runtime": runtime, "pipeline": pipeline, "status": "ok",
            "error": None, "median_ms": spread["median"], "p10_ms": spread["p10"], "p90_ms": spread["p90"],
            "samples_ms": samples, "gflops": gflops, "fraction_of_peak": gflops / PEAK_GFLOPS}


def _timing(rng: random.Random, model: str, cells: list[dict[str, Any]], inner: int) -> dict[str, Any]:
    """One interleaved timing group: the original on every runtime, every ok pipeline on every lane."""
    drift = [rng.uniform(0.97, 1.06) for _ in range(ROUNDS)]  # shared by all variants of a round
    base = RUNTIME_MS[model]

    def samples(ms: float) -> list[float]:
        return [round(ms * d * rng.gauss(1.0, 0.015), 4) for d in drift]

    flops = {c["pipeline"]: c["graph"]["flops"] for c in cells if c["status"] == "ok"}
    variants = [_variant(rt, "original", samples(base[rt]), flops["original"])
                for rt in ("torch_eager", "torch_compile", "onnxruntime", "onnxslim", "tvm")]
    for pipeline in flops:
        if pipeline == "original":
            continue
        for lane, factor in zip(LANES, _PIPELINE_FACTOR[pipeline]):
            variants.append(_variant(lane, pipeline, None if factor is None else samples(base[lane] * factor),
                                     flops[pipeline]))
    ok = {v["name"]: v["samples_ms"] for v in variants if v["status"] == "ok"}
    speedups = {name: {b: _spread([tb / tv for tb, tv in zip(ok[b], times)]) for b in BASELINES if b in ok}
                for name, times in ok.items()}
    return {"model": model, "rounds": ROUNDS, "warmup": 3, "inner": inner, "threads": 4, "variants": variants,
            "speedups": speedups}


def _aarch64(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """The emulated aarch64 lane: every ok pipeline checked, early exit failing to build as on tvm."""
    checks = [{"model": c["model"], "pipeline": c["pipeline"], "status": "ok", "error": None,
               "max_rel_error": 3e-6 if c["pipeline"] in ("original", "exact") else 4e-5}
              for c in cells if c["status"] == "ok" and c["pipeline"] != "early_exit"]
    checks += [{"model": c["model"], "pipeline": c["pipeline"], "status": "failed", "error": _TVM_EARLY_EXIT,
                "max_rel_error": None} for c in cells if c["pipeline"] == "early_exit"]
    return {"target": "aarch64", "mcpu": "neoverse-n1", "emulated": True, "checks": checks, "errors": []}


def sample_report() -> dict[str, Any]:
    """A bench-1 report covering every table and plot the renderers draw."""
    rng = random.Random(0)
    cells = _vision_cells(rng) + _decoder_cells(rng)
    models = [
        {"name": "resnet18", "kind": "vision", "dataset": "scikit-learn digits 32x32, held-out split",
         "input_shape": [1, 3, 224, 224], "metric": {"name": "accuracy", "higher_is_better": True},
         "params": 11_689_512, "flops": 3_642_000_000},
        {"name": "mobilenetv2_100", "kind": "vision", "dataset": "scikit-learn digits 32x32, held-out split",
         "input_shape": [1, 3, 224, 224], "metric": {"name": "accuracy", "higher_is_better": True},
         "params": 3_504_872, "flops": 627_000_000},
        {"name": "llama_tiny", "kind": "decoder", "dataset": "Python standard-library text, held-out bytes",
         "input_shape": [1, 128], "metric": {"name": "perplexity", "higher_is_better": False},
         "params": 4_198_400, "flops": 1_050_000_000},
    ]
    inner = {"resnet18": 10, "mobilenetv2_100": 30, "llama_tiny": 40}
    timings = [_timing(rng, m["name"], [c for c in cells if c["model"] == m["name"]], inner[m["name"]])
               for m in models]
    return {
        "schema": "depthfold.bench", "schema_version": "1.0", "depthfold": "0.1.0",
        "created": "2025-03-14T09:26:53Z",
        "command": "depthfold bench --models resnet18,mobilenetv2_100,llama_tiny --out out/bench",
        "device": {
            "id": "xeon-8375c-4t",
            "cpu": {"model": "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "arch": "x86_64",
                    "flags": ["avx2", "fma", "avx512f", "avx512_vnni"], "physical_cores": 4,
                    "logical_cpus": 8, "llc_bytes": 56_623_104},
            "memory_bytes": 32_212_254_720, "gpu": None, "os": "Linux-6.8.0-1021-aws-x86_64-with-glibc2.36",
            "python": "3.11.2", "threads": 4,
            "versions": {"torch": "2.13.0", "onnx": "1.19.0", "onnxruntime": "1.23.2", "onnxslim": "0.1.70",
                         "tvm": "0.27.0", "transformers": None},
            "git": "9566758-dirty", "peak_gflops": PEAK_GFLOPS,
        },
        "settings": {"quick": False, "rounds": ROUNDS, "warmup": 3, "threads": 4, "device": "cpu",
                     "lanes": LANES, "baselines": BASELINES, "aarch64": _aarch64(cells)},
        "models": models, "cells": cells, "timings": timings,
    }
