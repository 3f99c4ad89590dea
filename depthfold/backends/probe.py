"""A picklable latency probe: what passes use to time layers and models on the user's backend and device.

Passes may not import backends (dependencies point one way: ir <- passes <- backends <- api), so the API
hands them a :class:`LatencyProbe`. It is plain data, so executors (a process pool, Ray) can ship it to
workers together with the layers to time, and its :meth:`fingerprint` names everything a cached
measurement depends on: backend, device, threads, the machine, library versions and timing settings.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError

__all__ = ["LatencyProbe"]


@dataclass(frozen=True)
class LatencyProbe:
    """Times ONNX models and torch modules on one backend/device with the shared latency helper.

    Args:
        backend: ``"onnxruntime"`` or ``"tvm"`` (any name :func:`depthfold.backends.measure_latency` takes).
        device: ``"cpu"`` or ``"cuda"``.
        threads: intra-op threads, fixed for every measurement.
        warmup, repeat: untimed and timed runs per measurement.
        options: backend-specific keywords as ``(name, value)`` pairs (TVM: ``target``, ``remote``, ...).
    """

    backend: str = "onnxruntime"
    device: str = "cpu"
    threads: int = 1
    warmup: int = 3
    repeat: int = 15
    options: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        from . import _ALIASES, LATENCY_BACKENDS

        name = _ALIASES.get(self.backend, self.backend)
        if name not in LATENCY_BACKENDS or name == "torch":
            raise ConfigError(f"latency backend {self.backend!r} cannot time ONNX layers; use 'onnxruntime' "
                              "or 'tvm'")
        object.__setattr__(self, "backend", name)

    def measure(self, model: Any, inputs: tuple[Any, ...]) -> dict[str, Any]:
        """Time ``model`` (an ONNX ``ModelProto`` or an ``nn.Module``) on ``inputs``; returns
        ``Measurement.to_dict()`` (median, p10, p90, samples, ...)."""
        from . import measure_latency

        m = measure_latency(model, inputs, backend=self.backend, device=self.device, threads=self.threads,
                            warmup=self.warmup, repeat=self.repeat, **dict(self.options))
        return m.to_dict()

    @property
    def layer_scope(self) -> str:
        """How :meth:`measure_layer` times a layer: ``"kernels"`` (ONNX Runtime CPU: the layer's own kernels,
        read from ORT's profiler, without the layout reorders and call overhead a layer timed alone pays and a
        layer inside a network does not) or ``"end_to_end"`` (the whole call; a caller relating layers to a
        network subtracts the time of an identity model itself)."""
        return "kernels" if (self.backend, self.device) == ("onnxruntime", "cpu") else "end_to_end"

    def measure_layer(self, model: Any, inputs: tuple[Any, ...]) -> dict[str, Any]:
        """Time one layer (an ONNX ``ModelProto``) as part of a network; see :attr:`layer_scope`."""
        if self.layer_scope == "kernels":
            from .ort import measure_kernels

            return measure_kernels(model, inputs, device=self.device, threads=self.threads, warmup=self.warmup,
                                   repeat=self.repeat).to_dict()
        return self.measure(model, inputs)

    def fingerprint(self) -> dict[str, Any]:
        """Everything a measurement depends on besides the layer itself (the latency cache key)."""
        versions = {pkg: _version(pkg) for pkg in ("onnx", "onnxruntime", "apache-tvm")}
        return {"backend": self.backend, "device": self.device, "threads": self.threads, "warmup": self.warmup,
                "repeat": self.repeat, "options": [list(o) for o in self.options], "layer_scope": self.layer_scope,
                "machine": _machine(), "gpu": _gpu_name() if self.device == "cuda" else None,
                "versions": versions}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def _machine() -> str:
    """CPU model and architecture, e.g. ``x86_64 Intel(R) Xeon(R) ...``."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        model = platform.processor()
    return f"{platform.machine()} {model}".strip()


@functools.cache
def _gpu_name() -> str | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import shutil
    import subprocess

    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=False)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else None
    return None
