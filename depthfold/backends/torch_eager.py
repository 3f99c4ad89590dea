"""Eager PyTorch as a :class:`~depthfold.backends.base.Backend`: the reference the deployment backends are
compared with (``module(*inputs)`` under ``torch.inference_mode``)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_write
from ..errors import BackendUnavailableError, ConfigError
from ..ir import flatten_outputs
from .base import Backend, Inputs, Target
from .latency import Measurement
from .onnx import to_numpy

__all__ = ["TorchBackend"]


class TorchBackend(Backend):
    """Runs the ``nn.Module`` itself on this machine's CPU or GPU (a copy: the caller's module never moves).

    Its deployment files are the ``torch.export`` program (``model.pt2``, :func:`torch.export.save`)."""

    name = "torch"
    VERSIONED = ("torch",)

    def check_target(self, target: Target) -> None:
        from .base import host_arch

        if target.arch != host_arch():
            raise BackendUnavailableError(f"backend='torch' runs on this {host_arch()} machine only, not "
                                          f"{target.arch}; use the tvm backend to cross-compile")

    def compile(self, model: Any, example_inputs: Inputs) -> nn.Module:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"backend='torch' runs an nn.Module, got {type(model).__name__}; use "
                              "backend='onnxruntime' for ONNX files and ModelProtos")
        if self.target.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("device='cuda' with backend='torch' needs a CUDA build of PyTorch and a "
                                          "GPU; this torch has none. Use device='cpu'")
        return copy.deepcopy(model).to("cuda") if self.target.device == "cuda" else model

    def _inputs(self, inputs: Inputs) -> tuple[Any, ...]:
        device = "cuda" if self.target.device == "cuda" else "cpu"
        return tuple(torch.as_tensor(a).to(device) if isinstance(a, (torch.Tensor, np.ndarray)) else a
                     for a in inputs)

    def run(self, compiled: nn.Module, inputs: Inputs) -> list[np.ndarray]:
        with torch.inference_mode():
            return [to_numpy(t) for t in flatten_outputs(compiled(*self._inputs(inputs)))]

    def prepare(self, compiled: nn.Module, inputs: Inputs) -> tuple[Callable[[], object], Callable[[], None] | None]:
        args = self._inputs(inputs)

        def call() -> object:
            with torch.inference_mode():
                return compiled(*args)

        return call, (torch.cuda.synchronize if self.target.device == "cuda" else None)

    @contextlib.contextmanager
    def _fixed_threads(self) -> Iterator[None]:
        """torch's intra-op threads set to ``threads`` while timing, and restored afterwards."""
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def measure(self, model: Any, inputs: Inputs) -> Measurement:
        with self._fixed_threads():
            return super().measure(model, inputs)

    def compare(self, models: Any, inputs: Inputs, **kwargs: Any) -> dict[str, Any]:
        with self._fixed_threads():
            return super().compare(models, inputs, **kwargs)

    def export(self, model: Any, example_inputs: Inputs, out_dir: str | Path) -> Path:
        program = torch.export.export(model, tuple(example_inputs))
        return atomic_write(Path(out_dir) / "model.pt2", lambda tmp: torch.export.save(program, str(tmp)))
