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

    def speedup(self, reference: Any, candidate: Any, inputs: tuple[Any, ...], *, rounds: int = 8) -> dict[str, Any]:
        """How much faster ``candidate`` runs than ``reference`` (modules or ONNX models with the same inputs),
        timed interleaved: the median of per-round ratios, so drift in machine speed (which moves whole-model
        timings by 10-30% between minutes on a shared 2-core machine) cancels.

        Returns ``{"median", "p10", "p90", "rounds", "reference_ms", "candidate_ms"}``.
        """
        from .latency import quantile

        if self.backend == "onnxruntime":
            from .ort import compare_models

            result = compare_models({"reference": reference, "candidate": candidate}, inputs,
                                    device=self.device, threads=self.threads, rounds=rounds, warmup=self.warmup,
                                    min_sample_ms=20.0, baseline="reference")
            ratios = [1.0 / r for r in result["ratios"]["candidate"]["samples"]]
            medians = {name: m.median_ms for name, m in result["measurements"].items()}
        else:  # rounds of whole measurements (TVM caches its builds, so only the first round compiles)
            ratios, times = [], {"reference": [], "candidate": []}
            for r in range(rounds):
                pair = [("reference", reference), ("candidate", candidate)]
                for name, model in pair if r % 2 == 0 else pair[::-1]:
                    times[name].append(float(self.measure(model, inputs)["median_ms"]))
                ratios.append(times["reference"][-1] / times["candidate"][-1])
            medians = {name: quantile(values, 0.5) for name, values in times.items()}
        return {"median": quantile(ratios, 0.5), "p10": quantile(ratios, 0.1), "p90": quantile(ratios, 0.9),
                "rounds": rounds, "reference_ms": medians["reference"], "candidate_ms": medians["candidate"]}

    @property
    def layer_scope(self) -> str:
        """How :meth:`measure_layer` times a layer: ``"kernels"`` (ONNX Runtime CPU: the layer's own kernels,
        read from ORT's profiler, without the layout reorders and call overhead a layer timed alone pays and a
        layer inside a network does not) or ``"end_to_end"`` (the whole call; a caller relating layers to a
        network subtracts the time of an identity model itself)."""
        return "kernels" if (self.backend, self.device) == ("onnxruntime", "cpu") else "end_to_end"

    @property
    def cache_bytes(self) -> int:
        """The host CPU's last-level cache: a network whose weights exceed it reads them from memory."""
        from .ort import last_level_cache_bytes

        return last_level_cache_bytes()

    def measure_layer(self, model: Any, inputs: tuple[Any, ...], *, cold: bool = False) -> dict[str, Any]:
        """Time one layer (an ONNX ``ModelProto``) as part of a network; see :attr:`layer_scope`.

        ``cold``: evict the CPU caches before each run (``"kernels"`` scope), for layers of a network whose
        weights do not fit in :attr:`cache_bytes`, so they come from memory as they do there.
        """
        if self.layer_scope == "kernels":
            from .ort import measure_kernels

            return measure_kernels(model, inputs, device=self.device, threads=self.threads, warmup=self.warmup,
                                   repeat=self.repeat, flush_bytes=2 * self.cache_bytes if cold else 0).to_dict()
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
