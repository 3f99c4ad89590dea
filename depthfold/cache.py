"""Where depthfold keeps things that are expensive to rebuild (trained zoo weights, latency and importance
tables, TVM tuning records, the arm64 root), and the inter-process lock that lets processes share it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

__all__ = ["cache_dir", "cache_lock"]

logger = logging.getLogger(__name__)


def cache_dir(*parts: str) -> Path:
    """Return (and create) ``$DEPTHFOLD_CACHE/<parts>``, by default under ``~/.cache/depthfold``."""
    root = Path(os.environ.get("DEPTHFOLD_CACHE", Path.home() / ".cache" / "depthfold"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def cache_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive inter-process lock (``<path>.lock``, an OS file lock freed if the holder dies) while
    building ``what`` into ``path``: a second process building the same thing waits, then reads what the
    first one stored instead of computing it again."""
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process building %s (lock %s)", what, lock.lock_file)
        lock.acquire()
    except OSError as err:  # a read-only cache: nothing will be stored there either, so nothing to share
        logger.warning("cannot lock %s (%s); building %s without sharing it", lock.lock_file, err, what)
        yield
        return
    try:
        yield
    finally:
        lock.release()
