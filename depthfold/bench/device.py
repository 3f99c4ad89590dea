"""The device fingerprint a benchmark report is keyed by: CPU model and vector ISA, cores, memory, last-level
cache, GPU and driver, OS, library versions, git revision and the measured float32 peak."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["device_fingerprint", "device_id", "cpu_flags"]

# The ISA extensions kernels are specialised for; /proc/cpuinfo lists a hundred others.
_X86_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
_ARM_FLAGS = {"asimd": "neon", "asimddp": "dotprod", "asimdhp": "fp16", "i8mm": "i8mm", "bf16": "bf16",
              "sve": "sve", "sve2": "sve2"}
_VERSIONED = ("torch", "onnx", "onnxruntime", "onnxslim", "apache-tvm", "transformers", "numpy", "depthfold")


def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    return fields


def cpu_flags(info: dict[str, str] | None = None) -> list[str]:
    """The vector ISA extensions this CPU reports (x86: AVX2, AVX-512, AMX, ...; aarch64: NEON, SVE, ...)."""
    info = _cpuinfo() if info is None else info
    if "flags" in info:
        have = set(info["flags"].split())
        return [f for f in _X86_FLAGS if f in have]
    have = set(info.get("features", "").split())
    return [name for flag, name in _ARM_FLAGS.items() if flag in have]


def _cpu_model(info: dict[str, str]) -> str:
    for key in ("model name", "hardware", "cpu model"):
        if info.get(key):
            return info[key]
    if "cpu part" in info:  # aarch64 kernels name only the implementer and part
        return f"ARM implementer {info.get('cpu implementer', '?')} part {info['cpu part']}"
    return platform.processor() or "unknown CPU"


def _physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except ImportError:
        return None


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _gpu() -> dict[str, Any] | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30,
                             check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    if not out:
        return None
    name, driver, memory = ([p.strip() for p in out.splitlines()[0].split(",")] + ["", ""])[:3]
    return {"name": name, "driver": driver or None,
            "memory_bytes": int(float(memory)) << 20 if memory.replace(".", "").isdigit() else None}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or not shutil.which("git"):
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=30, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|c)\)", "", text.lower())
    text = re.sub(r"\b(cpu|processor|with|radeon graphics)\b", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")


def device_id(fingerprint: dict[str, Any], device: str = "cpu") -> str:
    """A directory name for reports from this device: architecture, CPU model, CPU count and widest vector
    ISA, plus the GPU for runs on it, e.g. ``x86_64-intel-xeon-2cpu-avx512`` (a CPU run) or
    ``x86_64-amd-epyc-7763-16cpu-avx2-nvidia-h200`` (a CUDA run on the same kind of host)."""
    cpu = fingerprint["cpu"]
    isa = next((f for f in ("avx512f", "avx2", "sve2", "sve", "neon") if f in cpu["flags"]), None)
    gpu = fingerprint.get("gpu") if device == "cuda" else None
    parts = [cpu["arch"], _slug(cpu["model"]), f"{cpu['logical_cpus']}cpu",
             isa.removesuffix("f") if isa else None, _slug(gpu["name"]) if gpu else None]
    return "-".join(p for p in parts if p)


@functools.cache
def _static() -> dict[str, Any]:
    info = _cpuinfo()
    from ..backends.ort import last_level_cache_bytes

    return {
        "cpu": {"model": _cpu_model(info), "arch": platform.machine(), "flags": cpu_flags(info),
                "physical_cores": _physical_cores(), "logical_cpus": os.cpu_count() or 1,
                "llc_bytes": last_level_cache_bytes(default=0) or None},
        "memory_bytes": _memory_bytes(), "gpu": _gpu(), "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {("tvm" if p == "apache-tvm" else p): _version(p) for p in _VERSIONED},
        "git": _git_revision(),
    }


def device_fingerprint(threads: int = 1, *, device: str = "cpu", peak: bool = True) -> dict[str, Any]:
    """This machine as a benchmark report records it (``device`` in the bench schema), for runs on its
    ``device`` (``"cpu"`` or ``"cuda"``). ``peak``: also measure the CPU's float32 matmul peak on ``threads``
    threads (a second or two)."""
    from ..backends.latency import peak_gflops

    fp = {**_static(), "threads": threads, "peak_gflops": peak_gflops(threads) if peak else None}
    return {"id": device_id(fp, device), **fp}
