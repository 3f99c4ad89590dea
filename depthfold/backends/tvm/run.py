"""Running a library here: loaded VMs (cached per file), ``run``, ``verify``, ``measure``, ``prepare``."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BackendUnavailableError, ConfigError
from ..latency import Measurement, time_callable
from ._common import _tvm
from .artifact import (
    Compiled,
    TensorSpec,
    TvmArtifact,
    _as_artifact,
    _check_inputs,
    _read_reference,
    verify_outputs,
)
from .rpc import _RPC_CONNECT_TIMEOUT_S, _measure_remote


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
    from ..base import host_arch

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
