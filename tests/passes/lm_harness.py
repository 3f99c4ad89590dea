"""What the transformer pass tests share: tiny token batches, transformers models, the result they read."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from depthfold import zoo

BATCH, SEQ = 2, 16


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def _hf_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(seed), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


def _hf(name: str) -> nn.Module:
    pytest.importorskip("transformers")
    return zoo.hf_text(name)


@dataclass
class Result:
    """The parts of depthfold.OptimizeResult these tests read."""

    module: torch.fx.GraphModule
    original: torch.fx.GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    records: list
