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

tvm is imported inside the functions of this package only, so depthfold imports without it; a missing tvm
raises :class:`~depthfold.errors.BackendUnavailableError` naming the ``tvm`` extra. The aarch64 emulation
helper :func:`run_emulated` runs a library under ``qemu-aarch64-static`` with an arm64 Python prepared by
``scripts/setup_arm_lane.sh``; emulated timings are not device timings, so it only returns outputs.
"""

from __future__ import annotations

from .artifact import Compiled, TensorSpec, TvmArtifact, verify_outputs
from .backend import TvmBackend
from .backend import _cached_build as _cached_build  # the build-cache test reaches it here
from .build import build, compile, gpu_available, nvcc_available, target_dict, tvm_target
from .emulation import emulation_root, run_emulated
from .rpc import parse_remote
from .run import load, measure, prepare, run, verify

__all__ = [
    "TvmBackend", "TvmArtifact", "Compiled", "compile", "build", "load", "run", "measure", "verify",
    "target_dict", "tvm_target", "parse_remote", "run_emulated", "emulation_root", "nvcc_available",
    "gpu_available", "verify_outputs", "TensorSpec", "prepare",
]
