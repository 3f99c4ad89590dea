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

import torch
from torch.fx import GraphModule

from ..._atomic import atomic_write

__all__ = ["digest_graph", "digest_tensors", "entry_path", "load_entry", "store_entry"]

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
    logger.warning("layermerge: table cache entry %s is corrupted or stale; recomputing it", path.name)
    path.unlink(missing_ok=True)
    return False


def store_entry(path: Path, key: str, result: dict[str, Any]) -> None:
    entry = {"format": _FORMAT, "key": key, "result": result, "checksum": _checksum(key, result)}
    atomic_write(path, lambda p: p.write_text(json.dumps(entry)))


def digest_tensors(*tensors: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def digest_graph(gm: GraphModule) -> str:
    """The graph's code and every parameter and buffer: two graphs with equal digests compute the same."""
    h = hashlib.sha256(gm.code.encode())
    for name, value in sorted(gm.state_dict().items()):
        h.update(name.encode())
        h.update(digest_tensors(value).encode())
    return h.hexdigest()
