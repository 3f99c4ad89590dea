"""Shared by every part of the TVM backend: the lazy tvm import, the logger, scratch directories."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ...errors import BackendUnavailableError

logger = logging.getLogger(__package__)  # one logger for the backend: depthfold.backends.tvm

_INSTALL_HINT = "pip install 'depthfold[tvm]' (apache-tvm>=0.27)"


def _tvm() -> Any:
    try:
        import tvm
        from tvm import relax  # noqa: F401  (checks the Relax part is there too)
    except ImportError as err:
        raise BackendUnavailableError(f"the tvm backend needs Apache TVM, which is not installed: {_INSTALL_HINT}"
                                      ) from err
    return tvm


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="depthfold-emu-") as tmp:
        yield Path(tmp)
