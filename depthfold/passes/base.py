"""What a pass returns: the new graph, one record per rewrite, and each matched site it left alone."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from torch.fx import GraphModule

from ..ir import ErrorStats

__all__ = ["Change", "Exactness", "PassResult", "Skip"]


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


@dataclass
class PassResult:
    """The output of one pass: a new graph module (never the input object) and what changed."""

    graph_module: GraphModule
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    error: ErrorStats | None = None
    """Measured error, for approximate passes that compute it themselves."""

    @property
    def modified(self) -> bool:
        return bool(self.changes)
