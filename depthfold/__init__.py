"""depthfold: make trained PyTorch networks shallower and faster for the device they will run on."""

from __future__ import annotations

__version__ = "0.1.0"

from . import errors, ir, passes  # noqa: E402
from .api import DEFAULT_PASSES, EXACT_PASSES, OptimizeResult, export_decoder, generate, optimize  # noqa: E402
from .passes import list_passes  # noqa: E402
from .passes.recover import recover  # noqa: E402

__all__ = ["DEFAULT_PASSES", "EXACT_PASSES", "OptimizeResult", "errors", "export_decoder", "generate", "ir", "list_passes",
           "optimize", "passes", "recover"]
