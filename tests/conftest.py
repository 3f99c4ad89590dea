"""Suite-wide settings: one torch thread (correctness tests; avoids oversubscribing small CI machines)."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
