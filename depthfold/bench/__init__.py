"""``depthfold bench``: a benchmark plan (zoo models x pipelines x backend lanes) measured on this device
against baselines in one interleaved run, written as a versioned ``report.json`` with markdown and HTML."""

from __future__ import annotations

from .device import device_fingerprint, device_id
from .plan import LANES, RUNTIMES, BenchModel, Pipeline, Plan, default_plan, demo_plan, quick_plan
from .run import BenchPaths, run_bench, write_report

__all__ = ["device_fingerprint", "device_id", "LANES", "RUNTIMES", "BenchModel", "Pipeline", "Plan",
           "default_plan", "demo_plan", "quick_plan", "BenchPaths", "run_bench", "write_report"]
