"""Table entries on disk: one JSON file per entry, keyed by everything the value depends on, checksummed.

A rerun reads the entries back instead of recomputing them; an interrupted build (Ctrl-C, SIGTERM, a crash)
resumes from the entries written before it stopped, each written atomically as it finished; an entry that
does not parse, whose checksum does not match or that was stored under another key is deleted and
recomputed, never used. Processes sharing a cache directory build under one lock per table kind, so two
runs started together compute each entry once and get the same table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Hashable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..._atomic import atomic_write
from ...cache import cache_lock
from ...errors import TimeBudgetError

__all__ = ["TableFill", "entry_path", "fill_table", "load_entry", "store_entry"]

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


@dataclass
class TableFill:
    """What :func:`fill_table` found: every entry's result, how many came from the cache, how many were
    computed, how many stored entries were rejected as corrupt or stale, and what ``compute`` returned."""

    results: dict[Any, dict[str, Any]]
    hits: int
    computed: int
    rejected: int
    ran: Any = None


def fill_table(root: Path, keys: dict[Hashable, str],
               compute: Callable[[list[Hashable], Callable[[Hashable, dict[str, Any]], None]], Any], *,
               use_cache: bool, what: str, deadline: float | None = None) -> TableFill:
    """Each entry of ``keys`` (id -> cache key) read from ``root`` or computed by ``compute(ids, store)``,
    which calls ``store(id, result)`` as each entry finishes (stored at once, so a stopped build resumes).

    Missing entries are computed holding ``root``'s lock: a process that waited for it first reads what the
    holder stored. ``use_cache=False`` reads, writes and locks nothing. Past ``deadline`` (a
    ``time.monotonic()`` value) the build stops after the entry in progress with :class:`TimeBudgetError`."""
    results: dict[Any, dict[str, Any]] = {}
    rejected = 0

    def read(ids: list[Hashable]) -> None:
        nonlocal rejected
        for i in ids:
            hit = load_entry(entry_path(root, keys[i]), keys[i]) if use_cache else None
            if isinstance(hit, dict):
                results[i] = hit
            else:
                rejected += hit is False

    read(list(keys))
    missing = [i for i in keys if i not in results]
    todo: list[Hashable] = []
    ran = None
    if missing:
        with cache_lock(root / "build", what) if use_cache else nullcontext():
            for stale in root.glob(".*.json.*.tmp"):  # left by a process killed mid-write (only writers lock)
                stale.unlink(missing_ok=True)
            read(missing)
            todo = [i for i in missing if i not in results]

            def store(i: Hashable, result: dict[str, Any]) -> None:
                results[i] = result
                if use_cache:
                    store_entry(entry_path(root, keys[i]), keys[i], result)
                left = len(keys) - len(results)
                if deadline is not None and left and time.monotonic() > deadline:
                    kept = ("they are cached, so rerunning continues from them" if use_cache else
                            "use_cache is off, so they are lost")
                    raise TimeBudgetError(f"{what} reached its time budget with {left} of {len(keys)} entries "
                                          f"still to compute ({len(results)} done; {kept}); raise time_budget_s "
                                          "or rerun")

            if todo:
                ran = compute(todo, store)
    return TableFill(results, len(keys) - len(todo), len(todo), rejected, ran)
