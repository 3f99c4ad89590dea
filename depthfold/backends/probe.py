"""A picklable latency probe: what passes use to time layers and models on the user's backend and target.

Passes may not import backends (dependencies point one way: ir <- passes <- backends <- api), so the API
hands them a :class:`LatencyProbe`: a small value (backend name, target, settings) that executors (a process
pool, Ray) ship to workers with the layers to time; each call opens the :class:`~depthfold.backends.Backend`
it names and delegates to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .base import Backend, LayerScope, Target

__all__ = ["LatencyProbe"]


@dataclass(frozen=True)
class LatencyProbe:
    """Times models and layers on one backend and target with fixed settings.

    Args:
        backend: a registered backend name (``"onnxruntime"``, ``"tvm"``, ``"torch"``; alias ``"ort"``).
        target: a :class:`~depthfold.backends.Target` or its name (``"x86"``, ``"cuda"``, ``"aarch64"``, ...);
            default this machine's CPU.
        threads: intra-op threads, fixed for every measurement.
        warmup, repeat: untimed and timed runs per measurement.
        options: the backend's own options as ``(name, value)`` pairs (TVM: ``remote``, ``mcpu``, ...).
    """

    backend: str = "onnxruntime"
    target: Target | str | None = None
    threads: int = 1
    warmup: int = 3
    repeat: int = 15
    options: tuple[tuple[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        from . import backend_name

        object.__setattr__(self, "backend", backend_name(self.backend))
        object.__setattr__(self, "target", Target.parse(self.target))
        object.__setattr__(self, "options", tuple(sorted((str(k), v) for k, v in self.options)))
        self.open()  # bad settings or a target the backend cannot compile for fail here, before any work

    def open(self) -> Backend:
        """The configured backend."""
        from . import get_backend

        return get_backend(self.backend, self.target, threads=self.threads, warmup=self.warmup,
                           repeat=self.repeat, **dict(self.options))

    @property
    def device(self) -> str:
        return self.target.device  # type: ignore[union-attr]

    def measure(self, model: Any, inputs: tuple[Any, ...]) -> dict[str, Any]:
        """Time ``model`` end to end; returns ``Measurement.to_dict()`` (median, p10, p90, samples, ...)."""
        return self.open().measure(model, inputs).to_dict()

    def measure_layer(self, layer: Any, inputs: tuple[Any, ...], *, cold: bool = False) -> dict[str, Any]:
        """Time one layer (an fx ``GraphModule``) as part of a network (see :attr:`layer_scope`)."""
        return self.open().measure_layer(layer, inputs, cold=cold).to_dict()

    def speedup(self, reference: Any, candidate: Any, inputs: tuple[Any, ...], *, rounds: int = 8) -> dict[str, Any]:
        """How much faster ``candidate`` runs than ``reference``, timed interleaved (median of per-round
        ratios): ``{"median", "p10", "p90", "rounds", "reference_ms", "candidate_ms"}``."""
        return self.open().speedup(reference, candidate, inputs, rounds=rounds)

    @property
    def layer_scope(self) -> LayerScope:
        return self.open().layer_scope

    @property
    def cache_bytes(self) -> int:
        """The host CPU's last-level cache: a network whose weights exceed it reads them from memory."""
        from .ort import last_level_cache_bytes

        return last_level_cache_bytes()

    def fingerprint(self) -> dict[str, Any]:
        """Everything a measurement depends on besides the layer itself (the latency cache key)."""
        return self.open().fingerprint()
