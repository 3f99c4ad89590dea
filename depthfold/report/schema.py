"""The report schema: lineage (model, passes, configs, errors, durations), sizes, environment, latency.

Layout (all JSON types)::

    {"schema": 1, "depthfold": "0.1.0", "created": iso-time, "model": {"name", "inputs": [...]},
     "environment": {"python", "platform", "machine", "cpu_count", "torch", "onnx", "onnxruntime"},
     "passes": [PassRecord.to_dict(), ...],
     "summary": {"before": {"nodes","params","flops"}, "after": {...}, "verification": {...}},
     "onnx": {...} | absent, "latency": {...} | absent}
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SCHEMA_VERSION", "environment", "new_report"]

SCHEMA_VERSION = 1


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Where the numbers were taken: interpreter, machine and library versions."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "onnxscript": _version("onnxscript"),
    }


def new_report(model_name: str, example_inputs: Sequence[torch.Tensor], records: Sequence[dict[str, Any]],
               before: dict[str, int], after: dict[str, int], verification: dict[str, Any]) -> dict[str, Any]:
    """A fresh report for one optimisation run."""
    from .. import __version__

    return {
        "schema": SCHEMA_VERSION,
        "depthfold": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": model_name,
            "inputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                       for t in example_inputs],
        },
        "environment": environment(),
        "passes": list(records),
        "summary": {"before": before, "after": after, "verification": verification},
    }
