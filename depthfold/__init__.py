"""depthfold: make trained PyTorch networks shallower and faster for the device they will run on."""

from __future__ import annotations

__version__ = "0.1.0"
