"""One error hierarchy for depthfold: every message says what was wrong, where, and how to fix it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "DepthfoldError",
    "CaptureError",
    "ConfigError",
    "PassError",
    "PreconditionError",
    "VerificationError",
    "BackendUnavailableError",
    "ArtifactError",
    "InfeasibleBudgetError",
    "TimeBudgetError",
    "suggest",
]


class DepthfoldError(Exception):
    """Base class of every error depthfold raises on purpose."""


class CaptureError(DepthfoldError):
    """The model or its example inputs could not be captured with ``torch.export``."""


class ConfigError(DepthfoldError, ValueError):
    """A pass name, pass spec, option or input argument is malformed or unknown."""


class PassError(DepthfoldError):
    """A pass raised while transforming the graph."""


class PreconditionError(DepthfoldError):
    """A pass was run on a graph that does not meet its declared requirements."""


class VerificationError(DepthfoldError):
    """A transformed graph does not reproduce the original's outputs within tolerance."""


class BackendUnavailableError(DepthfoldError):
    """A backend, execution provider or toolchain is not installed or not usable here."""


class ArtifactError(DepthfoldError):
    """An artifact could not be written, read or validated."""


class TimeBudgetError(DepthfoldError):
    """Work stopped at its time budget; what finished is kept (cached table entries), so a rerun continues."""


class InfeasibleBudgetError(DepthfoldError):
    """No plan fits the budget; ``min_latency`` is the smallest achievable (true) latency.

    Attributes:
        min_latency: Latency of the fastest tiling, computed on undiscretised latencies.
        budget: The budget that was asked for.
    """

    def __init__(self, message: str, *, min_latency: float, budget: float) -> None:
        super().__init__(message)
        self.min_latency = min_latency
        self.budget = budget


def suggest(name: str, known: Iterable[str]) -> str:
    """Return ``"; did you mean 'x'?"`` for the closest known name, or an empty string."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
