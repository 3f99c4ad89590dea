"""From a model to a TVM library: targets, toolchains, Relax import (torch, ONNX fallback), build, compile."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..._atomic import atomic_write, ensure_writable_dir
from ...cache import cache_dir, cache_lock
from ...errors import ArtifactError, BackendUnavailableError, ConfigError, DepthfoldError
from ...ir import flatten_outputs
from ..base import Target
from ..latency import efficiency
from ..onnx import to_numpy
from ._common import _tvm, _workdir, logger
from .artifact import (
    ARTIFACT_JSON,
    LIBRARY_NAME,
    Compiled,
    TensorSpec,
    TvmArtifact,
    _as_inputs,
    _write_reference,
    verify_outputs,
)
from .run import measure, run
from .schedules import Guarded, cpu_pipeline, fusion_passes

#: CPU kernel sources: depthfold's default schedules with block fusion, the same one kernel per layer, or TVM's
#: stock pipeline.
SCHEDULES = ("depthfold", "per_layer", "tvm")
_CROSS_CXX = "aarch64-linux-gnu-g++"
_CROSS_PACKAGE = "g++-aarch64-linux-gnu"
_DEFAULT_CUDA_ARCH = "sm_80"


# ----------------------------------------------------------------------------------------------------------
# targets, toolchains
# ----------------------------------------------------------------------------------------------------------

def _host_mcpu() -> str | None:
    tvm = _tvm()
    try:
        return str(tvm.target.codegen.llvm_get_system_cpu())
    except Exception:  # an llvm-less tvm build; the generic CPU then
        return None


def tvm_target(target: Target | str) -> str:
    """TVM's name for a :class:`~depthfold.backends.Target` (or any string ``Target.parse`` reads):
    ``"x86"`` or ``"aarch64"`` for their CPUs, ``"cuda"`` for a GPU with an x86 host."""
    t = Target.parse("x86-cuda" if target == "cuda" else target)
    if t.device == "cpu":
        return t.arch
    if t.arch == "x86":
        return "cuda"
    raise ConfigError(f"the tvm backend compiles CUDA for an x86 host only, not {str(t)!r}; use target='cuda' "
                      "(x86-cuda) or an aarch64 CPU target")


def target_dict(target: Target | str = "x86", *, mcpu: str | None = None, arch: str | None = None
                ) -> dict[str, Any]:
    """Return TVM's JSON target dict for a depthfold target.

    Args:
        target: a :class:`~depthfold.backends.Target` or its name: ``"x86"``, ``"aarch64"`` or ``"cuda"``.
        mcpu: LLVM CPU name (``"cortex-a72"``, ``"skylake-avx512"``); x86 default: this machine's CPU,
            aarch64 default: generic ARMv8-A with NEON. For ``"cuda"`` it sets the host CPU.
        arch: CUDA architecture such as ``"sm_90"`` (``"cuda"`` only); default: this machine's GPU, else
            ``sm_80``.

    Raises:
        ConfigError: unknown target, an ``arch`` for a CPU target, or a malformed ``arch``.
    """
    target = tvm_target(target)
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
# Import (torch frontend, ONNX fallback) and build
# ----------------------------------------------------------------------------------------------------------

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

    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        dl.ApplyDefaultSchedule(*(Guarded(r) for r in (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(),
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

    apache-tvm 0.27.0.post1 with the apache-tvm-ffi 0.1.15.x that pip resolves segfaults inside MetaSchedule
    (``tvm::ffi::ToJSONGraph``, serialising the module); the ``tvm`` extra pins the FFI the wheel was built
    against. The probe stays as the guard for other environments: a crash in a child becomes an error here.
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
        ffi = _versions().get("tvm-ffi", "unknown")
        raise BackendUnavailableError(
            f"MetaSchedule tuning crashes here (apache-tvm {version}, apache-tvm-ffi {ffi}; a 2-trial probe died, "
            "e.g. with a segfault in tvm::ffi::ToJSONGraph, or xgboost is missing); install the tvm extra "
            "(pip install 'depthfold[tvm]': apache-tvm-ffi==0.1.14.post1 and xgboost-cpu) or use tune_trials=0 "
            "(the default schedules)")


def tuning_dir(target_json: dict[str, Any]) -> Path:
    """Where MetaSchedule's records for one target live (``$DEPTHFOLD_CACHE/tvm-tuning/<target hash>``): a
    workload tuned once is reused by every later build for that target."""
    key = hashlib.sha256(json.dumps(target_json, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir("tvm-tuning", key)


def _tuned(mod: Any, target: Any, target_json: dict[str, Any], trials: int, *,
           block_fusion: bool) -> tuple[Any, dict[str, Any]]:
    """MetaSchedule-tuned build over the channels-last kernels; kernels without a record keep the default
    schedules. Tasks whose workload already has a measured record for this target are not tuned again."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    work = tuning_dir(target_json)
    with target:
        fused = tvm.transform.Sequential(fusion_passes(target, block_fusion=block_fusion))(mod)
    # kernels written already scheduled (block fusion) have no search space: MetaSchedule gives them no trial
    tasks = [t for t in ms.relax_integration.extract_tasks(fused, target)
             if not any(f.attrs and "tirx.is_scheduled" in f.attrs for f in t.dispatched[0].functions.values())]
    database = ms.database.JSONDatabase(work_dir=str(work))

    def measured(task: Any) -> bool:
        """A workload counts as tuned once it has a measured record (a stopped run registers workloads first)."""
        mod = task.dispatched[0]
        return bool(database.has_workload(mod) and database.get_top_k(database.commit_workload(mod), 1))

    todo = [t for t in tasks if not measured(t)]
    if todo:
        # one tuner per target at a time: MetaSchedule appends to the records, and concurrent timing interferes
        with cache_lock(work, "TVM tuning records"):
            database = ms.database.JSONDatabase(work_dir=str(work))  # with what a waited-for tuner added
            todo = [t for t in tasks if not measured(t)]
            if todo:
                per_task = max(1, min(trials, 64))
                builder = ms.builder.LocalBuilder(f_build=_build_candidate, timeout_sec=BUILD_TIMEOUT_S)
                ms.relax_integration.tune_relax(fused, {}, target, work_dir=str(work), max_trials_global=trials,
                                                max_trials_per_task=per_task, num_trials_per_iter=per_task,
                                                builder=builder, database=database, seed=0)
    with_record = sum(measured(t) for t in tasks)
    if todo and with_record == 0:
        logger.warning("tvm: tuning measured no candidate (every build or run failed); the default schedules "
                       "are used. MetaSchedule's logs are in %s", work / "logs")
    ex = tvm.compile(fused, target=target, relax_pipeline=cpu_pipeline(target, records=work, fused=True))
    return ex, {"tasks": len(tasks), "tuned_now": len(todo), "measured": with_record, "records": str(work)}


BUILD_TIMEOUT_S = 120.0


def _build_candidate(mod: Any, target: Any, _params: Any) -> Any:
    """MetaSchedule's default candidate build without its import of every tensor intrinsic (CUDA, ROCm, ...):
    that import alone takes about 30 s in each fresh builder process, past the builder's timeout, and CPU
    candidates use none of them."""
    import tvm
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return tvm.tirx.build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target)


def _keep_faster(default: Any, tuned: Any, specs: Sequence[TensorSpec],
                 reference: tuple[list[np.ndarray], list[np.ndarray]] | None, tuning: dict[str, Any]) -> Any:
    """The faster of the default-scheduled and the tuned executable, timed here interleaved on one thread (a
    small tuning budget can pick schedules slower than the defaults, so tuning never makes a build slower)."""
    import tvm
    from tvm import relax

    from ..latency import compare_interleaved
    from .run import _set_threads

    arrays = reference[0] if reference is not None else [np.zeros(s.shape, dtype=s.dtype) for s in specs]
    _set_threads(1)
    fns = {}
    for label, ex in (("default", default), ("tuned", tuned)):
        vm = relax.VirtualMachine(ex, tvm.cpu())
        args = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
        fns[label] = (lambda fn=vm["main"], a=args: fn(*a))
    timed = compare_interleaved(fns, rounds=7, warmup=2, min_sample_ms=20.0, baseline="default", threads=1,
                                backend="tvm", device="cpu")
    ratio = float(timed["ratios"]["tuned"]["median"])
    tuning.update(default_ms=timed["measurements"]["default"].median_ms,
                  tuned_ms=timed["measurements"]["tuned"].median_ms, tuned_over_default=ratio,
                  kept="tuned" if ratio < 1.0 else "default")
    logger.info("tvm: tuned kernels run at %.3fx the default schedules; keeping the %s build", ratio,
                tuning["kept"])
    return tuned if ratio < 1.0 else default


def build(
    source: Any,
    example_inputs: Any = None,
    target: Target | str = "x86",
    *,
    mcpu: str | None = None,
    arch: str | None = None,
    tune_trials: int = 0,
    frontend: str = "auto",
    schedules: str = "depthfold",
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
        schedules: CPU kernels: ``"depthfold"`` (channels-last, register-tiled default schedules, see
            :mod:`~depthfold.backends.tvm.schedules`, with each inverted residual fused into one kernel, see
            :mod:`~depthfold.backends.tvm.block_fusion`), ``"per_layer"`` (the same schedules, one kernel per
            layer) or ``"tvm"`` (TVM's stock CPU pipeline, unscheduled loops).

    Raises:
        BackendUnavailableError: tvm, the cross toolchain or nvcc missing.
        ConfigError: bad target/options/inputs, or tuning for a target this machine cannot run.
        ArtifactError: the model cannot be imported into or compiled by TVM (naming the op and the fallback).
    """
    import time

    tvm = _tvm()
    if frontend not in ("auto", "torch", "onnx"):
        raise ConfigError(f"frontend must be 'auto', 'torch' or 'onnx', got {frontend!r}")
    if schedules not in SCHEDULES:
        raise ConfigError(f"schedules must be one of {SCHEDULES}, got {schedules!r}")
    if isinstance(tune_trials, bool) or not isinstance(tune_trials, int) or tune_trials < 0:
        raise ConfigError(f"tune_trials must be an integer >= 0, got {tune_trials!r}")
    target = tvm_target(target)
    tjson = target_dict(target, mcpu=mcpu, arch=arch)
    if tune_trials and schedules == "tvm" and target != "cuda":
        raise ConfigError("tune_trials tunes the channels-last kernels of schedules='depthfold'; drop "
                          "schedules='tvm' (TVM's stock pipeline) or use tune_trials=0")
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
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            ref_out = [t.detach() for t in flatten_outputs(ep.module()(*t_inputs))]
        flops = int(counter.get_total_flops())
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
            from ..onnx import to_onnx_model

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
        flops = None
        mod, out_names, in_specs_l = _import_onnx(model, inputs)
        in_specs = tuple(in_specs_l)
        used = "onnx"
        import onnx

        proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        source_hash = hashlib.sha256(proto.SerializeToString()).hexdigest()
        out_specs = _onnx_output_specs(proto, out_names)

    tgt = tvm.target.Target(tjson)
    tuning: dict[str, Any] | None = None
    try:
        if target == "cuda" and tune_trials:
            with tempfile.TemporaryDirectory(prefix="depthfold-tune-") as work:
                from tvm import relax

                ex = tvm.compile(relax.pipeline.static_shape_tuning_pipeline(
                    total_trials=tune_trials, target=tgt, work_dir=work,
                    max_trials_per_task=max(1, min(tune_trials, 64)))(mod), target=tgt)
        elif target == "cuda":
            ex = tvm.compile(mod, target=tgt, relax_pipeline=_cuda_pipeline(tgt))
        elif schedules == "tvm":
            ex = tvm.compile(mod, target=tgt)
        else:
            block_fusion = schedules == "depthfold"
            ex = tvm.compile(mod, target=tgt, relax_pipeline=cpu_pipeline(tgt, block_fusion=block_fusion))
            if tune_trials:
                tuned, tuning = _tuned(mod, tgt, tjson, tune_trials, block_fusion=block_fusion)
                ex = _keep_faster(ex, tuned, in_specs, reference, tuning)
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
                    tuned_trials=tune_trials, compile_s=elapsed, flops=flops, tuning=tuning,
                    schedules="tvm" if target == "cuda" else schedules)


def _onnx_output_specs(proto: Any, names: Sequence[str]) -> tuple[TensorSpec, ...]:
    import onnx

    specs = []
    for o in proto.graph.output:
        tt = o.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
        specs.append(TensorSpec(o.name, dims, str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return tuple(specs)


def _export(model: nn.Module, inputs: tuple[Any, ...]) -> torch.export.ExportedProgram:
    from ...errors import CaptureError

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
    for dist, key in (("apache-tvm", "tvm"), ("apache-tvm-ffi", "tvm-ffi"), ("depthfold", "depthfold"),
                      ("onnx", "onnx")):
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
    target: Target | str = "x86",
    *,
    mcpu: str | None = None,
    arch: str | None = None,
    tune_trials: int = 0,
    out_dir: str | Path | None = None,
    frontend: str = "auto",
    schedules: str = "depthfold",
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
        schedules: ``"depthfold"`` (default schedules, block fusion), ``"per_layer"`` or ``"tvm"`` (see
            :func:`build`).
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
    target = tvm_target(target)
    compiled = build(result_or_module, example_inputs, target, mcpu=mcpu, arch=arch, tune_trials=tune_trials,
                     frontend=frontend, schedules=schedules)
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
    _write_reference(out, compiled.reference)
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
        "tuning": compiled.tuning,
        "schedules": compiled.schedules,
        "compile_seconds": round(compiled.compile_s, 3),
        "source_sha256": compiled.source_hash,
        "versions": _versions(),
        "verification": None,
    }
    art = TvmArtifact(path=out, target=target, inputs=compiled.inputs, outputs=compiled.outputs, meta=meta)
    if verify and compiled.reference is not None and _runs_here(target):
        meta["verification"] = _verify_local(art, compiled.reference, rtol)
        if compiled.flops:
            timing = measure(art, compiled.reference[0], warmup=2, repeat=10, threads=1)
            meta["efficiency"] = efficiency(compiled.flops, timing.median_ms, threads=1)
    atomic_write(out / ARTIFACT_JSON, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    logger.info("tvm: wrote %s (%s, %s frontend)", out, target, compiled.frontend)
    return TvmArtifact.load(out)


def _runs_here(target: str) -> bool:
    if target == "cuda":
        return _local_cuda_arch() is not None
    from ..base import host_arch

    return host_arch() == target


def _verify_local(art: TvmArtifact, reference: tuple[list[np.ndarray], list[np.ndarray]],
                  rtol: float) -> dict[str, Any]:
    got = run(art, reference[0])
    return verify_outputs(got, reference[1], rtol=rtol, where=f"TVM {art.target} library {str(art.library)!r}")
