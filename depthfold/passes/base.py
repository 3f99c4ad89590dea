"""What a pass returns: the new graph, one record per rewrite, and each matched site it left alone."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from ..ir import ErrorStats

__all__ = ["Change", "Exactness", "PassContext", "PassResult", "Skip"]


class Exactness(enum.Enum):
    """EXACT passes keep outputs equal up to float error (verified every run); APPROXIMATE ones report error."""

    EXACT = "exact"
    APPROXIMATE = "approximate"


@dataclass(frozen=True)
class Change:
    """One rewrite: what it did, which nodes it removed and added, and details (e.g. parameter delta)."""

    kind: str
    removed: tuple[str, ...]
    added: tuple[str, ...]
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "removed": list(self.removed), "added": list(self.added), **self.detail}


@dataclass(frozen=True)
class Skip:
    """A matched site the pass left alone, and why."""

    site: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"site": self.site, "reason": self.reason}


@dataclass(frozen=True)
class PassContext:
    """What a pass that measures or trains gets besides the graph (passes that only rewrite ignore it).

    The API fills it in; passes never import backends, so the latency probe is handed to them here.
    """

    example_inputs: tuple[Any, ...] = ()
    data: Any = None
    """Calibration/training data in any form :func:`depthfold.data.read_samples` reads."""
    original: GraphModule | None = None
    """The pipeline's input graph (the teacher of ``recover``); the manager fills it in."""
    latency_probe: Any = None
    """A :class:`depthfold.backends.LatencyProbe` (``measure(model, inputs)``, ``fingerprint()``)."""
    executor: Any = None
    """Where independent jobs run: ``None``/``"process"`` (a local process pool), ``"serial"``, ``"ray"``, or
    any ``concurrent.futures.Executor``."""
    progress: bool = False
    seed: int = 0


@dataclass
class PassResult:
    """The output of one pass: a new graph module (never the input object) and what changed."""

    graph_module: GraphModule
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    error: ErrorStats | None = None
    """Measured error, for approximate passes that compute it themselves."""
    report: dict[str, Any] = field(default_factory=dict)
    """Pass-specific findings for the report (JSON-serialisable), e.g. LayerMerge's plan and tables."""

    @property
    def modified(self) -> bool:
        return bool(self.changes)
