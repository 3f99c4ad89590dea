"""Shared fixtures for the backend tests: one small conv+bn+relu+linear model, captured and exported once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from depthfold.backends import OnnxArtifact, export_onnx


class ConvBNReLULinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = ConvBNReLULinear().eval()
    # Non-trivial BatchNorm statistics, so folding mistakes would show.
    m.bn.running_mean.uniform_(-1, 1)
    m.bn.running_var.uniform_(0.5, 2.0)
    m.bn.weight.data.uniform_(0.5, 1.5)
    m.bn.bias.data.uniform_(-0.5, 0.5)
    return m


@dataclass(frozen=True)
class Exported:
    gm: nn.Module
    x: torch.Tensor
    artifact: OnnxArtifact


@pytest.fixture(scope="session")
def captured() -> tuple[nn.Module, torch.Tensor]:
    """``torch.export.export(model.eval(), (x,)).module()`` and its example input."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    gm = torch.export.export(make_model(), (x,)).module()
    return gm, x


@pytest.fixture(scope="session")
def exported(captured: tuple[nn.Module, torch.Tensor], tmp_path_factory: pytest.TempPathFactory) -> Exported:
    gm, x = captured
    path: Path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return Exported(gm=gm, x=x, artifact=export_onnx(gm, (x,), path))
