"""Backends: ONNX export, ONNX Runtime sessions and the shared latency helper.

``measure_latency`` is the one entry point for latency, for whole models and for single candidate layers
(LayerMerge's latency tables) alike::

    m = measure_latency(model, (x,), backend="onnxruntime", threads=1, repeat=20)
    m.median_ms, m.p90_ms, m.n

onnxruntime is imported only when a session is created; tvm only when ``backend="tvm"`` is used (it takes
extra keyword options: ``target=``, ``remote="host:port"``, ``mcpu=``, ``arch=``, ``tune_trials=``).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from onnx import ModelProto  # `import onnx` would be shadowed: in this package `onnx` is the .onnx submodule
from torch import nn

from ..errors import BackendUnavailableError, ConfigError, suggest
from ..ir import flatten_outputs
from .base import ARCHS, DEVICES, Backend, Inputs, Target, host_arch
from .latency import Measurement, compare_interleaved, quantile, time_callable
from .onnx import OnnxArtifact, export_onnx, to_onnx_model
from .ort import (
    OrtBackend,
    available_providers,
    check_session_args,
    create_session,
    default_device,
    measure,
    run,
)
from .probe import LatencyProbe

__all__ = [
    "ARCHS", "DEVICES", "Backend", "Inputs", "Target", "host_arch",
    "Measurement", "compare_interleaved", "quantile", "time_callable",
    "OnnxArtifact", "export_onnx", "to_onnx_model",
    "OrtBackend", "available_providers", "check_session_args", "create_session", "default_device", "measure", "run",
    "measure_latency", "LATENCY_BACKENDS", "LatencyProbe",
]

Model = nn.Module | str | Path | ModelProto


def _measure_onnxruntime(model: Model, inputs: tuple[Any, ...], *, device: str, threads: int, warmup: int,
                         repeat: int, graph_optimization: str) -> Measurement:
    check_session_args(device=device, threads=threads, graph_optimization=graph_optimization)  # before export
    source = to_onnx_model(model, inputs) if isinstance(model, nn.Module) else model
    session = create_session(source, device=device, threads=threads,
                             graph_optimization=graph_optimization)  # type: ignore[arg-type]
    return measure(session, flatten_outputs(inputs), warmup=warmup, repeat=repeat)


def _measure_torch(model: Model, inputs: tuple[Any, ...], *, device: str, threads: int, warmup: int,
                   repeat: int, graph_optimization: str) -> Measurement:
    if not isinstance(model, nn.Module):
        raise ConfigError(f"backend='torch' times an nn.Module, got {type(model).__name__}; "
                          "use backend='onnxruntime' for ONNX files and ModelProtos")
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; known: {', '.join(DEVICES)}{suggest(str(device), DEVICES)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
    sync: Callable[[], None] | None = None
    if device == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError("device='cuda' with backend='torch' needs a CUDA build of PyTorch and a "
                                          "GPU; this torch has none. Use device='cpu'")
        # Never move the caller's module: time a copy on the GPU.
        model = copy.deepcopy(model).to("cuda")
        inputs = tuple(t.to("cuda") if isinstance(t, torch.Tensor) else t for t in inputs)
        sync = torch.cuda.synchronize
    module = model
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            return time_callable(lambda: module(*inputs), warmup=warmup, repeat=repeat, threads=threads,
                                 backend="torch", device=device, sync=sync)
    finally:
        torch.set_num_threads(previous)


def _measure_tvm(model: Model, inputs: tuple[Any, ...], *, device: str, threads: int, warmup: int, repeat: int,
                 graph_optimization: str, **options: Any) -> Measurement:
    from . import tvm as tvm_backend  # tvm itself is imported inside that module's functions

    return tvm_backend.measure_module(model, inputs, device=device, threads=threads, warmup=warmup, repeat=repeat,
                                      **options)


# Backend name -> measuring function. Adding a backend is one function and one entry here; a function that
# takes ``**options`` accepts backend-specific keywords from measure_latency.
LATENCY_BACKENDS: dict[str, Callable[..., Measurement]] = {
    "onnxruntime": _measure_onnxruntime,
    "torch": _measure_torch,
    "tvm": _measure_tvm,
}
_ALIASES = {"ort": "onnxruntime"}


def measure_latency(
    model: nn.Module | str | Path | ModelProto,
    example_inputs: tuple[Any, ...],
    *,
    backend: str = "onnxruntime",
    device: str = "cpu",
    threads: int = 1,
    warmup: int = 5,
    repeat: int = 20,
    graph_optimization: str = "all",
    **backend_options: Any,
) -> Measurement:
    """Measure the latency of a whole model or a single layer on ``backend``/``device``.

    Args:
        model: An ``nn.Module`` (for ``"onnxruntime"``: exported to ONNX in memory, unverified, then timed in
            a session), or an ONNX file path / ``ModelProto`` (``"onnxruntime"`` only).
        example_inputs: Positional inputs, fed on every run (tensor leaves in order for ONNX).
        backend: ``"onnxruntime"`` (alias ``"ort"``), ``"torch"`` (eager ``module(*inputs)`` under
            ``torch.inference_mode``) or ``"tvm"`` (compiled with Apache TVM, timed here or over TVM RPC).
        device: ``"cpu"`` or ``"cuda"``.
        threads: Intra-op threads, fixed for the measurement (for torch, restored afterwards); recorded.
        warmup: Untimed runs first.
        repeat: Timed runs (samples); reports use at least 20.
        graph_optimization: ORT graph optimization level (``"disable"``, ``"basic"``, ``"extended"``,
            ``"all"``); ignored by other backends.
        **backend_options: Backend-specific keywords, for ``"tvm"``: ``target`` (``"x86"``, ``"aarch64"``,
            ``"cuda"``), ``remote`` (``"host:port"`` of a TVM RPC server), ``mcpu``, ``arch``, ``tune_trials``,
            ``rpc_timeout_s`` (see ``depthfold.backends.tvm.measure_module``).

    Returns:
        A Measurement with ``repeat`` samples.

    Raises:
        ConfigError: unknown backend or device, bad counts, a model kind the backend cannot time, or an
            option the backend does not take.
        BackendUnavailableError: ``device="cuda"`` without a usable GPU runtime; tvm not installed; an
            unreachable RPC server.
    """
    name = _ALIASES.get(backend, backend)
    if name not in LATENCY_BACKENDS:
        known = sorted(LATENCY_BACKENDS)
        raise ConfigError(f"unknown latency backend {backend!r}; known: {', '.join(known)}"
                          f"{suggest(str(backend), [*known, *_ALIASES])}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise ConfigError(f"example_inputs must be a tuple of positional inputs, got "
                          f"{type(example_inputs).__name__}; write (x,) for a single tensor")
    takes_options = any(p.kind is inspect.Parameter.VAR_KEYWORD
                        for p in inspect.signature(LATENCY_BACKENDS[name]).parameters.values())
    if backend_options and not takes_options:
        option = sorted(backend_options)[0]
        raise ConfigError(f"backend {name!r} takes no option {option!r}; backend-specific options (target, remote, "
                          "...) belong to backend='tvm'")
    if not isinstance(model, (nn.Module, str, Path, ModelProto)):
        raise ConfigError(f"model must be an nn.Module, an ONNX file path or a ModelProto, "
                          f"got {type(model).__name__}")
    # Check counts before an expensive export.
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ConfigError(f"repeat must be an integer >= 1, got {repeat!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
    return LATENCY_BACKENDS[name](model, tuple(example_inputs), device=device, threads=threads, warmup=warmup,
                                  repeat=repeat, graph_optimization=graph_optimization, **backend_options)
