"""``measure_latency(backend="tvm")``: a model built in memory, cached by content, timed here or remotely."""

from __future__ import annotations

import collections
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import ConfigError, suggest
from ..latency import Measurement
from ..onnx import to_numpy
from .artifact import ARTIFACT_JSON, LIBRARY_NAME, Compiled, TvmArtifact
from .build import _export, _export_library, _hash_torch, build
from .rpc import _RPC_CONNECT_TIMEOUT_S, parse_remote
from .run import measure

_BUILDS: collections.OrderedDict[tuple[Any, ...], Compiled] = collections.OrderedDict()
_BUILDS_MAX = 64
_LOCK = threading.Lock()


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
    from ..base import DEVICES, host_arch

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
