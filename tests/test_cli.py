"""The depthfold command line: optimize, bench, pass-list splitting and its errors."""

from __future__ import annotations

import json

import pytest

from depthfold import cli
from depthfold.errors import ConfigError

FACTORY = '''
import torch
from torch import nn

def build():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.Conv2d(4, 4, 1))
    return model, (torch.randn(1, 3, 16, 16),)

def only_model():
    return nn.Sequential(nn.Conv2d(3, 4, 1))
'''


def test_split_pass_list_keeps_options_together():
    assert cli.split_pass_list("fold_bn,layermerge:speedup=1.8,mode=depth,fuse_qkv") == [
        "fold_bn", "layermerge:speedup=1.8,mode=depth", "fuse_qkv"]
    with pytest.raises(ConfigError, match="starts with an option"):
        cli.split_pass_list("speedup=2,fold_bn")
    assert cli.split_pass_list("fold_bn,early_exit:after=layer2,layer3.1,tolerance=0.02,fuse_qkv") == [
        "fold_bn", "early_exit:after=layer2,layer3.1,tolerance=0.02", "fuse_qkv"]
    assert cli.split_pass_list("kv_share:sources=0,0,2,2") == ["kv_share:sources=0,0,2,2"]


def test_optimize_and_bench_from_a_factory_file(tmp_path, capsys):
    path = tmp_path / "models.py"
    path.write_text(FACTORY)
    out = tmp_path / "out"
    code = cli.main(["--quiet", "optimize", f"{path}:build", "--passes", "fold_bn,merge_linear_chains",
                     "--out", str(out)])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert [p["name"] for p in report["passes"]] == ["fold_bn", "merge_linear_chains"]
    # conv(3x3) -> conv(1x1) after the ReLU merge once; the first conv sits before the ReLU.
    assert len(report["passes"][1]["changes"]) == 1
    assert (out / "model.onnx").exists() and (out / "report.md").exists()
    code = cli.main(["--quiet", "bench", str(out / "model.onnx"), "--repeat", "3", "--warmup", "1",
                     "--json", str(tmp_path / "bench.json")])
    assert code == 0
    rows = json.loads((tmp_path / "bench.json").read_text())
    assert rows[0]["n"] == 3 and rows[0]["median_ms"] > 0


def test_cli_errors_are_reported_not_raised(tmp_path, capsys):
    path = tmp_path / "models.py"
    path.write_text(FACTORY)
    assert cli.main(["--quiet", "optimize", f"{path}:only_model", "--out", str(tmp_path / "o")]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert cli.main(["--quiet", "optimize", f"{path}:build", "--passes", "fold_batchnorm",
                     "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'fold_bn'" in capsys.readouterr().err
    assert cli.main(["--quiet", "optimize", "zoo:resnet", "--out", str(tmp_path / "o")]) == 2
    assert "resnet18" in capsys.readouterr().err
    assert cli.main(["--quiet", "optimize", "nothing_here", "--out", str(tmp_path / "o")]) == 2
    assert "zoo:NAME" in capsys.readouterr().err
