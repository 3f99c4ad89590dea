"""Backends: one :class:`Backend` interface (ONNX Runtime, TVM, eager torch), one :class:`Target` vocabulary,
ONNX export and the shared latency helper.

``get_backend(name, target, threads=..., ...)`` gives a configured backend (compile, run, measure,
measure_layer, compare, export, fingerprint); ``measure_latency`` is the one-call form for timing a model::

    m = measure_latency(model, (x,), backend="onnxruntime", threads=1, repeat=20)
    m.median_ms, m.p90_ms, m.n

onnxruntime is imported only when a session is created; tvm only when ``backend="tvm"`` is used (it takes
extra keyword options: ``remote="host:port"``, ``mcpu=``, ``arch=``, ``tune_trials=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from onnx import ModelProto  # `import onnx` would be shadowed: in this package `onnx` is the .onnx submodule
from torch import nn

from ..errors import ConfigError, suggest
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
from .torch_eager import TorchBackend
from .tvm import TvmBackend

__all__ = [
    "ARCHS", "DEVICES", "Backend", "Inputs", "Target", "host_arch",
    "BACKENDS", "backend_name", "get_backend", "OrtBackend", "TvmBackend", "TorchBackend",
    "Measurement", "compare_interleaved", "quantile", "time_callable",
    "OnnxArtifact", "export_onnx", "to_onnx_model",
    "available_providers", "check_session_args", "create_session", "default_device", "measure", "run",
    "measure_latency", "LatencyProbe",
]

Model = nn.Module | str | Path | ModelProto

BACKENDS: dict[str, type[Backend]] = {"onnxruntime": OrtBackend, "tvm": TvmBackend, "torch": TorchBackend}
"""Backend name -> class. ``"torch"`` (eager PyTorch) is the reference the deployment backends are compared with."""
_ALIASES = {"ort": "onnxruntime"}


def backend_name(name: str) -> str:
    """The registered name of ``name`` (aliases such as ``"ort"`` resolved); unknown names are refused."""
    resolved = _ALIASES.get(name, name)
    if resolved not in BACKENDS:
        known = sorted(BACKENDS)
        raise ConfigError(f"unknown backend {name!r}; known: {', '.join(known)}"
                          f"{suggest(str(name), [*known, *_ALIASES])}")
    return resolved


def get_backend(name: str, target: Target | str | None = None, **settings: Any) -> Backend:
    """The backend ``name`` configured for ``target`` (default: this machine's CPU) with ``settings``
    (``threads``, ``warmup``, ``repeat`` and the backend's own options)."""
    return BACKENDS[backend_name(name)](target, **settings)


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
    target: Target | str | None = None,
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
        target: Where to run (a :class:`Target` or its name: ``"x86"``, ``"aarch64"``, ``"cuda"``, ...);
            default this machine with ``device``.
        **backend_options: The backend's own options (its ``OPTIONS``), for ``"tvm"``: ``remote``
            (``"host:port"`` of a TVM RPC server), ``mcpu``, ``arch``, ``tune_trials``, ``rpc_timeout_s``.

    Returns:
        A Measurement with ``repeat`` samples.

    Raises:
        ConfigError: unknown backend or device, bad counts, a model kind the backend cannot time, or an
            option the backend does not take.
        BackendUnavailableError: ``device="cuda"`` without a usable GPU runtime; tvm not installed; an
            unreachable RPC server.
    """
    name = backend_name(backend)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise ConfigError(f"example_inputs must be a tuple of positional inputs, got "
                          f"{type(example_inputs).__name__}; write (x,) for a single tensor")
    if not isinstance(model, (nn.Module, str, Path, ModelProto)):
        raise ConfigError(f"model must be an nn.Module, an ONNX file path or a ModelProto, "
                          f"got {type(model).__name__}")
    options = dict(backend_options)
    if name == "onnxruntime":
        options["graph_optimization"] = graph_optimization
    return get_backend(name, Target.parse(target, device=device), threads=threads, warmup=warmup, repeat=repeat, **options).measure(
        model, tuple(example_inputs))
