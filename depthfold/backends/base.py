"""What every backend offers (export, compile, run, measure) and the ``Target`` it compiles for."""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from ..errors import ConfigError, suggest

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from .latency import Measurement

__all__ = ["Target", "Backend", "Inputs", "ARCHS", "DEVICES", "host_arch"]

ARCHS: tuple[str, ...] = ("x86", "aarch64")
DEVICES: tuple[str, ...] = ("cpu", "cuda")

Inputs = Sequence[Any]
"""Positional example inputs: ``torch.Tensor`` or ``numpy.ndarray`` values, in the model's input order."""

_HOST_ARCH = {"x86_64": "x86", "amd64": "x86", "i386": "x86", "i686": "x86",
              "aarch64": "aarch64", "arm64": "aarch64"}


def host_arch() -> str:
    """Return the architecture of this machine as a Target arch (``"x86"`` or ``"aarch64"``)."""
    machine = platform.machine().lower()
    return _HOST_ARCH.get(machine, machine)


@dataclass(frozen=True)
class Target:
    """Where a compiled model will run; each backend maps it to its own notion (ORT providers, TVM target)."""

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
    def host(cls, device: Literal["cpu", "cuda"] = "cpu") -> Target:
        """The Target for this machine's architecture."""
        arch = host_arch()
        if arch not in ARCHS:
            raise ConfigError(f"this machine's architecture {platform.machine()!r} is not a supported target; "
                              f"known: {', '.join(ARCHS)}")
        return cls(arch=arch, device=device)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.arch}-{self.device}"


ArtifactT = TypeVar("ArtifactT")
CompiledT = TypeVar("CompiledT")


class Backend(Protocol[ArtifactT, CompiledT]):
    """A deployment backend: ``"onnxruntime"`` (see ``ort.OrtBackend``) or ``"tvm"``."""

    name: str

    def export(self, gm: nn.Module, example_inputs: tuple[torch.Tensor, ...], out_dir: Path) -> ArtifactT:
        """Write the model to ``out_dir`` in the backend's exchange format, verified against ``gm``."""
        ...

    def compile(self, artifact: ArtifactT, target: Target) -> CompiledT:
        """Make the artifact runnable on ``target``."""
        ...

    def run(self, compiled: CompiledT, inputs: Inputs) -> list[np.ndarray]:
        """Run once on positional inputs and return the outputs as NumPy arrays."""
        ...

    def measure(self, compiled: CompiledT, inputs: Inputs, *, warmup: int, repeat: int) -> Measurement:
        """Time ``run`` with the shared latency helper."""
        ...
