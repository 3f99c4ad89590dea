"""Apache TVM (Relax) backend: compile a model for x86, aarch64 (edge ARM) or CUDA, run it, time it, remotely too.

::

    art = tvm.compile(model, (x,), target="aarch64", mcpu="cortex-a72", out_dir="out/pi4")
    # out/pi4/model.so (cross-linked with aarch64-linux-gnu-g++), out/pi4/artifact.json, out/pi4/reference.npz
    tvm.measure(art, (x,), remote="raspberrypi:9090")   # uploads the library and times it on the Pi

Import goes through ``tvm.relax.frontend.torch.from_exported_program``; where that fails (an op the torch
frontend lacks), the model is exported to ONNX and imported with TVM's ONNX frontend instead, and
``artifact.json`` says so (``"frontend": "onnx"``, with the reason). Targets map to TVM's JSON target dicts:

- ``"x86"``: ``{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": <this CPU unless mcpu=...>}``
- ``"aarch64"``: ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"], "mcpu": mcpu}``
  (e.g. ``cortex-a72`` for a Raspberry Pi 4, ``cortex-a76`` for a Pi 5); linked with Debian's
  ``g++-aarch64-linux-gnu``.
- ``"cuda"``: ``{"kind": "cuda", "arch": arch}`` (e.g. ``sm_90``), with an x86 llvm host; needs ``nvcc`` to
  compile and a GPU to run.

tvm is imported inside the functions of this module only, so depthfold imports without it; a missing tvm
raises :class:`~depthfold.errors.BackendUnavailableError` naming the ``tvm`` extra. The aarch64 emulation
helper :func:`run_emulated` runs a library under ``qemu-aarch64-static`` with an arm64 Python prepared by
``scripts/setup_arm_lane.sh``; emulated timings are not device timings, so it only returns outputs.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._atomic import atomic_write, ensure_writable_dir
from ..cache import cache_dir
from ..errors import ArtifactError, BackendUnavailableError, ConfigError, DepthfoldError, suggest
from ..ir import flatten_outputs
from .latency import Measurement, time_callable
from .onnx import to_numpy

__all__ = [
    "TARGETS", "TvmArtifact", "Compiled", "compile", "build", "load", "run", "measure", "verify",
    "target_dict", "parse_remote", "run_emulated", "emulation_root", "measure_module", "nvcc_available",
    "gpu_available", "verify_outputs", "TensorSpec", "prepare",
]

logger = logging.getLogger(__name__)

TARGETS: tuple[str, ...] = ("x86", "aarch64", "cuda")
LIBRARY_NAME = "model.so"
ARTIFACT_JSON = "artifact.json"
REFERENCE_NPZ = "reference.npz"
_INSTALL_HINT = "pip install 'depthfold[tvm]' (apache-tvm>=0.27)"
_CROSS_CXX = "aarch64-linux-gnu-g++"
_CROSS_PACKAGE = "g++-aarch64-linux-gnu"
_QEMU = "qemu-aarch64-static"
_QEMU_PACKAGE = "qemu-user-static"
_DEFAULT_CUDA_ARCH = "sm_80"
_RPC_CONNECT_TIMEOUT_S = 10.0


# ----------------------------------------------------------------------------------------------------------
# tvm import, targets
# ----------------------------------------------------------------------------------------------------------

def _tvm() -> Any:
    try:
        import tvm
        from tvm import relax  # noqa: F401  (checks the Relax part is there too)
    except ImportError as err:
        raise BackendUnavailableError(f"the tvm backend needs Apache TVM, which is not installed: {_INSTALL_HINT}"
                                      ) from err
    return tvm


def _host_mcpu() -> str | None:
    tvm = _tvm()
    try:
        return str(tvm.target.codegen.llvm_get_system_cpu())
    except Exception:  # an llvm-less tvm build; the generic CPU then
        return None


def target_dict(target: str = "x86", *, mcpu: str | None = None, arch: str | None = None) -> dict[str, Any]:
    """Return TVM's JSON target dict for a depthfold target name.

    Args:
        target: ``"x86"``, ``"aarch64"`` or ``"cuda"``.
        mcpu: LLVM CPU name (``"cortex-a72"``, ``"skylake-avx512"``); x86 default: this machine's CPU,
            aarch64 default: generic ARMv8-A with NEON. For ``"cuda"`` it sets the host CPU.
        arch: CUDA architecture such as ``"sm_90"`` (``"cuda"`` only); default: this machine's GPU, else
            ``sm_80``.

    Raises:
        ConfigError: unknown target, an ``arch`` for a CPU target, or a malformed ``arch``.
    """
    if target not in TARGETS:
        raise ConfigError(f"unknown tvm target {target!r}; known: {', '.join(TARGETS)}"
                          f"{suggest(str(target), TARGETS)}")
    if arch is not None and target != "cuda":
        raise ConfigError(f"arch={arch!r} selects a CUDA architecture and applies to target='cuda' only; "
                          f"use mcpu=... to pick the CPU of target {target!r}")
    if target == "aarch64":
        out: dict[str, Any] = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
        if mcpu:
            out["mcpu"] = mcpu
        return out
    host: dict[str, Any] = {"kind": "llvm", "mtriple": "x86_64-linux-gnu"}
    cpu = mcpu or _host_mcpu()
    if cpu:
        host["mcpu"] = cpu
    if target == "x86":
        host["num-cores"] = os.cpu_count() or 1  # MetaSchedule's local runner needs it
        return host
    if arch is None:
        arch = _local_cuda_arch() or _DEFAULT_CUDA_ARCH
    if not re.fullmatch(r"sm_\d+[a-z]?", str(arch)):
        raise ConfigError(f"CUDA arch must look like 'sm_90' (compute capability 9.0), got {arch!r}")
    # Explicit limits: TVM otherwise guesses them and says so on stderr. These hold for every sm_70+ GPU.
    return {"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152, "max_threads_per_block": 1024,
            "thread_warp_size": 32, "host": host}


def _local_cuda_arch() -> str | None:
    tvm = _tvm()
    try:
        dev = tvm.cuda(0)
        if dev.exist:
            return "sm_" + str(dev.compute_version).replace(".", "")
    except Exception:  # no CUDA runtime in this tvm build
        return None
    return None


def _check_toolchain(target: str) -> None:
    if target == "aarch64" and shutil.which(_CROSS_CXX) is None:
        raise BackendUnavailableError(
            f"target='aarch64' links the library with {_CROSS_CXX}, which is not on PATH; install Debian's "
            f"{_CROSS_PACKAGE} (apt-get install {_CROSS_PACKAGE}) or run scripts/setup_arm_lane.sh")
    if target == "cuda" and not nvcc_available():
        raise BackendUnavailableError(
            "target='cuda' compiles kernels with nvcc, which is not on PATH (nor in $CUDA_HOME/bin); install "
            "the CUDA toolkit (Debian: nvidia-cuda-toolkit; PyPI: nvidia-cuda-nvcc) and put nvcc on PATH")


def nvcc_available() -> bool:
    """Whether ``nvcc`` (needed to compile ``target="cuda"``) is on PATH or in ``$CUDA_HOME/bin``."""
    return shutil.which("nvcc") is not None or _has_nvcc_in_cuda_home()


def gpu_available() -> bool:
    """Whether TVM sees a CUDA GPU here (needed to run or tune ``target="cuda"`` locally)."""
    return _local_cuda_arch() is not None


def _has_nvcc_in_cuda_home() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool(home) and (Path(home) / "bin" / "nvcc").is_file()


# ----------------------------------------------------------------------------------------------------------
# Artifact
# ----------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------
# Import (torch frontend, ONNX fallback) and build
# ----------------------------------------------------------------------------------------------------------

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


def _as_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, (torch.Tensor, np.ndarray)):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConfigError(f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}; "
                      "write (x,) for a single tensor")


def _resolve_source(source: Any, example_inputs: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(nn.Module | ExportedProgram | onnx path/ModelProto, inputs) from what the user passed."""
    if hasattr(source, "module") and isinstance(getattr(source, "module", None), nn.Module) \
            and hasattr(source, "example_inputs"):  # depthfold.OptimizeResult (duck-typed: backends never import api)
        if example_inputs is None:
            example_inputs = source.example_inputs
        source = source.module
    if isinstance(source, torch.export.ExportedProgram) or isinstance(source, nn.Module):
        if example_inputs is None:
            raise ConfigError("example_inputs are needed to compile a torch model (they fix the input shapes); "
                              "pass e.g. (torch.randn(1, 3, 224, 224),)")
        return source, _as_inputs(example_inputs)
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir() and (p / "model.onnx").is_file():
            p = p / "model.onnx"
        if p.suffix != ".onnx" or not p.is_file():
            raise ConfigError(f"cannot compile {str(source)!r}: expected an nn.Module, an ExportedProgram, an "
                              "OptimizeResult, an .onnx file or a directory holding model.onnx")
        return p, None if example_inputs is None else _as_inputs(example_inputs)
    try:
        from onnx import ModelProto
        if isinstance(source, ModelProto):
            return source, None if example_inputs is None else _as_inputs(example_inputs)
    except ImportError:  # onnx is a core dependency; keep the error below if it is gone
        pass
    raise ConfigError(f"cannot compile a {type(source).__name__}; pass an nn.Module, a torch.export "
                      "ExportedProgram, a depthfold OptimizeResult, an ONNX file path or an onnx.ModelProto")


def _hash_torch(ep: torch.export.ExportedProgram) -> str:
    h = hashlib.sha256()
    h.update(str(ep.graph_module.code).encode())
    for name, t in sorted(ep.state_dict.items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(np.ascontiguousarray(t.detach().cpu().float().numpy()).tobytes())
    for name, t in sorted(getattr(ep, "constants", {}).items()):
        if isinstance(t, torch.Tensor):
            h.update(name.encode())
            h.update(np.ascontiguousarray(t.detach().cpu().float().numpy()).tobytes())
    return h.hexdigest()


def _dtype_str(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return str(np.dtype(dtype))


def _specs(prefix: str, names: Sequence[str] | None, arrays: Sequence[Any]) -> tuple[TensorSpec, ...]:
    out = []
    for i, a in enumerate(arrays):
        name = names[i] if names and i < len(names) else f"{prefix}{i}"
        out.append(TensorSpec(name, tuple(int(s) for s in a.shape), _dtype_str(a.dtype)))
    return tuple(out)


_UNSUPPORTED = re.compile(r"Unsupported function types? \[?([^\]\n]+)\]?", re.I)


def _unsupported_ops(err: BaseException) -> str | None:
    text = str(err)
    m = _UNSUPPORTED.search(text)
    if m:
        return m.group(1).replace("'", "").strip()
    m = re.search(r"(?:not supported|unsupported)[^\n]*?'([\w.:]+)'", text, re.I)
    return m.group(1) if m else None


def _import_torch(ep: torch.export.ExportedProgram) -> Any:
    from tvm.relax.frontend.torch import from_exported_program

    return from_exported_program(ep, keep_params_as_input=False)


def _import_onnx(model: Any, inputs: tuple[Any, ...] | None) -> tuple[Any, list[str], list[TensorSpec]]:
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    init_names = {i.name for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in init_names]
    shapes: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    specs = []
    for k, vi in enumerate(graph_inputs):
        tt = vi.type.tensor_type
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if inputs is not None and k < len(inputs):
            dims = [int(s) for s in inputs[k].shape]
        if any(d is None for d in dims):
            raise ConfigError(f"ONNX input {vi.name!r} has a dynamic shape {dims}; pass example_inputs to fix it")
        shapes[vi.name] = [int(d) for d in dims]  # type: ignore[arg-type]
        dtypes[vi.name] = dtype
        specs.append(TensorSpec(vi.name, tuple(shapes[vi.name]), dtype))
    mod = from_onnx(proto, shape_dict=shapes, dtype_dict=dtypes, keep_params_in_input=False)
    outputs = [o.name for o in proto.graph.output]
    return mod, outputs, specs


def _cuda_pipeline(target: Any) -> Any:
    """TVM's default CUDA pipeline, with each dlight schedule rule guarded.

    In TVM 0.27 the GEMV rule's analysis asserts on MobileNetV2's depthwise convolutions instead of declining
    them; a guarded rule that raises counts as "not applicable", so the next rule (ending with Fallback)
    schedules that kernel. Same passes, same order as ``relax.backend.cuda.pipeline.get_default_pipeline``.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda_pipeline
    from tvm.s_tir import dlight as dl

    class _Guarded(dl.ScheduleRule):
        def __init__(self, rule: Any) -> None:
            self.rule = rule

        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            try:
                return self.rule.apply(func, target, tunable)
            except Exception as err:  # a rule's own bug; let the next rule schedule the kernel
                logger.debug("tvm: dlight rule %s declined a kernel after raising %r", type(self.rule).__name__,
                             err)
                return None

        def is_target_available(self, target: Any) -> bool:
            return bool(self.rule.is_target_available(target))

    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(*(_Guarded(r) for r in (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
                                                          dl.gpu.GeneralReduction(), dl.gpu.Fallback()))),
    ]

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            seq = tvm.transform.Sequential(cuda_pipeline.library_dispatch_passes(target) + legalize
                                           + cuda_pipeline.dataflow_lower_passes(target)
                                           + cuda_pipeline.finalize_passes(target))
            return seq(mod)

    return _pipeline


_TUNE_PROBE = r'''
import sys, tempfile
import numpy as np
import tvm
from tvm import relax
from tvm.script import relax as R
@tvm.script.ir_module
class Mod:
    @R.function
    def main(x: R.Tensor((1, 16), "float32"), w: R.Tensor((16, 16), "float32")) -> R.Tensor((1, 16), "float32"):
        with R.dataflow():
            y = R.matmul(x, w)
            R.output(y)
        return y
target = tvm.target.Target({"kind": "llvm", "num-cores": 1})
with tempfile.TemporaryDirectory() as work:
    mod = relax.pipeline.static_shape_tuning_pipeline(total_trials=2, target=target, work_dir=work,
                                                      max_trials_per_task=2)(Mod)
tvm.compile(mod, target=target)
print("tuning-ok")
'''
_TUNE_OK: bool | None = None


def _check_tuning_works() -> None:
    """Run a 2-trial MetaSchedule tuning in a child process once; raise if it crashes.

    The apache-tvm 0.27.0.post1 wheel from PyPI segfaults inside MetaSchedule (in ``tvm::ffi::ToJSONGraph``
    while setting up the tuning context), which would kill the caller's process; probing in a child turns that
    into an error the caller can handle.
    """
    global _TUNE_OK
    if _TUNE_OK is None:
        import sys

        try:
            with _workdir() as work:  # TVMScript parses the probe's source, so it must live in a file
                (work / "probe.py").write_text(_TUNE_PROBE)
                proc = subprocess.run([sys.executable, str(work / "probe.py")], capture_output=True, text=True,
                                      timeout=600, check=False)
            _TUNE_OK = proc.returncode == 0 and "tuning-ok" in proc.stdout
            if not _TUNE_OK:
                logger.debug("tvm: tuning probe failed (exit %s): %s", proc.returncode, proc.stderr[-2000:])
        except subprocess.TimeoutExpired:
            _TUNE_OK = False
    if not _TUNE_OK:
        version = _versions().get("tvm", "unknown")
        raise BackendUnavailableError(
            f"MetaSchedule tuning crashes in this apache-tvm build ({version}; a 2-trial probe died, e.g. with a "
            "segfault in tvm::ffi::ToJSONGraph); use tune_trials=0 (TVM's default schedules) or an apache-tvm "
            "build whose MetaSchedule works")


def _tuned(mod: Any, target: Any, trials: int, work_dir: Path) -> Any:
    from tvm import relax

    pipeline = relax.pipeline.static_shape_tuning_pipeline(
        total_trials=trials, target=target, work_dir=str(work_dir), max_trials_per_task=max(1, min(trials, 64)))
    return pipeline(mod)


def build(
    source: Any,
    example_inputs: Any = None,
    target: str = "x86",
    *,
    mcpu: str | None = None,
    arch: str | None = None,
    tune_trials: int = 0,
    frontend: str = "auto",
) -> Compiled:
    """Import and compile a model in memory (no files); :func:`compile` writes the result as an artifact.

    Args:
        source: ``nn.Module``, ``torch.export.ExportedProgram``, depthfold ``OptimizeResult``, ONNX file path
            (or a directory holding ``model.onnx``) or ``onnx.ModelProto``.
        example_inputs: Positional inputs fixing shapes and dtypes (optional for ONNX sources with static
            shapes; then outputs are not verified).
        target: ``"x86"``, ``"aarch64"`` or ``"cuda"``.
        mcpu, arch: See :func:`target_dict`.
        tune_trials: MetaSchedule trial budget (0: untuned, TVM's default schedules). Tuning measures
            candidates on this machine, so it needs a target this machine runs (x86 here; cuda with a GPU).
        frontend: ``"auto"`` (torch frontend, ONNX fallback), ``"torch"`` (no fallback) or ``"onnx"``.

    Raises:
        BackendUnavailableError: tvm, the cross toolchain or nvcc missing.
        ConfigError: bad target/options/inputs, or tuning for a target this machine cannot run.
        ArtifactError: the model cannot be imported into or compiled by TVM (naming the op and the fallback).
    """
    import time

    tvm = _tvm()
    if frontend not in ("auto", "torch", "onnx"):
        raise ConfigError(f"frontend must be 'auto', 'torch' or 'onnx', got {frontend!r}")
    if isinstance(tune_trials, bool) or not isinstance(tune_trials, int) or tune_trials < 0:
        raise ConfigError(f"tune_trials must be an integer >= 0, got {tune_trials!r}")
    tjson = target_dict(target, mcpu=mcpu, arch=arch)
    if tune_trials and not (target == "x86" and platform.machine().lower() in ("x86_64", "amd64")
                            or target == "cuda" and _local_cuda_arch() is not None):
        raise ConfigError(f"tune_trials={tune_trials} measures candidate schedules on this machine, which cannot "
                          f"run target {target!r}; tune on the device itself (or use tune_trials=0)")
    _check_toolchain(target)
    if tune_trials:
        _check_tuning_works()
    model, inputs = _resolve_source(source, example_inputs)
    start = time.perf_counter()

    note: str | None = None
    reference: tuple[list[np.ndarray], list[np.ndarray]] | None = None
    is_torch = isinstance(model, (nn.Module, torch.export.ExportedProgram))
    if is_torch:
        assert inputs is not None  # _resolve_source guarantees it for torch sources
        t_inputs = tuple(torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in inputs)
        ep = model if isinstance(model, torch.export.ExportedProgram) else _export(model, t_inputs)
        with torch.no_grad():
            ref_out = [t.detach() for t in flatten_outputs(ep.module()(*t_inputs))]
        in_arrays = [to_numpy(a, name=f"input {i}") for i, a in enumerate(t_inputs)]
        reference = (in_arrays, [to_numpy(t.float() if t.dtype == torch.bfloat16 else t) for t in ref_out])
        in_names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        in_specs = _specs("input", in_names, in_arrays)
        out_specs = _specs("output", None, reference[1])
        source_hash = _hash_torch(ep)
        mod = None
        torch_failure: str | None = None
        if frontend in ("auto", "torch"):
            try:
                mod = _import_torch(ep)
                used = "torch"
            except Exception as err:  # the frontend raises AssertionError/KeyError/TVMError for unknown ops
                ops = _unsupported_ops(err)
                what = f"op(s) {ops}" if ops else f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
                if frontend == "torch":
                    raise ArtifactError(
                        f"TVM's torch frontend (from_exported_program) cannot import {type(model).__name__}: "
                        f"{what}; use frontend='auto' or 'onnx' to go through TVM's ONNX frontend instead, "
                        "or replace the op in the model") from err
                torch_failure = what
                note = f"from_exported_program failed ({what}); imported through ONNX instead"
                logger.warning("tvm: %s", note)
        if mod is None:
            from .onnx import to_onnx_model

            try:
                proto = to_onnx_model(ep.module(), t_inputs)
                mod, _, onnx_specs = _import_onnx(proto, in_arrays)
            except Exception as err:
                if torch_failure is not None and isinstance(err, ArtifactError):  # the ONNX export failed
                    raise ArtifactError(f"TVM's torch frontend cannot import {type(model).__name__} "
                                        f"({torch_failure}), and the ONNX fallback failed too: {err}") from err
                ops = _unsupported_ops(err)
                raise ArtifactError(
                    f"TVM cannot import {type(model).__name__} through the torch frontend nor through the ONNX "
                    f"fallback: {('op(s) ' + ops) if ops else str(err).strip().splitlines()[0]}; replace that "
                    "op in the model or use the onnxruntime backend") from err
            used = "onnx"
            in_specs = tuple(TensorSpec(s.name, s.shape, s.dtype) for s in onnx_specs)
    else:
        mod, out_names, in_specs_l = _import_onnx(model, inputs)
        in_specs = tuple(in_specs_l)
        used = "onnx"
        import onnx

        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        source_hash = hashlib.sha256(proto.SerializeToString()).hexdigest()
        out_specs = _onnx_output_specs(proto, out_names)

    tgt = tvm.target.Target(tjson)
    try:
        if tune_trials:
            with tempfile.TemporaryDirectory(prefix="depthfold-tune-") as work:
                mod = _tuned(mod, tgt, tune_trials, Path(work))
                ex = tvm.compile(mod, target=tgt)
        elif target == "cuda":
            ex = tvm.compile(mod, target=tgt, relax_pipeline=_cuda_pipeline(tgt))
        else:
            ex = tvm.compile(mod, target=tgt)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if target == "cuda" and "nvcc" in str(err).lower():
            raise BackendUnavailableError(f"CUDA compile failed in nvcc: {first}; check the CUDA toolkit "
                                          "install (nvcc on PATH, matching the requested arch)") from err
        raise ArtifactError(f"TVM could not compile the model for {target} ({json.dumps(tjson)}): {first}") from err
    elapsed = time.perf_counter() - start
    logger.info("tvm: compiled %s for %s via %s frontend in %.1f s%s", type(model).__name__, target, used,
                elapsed, f" ({tune_trials} tuning trials)" if tune_trials else "")
    return Compiled(executable=ex, target=target, target_json=tjson, inputs=in_specs, outputs=out_specs,
                    frontend=used, frontend_note=note, source_hash=source_hash, reference=reference,
                    tuned_trials=tune_trials, compile_s=elapsed)


def _onnx_output_specs(proto: Any, names: Sequence[str]) -> tuple[TensorSpec, ...]:
    import onnx

    specs = []
    for o in proto.graph.output:
        tt = o.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        specs.append(TensorSpec(o.name, dims, str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return tuple(specs)


def _export(model: nn.Module, inputs: tuple[Any, ...]) -> torch.export.ExportedProgram:
    from ..errors import CaptureError

    if model.training and any(isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
                              for m in model.modules()):
        logger.warning("compiling %s in training mode: BatchNorm/Dropout keep their training behaviour; call "
                       ".eval() first for inference", type(model).__name__)
    try:
        return torch.export.export(model, inputs)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CaptureError(f"torch.export failed on {type(model).__name__} ({type(err).__name__}: {first}); make "
                           "the model capturable with torch.export.export(model, args) first (see docs/capture.md)"
                           ) from err


# ----------------------------------------------------------------------------------------------------------
# compile: artifact directory
# ----------------------------------------------------------------------------------------------------------

def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist, key in (("apache-tvm", "tvm"), ("depthfold", "depthfold"), ("onnx", "onnx")):
        try:
            out[key] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[key] = "unknown"
    return out


def _export_library(executable: Any, target: str, path: Path) -> None:
    if target == "aarch64":
        from tvm.support import cc

        executable.export_library(str(path), fcompile=cc.cross_compiler(_CROSS_CXX))
    else:
        executable.export_library(str(path))


def compile(  # noqa: A001  (the backend verb; shadowing the builtin inside this module is intended)
    result_or_module: Any,
    example_inputs: Any = None,
    target: str = "x86",
    *,
    mcpu: str | None = None,
    arch: str | None = None,
    tune_trials: int = 0,
    out_dir: str | Path | None = None,
    frontend: str = "auto",
    verify: bool = True,
    rtol: float = 1e-4,
) -> TvmArtifact:
    """Compile a model with TVM for ``target`` into an artifact directory.

    The directory holds ``model.so`` (TVM's ``export_library``; aarch64 cross-linked with
    ``aarch64-linux-gnu-g++``), ``artifact.json`` (format, target and its TVM JSON, input/output names, shapes
    and dtypes, frontend used and why, versions, source model hash, verification error) and, for torch sources,
    ``reference.npz`` (the example inputs and torch's outputs, to verify the library where it runs). The JSON is
    written last and atomically: a directory with an ``artifact.json`` is complete.

    Args:
        result_or_module: ``nn.Module``, ``torch.export.ExportedProgram``, depthfold ``OptimizeResult``, ONNX
            file (or a directory with ``model.onnx``) or ``onnx.ModelProto``.
        example_inputs: Positional inputs (shapes and dtypes are fixed to theirs). Optional for an
            ``OptimizeResult`` (its own) and static-shape ONNX.
        target: ``"x86"``, ``"aarch64"`` or ``"cuda"``.
        mcpu: LLVM CPU (``"cortex-a72"`` for a Raspberry Pi 4, ``"cortex-a76"`` for a Pi 5).
        arch: CUDA arch (``"sm_90"``).
        tune_trials: MetaSchedule trial budget; 0 (default) is untuned.
        out_dir: Artifact directory (created); default ``./tvm-<target>``.
        frontend: ``"auto"``, ``"torch"`` or ``"onnx"`` (see :func:`build`).
        verify: For a target this machine runs (x86 here), run the library on the example inputs and compare
            with torch; the error is recorded, and an error over ``rtol`` raises.
        rtol: Largest accepted ``max_abs / max(1, max|ref|)`` per output.

    Returns:
        The :class:`TvmArtifact`.

    Raises:
        BackendUnavailableError, ConfigError, ArtifactError: see :func:`build`; ArtifactError also when the
            directory cannot be written.
        VerificationError: ``verify`` and the x86 library differs from torch beyond ``rtol``.
    """
    compiled = build(result_or_module, example_inputs, target, mcpu=mcpu, arch=arch, tune_trials=tune_trials,
                     frontend=frontend)
    out = ensure_writable_dir(Path(out_dir) if out_dir is not None else Path(f"tvm-{target}"))
    (out / ARTIFACT_JSON).unlink(missing_ok=True)  # an artifact.json only ever describes a finished library
    lib = out / LIBRARY_NAME
    tmp = out / f".{LIBRARY_NAME}.{os.getpid()}.tmp.so"
    try:
        _export_library(compiled.executable, target, tmp)
        os.replace(tmp, lib)
    except Exception as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, DepthfoldError):
            raise
        raise ArtifactError(f"could not write the TVM library to {str(lib)!r}: {err}") from err
    if compiled.reference is not None:
        ins, outs = compiled.reference

        def write_ref(p: Path) -> None:
            with open(p, "wb") as fh:
                np.savez(fh, **{f"in{i}": a for i, a in enumerate(ins)}, **{f"out{i}": a for i, a in enumerate(outs)})

        atomic_write(out / REFERENCE_NPZ, write_ref)
    else:
        (out / REFERENCE_NPZ).unlink(missing_ok=True)
    meta: dict[str, Any] = {
        "format": "depthfold-tvm",
        "format_version": 1,
        "library": LIBRARY_NAME,
        "target": target,
        "target_json": compiled.target_json,
        "inputs": [s.to_dict() for s in compiled.inputs],
        "outputs": [s.to_dict() for s in compiled.outputs],
        "frontend": compiled.frontend,
        "frontend_note": compiled.frontend_note,
        "tune_trials": compiled.tuned_trials,
        "compile_seconds": round(compiled.compile_s, 3),
        "source_sha256": compiled.source_hash,
        "versions": _versions(),
        "verification": None,
    }
    art = TvmArtifact(path=out, target=target, inputs=compiled.inputs, outputs=compiled.outputs, meta=meta)
    if verify and compiled.reference is not None and _runs_here(target):
        meta["verification"] = _verify_local(art, compiled.reference, rtol)
    atomic_write(out / ARTIFACT_JSON, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    logger.info("tvm: wrote %s (%s, %s frontend)", out, target, compiled.frontend)
    return TvmArtifact.load(out)


def _runs_here(target: str) -> bool:
    if target == "cuda":
        return _local_cuda_arch() is not None
    from .base import host_arch

    return host_arch() == target


def _verify_local(art: TvmArtifact, reference: tuple[list[np.ndarray], list[np.ndarray]],
                  rtol: float) -> dict[str, Any]:
    got = run(art, reference[0])
    return verify_outputs(got, reference[1], rtol=rtol, where=f"TVM {art.target} library {str(art.library)!r}")


def verify_outputs(got: Sequence[np.ndarray], ref: Sequence[np.ndarray], *, rtol: float = 1e-4,
                   where: str = "TVM output") -> dict[str, Any]:
    """Compare outputs with references as ``max_abs / max(1, max|ref|)``; raise VerificationError over rtol."""
    from ..errors import VerificationError

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


# ----------------------------------------------------------------------------------------------------------
# run / measure (local)
# ----------------------------------------------------------------------------------------------------------

@dataclass
class _Loaded:
    vm: Any
    fn: Any
    dev: Any
    specs: tuple[TensorSpec, ...]
    label: str
    device: str


_LOADED: collections.OrderedDict[tuple[str, int, int], _Loaded] = collections.OrderedDict()
_LOADED_MAX = 8
_LOCK = threading.Lock()


def _device_for(target: str, where: str) -> Any:
    tvm = _tvm()
    from .base import host_arch

    if target == "cuda":
        dev = tvm.cuda(0)
        if not dev.exist:
            raise BackendUnavailableError(
                f"{where} was compiled for CUDA but this machine has no usable CUDA GPU (or this tvm has no CUDA "
                "runtime); run it on a GPU machine or measure it there with remote='host:port'")
        return dev
    if target != host_arch():
        raise BackendUnavailableError(
            f"{where} was compiled for {target} and cannot run on this {host_arch()} machine; measure it on the "
            f"device with remote='host:port' (TVM RPC server there), or check outputs under emulation with "
            "depthfold.backends.tvm.run_emulated")
    return tvm.cpu(0)


def load(artifact: TvmArtifact | str | Path | Compiled) -> _Loaded:
    """Load an artifact's library (or an in-memory build) into a Relax VM on its device; cached per file."""
    from tvm import relax

    tvm = _tvm()
    if isinstance(artifact, Compiled):
        dev = _device_for(artifact.target, f"the in-memory {artifact.target} build")
        vm = relax.VirtualMachine(artifact.executable, dev)
        return _Loaded(vm, vm["main"], dev, artifact.inputs, "in-memory build",
                       "cuda" if artifact.target == "cuda" else "cpu")
    art = _as_artifact(artifact)
    st = art.library.stat()
    key = (str(art.library.resolve()), st.st_mtime_ns, st.st_size)
    with _LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
    dev = _device_for(art.target, f"artifact {str(art.path)!r}")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(art.library)), dev)
    loaded = _Loaded(vm, vm["main"], dev, art.inputs, f"artifact {str(art.path)!r}",
                     "cuda" if art.target == "cuda" else "cpu")
    with _LOCK:
        _LOADED[key] = loaded
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    return loaded


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


def _to_numpy_outputs(out: Any) -> list[np.ndarray]:
    if hasattr(out, "numpy"):
        return [out.numpy()]
    result: list[np.ndarray] = []
    for o in out:
        result.extend(_to_numpy_outputs(o))
    return result


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    tvm = _tvm()
    f = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
    if f is not None:
        f(1, int(threads))  # 1: kBig, i.e. the (all, on a homogeneous CPU) big cores, `threads` of them


def run(artifact: TvmArtifact | str | Path | Compiled, inputs: Any) -> list[np.ndarray]:
    """Run a TVM artifact (or in-memory build) on positional inputs; return outputs as NumPy arrays.

    Raises:
        ConfigError: wrong number, shape or dtype of inputs (the library has fixed shapes).
        BackendUnavailableError: the artifact is for another architecture, or for CUDA without a GPU here.
        ArtifactError: not an artifact directory.
    """
    tvm = _tvm()
    loaded = load(artifact)
    arrays = _check_inputs(loaded.specs, inputs, loaded.label)
    args = [tvm.runtime.tensor(a, loaded.dev) for a in arrays]
    out = loaded.fn(*args)
    return _to_numpy_outputs(out)


def verify(artifact: TvmArtifact | str | Path, *, rtol: float = 1e-4) -> dict[str, Any]:
    """Run the artifact here on its ``reference.npz`` inputs and compare with the stored torch outputs."""
    art = _as_artifact(artifact)
    ins, outs = _read_reference(art)
    return verify_outputs(run(art, ins), outs, rtol=rtol, where=f"TVM {art.target} library {str(art.library)!r}")


def _read_reference(art: TvmArtifact) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if art.reference is None:
        raise ArtifactError(f"artifact {str(art.path)!r} has no {REFERENCE_NPZ} (compiled from ONNX?); pass inputs "
                            "and compare outputs yourself")
    with np.load(art.reference) as z:
        ins = [z[f"in{i}"] for i in range(len(art.inputs))]
        outs = [z[f"out{i}"] for i in range(len(art.outputs))]
    return ins, outs


def measure(
    artifact: TvmArtifact | str | Path | Compiled,
    inputs: Any,
    *,
    warmup: int = 5,
    repeat: int = 20,
    threads: int | None = 1,
    remote: str | None = None,
    rpc_timeout_s: float = _RPC_CONNECT_TIMEOUT_S,
) -> Measurement:
    """Time the artifact with the shared latency helper, here or on a device running TVM's RPC server.

    Locally each sample is one ``vm["main"](*inputs)`` call (inputs copied to the device once, untimed;
    CUDA synchronised per call). Remotely the library is uploaded, loaded on the device and timed there with
    TVM's ``time_evaluator`` (one call per sample, device clock), so network latency is not in the numbers.

    Args:
        artifact: Artifact directory / :class:`TvmArtifact` (or a :class:`Compiled` build, local only).
        inputs: Positional inputs of the compiled shapes.
        warmup, repeat: Untimed and timed calls.
        threads: TVM CPU thread-pool size, fixed for the measurement (None: the runtime's default); recorded.
        remote: ``"host:port"`` of a TVM RPC server (``python -m tvm.exec.rpc_server --port 9090`` on the
            device); None: this machine.
        rpc_timeout_s: Seconds to wait for the RPC server to accept the connection.

    Raises:
        ConfigError: bad inputs or counts, malformed ``remote``.
        BackendUnavailableError: the artifact cannot run here (other arch, CUDA without GPU), or the RPC server
            is unreachable (naming the address).
    """
    if remote is not None:
        if isinstance(artifact, Compiled):
            raise ConfigError("remote measurement uploads a library file; compile() the model to a directory first")
        return _measure_remote(_as_artifact(artifact), inputs, warmup=warmup, repeat=repeat, threads=threads,
                               remote=remote, timeout_s=rpc_timeout_s)
    call, device, sync = prepare(artifact, inputs, threads=threads)
    return time_callable(call, warmup=warmup, repeat=repeat, threads=threads or 0, backend="tvm", device=device,
                         sync=sync)


def prepare(artifact: TvmArtifact | str | Path | Compiled, inputs: Any, *, threads: int | None = 1
            ) -> tuple[Callable[[], object], str, Callable[[], None] | None]:
    """Bind inputs to a loaded library for timing: ``(call, device, sync)``.

    Inputs are checked and copied to the device once; ``call()`` runs ``main`` on them; ``sync`` (CUDA only)
    waits for the device. The CPU thread pool is fixed to ``threads`` (None: left as is). Used by
    :func:`measure` and by benchmarks that interleave TVM with other backends.
    """
    tvm = _tvm()
    loaded = load(artifact)
    arrays = _check_inputs(loaded.specs, inputs, loaded.label)
    args = [tvm.runtime.tensor(a, loaded.dev) for a in arrays]
    fn, dev, device = loaded.fn, loaded.dev, loaded.device
    _set_threads(threads if device == "cpu" else None)
    return (lambda: fn(*args)), device, (dev.sync if device == "cuda" else None)


# ----------------------------------------------------------------------------------------------------------
# RPC
# ----------------------------------------------------------------------------------------------------------

def parse_remote(remote: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:9090"`` for IPv6).

    Raises:
        ConfigError: not of the form host:port with a port in 1..65535.
    """
    m = re.fullmatch(r"\[?([^\]\s]+?)\]?:(\d+)", str(remote).strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"remote must be 'host:port' (e.g. '192.168.1.20:9090'), got {remote!r}")
    return m.group(1), int(m.group(2))


def _connect(remote: str, timeout_s: float) -> Any:
    from tvm import rpc

    host, port = parse_remote(remote)
    # TVM's own connect blocks (and retries) for long on an unreachable host; probe first with a bounded
    # timeout so the error names the address.
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) or "timed out" in str(err) else (err.strerror or str(err))
        raise BackendUnavailableError(
            f"cannot reach the TVM RPC server at {host}:{port} ({why} after at most {timeout_s:g} s); start one "
            f"on the device with `python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}` and check the "
            "address and firewall") from err
    try:
        return rpc.connect(host, port, session_timeout=0)
    except Exception as err:
        raise BackendUnavailableError(f"TVM RPC handshake with {host}:{port} failed: {err}; is a TVM RPC server "
                                      "(python -m tvm.exec.rpc_server) of a matching TVM version listening "
                                      "there?") from err


def _measure_remote(art: TvmArtifact, inputs: Any, *, warmup: int, repeat: int, threads: int | None,
                    remote: str, timeout_s: float) -> Measurement:
    from tvm import relax

    from .latency import _check_counts

    tvm = _tvm()
    _check_counts(warmup, repeat)
    arrays = _check_inputs(art.inputs, inputs, f"artifact {str(art.path)!r}")
    sess = _connect(remote, timeout_s)
    name = f"depthfold-{art.meta.get('source_sha256', 'model')[:12]}-{os.getpid()}.so"
    sess.upload(str(art.library), target=name)
    rlib = sess.load_module(name)
    dev = sess.cuda(0) if art.target == "cuda" else sess.cpu(0)
    if threads is not None and art.target != "cuda":
        f = sess.get_function("runtime.config_threadpool")
        f(1, int(threads))
    vm = relax.VirtualMachine(rlib, dev)
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    if warmup:
        vm.time_evaluator("main", dev, number=warmup, repeat=1)(*args)
    res = vm.time_evaluator("main", dev, number=1, repeat=repeat)(*args)
    samples = tuple(float(s) * 1e3 for s in res.results)
    with contextlib.suppress(Exception):  # leave no library behind on the device
        sess.remove(name)
    return Measurement(samples_ms=samples, warmup=warmup, threads=threads or 0, backend="tvm",
                       device="cuda" if art.target == "cuda" else "cpu")


# ----------------------------------------------------------------------------------------------------------
# measure_latency integration: nn.Module -> in-memory build (cached by content) -> time
# ----------------------------------------------------------------------------------------------------------

_BUILDS: collections.OrderedDict[tuple[Any, ...], Compiled] = collections.OrderedDict()
_BUILDS_MAX = 64


def _input_key(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((tuple(a.shape), str(a.dtype)) for a in inputs)


def measure_module(
    model: Any,
    inputs: tuple[Any, ...],
    *,
    device: str = "cpu",
    threads: int = 1,
    warmup: int = 5,
    repeat: int = 20,
    target: str | None = None,
    remote: str | None = None,
    mcpu: str | None = None,
    arch: str | None = None,
    tune_trials: int = 0,
    rpc_timeout_s: float = _RPC_CONNECT_TIMEOUT_S,
    **ignored: Any,
) -> Measurement:
    """``measure_latency(..., backend="tvm")``: compile ``model`` for ``target`` and time it here or remotely.

    A local build stays in memory (no library file); a remote one is written to a temporary artifact,
    uploaded and deleted. Builds are cached in-process by content (the exported graph's code, weights, input
    shapes, target options), so timing the same layer twice compiles it once.

    Args:
        model: ``nn.Module``, ONNX path / ``ModelProto``, or a TVM artifact directory (then not recompiled).
        device: ``"cpu"`` or ``"cuda"`` (``target`` defaults to this machine's arch, or ``"cuda"``).
        target: ``"x86"``, ``"aarch64"`` or ``"cuda"``; must agree with ``device``.
        remote: ``"host:port"`` of a TVM RPC server to time on.
        Other args: see :func:`measure` and :func:`build`. ``graph_optimization`` (ORT only) is ignored.
    """
    from .base import DEVICES, host_arch

    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; known: {', '.join(DEVICES)}{suggest(str(device), DEVICES)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
    unknown = set(ignored) - {"graph_optimization"}
    if unknown:
        known = ["target", "remote", "mcpu", "arch", "tune_trials", "rpc_timeout_s"]
        name = sorted(unknown)[0]
        raise ConfigError(f"backend 'tvm' has no option {name!r}; known: {', '.join(known)}{suggest(name, known)}")
    if target is None:
        target = "cuda" if device == "cuda" else host_arch()
    if (target == "cuda") != (device == "cuda"):
        raise ConfigError(f"target={target!r} does not match device={device!r}; use device='cuda' with "
                          "target='cuda' and device='cpu' with a CPU target")
    if remote is not None:
        parse_remote(remote)  # malformed addresses fail before an expensive build
    if isinstance(model, (str, Path)) and (Path(model) / ARTIFACT_JSON).is_file():
        art = TvmArtifact.load(model)
        return measure(art, inputs, warmup=warmup, repeat=repeat, threads=threads, remote=remote,
                       rpc_timeout_s=rpc_timeout_s)
    compiled = _cached_build(model, inputs, target, mcpu=mcpu, arch=arch, tune_trials=tune_trials)
    if remote is None:
        return measure(compiled, compiled.reference[0] if compiled.reference else inputs, warmup=warmup,
                       repeat=repeat, threads=threads)
    with tempfile.TemporaryDirectory(prefix="depthfold-tvm-rpc-") as tmp:
        lib = Path(tmp) / LIBRARY_NAME
        _export_library(compiled.executable, target, lib)
        meta = {"format": "depthfold-tvm", "library": LIBRARY_NAME, "target": target,
                "source_sha256": compiled.source_hash}
        art = TvmArtifact(path=Path(tmp), target=target, inputs=compiled.inputs, outputs=compiled.outputs,
                          meta=meta)
        return measure(art, inputs, warmup=warmup, repeat=repeat, threads=threads, remote=remote,
                       rpc_timeout_s=rpc_timeout_s)


def _cached_build(model: Any, inputs: tuple[Any, ...], target: str, *, mcpu: str | None, arch: str | None,
                  tune_trials: int) -> Compiled:
    key: tuple[Any, ...] | None = None
    source = model
    if isinstance(model, nn.Module):
        # Content key: the exported graph's code (ops, shapes, Python constants baked in by torch.export) and
        # every parameter/buffer/constant, plus input shapes and build options. Two modules equal in all of
        # these compile to the same code, so reusing a build cannot time the wrong thing; exporting is cheap
        # next to compiling, and the exported program is reused on a miss.
        t_inputs = tuple(torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in inputs)
        source = _export(model, t_inputs)
        key = (_hash_torch(source), _input_key(tuple(to_numpy(a) for a in inputs)), target, mcpu, arch,
               tune_trials)
        with _LOCK:
            if key in _BUILDS:
                _BUILDS.move_to_end(key)
                return _BUILDS[key]
    compiled = build(source, inputs, target, mcpu=mcpu, arch=arch, tune_trials=tune_trials)
    if key is not None:
        with _LOCK:
            _BUILDS[key] = compiled
            while len(_BUILDS) > _BUILDS_MAX:
                _BUILDS.popitem(last=False)
    return compiled


# ----------------------------------------------------------------------------------------------------------
# aarch64 emulation (qemu-user + an arm64 Python root prepared by scripts/setup_arm_lane.sh)
# ----------------------------------------------------------------------------------------------------------

_EMU_SCRIPT = r'''
import json, sys
import numpy as np
import tvm
from tvm import relax
jobs = json.load(open(sys.argv[1]))
dev = tvm.cpu(0)
for job in jobs:
    vm = relax.VirtualMachine(tvm.runtime.load_module(job["library"]), dev)
    with np.load(job["inputs"]) as z:
        args = [tvm.runtime.tensor(z["in%d" % i], dev) for i in range(job["n_inputs"])]
    out = vm["main"](*args)
    flat = []
    def walk(o):
        if hasattr(o, "numpy"):
            flat.append(o.numpy())
        else:
            for x in o:
                walk(x)
    walk(out)
    np.savez(job["outputs"], **{"out%d" % i: a for i, a in enumerate(flat)})
    print("done", job["library"], flush=True)
'''


def emulation_root() -> Path:
    """The arm64 root used by :func:`run_emulated`: ``$DEPTHFOLD_CACHE/arm64-root`` (``~/.cache/depthfold``)."""
    return cache_dir() / "arm64-root"


def _check_emulation(root: Path) -> None:
    if shutil.which(_QEMU) is None:
        raise BackendUnavailableError(f"running aarch64 code here needs {_QEMU}, which is not on PATH; install "
                                      f"Debian's {_QEMU_PACKAGE} (apt-get install {_QEMU_PACKAGE}) or run "
                                      "scripts/setup_arm_lane.sh")
    if not (root / "usr" / "bin" / "python3.11").is_file() or not (root / "opt" / "site" / "tvm").is_dir():
        raise BackendUnavailableError(f"no arm64 Python with TVM under {str(root)!r}; prepare it with "
                                      "scripts/setup_arm_lane.sh (Debian arm64 python3.11 .debs + aarch64 wheels)")


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="depthfold-emu-") as tmp:
        yield Path(tmp)


def run_emulated(
    jobs: Sequence[tuple[TvmArtifact | str | Path, Any]],
    *,
    root: str | Path | None = None,
    timeout_s: float = 900.0,
) -> list[list[np.ndarray]]:
    """Run aarch64 artifacts under ``qemu-aarch64-static`` with an arm64 Python; return their outputs.

    All jobs run in one emulated Python process (importing tvm there takes ~10-20 s). Emulated timings say
    nothing about a device, so none are taken. onnxruntime is not available under emulation (its aarch64 wheel
    crashes at import under qemu-user).

    Args:
        jobs: (artifact, inputs) pairs; inputs None uses the artifact's ``reference.npz`` inputs.
        root: The arm64 root (default :func:`emulation_root`).
        timeout_s: Wall-clock limit for the whole emulated run.

    Raises:
        BackendUnavailableError: qemu or the arm64 root is missing (naming the package / setup script).
        ConfigError: an artifact is not for aarch64, or bad inputs.
        ArtifactError: the emulated run failed (its stderr tail is included).
    """
    base = Path(root) if root is not None else emulation_root()
    _check_emulation(base)
    with _workdir() as work:
        spec = []
        for k, (artifact, inputs) in enumerate(jobs):
            art = _as_artifact(artifact)
            if art.target != "aarch64":
                raise ConfigError(f"run_emulated runs aarch64 artifacts; {str(art.path)!r} is for {art.target}")
            arrays = _read_reference(art)[0] if inputs is None else _check_inputs(
                art.inputs, inputs, f"artifact {str(art.path)!r}")
            np.savez(work / f"in{k}.npz", **{f"in{i}": a for i, a in enumerate(arrays)})
            spec.append({"library": str(art.library.resolve()), "inputs": str(work / f"in{k}.npz"),
                         "outputs": str(work / f"out{k}.npz"), "n_inputs": len(arrays)})
        (work / "jobs.json").write_text(json.dumps(spec))
        (work / "run.py").write_text(_EMU_SCRIPT)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(base / "opt" / "site"), "PYTHONNOUSERSITE": "1",
               "HOME": str(work), "TVM_NUM_THREADS": "1"}
        cmd = [shutil.which(_QEMU) or _QEMU, "-L", str(base), str(base / "usr" / "bin" / "python3.11"),
               str(work / "run.py"), str(work / "jobs.json")]
        logger.info("tvm: running %d aarch64 librar%s under qemu", len(spec), "y" if len(spec) == 1 else "ies")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as err:
            raise ArtifactError(f"the emulated aarch64 run did not finish within {timeout_s:g} s") from err
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise ArtifactError(f"the emulated aarch64 run failed (exit {proc.returncode}):\n{tail}")
        results = []
        for k, job in enumerate(spec):
            with np.load(job["outputs"]) as z:
                results.append([z[f"out{i}"] for i in range(len(z.files))])
            logger.debug("tvm: emulated job %d done", k)
        return results

