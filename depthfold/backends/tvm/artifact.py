"""The artifact: tensor specs, the directory on disk, the in-memory build, reference outputs, input checks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..._atomic import atomic_write
from ...errors import ArtifactError, ConfigError
from ..onnx import to_numpy

LIBRARY_NAME = "model.so"
ARTIFACT_JSON = "artifact.json"
REFERENCE_NPZ = "reference.npz"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model input or output."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))


@dataclass(frozen=True)
class TvmArtifact:
    """A compiled TVM library on disk with its ``artifact.json`` (see :func:`compile`)."""

    path: Path
    """The artifact directory."""
    target: str
    """``"x86"``, ``"aarch64"`` or ``"cuda"``."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    """The whole ``artifact.json``."""

    @property
    def library(self) -> Path:
        return self.path / str(self.meta.get("library", LIBRARY_NAME))

    @property
    def reference(self) -> Path | None:
        """``reference.npz`` (example inputs ``in<i>`` and torch outputs ``out<i>``), if written."""
        ref = self.path / REFERENCE_NPZ
        return ref if ref.is_file() else None

    @classmethod
    def load(cls, path: str | Path) -> TvmArtifact:
        """Read an artifact directory written by :func:`compile`.

        Raises:
            ArtifactError: no ``artifact.json`` or library there, or the JSON is not a TVM artifact.
        """
        root = Path(path)
        if root.is_file() and root.name == ARTIFACT_JSON:
            root = root.parent
        meta_file = root / ARTIFACT_JSON
        if not meta_file.is_file():
            raise ArtifactError(f"{str(root)!r} is not a TVM artifact directory (no {ARTIFACT_JSON}); create one "
                                "with depthfold.backends.tvm.compile or `depthfold compile`")
        try:
            meta = json.loads(meta_file.read_text())
            art = cls(path=root, target=str(meta["target"]),
                      inputs=tuple(TensorSpec.from_dict(d) for d in meta["inputs"]),
                      outputs=tuple(TensorSpec.from_dict(d) for d in meta["outputs"]), meta=meta)
        except (ValueError, KeyError, TypeError) as err:
            raise ArtifactError(f"{str(meta_file)!r} is not a valid TVM artifact.json ({err}); recompile") from err
        if meta.get("format") != "depthfold-tvm":
            raise ArtifactError(f"{str(meta_file)!r} is not a depthfold TVM artifact (format "
                                f"{meta.get('format')!r}); recompile with depthfold.backends.tvm.compile")
        if not art.library.is_file():
            raise ArtifactError(f"TVM artifact {str(root)!r} lacks its library {art.library.name!r}; recompile")
        return art


def _as_artifact(artifact: TvmArtifact | str | Path) -> TvmArtifact:
    return artifact if isinstance(artifact, TvmArtifact) else TvmArtifact.load(artifact)


@dataclass
class Compiled:
    """An in-memory build: the TVM executable, what it was built from, and its input/output specs."""

    executable: Any
    target: str
    target_json: dict[str, Any]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    frontend: str
    """``"torch"`` (``from_exported_program``) or ``"onnx"`` (fallback or ONNX source)."""
    frontend_note: str | None
    source_hash: str
    reference: tuple[list[np.ndarray], list[np.ndarray]] | None
    """(example inputs, torch outputs) as NumPy arrays; None for ONNX sources."""
    tuned_trials: int = 0
    compile_s: float = 0.0
    schedules: str = "depthfold"
    """CPU kernels: depthfold's default schedules (``"depthfold"``: block-fused; ``"per_layer"``), or ``"tvm"``
    (TVM's own pipeline; always for CUDA)."""
    flops: int | None = None
    """FLOPs of one call, counted on the torch model (None for ONNX sources)."""
    tuning: dict[str, Any] | None = None
    """With ``tune_trials``: tasks, how many were tuned now (the rest came from the record cache), default vs
    tuned latency here and which build was kept."""


def _as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConfigError(f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}; "
                      "write (x,) for a single tensor")


def _check_inputs(specs: Sequence[TensorSpec], inputs: Any, where: str) -> list[np.ndarray]:
    values = _as_inputs(inputs)
    if len(values) != len(specs):
        raise ConfigError(f"{where} takes {len(specs)} input(s) {[s.name for s in specs]}, got {len(values)}; "
                          "pass them positionally in that order")
    arrays = []
    for spec, v in zip(specs, values, strict=True):
        a = to_numpy(v, name=f"input {spec.name!r}")
        if tuple(a.shape) != spec.shape or str(a.dtype) != spec.dtype:
            raise ConfigError(f"{where}: input {spec.name!r} expects shape {list(spec.shape)} {spec.dtype}, got "
                              f"{list(a.shape)} {a.dtype}; TVM libraries are compiled for fixed shapes, so "
                              "recompile with example inputs of the new shape")
        arrays.append(np.ascontiguousarray(a))
    return arrays


def _write_reference(out: Path, reference: tuple[list[np.ndarray], list[np.ndarray]] | None) -> None:
    """Write ``reference.npz`` (inputs ``in<i>``, outputs ``out<i>``) into ``out`` (None: remove it)."""
    if reference is None:
        (out / REFERENCE_NPZ).unlink(missing_ok=True)
        return
    ins, outs = reference

    def write_ref(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez(fh, **{f"in{i}": a for i, a in enumerate(ins)}, **{f"out{i}": a for i, a in enumerate(outs)})

    atomic_write(out / REFERENCE_NPZ, write_ref)


def _read_reference(art: TvmArtifact) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if art.reference is None:
        raise ArtifactError(f"artifact {str(art.path)!r} has no {REFERENCE_NPZ} (compiled from ONNX?); pass inputs "
                            "and compare outputs yourself")
    with np.load(art.reference) as z:
        ins = [z[f"in{i}"] for i in range(len(art.inputs))]
        outs = [z[f"out{i}"] for i in range(len(art.outputs))]
    return ins, outs


def verify_outputs(got: Sequence[np.ndarray], ref: Sequence[np.ndarray], *, rtol: float = 1e-4,
                   where: str = "TVM output") -> dict[str, Any]:
    """Compare outputs with references as ``max_abs / max(1, max|ref|)``; raise VerificationError over rtol."""
    from ...errors import VerificationError

    if len(got) != len(ref):
        raise VerificationError(f"{where} returns {len(got)} outputs, the reference {len(ref)}")
    max_abs, worst = 0.0, 0.0
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        if tuple(g.shape) != tuple(r.shape):
            raise VerificationError(f"{where}: output {i} has shape {list(g.shape)}, reference {list(r.shape)}")
        diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
        diff = np.nan_to_num(diff, nan=np.inf)
        a = float(diff.max()) if diff.size else 0.0
        scale = max(1.0, float(np.abs(r).max())) if r.size else 1.0
        max_abs, worst = max(max_abs, a), max(worst, a / scale)
    if not worst <= rtol:
        raise VerificationError(f"{where} differs from torch by {worst:.3g} relative to the output scale "
                                f"(max_abs / max(1, max|ref|)), over rtol={rtol:g}")
    return {"max_abs_error": max_abs, "max_rel_error": worst, "rtol": rtol}
