"""Machinery every approximate pass shares: calibration data, task metrics, table caches and jobs.

:mod:`.calibration` reads and splits the user's data; :mod:`.metrics` is the metric registry (accuracy, KL to
the teacher, perplexity, embedding cosine); :mod:`.table_cache` stores table entries on disk keyed by
content; :mod:`.jobs` runs independent table jobs serially, on a process pool, on Ray or on any executor;
:mod:`.replan` re-solves a latency-budgeted plan until the planned network, measured, meets the target.
"""

from __future__ import annotations

from .calibration import Calibration, calibration_split
from .jobs import RayExecutor, run_jobs
from .metrics import METRICS, Metric, batched_outputs, evaluate, logits_of
from .replan import Replanned, next_budget, plan_with_feedback
from .table_cache import entry_path, load_entry, store_entry

__all__ = ["METRICS", "Calibration", "Metric", "RayExecutor", "Replanned", "batched_outputs", "calibration_split",
           "entry_path", "evaluate", "load_entry", "logits_of", "next_budget", "plan_with_feedback", "run_jobs",
           "store_entry"]
