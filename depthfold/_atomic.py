"""Atomic file writes: write a temporary file beside the target, then rename over it."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import ArtifactError

__all__ = ["atomic_write", "ensure_writable_dir"]


def ensure_writable_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and check it is a writable directory, with a clear error if not."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"output path {str(out)!r} exists and is not a directory; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ArtifactError(f"cannot create output directory {str(out)!r}: {err.strerror}; "
                            "choose a directory you can write to") from err
    if not os.access(out, os.W_OK):
        raise ArtifactError(f"output directory {str(out)!r} is not writable; choose another --out "
                            "or fix its permissions")
    return out


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` atomically; nothing is left half-written."""
    target = Path(path)
    ensure_writable_dir(target.parent)
    tmp: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        # mkstemp creates 0600 files; give the artifact the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    except OSError as err:  # a full disk, a read-only file system, a vanished directory: say where, leave nothing
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        fix = "free some space or choose another output directory" if err.errno == errno.ENOSPC else \
            "choose another output directory"
        raise ArtifactError(f"could not write {str(target)!r}: {err.strerror or err}; {fix} (nothing was written "
                            "there)") from err
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return target
