"""Where depthfold keeps things that are expensive to rebuild (trained zoo weights, latency tables)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(*parts: str) -> Path:
    """Return (and create) ``$DEPTHFOLD_CACHE/<parts>``, by default under ``~/.cache/depthfold``."""
    root = Path(os.environ.get("DEPTHFOLD_CACHE", Path.home() / ".cache" / "depthfold"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
