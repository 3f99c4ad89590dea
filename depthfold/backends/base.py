"""One backend interface (:class:`Backend`) and one vocabulary of places to run (:class:`Target`).

A backend, configured for a target and fixed timing settings, lowers and compiles models for it, runs them,
times them (whole models, single layers handed in as fx subgraphs, several models interleaved) and names
everything its timings depend on (:meth:`Backend.fingerprint`). ONNX Runtime (``ort.OrtBackend``), Apache TVM
(``tvm.TvmBackend``) and eager PyTorch (``torch_eager.TorchBackend``, the reference) implement it.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..errors import ConfigError, suggest
from .latency import Measurement, _check_counts, compare_interleaved, spread, time_callable

if TYPE_CHECKING:
    import numpy as np
    from torch.fx import GraphModule

__all__ = ["Target", "Backend", "Inputs", "ARCHS", "DEVICES", "host_arch", "LayerScope"]

ARCHS: tuple[str, ...] = ("x86", "aarch64")
DEVICES: tuple[str, ...] = ("cpu", "cuda")

Inputs = Sequence[Any]
"""Positional example inputs: ``torch.Tensor`` or ``numpy.ndarray`` values, in the model's input order."""

LayerScope = Literal["kernels", "end_to_end"]

_HOST_ARCH = {"x86_64": "x86", "amd64": "x86", "i386": "x86", "i686": "x86",
              "aarch64": "aarch64", "arm64": "aarch64"}


def host_arch() -> str:
    """Return the architecture of this machine as a Target arch (``"x86"`` or ``"aarch64"``)."""
    machine = platform.machine().lower()
    return _HOST_ARCH.get(machine, machine)


@dataclass(frozen=True)
class Target:
    """Where a compiled model will run: a CPU architecture and a compute device on that machine.

    Written as a string: ``"x86"``, ``"aarch64"`` (their CPUs), ``"cuda"`` (a GPU on this machine's
    architecture), ``"cpu"`` (this machine's CPU) or ``"<arch>-<device>"`` (``"aarch64-cuda"``);
    :meth:`parse` reads all of them and ``str(target)`` writes the last form.
    """

    arch: Literal["x86", "aarch64"] = "x86"
    """CPU architecture of the machine that runs the model."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Compute device on that machine."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"unknown target arch {self.arch!r}; known: {', '.join(ARCHS)}"
                              f"{suggest(str(self.arch), ARCHS)}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown target device {self.device!r}; known: {', '.join(DEVICES)}"
                              f"{suggest(str(self.device), DEVICES)}")

    @classmethod
    def host(cls, device: str = "cpu") -> Target:
        """The Target for this machine's architecture."""
        arch = host_arch()
        if arch not in ARCHS:
            raise ConfigError(f"this machine's architecture {platform.machine()!r} is not a supported target; "
                              f"known: {', '.join(ARCHS)}")
        return cls(arch=arch, device=device)  # type: ignore[arg-type]

    @classmethod
    def parse(cls, spec: Target | str | None, *, device: str | None = None) -> Target:
        """Read a target written any accepted way (see the class docstring); ``None`` is this machine with
        ``device`` (default CPU). A ``device`` that contradicts the spec is an error."""
        if isinstance(spec, Target):
            target = spec
        elif spec is None:
            return cls.host(device or "cpu")
        elif not isinstance(spec, str):
            raise ConfigError(f"a target is a Target or a string such as 'x86', 'aarch64', 'cuda' or "
                              f"'x86-cuda', got {type(spec).__name__}")
        else:
            text = spec.strip().lower()
            if text in DEVICES:
                target = cls.host(text)
            elif text in ARCHS:
                target = cls(arch=text)  # type: ignore[arg-type]
            elif text.count("-") == 1 and (parts := text.split("-"))[0] in ARCHS and parts[1] in DEVICES:
                target = cls(arch=parts[0], device=parts[1])  # type: ignore[arg-type]
            else:
                known = [*ARCHS, *DEVICES, *(f"{a}-{d}" for a in ARCHS for d in DEVICES)]
                raise ConfigError(f"unknown target {spec!r}; known: {', '.join(known)}{suggest(text, known)}")
        if device is not None and device != target.device:
            if device not in DEVICES:
                raise ConfigError(f"unknown device {device!r}; known: {', '.join(DEVICES)}"
                                  f"{suggest(str(device), DEVICES)}")
            raise ConfigError(f"target {str(target)!r} runs on {target.device}, but device={device!r} was asked "
                              f"for; use target='{target.arch}-{device}' or leave one of them out")
        return target

    def __str__(self) -> str:
        return f"{self.arch}-{self.device}"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


class Backend(ABC):
    """A deployment backend configured for one :class:`Target`, with fixed threads and timing settings.

    Subclasses say how to ``compile`` a model (an ``nn.Module`` or the backend's exchange format) into
    something runnable here, how to ``run`` it, how to ``prepare`` a timed call and how to ``export``
    deployment files; timing, interleaved comparison and layer timing are shared. Options a backend takes
    beyond the shared ones are listed in ``OPTIONS`` and checked on construction.
    """

    name: ClassVar[str]
    OPTIONS: ClassVar[tuple[str, ...]] = ()
    VERSIONED: ClassVar[tuple[str, ...]] = ()
    """Packages whose versions a timing depends on (recorded in :meth:`fingerprint`)."""

    def __init__(self, target: Target | str | None = None, *, threads: int = 1, warmup: int = 5, repeat: int = 20,
                 **options: Any) -> None:
        self.check_settings(threads, warmup, repeat, options)
        self.target = Target.parse(target)
        self.threads, self.warmup, self.repeat = threads, warmup, repeat
        self.options = dict(options)
        self.check_target(self.target)

    @classmethod
    def check_settings(cls, threads: int, warmup: int, repeat: int, options: Mapping[str, Any]) -> None:
        """Refuse bad thread or run counts and options this backend does not take."""
        _positive_int("threads", threads)
        _check_counts(warmup, repeat)
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            known = ", ".join(cls.OPTIONS) or "none"
            raise ConfigError(f"backend {cls.name!r} has no option {unknown[0]!r}; its options: {known}"
                              f"{suggest(unknown[0], [*cls.OPTIONS, 'target', 'threads', 'warmup', 'repeat'])}")

    @abstractmethod
    def check_target(self, target: Target) -> None:
        """Refuse a target this backend cannot compile for, saying what to use instead (whether the device's
        runtime is usable on this machine is checked when a model is compiled)."""

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in sorted(self.options.items()))
        return f"{type(self).__name__}({str(self.target)!r}, threads={self.threads}{opts})"

    # -- what each backend provides --------------------------------------------------------------------

    @abstractmethod
    def compile(self, model: Any, example_inputs: Inputs) -> Any:
        """Lower and compile ``model`` for this target at the inputs' shapes; returns a runnable handle."""

    @abstractmethod
    def run(self, compiled: Any, inputs: Inputs) -> list[np.ndarray]:
        """Run once on positional inputs and return the outputs as NumPy arrays."""

    @abstractmethod
    def prepare(self, compiled: Any, inputs: Inputs) -> tuple[Callable[[], object], Callable[[], None] | None]:
        """Bind inputs once for timing: ``(call, sync)``, ``sync`` waiting for an asynchronous device or None."""

    @abstractmethod
    def export(self, model: Any, example_inputs: Inputs, out_dir: str | Path) -> Any:
        """Write deployment files for ``model`` to ``out_dir``, verified against it where this machine can run
        them; returns the backend's artifact record."""

    @property
    def layer_scope(self) -> LayerScope:
        """How :meth:`measure_layer` times a layer: ``"kernels"`` (the layer's own kernels, as inside a
        network) or ``"end_to_end"`` (the whole call; relate it to a network by subtracting the time of an
        identity model at the same shape)."""
        return "end_to_end"

    # -- shared ----------------------------------------------------------------------------------------

    def measure(self, model: Any, inputs: Inputs) -> Measurement:
        """Compile (cached by content where the backend caches) and time ``model`` end to end."""
        call, sync = self.prepare(self.compile(model, inputs), inputs)
        return time_callable(call, warmup=self.warmup, repeat=self.repeat, threads=self.threads,
                             backend=self.name, device=self.target.device, sync=sync)

    def measure_layer(self, layer: GraphModule, inputs: Inputs, *, cold: bool = False) -> Measurement:
        """Time one layer, an fx subgraph taking ``inputs``, as part of a network (see :attr:`layer_scope`).

        ``cold``: the layer belongs to a network whose weights exceed the CPU's last-level cache, so inside it
        they come from memory (backends timing ``"kernels"`` evict the caches before each run)."""
        return self.measure(layer, inputs)

    def compare(self, models: Mapping[str, Any], inputs: Inputs, *, rounds: int = 20, baseline: str | None = None,
                min_sample_ms: float | None = None) -> dict[str, Any]:
        """Time ``models`` (same inputs) interleaved round by round; medians of per-round ratios cancel drift
        in machine speed. Returns :func:`~depthfold.backends.latency.compare_interleaved`'s result."""
        prepared = {name: self.prepare(self.compile(m, inputs), inputs) for name, m in models.items()}
        syncs = [s for _, s in prepared.values() if s is not None]
        return compare_interleaved({name: call for name, (call, _) in prepared.items()}, rounds=rounds,
                                   warmup=self.warmup, min_sample_ms=min_sample_ms, baseline=baseline,
                                   threads=self.threads, backend=self.name, device=self.target.device,
                                   sync=syncs[0] if syncs else None)

    def speedup(self, reference: Any, candidate: Any, inputs: Inputs, *, rounds: int = 8) -> dict[str, Any]:
        """How much faster ``candidate`` runs than ``reference``: ``{"median", "p10", "p90", "rounds",
        "reference_ms", "candidate_ms"}`` from per-round ratios of an interleaved :meth:`compare`."""
        result = self.compare({"reference": reference, "candidate": candidate}, inputs, rounds=rounds,
                              baseline="reference", min_sample_ms=20.0)
        ratios = [1.0 / r for r in result["ratios"]["candidate"]["samples"]]
        ms = {name: m.median_ms for name, m in result["measurements"].items()}
        return {**spread(ratios), "rounds": rounds, "reference_ms": ms["reference"], "candidate_ms": ms["candidate"]}

    def fingerprint(self) -> dict[str, Any]:
        """Everything a timing depends on besides the model: backend, target, settings, the machine, versions."""
        return {"backend": self.name, "target": str(self.target), "device": self.target.device,
                "threads": self.threads, "warmup": self.warmup, "repeat": self.repeat,
                "options": sorted([k, _plain(v)] for k, v in self.options.items()), "layer_scope": self.layer_scope,
                "machine": machine(), "gpu": gpu_name() if self.target.device == "cuda" else None,
                "versions": {pkg: _version(pkg) for pkg in ("onnx", *self.VERSIONED)}}


def _plain(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def machine() -> str:
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
def gpu_name() -> str | None:
    """This machine's first GPU, from torch or ``nvidia-smi``; None without one."""
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
