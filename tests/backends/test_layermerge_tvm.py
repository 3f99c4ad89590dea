"""LayerMerge against TVM: its latency table measured with backend="tvm", and its output compiled by TVM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import depthfold
from depthfold.backends import tvm as tvm_backend

pytest.importorskip("tvm")


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _block(3, 8)
        self.body = nn.Sequential(_block(8, 8), _block(8, 8))
        self.down = _block(8, 16, stride=2)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.body(x)
        x = self.down(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.slow
def test_layermerge_tables_on_tvm_and_the_result_compiles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = SmallResidualCNN().eval()
    x = torch.randn(1, 3, 16, 16)
    spec = "layermerge:speedup=1.2,importance=zero_shot,recover_steps=0,eval_samples=8,train_samples=16,replan=0"
    try:
        result = depthfold.optimize(model, (x,), [spec], backend="tvm", verify=False)
    except depthfold.errors.InfeasibleBudgetError:
        pytest.skip("timings on this machine leave no plan at 1.2x")
    details = result.records[0].details
    assert details["tables"]["latency"]["probe"]["backend"] == "tvm"
    assert details["tables"]["latency"]["measured"] == details["tables"]["latency"]["distinct_layers"] > 0

    artifact = tvm_backend.compile(result.module, (x,), target="x86", out_dir=tmp_path / "tvm")
    (got,) = tvm_backend.run(artifact, (x,))
    with torch.no_grad():
        want = result.module(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
