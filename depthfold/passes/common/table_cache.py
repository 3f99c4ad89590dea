"""Table entries on disk: one JSON file per entry, keyed by everything the value depends on, checksummed.

A rerun reads the entries back instead of recomputing them; an interrupted build resumes from what was
written; an entry that does not parse, whose checksum does not match or that was stored under another key
is deleted and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from ..._atomic import atomic_write

__all__ = ["entry_path", "load_entry", "store_entry"]

logger = logging.getLogger(__name__)

_FORMAT = 1


def entry_path(root: Path, key: str) -> Path:
    return root / f"{hashlib.sha256(key.encode()).hexdigest()}.json"


def _checksum(key: str, result: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"key": key, "result": result}, sort_keys=True).encode()).hexdigest()


def load_entry(path: Path, key: str) -> dict[str, Any] | None | bool:
    """The stored result, ``None`` if absent, ``False`` if present but corrupt or for another key (deleted)."""
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
        ok = (entry.get("format") == _FORMAT and entry.get("key") == key
              and entry.get("checksum") == _checksum(key, entry["result"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if ok:
        return entry["result"]
    logger.warning("table cache entry %s is corrupted or stale; recomputing it", path.name)
    path.unlink(missing_ok=True)
    return False


def store_entry(path: Path, key: str, result: dict[str, Any]) -> None:
    entry = {"format": _FORMAT, "key": key, "result": result, "checksum": _checksum(key, result)}
    atomic_write(path, lambda p: p.write_text(json.dumps(entry)))
