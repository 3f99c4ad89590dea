"""Apache TVM as a :class:`~depthfold.backends.base.Backend`: builds cached in memory by content, timed here
or on a device running TVM's RPC server."""

from __future__ import annotations

import collections
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..base import Backend, Inputs, Target
from ..latency import Measurement, summarise_rounds
from ..onnx import to_numpy
from .artifact import ARTIFACT_JSON, LIBRARY_NAME, Compiled, TvmArtifact
from .build import _export, _export_library, _hash_torch, build, compile, tvm_target
from .rpc import _RPC_CONNECT_TIMEOUT_S, parse_remote
from .run import measure, prepare, run

__all__ = ["TvmBackend"]

_BUILDS: collections.OrderedDict[tuple[Any, ...], Compiled] = collections.OrderedDict()
_BUILDS_MAX = 64
_LOCK = threading.Lock()


class TvmBackend(Backend):
    """Compiles with Apache TVM (Relax) for x86, aarch64 or CUDA and times here or over RPC.

    ``compile`` takes an ``nn.Module``, ONNX path / ``ModelProto`` or a TVM artifact directory (not rebuilt).
    Options: ``remote`` (``"host:port"`` of a TVM RPC server to time on), ``mcpu``, ``arch``, ``tune_trials``,
    ``schedules``, ``rpc_timeout_s`` (see :func:`~depthfold.backends.tvm.build`). Without ``remote`` the target must be one
    this machine runs.
    """

    name = "tvm"
    OPTIONS = ("remote", "mcpu", "arch", "tune_trials", "schedules", "rpc_timeout_s")
    VERSIONED = ("apache-tvm",)

    def check_target(self, target: Target) -> None:
        tvm_target(target)
        if self.options.get("remote") is not None:
            parse_remote(self.options["remote"])  # malformed addresses fail before an expensive build

    @property
    def _name(self) -> str:
        return tvm_target(self.target)

    def compile(self, model: Any, example_inputs: Inputs) -> Compiled | TvmArtifact:
        if isinstance(model, TvmArtifact):
            return model
        if isinstance(model, (str, Path)) and (Path(model) / ARTIFACT_JSON).is_file():
            return TvmArtifact.load(model)
        return _cached_build(model, tuple(example_inputs), self._name, mcpu=self.options.get("mcpu"),
                             arch=self.options.get("arch"), tune_trials=self.options.get("tune_trials", 0),
                             schedules=self.options.get("schedules", "depthfold"))

    def run(self, compiled: Compiled | TvmArtifact, inputs: Inputs) -> list[np.ndarray]:
        return run(compiled, inputs)

    def prepare(self, compiled: Compiled | TvmArtifact, inputs: Inputs
                ) -> tuple[Callable[[], object], Callable[[], None] | None]:
        call, _, sync = prepare(compiled, _timing_inputs(compiled, inputs), threads=self.threads)
        return call, sync

    def export(self, model: Any, example_inputs: Inputs, out_dir: str | Path) -> TvmArtifact:
        return compile(model, tuple(example_inputs), self._name, mcpu=self.options.get("mcpu"),
                       arch=self.options.get("arch"), tune_trials=self.options.get("tune_trials", 0),
                       schedules=self.options.get("schedules", "depthfold"), out_dir=out_dir)

    def measure(self, model: Any, inputs: Inputs) -> Measurement:
        remote = self.options.get("remote")
        if remote is None:
            return super().measure(model, inputs)
        compiled = self.compile(model, inputs)
        timeout = self.options.get("rpc_timeout_s", _RPC_CONNECT_TIMEOUT_S)
        if isinstance(compiled, TvmArtifact):
            return measure(compiled, inputs, warmup=self.warmup, repeat=self.repeat, threads=self.threads,
                           remote=remote, rpc_timeout_s=timeout)
        with tempfile.TemporaryDirectory(prefix="depthfold-tvm-rpc-") as tmp:
            _export_library(compiled.executable, compiled.target, Path(tmp) / LIBRARY_NAME)
            meta = {"format": "depthfold-tvm", "library": LIBRARY_NAME, "target": compiled.target,
                    "source_sha256": compiled.source_hash}
            art = TvmArtifact(path=Path(tmp), target=compiled.target, inputs=compiled.inputs,
                              outputs=compiled.outputs, meta=meta)
            return measure(art, inputs, warmup=self.warmup, repeat=self.repeat, threads=self.threads,
                           remote=remote, rpc_timeout_s=timeout)

    def compare(self, models: Mapping[str, Any], inputs: Inputs, *, rounds: int = 20, baseline: str | None = None,
                min_sample_ms: float | None = None) -> dict[str, Any]:
        if self.options.get("remote") is None:
            return super().compare(models, inputs, rounds=rounds, baseline=baseline, min_sample_ms=min_sample_ms)
        return _compare_by_measurements(self, models, inputs, rounds, baseline)


def _compare_by_measurements(backend: Backend, models: Mapping[str, Any], inputs: Inputs, rounds: int,
                             baseline: str | None) -> dict[str, Any]:
    """Interleaved comparison where calls cannot be timed from here (a remote device): rounds of whole
    measurements (builds are cached, so only the first round compiles), in alternating order."""
    names = list(models)
    base = baseline or names[0]
    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        per_round.append({name: backend.measure(models[name], inputs).median_ms for name in order})
    return summarise_rounds(per_round, names, base, warmup=backend.warmup, inner=1, threads=backend.threads,
                            backend=backend.name, device=backend.target.device)


def _timing_inputs(compiled: Compiled | TvmArtifact, inputs: Inputs) -> Any:
    """A build of a torch module keeps the example inputs it was verified on; time it on those."""
    if isinstance(compiled, Compiled) and compiled.reference:
        return compiled.reference[0]
    return inputs


def _input_key(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple((tuple(a.shape), str(a.dtype)) for a in inputs)


def _cached_build(model: Any, inputs: tuple[Any, ...], target: str, *, mcpu: str | None, arch: str | None,
                  tune_trials: int, schedules: str = "depthfold") -> Compiled:
    """``build``, reused when the same content is built again for the same target and options.

    Content key: the exported graph's code (ops, shapes, Python constants baked in by torch.export) and every
    parameter/buffer/constant, plus input shapes and build options. Two modules equal in all of these compile
    to the same code, so reusing a build cannot time the wrong thing; exporting is cheap next to compiling,
    and the exported program is reused on a miss."""
    key: tuple[Any, ...] | None = None
    source = model
    if isinstance(model, nn.Module):
        t_inputs = tuple(torch.as_tensor(a) if isinstance(a, np.ndarray) else a for a in inputs)
        source = _export(model, t_inputs)
        key = (_hash_torch(source), _input_key(tuple(to_numpy(a) for a in inputs)), target, mcpu, arch,
               tune_trials, schedules)
        with _LOCK:
            if key in _BUILDS:
                _BUILDS.move_to_end(key)
                return _BUILDS[key]
    compiled = build(source, inputs, target, mcpu=mcpu, arch=arch, tune_trials=tune_trials, schedules=schedules)
    if key is not None:
        with _LOCK:
            _BUILDS[key] = compiled
            while len(_BUILDS) > _BUILDS_MAX:
                _BUILDS.popitem(last=False)
    return compiled

