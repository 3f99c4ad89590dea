"""The user-facing entry point: ``depthfold.optimize(model, example_inputs, passes=[...])``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from . import ir
from ._atomic import atomic_write, ensure_writable_dir
from .backends import decoder as decoder_backend
from .backends import latency as latency_mod
from .backends import onnx as onnx_backend
from .backends.base import Target
from .backends.probe import LatencyProbe
from .errors import ConfigError
from .passes import PassContext, PassManager, PassRecord
from .report import new_report, render_markdown

__all__ = ["DEFAULT_PASSES", "EXACT_PASSES", "OptimizeResult", "export_decoder", "generate", "optimize"]

logger = logging.getLogger(__name__)

EXACT_PASSES: tuple[str, ...] = ("fold_bn", "merge_linear_chains", "fuse_qkv")
"""Every exact pass, in the order that lets each enable the next."""

DEFAULT_PASSES: tuple[str, ...] = ("fold_bn", "merge_linear_chains")
"""What ``optimize`` runs when no passes are given: the exact passes that never slowed a zoo model on
CPU ONNX Runtime. ``fuse_qkv`` is opt-in: on one-thread CPU ORT its split after the fused GEMM cost
~1.5% on vit_tiny and llama_tiny (benchmarks/exact_fusion.py reports it per model)."""


@dataclass
class OptimizeResult:
    """What :func:`optimize` returns: the optimized module, the per-pass records and the report."""

    module: GraphModule
    """The optimized model: a runnable, trainable ``nn.Module`` (an fx ``GraphModule``)."""
    original: GraphModule
    """The captured original, for comparisons (the user's own object is untouched)."""
    example_inputs: tuple[torch.Tensor, ...]
    records: list[PassRecord]
    report: dict[str, Any]
    """JSON-serialisable: per pass name, exact, changed, max_abs_error, seconds, nodes/params/FLOPs."""
    probe: LatencyProbe = field(default_factory=LatencyProbe)
    """Where the pipeline planned for (backend, target, threads): what :meth:`measure` times on."""

    def export_onnx(self, path: str | Path, *, verify: bool = True) -> onnx_backend.OnnxArtifact:
        """Write the optimized model as ONNX (atomically; checked; verified against torch in ONNX Runtime)."""
        artifact = onnx_backend.export_onnx(self.module, self.example_inputs, path, verify=verify)
        self.report["onnx"] = {"file": Path(artifact.path).name, **artifact.to_dict()}
        return artifact

    def measure(self, *, rounds: int = 20, probe: LatencyProbe | None = None) -> dict[str, Any]:
        """Time the original and the optimized model interleaved on the backend and target the pipeline was
        planned for (or ``probe``'s); store the result in the report."""
        probe = probe or self.probe
        backend = probe.open()
        result = backend.compare({"original": self.original, "optimized": self.module}, self.example_inputs,
                                 rounds=rounds, baseline="original", min_sample_ms=50.0)
        speedups = [1.0 / r for r in result["ratios"]["optimized"]["samples"]]
        summary = {
            "backend": backend.name, "target": str(backend.target), "device": backend.target.device,
            "threads": backend.threads, "rounds": rounds, "calls_per_sample": result["inner"],
            "measurements": {k: m.to_dict() for k, m in result["measurements"].items()},
            "speedup": latency_mod.spread(speedups),
        }
        self.report["latency"] = summary
        return summary

    def save(self, out_dir: str | Path, *, measure: bool = False) -> dict[str, Path]:
        """Write ``model.onnx``, ``report.json`` and ``report.md`` to ``out_dir`` (each atomically)."""
        out = ensure_writable_dir(out_dir)
        self.export_onnx(out / "model.onnx")
        if measure:
            self.measure()
        text = json.dumps(self.report, indent=2, default=_json_default)
        json_path = atomic_write(out / "report.json", lambda p: p.write_text(text + "\n"))
        md_path = atomic_write(out / "report.md", lambda p: p.write_text(render_markdown(self.report)))
        return {"onnx": out / "model.onnx", "report_json": json_path, "report_md": md_path}


def optimize(model: nn.Module, example_inputs: Any, passes: Sequence[Any] = DEFAULT_PASSES, *,
             verify: bool = True, max_steps: int = 1, random_inputs: int = 2,
             dump_dir: str | Path | None = None, progress: bool = False, data: Any = None,
             backend: str = "onnxruntime", device: str | None = None, target: Target | str | None = None,
             threads: int = 1, executor: Any = None, backend_options: dict[str, Any] | None = None,
             seed: int = 0) -> OptimizeResult:
    """Capture ``model``, run ``passes`` on it and verify the result; the user's model is never modified.

    Args:
        model: a trained ``nn.Module`` (a private eval-mode copy is captured with ``torch.export``).
        example_inputs: a tensor, a tuple of tensors, a dict of keyword arguments (``model(**batch)``) or an
            ``(args, kwargs)`` pair, at deployment shapes. The batch dimension (and the sequence dimension of
            integer token inputs) is captured dynamic where the model allows it (``report["capture"]``).
        passes: pass names, ``"name:key=value,..."`` specs, or ``(name, config)`` tuples
            (default :data:`DEFAULT_PASSES`; :data:`EXACT_PASSES` adds ``fuse_qkv``).
        verify: check every exact pass numerically, and the whole pipeline against the original.
        max_steps: repeat the pipeline until nothing changes, at most this many times.
        random_inputs: random input sets used for verification besides the example inputs.
        dump_dir: write each pass's graph code before and after there.
        progress: show progress bars (passes, table building, training).
        data: calibration/training data for passes that measure accuracy or fine-tune (``layermerge``,
            ``recover``), in any form :func:`depthfold.data.read_samples` reads: a tensor, ``(x, y)``, a
            ``Dataset``, a ``DataLoader``, or any iterable of batches (tuples, or dicts such as tokenized batches
            with ``input_ids``, ``attention_mask``, ``labels``). Only the samples a pass needs are read.
        backend, target, device, threads, backend_options: where latency-driven passes measure and
            :meth:`OptimizeResult.measure` times (the deployment target): ``"onnxruntime"``, ``"tvm"`` (options
            such as ``remote``, ``mcpu``) or ``"torch"``; a :class:`~depthfold.backends.Target` or its name
            (``"x86"``, ``"aarch64"``, ``"cuda"``, ...), default this machine with ``device`` (``"cpu"`` or
            ``"cuda"``).
        executor: where independent table jobs run: ``None``/``"process"``, ``"serial"``, ``"ray"`` or a
            ``concurrent.futures.Executor``.
        seed: seed for calibration splits and training.

    Raises:
        ConfigError: bad inputs, an unknown pass or a malformed spec.
        CaptureError: the model cannot be captured.
        VerificationError: an exact pass changed the outputs (names the pass and the node).
        PassError: a pass failed.
    """
    manager = PassManager(passes, max_steps=max_steps, verify=verify, random_inputs=random_inputs,
                          dump_dir=dump_dir, progress=progress)  # bad pass specs fail before the capture
    probe = LatencyProbe(backend=backend, target=Target.parse(target, device=device), threads=threads,
                         options=tuple(sorted((backend_options or {}).items())))
    captured = ir.capture(model, example_inputs)
    original = captured.graph_module
    inputs = captured.example_inputs
    manager.context = PassContext(example_inputs=inputs, data=data, latency_probe=probe, executor=executor,
                                  progress=progress, seed=seed)
    pipeline = manager.run(original, inputs)
    verification: dict[str, Any] = {}
    if verify:
        check = [inputs, *ir.random_inputs_like(inputs, random_inputs, seed=1)]
        all_exact = all(r.exact for r in pipeline.records)
        if all_exact:
            stats, _ = ir.check_equivalent(original, pipeline.graph_module, check, what="the optimized model")
        else:
            with torch.no_grad():
                stats = ir.ErrorStats.worst(ir.compare_outputs(original(*b), pipeline.graph_module(*b))
                                            for b in check)
        verification = {**stats.to_dict(), "inputs": len(check), "exact_pipeline": all_exact}
    report = new_report(
        captured.model_name, inputs, [r.to_dict() for r in pipeline.records],
        ir.graph_stats(original, inputs), ir.graph_stats(pipeline.graph_module, inputs), verification)
    report["capture"] = {"input_names": list(captured.input_names), **captured.dynamic}
    return OptimizeResult(pipeline.graph_module, original, inputs, pipeline.records, report, probe)


def export_decoder(source: OptimizeResult | nn.Module, example_inputs: Any = None, out_dir: str | Path = "out/decoder",
                   *, max_length: int | None = None, opset: int | None = None,
                   measure: bool = False) -> decoder_backend.DecoderArtifact:
    """Write the KV-cache decode step of a causal LM as ``decoder.onnx`` + ``decoder.json`` (Optimum's names).

    Args:
        source: an :class:`OptimizeResult` (its optimized module, e.g. after ``kv_share``) or a model, which is
            captured on ``example_inputs`` (token ids, or a dict with ``input_ids`` and ``attention_mask``).
        example_inputs: needed for a model; ignored for a result.
        out_dir: where both files go (written atomically).
        max_length: longest ``past + seq`` supported; default the capture's sequence bound (a model's
            ``max_position_embeddings`` or the length its position tables allow).

        measure: also time greedy generation (batch 1, a 16-token prompt, 32 new tokens, median of 3 runs)
            and record prefill latency and decode tokens/s.

    The decode step is checked against the full model and the ONNX file against torch before anything is
    written; for a result, ``report["decoder"]`` records the cache layout (and the timings).
    """
    if isinstance(source, OptimizeResult):
        gm, bound = source.module, source.report.get("capture", {}).get("max_seq")
    else:
        if example_inputs is None:
            raise ConfigError("export_decoder(model, example_inputs, out_dir): a model needs example inputs "
                              "(token ids) to be captured")
        captured = ir.capture(source, example_inputs)
        gm, bound = captured.graph_module, captured.dynamic.get("max_seq")
    artifact = decoder_backend.export_decoder(gm, out_dir, max_length=max_length or bound, opset=opset)
    timing = decoder_backend.measure_generation(out_dir) if measure else None
    if isinstance(source, OptimizeResult):
        source.report["decoder"] = {"dir": str(Path(out_dir)), **artifact.meta,
                                    **({"generation": timing} if timing else {})}
    return artifact


generate = decoder_backend.generate


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    return str(value)
