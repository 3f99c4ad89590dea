"""Run a benchmark :class:`~depthfold.bench.plan.Plan` and write ``report.json``, ``report.md`` and
``report.html`` under ``out/bench/<device-id>/``.

Two kinds of work, each saved as it finishes so an interrupted run resumes where it stopped:

* a **cell** per (model, pipeline): optimize, score quality (accuracy or perplexity) and fidelity against the
  original, export the ONNX artifact, profile it per node (``cells/<model>/<pipeline>.{json,onnx}``);
* a **timing group** per model: every baseline (the original on torch eager, ``torch.compile``, ONNX Runtime,
  onnxslim + ONNX Runtime, TVM) and every pipeline's artifact on every lane, timed interleaved round by round
  (``timings/<model>.json``); speedups are medians of per-round ratios, so drift in machine speed cancels.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__, zoo
from .._atomic import atomic_write, ensure_writable_dir
from ..backends import Target, get_backend
from ..backends.latency import compare_interleaved, spread
from ..backends.ort import profile_nodes
from ..errors import ConfigError
from ..ir import compare_outputs
from ..passes.kv_share import cache_bytes_per_token
from ..report import BENCH_SCHEMA_VERSION, check_report, render_bench_markdown
from .device import device_fingerprint
from .plan import BenchModel, Pipeline, Plan

__all__ = ["run_bench", "BenchPaths"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchPaths:
    """Where one device's benchmark lives."""

    root: Path

    def cell(self, model: str, pipeline: str, suffix: str) -> Path:
        return self.root / "cells" / model / f"{pipeline}.{suffix}"

    def timing(self, model: str) -> Path:
        return self.root / "timings" / f"{model}.json"

    def aarch64(self, model: str) -> Path:
        """The aarch64 cross-compile and emulated-run checks of one model's pipelines."""
        return self.root / "aarch64" / f"{model}.json"

    @property
    def report(self) -> dict[str, Path]:
        return {kind: self.root / f"report.{kind}" for kind in ("json", "md", "html")}


# ------------------------------------------------------------------------------------------------- models

TIMING_INPUTS = 16
"""Held-out inputs (batch 1) each timed variant cycles through."""


@dataclass
class _Loaded:
    """A plan model with trained weights, example inputs, calibration data and its quality scorer."""

    spec: BenchModel
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    timing_inputs: list[tuple[torch.Tensor, ...]]
    """Held-out single inputs the timed calls cycle through."""
    data: Any
    held_out: torch.Tensor
    score: Callable[[nn.Module], float]
    dataset: str
    metric: str
    higher_is_better: bool


def _load(spec: BenchModel, progress: bool) -> _Loaded:
    if spec.kind == "vision":
        module = zoo.pretrained_digits(spec.name, resolution=spec.resolution, progress=progress)
        train, test = zoo.digits_datasets(resolution=spec.resolution)
        timing = [(test.tensors[0][i:i + 1].clone(),) for i in range(TIMING_INPUTS)]
        return _Loaded(spec, module, timing[0], timing, train, test.tensors[0][:256],
                       lambda m: zoo.evaluate_accuracy(m, test),
                       f"scikit-learn digits {spec.resolution}x{spec.resolution}, held-out split", "accuracy", True)
    module = zoo.pretrained_text(spec.name, progress=progress)
    train, val = zoo.split_corpus(zoo.text_corpus())
    data, _ = next(zoo.lm_batches(train, spec.seq_len, 1088, seed=1, num_batches=1))
    held_out, _ = next(zoo.lm_batches(val, spec.seq_len, 64, seed=2, num_batches=1))
    timing = [(held_out[i:i + 1].clone(),) for i in range(TIMING_INPUTS)]
    return _Loaded(spec, module, (data[:1].clone(),), timing, data, held_out, lambda m: zoo.evaluate_perplexity(m, val),
                   "Python standard-library text, held-out bytes", "perplexity", False)


def _model_record(loaded: _Loaded, original_cell: dict[str, Any] | None) -> dict[str, Any]:
    graph = (original_cell or {}).get("graph") or {}
    return {"name": loaded.spec.name, "kind": loaded.spec.kind, "dataset": loaded.dataset,
            "input_shape": list(loaded.inputs[0].shape),
            "metric": {"name": loaded.metric, "higher_is_better": loaded.higher_is_better},
            "params": int(graph.get("params", sum(p.numel() for p in loaded.module.parameters()))),
            "flops": int(graph.get("flops", 0))}


# --------------------------------------------------------------------------------------------------- cells


def _details(records: list[Any]) -> dict[str, Any]:
    """What the plots need from the passes' own reports."""
    out: dict[str, Any] = {}
    for rec in records:
        d = rec.details or {}
        if rec.name == "layermerge" and d.get("latency"):
            lat = d["latency"]
            out["layermerge"] = {"original_ms": lat["original_ms"], "predicted_ms": lat["predicted_ms"],
                                 "measured_ms": lat["measured_ms"],
                                 "segments": sum(p["kind"] not in ("original", "barrier") for p in d["plan"])}
            if rec.config.get("speedup") is not None:
                out["layermerge"]["target_speedup"] = rec.config["speedup"]
        elif rec.name == "kv_share":
            kv = d["kv_bytes_per_token"]
            out["kv"] = {"bytes_per_token": kv["after"], "original_bytes_per_token": kv["before"],
                         "sources": list(d["sources"])}
        elif rec.name == "early_exit":
            out["early_exit"] = {"histogram": dict(d["histogram"]), "expected_compute": d["expected_compute"]}
    return out


def _fidelity(original: nn.Module, optimized: nn.Module, held_out: torch.Tensor) -> dict[str, Any]:
    with torch.no_grad():
        want, got = original(held_out), optimized(held_out)
    stats = compare_outputs(want, got)
    agreement = float((want.argmax(-1) == got.argmax(-1)).float().mean())
    return {"max_abs": _finite(stats.max_abs), "max_rel": _finite(stats.max_rel), "agreement": agreement}


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _run_cell(loaded: _Loaded, pipeline: Pipeline, plan: Plan, paths: BenchPaths, original_quality: float | None
              ) -> dict[str, Any]:
    from ..api import optimize

    start = time.perf_counter()
    cell: dict[str, Any] = {"model": loaded.spec.name, "pipeline": pipeline.name, "passes": list(pipeline.passes),
                            "status": "ok", "error": None, "optimize_s": 0.0, "graph": None, "quality": None,
                            "fidelity": None, "details": {}}
    try:
        result = optimize(loaded.module, loaded.inputs, list(pipeline.passes), data=loaded.data,
                          device=plan.device, threads=plan.threads)
        cell["optimize_s"] = time.perf_counter() - start
        cell["graph"] = {k: int(v) for k, v in result.report["summary"]["after"].items()
                         if k in ("nodes", "params", "flops")}
        value = loaded.score(result.module)
        cell["quality"] = {"metric": loaded.metric, "value": value,
                           "original": value if original_quality is None else original_quality}
        cell["fidelity"] = _fidelity(result.original, result.module, loaded.held_out)
        cell["details"] = _details(result.records)
        if loaded.spec.kind == "decoder" and "kv" not in cell["details"]:
            cell["details"]["kv"] = {"bytes_per_token": cache_bytes_per_token(result.module),
                                     "original_bytes_per_token": cache_bytes_per_token(result.original)}
        onnx_path = paths.cell(loaded.spec.name, pipeline.name, "onnx")
        ensure_writable_dir(onnx_path.parent)
        result.export_onnx(onnx_path)
        cell["details"]["layers"] = profile_nodes(onnx_path, list(loaded.inputs), device=plan.device,
                                                  threads=plan.threads)
    except Exception as err:  # a failed cell is a result: the report shows it with its error
        logger.warning("bench: %s/%s failed: %s", loaded.spec.name, pipeline.name, err)
        logger.debug("%s", traceback.format_exc())
        cell.update(status="failed", error=f"{type(err).__name__}: {err}",
                    optimize_s=time.perf_counter() - start)
    return cell


# ------------------------------------------------------------------------------------------------- timings


def _variant_call(runtime: str, loaded: _Loaded, onnx_path: Path, plan: Plan) -> Callable[[], object]:
    """Build (compile, warm) one variant; its timed call runs the next of the model's timing inputs (so a
    sample covers several held-out inputs, and early exits are timed on real data, not on one input) and waits
    for an asynchronous device."""
    target = Target.parse(None, device=plan.device)
    inputs = loaded.inputs
    source: Any = onnx_path
    if runtime in ("torch_eager", "torch_compile"):
        backend = get_backend("torch", target, threads=plan.threads)
        source = backend.compile(loaded.module, inputs)
        if runtime == "torch_compile":
            source = torch.compile(source, backend="inductor")
    else:
        if runtime == "onnxslim":
            import onnxslim

            source = onnxslim.slim(str(onnx_path))
        backend = get_backend("tvm" if runtime == "tvm" else "onnxruntime", target, threads=plan.threads)
        source = backend.compile(source, inputs)
    prepared = [backend.prepare(source, batch) for batch in loaded.timing_inputs]
    # torch.compile compiles on the first call; freezing (weights as constants, prepacked for oneDNN) is
    # inductor's setting for CPU inference, and must be on while it compiles.
    import torch._inductor.config as inductor_config

    with inductor_config.patch(freezing=True):
        for call, _ in prepared:
            call()
    sync = prepared[0][1]
    state = {"next": 0}

    def call_next() -> object:
        i = state["next"]
        state["next"] = (i + 1) % len(prepared)
        out = prepared[i][0]()
        if sync is not None:
            sync()
        return out

    return call_next


def _run_timing(loaded: _Loaded, cells: list[dict[str, Any]], plan: Plan, paths: BenchPaths) -> dict[str, Any]:
    model = loaded.spec.name
    wanted: list[tuple[str, str]] = [(r, "original") for r in plan.baselines]
    wanted += [(lane, c["pipeline"]) for c in cells if c["pipeline"] != "original" and c["status"] == "ok"
               for lane in plan.lanes]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    calls: dict[str, Callable[[], object]] = {}
    failed: dict[str, tuple[str, str, str]] = {}
    try:
        for runtime, pipeline in wanted:
            name = f"{runtime}/{pipeline}"
            try:
                calls[name] = _variant_call(runtime, loaded, paths.cell(model, pipeline, "onnx"), plan)
            except Exception as err:  # recorded in the report as a failed variant
                logger.warning("bench: %s %s cannot run: %s", model, name, err)
                failed[name] = (runtime, pipeline, f"{type(err).__name__}: {str(err)[:500]}")
        baseline = "onnxruntime/original"
        if baseline not in calls:
            raise ConfigError(f"{model}: the ONNX Runtime baseline failed ({failed.get(baseline)}); nothing to "
                              "compare against")
        result = compare_interleaved(calls, rounds=plan.rounds, warmup=plan.warmup, baseline=baseline,
                                     min_sample_ms=plan.min_sample_ms, threads=plan.threads, device=plan.device)
    finally:
        torch.set_num_threads(threads_before)
    flops = {c["pipeline"]: (c.get("graph") or {}).get("flops") for c in cells}
    peak = _peak(plan.threads) if plan.device == "cpu" else None  # the microbenchmark measures the CPU
    variants = []
    for runtime, pipeline in wanted:
        name = f"{runtime}/{pipeline}"
        if name in failed:
            variants.append({"name": name, "runtime": runtime, "pipeline": pipeline, "status": "failed",
                             "error": failed[name][2], "median_ms": None, "p10_ms": None, "p90_ms": None,
                             "samples_ms": [], "gflops": None, "fraction_of_peak": None})
            continue
        m = result["measurements"][name]
        gflops = flops[pipeline] / (m.median_ms * 1e-3) / 1e9 if flops.get(pipeline) else None
        variants.append({"name": name, "runtime": runtime, "pipeline": pipeline, "status": "ok", "error": None,
                         "median_ms": m.median_ms, "p10_ms": m.p10_ms, "p90_ms": m.p90_ms,
                         "samples_ms": list(m.samples_ms), "gflops": gflops,
                         "fraction_of_peak": gflops / peak if gflops and peak else None})
    bases = [f"{r}/original" for r in plan.baselines if f"{r}/original" in calls]
    speedups = {v: {b: spread([t[b] / t[v] for t in _rounds(result, [v, b])]) for b in bases}
                for v in calls}
    return {"model": model, "rounds": plan.rounds, "warmup": plan.warmup, "inner": result["inner"],
            "threads": plan.threads, "variants": variants, "speedups": speedups}


def _rounds(result: dict[str, Any], names: list[str]) -> list[dict[str, float]]:
    samples = {n: result["measurements"][n].samples_ms for n in names}
    return [{n: samples[n][i] for n in names} for i in range(result["rounds"])]


def _peak(threads: int) -> float | None:
    from ..backends.latency import peak_gflops

    try:
        return peak_gflops(threads)
    except Exception:  # no ORT CPU provider: the report says the peak is unknown
        return None


# -------------------------------------------------------------------------------------------------- aarch64


def _aarch64_checks(cells: list[dict[str, Any]], example: tuple[torch.Tensor, ...], paths: BenchPaths
                    ) -> dict[str, Any]:
    """Cross-compile every ok pipeline's ONNX artifact with TVM for aarch64 (Cortex-A72) and run it under
    qemu with an arm64 Python: its outputs against ONNX Runtime's on this machine. Correctness only: emulated
    time is not device time."""
    from ..backends import ort
    from ..backends import tvm as tvm_backend
    from ..errors import BackendUnavailableError

    record: dict[str, Any] = {"target": "aarch64", "mcpu": "cortex-a72", "checks": [], "error": None}
    jobs, refs, checks = [], [], []
    with tempfile.TemporaryDirectory(prefix="depthfold-bench-a64-") as tmp:
        for cell in cells:
            if cell["status"] != "ok":
                continue
            onnx_path = paths.cell(cell["model"], cell["pipeline"], "onnx")
            check = {"model": cell["model"], "pipeline": cell["pipeline"], "status": "ok", "error": None,
                     "max_rel_error": None}
            try:
                inputs = [t.numpy() for t in example]
                art = tvm_backend.compile(onnx_path, example, "aarch64", mcpu="cortex-a72",
                                          out_dir=Path(tmp) / f"{cell['model']}-{len(jobs)}")
                refs.append(ort.run(ort.create_session(onnx_path), inputs))
                jobs.append((art, inputs))
            except Exception as err:  # recorded: the lane reports what it could not build
                check.update(status="failed", error=f"{type(err).__name__}: {str(err)[:300]}")
            checks.append(check)
        try:
            outputs = tvm_backend.run_emulated(jobs) if jobs else []
        except BackendUnavailableError as err:
            return {**record, "error": f"emulation unavailable: {err}"}
        except Exception as err:  # an emulated run that fails is a result too
            return {**record, "checks": checks, "error": f"{type(err).__name__}: {str(err)[:500]}"}
    ok = [c for c in checks if c["status"] == "ok"]
    for check, got, want in zip(ok, outputs, refs):
        scale = max(float(np.abs(w).max()) for w in want) or 1.0
        check["max_rel_error"] = max(float(np.abs(g - w).max()) for g, w in zip(got, want)) / scale
    record["checks"] = checks
    return record


# -------------------------------------------------------------------------------------------------- driver


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    ensure_writable_dir(path.parent)
    text = json.dumps(data, indent=1, allow_nan=False)
    atomic_write(path, lambda p: p.write_text(text + "\n"))


def _complete(timing: dict[str, Any] | None, cells: list[dict[str, Any]], plan: Plan) -> bool:
    """A saved timing group still answers the plan: same settings, and every variant the plan asks for."""
    if timing is None or timing.get("rounds") != plan.rounds or timing.get("threads") != plan.threads:
        return False
    have = {v["name"] for v in timing["variants"]}
    want = {f"{r}/original" for r in plan.baselines}
    want |= {f"{lane}/{c['pipeline']}" for c in cells if c["pipeline"] != "original" and c["status"] == "ok"
             for lane in plan.lanes}
    return have == want


def run_bench(plan: Plan, out_dir: str | Path = "out/bench", *, force: bool = False, progress: bool = True,
              command: str | None = None) -> dict[str, Path]:
    """Measure ``plan`` on this machine and write ``report.{json,md,html}`` under ``out_dir/<device-id>/``.

    Cells and timing groups already saved there with the same settings are reused unless ``force``; a
    failing pipeline or backend is recorded with its error and the run goes on."""
    from tqdm.auto import tqdm

    device = device_fingerprint(plan.threads, device=plan.device)
    if plan.device == "cuda" and device["gpu"] is None:
        raise ConfigError("--device cuda: this machine has no NVIDIA GPU (nvidia-smi not found)")
    paths = BenchPaths(ensure_writable_dir(Path(out_dir) / device["id"]))
    total = sum(len(m.pipelines) + 1 for m in plan.models)
    bar = tqdm(total=total, desc="bench", unit="step", disable=not progress, file=sys.stderr)
    models, all_cells, timings, aarch64 = [], [], [], []
    for spec in plan.models:
        loaded = _load(spec, progress=False)
        cells: list[dict[str, Any]] = []
        for pipeline in spec.pipelines:
            bar.set_postfix_str(f"{spec.name} {pipeline.name}")
            cell_path = paths.cell(spec.name, pipeline.name, "json")
            cell = None if force else _read_json(cell_path)
            if cell is None or cell.get("passes") != list(pipeline.passes) or \
                    not paths.cell(spec.name, pipeline.name, "onnx").is_file() and cell.get("status") == "ok":
                original_quality = cells[0]["quality"]["value"] if cells and cells[0]["quality"] else None
                cell = _run_cell(loaded, pipeline, plan, paths, original_quality)
                _write_json(cell_path, cell)
            cells.append(cell)
            bar.update()
        bar.set_postfix_str(f"{spec.name} timing")
        timing = None if force else _read_json(paths.timing(spec.name))
        if not _complete(timing, cells, plan):
            timing = _run_timing(loaded, cells, plan, paths)
            _write_json(paths.timing(spec.name), timing)
        bar.update()
        if plan.aarch64 and spec.kind == "vision":
            bar.set_postfix_str(f"{spec.name} aarch64")
            a64 = None if force else _read_json(paths.aarch64(spec.name))
            if a64 is None or {c["pipeline"] for c in a64["checks"]} != {c["pipeline"] for c in cells
                                                                        if c["status"] == "ok"}:
                a64 = _aarch64_checks(cells, loaded.inputs, paths)
                _write_json(paths.aarch64(spec.name), a64)
            aarch64.append(a64)
        models.append(_model_record(loaded, cells[0] if cells and cells[0]["pipeline"] == "original" else None))
        all_cells += cells
        timings.append(timing)
    bar.close()
    report = {
        "schema": "depthfold.bench", "schema_version": BENCH_SCHEMA_VERSION, "depthfold": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": command, "device": device,
        "settings": {"quick": plan.quick, "rounds": plan.rounds, "warmup": plan.warmup, "threads": plan.threads,
                     "device": plan.device, "lanes": list(plan.lanes),
                     "baselines": [f"{r}/original" for r in plan.baselines],
                     "aarch64": {"target": "aarch64", "mcpu": "cortex-a72", "emulated": True,
                                 "checks": [c for a in aarch64 for c in a["checks"]],
                                 "errors": [a["error"] for a in aarch64 if a["error"]]} if plan.aarch64 else None},
        "models": models, "cells": all_cells, "timings": timings,
    }
    check_report(report)
    return write_report(report, paths.root)


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write a bench report and its two renderings (each file atomically)."""
    from ..report.html import render_html  # matplotlib: imported only to render

    out = BenchPaths(ensure_writable_dir(out_dir)).report
    _write_json(out["json"], report)
    markdown, page = render_bench_markdown(report), render_html(report)
    atomic_write(out["md"], lambda p: p.write_text(markdown))
    atomic_write(out["html"], lambda p: p.write_text(page))
    return out

