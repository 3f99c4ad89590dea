"""optimize(): report contents, artifacts, errors, and the user's model left untouched."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import depthfold
from depthfold.errors import ArtifactError, ConfigError


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.3)
        self.conv3 = nn.Conv2d(8, 4, 1)  # narrowing, so the merged 3x3 is cheaper than the pair
        self.bn3 = nn.BatchNorm2d(4)
        self.q, self.k = nn.Linear(4, 16), nn.Linear(4, 16)

    def forward(self, x):
        y = self.bn3(self.conv3(self.drop(self.conv2(self.relu(self.bn1(self.conv1(x)))))))
        y = y.mean((2, 3))
        return self.q(y) * self.k(y)


@pytest.fixture
def net() -> nn.Module:
    torch.manual_seed(0)
    model = SmallNet()
    for bn in (model.bn1, model.bn3):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return model.train()  # optimize() must not flip the caller's mode


def test_optimize_applies_every_exact_pass_and_reports(net):
    x = torch.randn(2, 3, 12, 12)
    res = depthfold.optimize(net, (x,), depthfold.EXACT_PASSES)
    by_name = {r["name"]: r for r in res.report["passes"]}
    assert [r["name"] for r in res.report["passes"]] == list(depthfold.EXACT_PASSES)
    assert len(by_name["fold_bn"]["changes"]) == 2
    assert len(by_name["merge_linear_chains"]["changes"]) == 1  # conv2 -> dropout -> conv3 (1x1)
    assert len(by_name["fuse_qkv"]["changes"]) == 1             # q and k read the same tensor
    summary = res.report["summary"]
    assert summary["after"]["nodes"] < summary["before"]["nodes"]
    assert summary["verification"]["exact_pipeline"] is True
    assert summary["verification"]["max_rel"] <= 1e-4
    for rec in res.report["passes"]:
        assert rec["exact"] is True and rec["seconds"] >= 0 and rec["max_abs_error"] is not None
        assert set(rec["before"]) == {"nodes", "params", "flops"}
    json.dumps(res.report)  # serialisable
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(res.module(x), net(x), rtol=1e-4, atol=1e-5)


def test_default_pipeline_is_fold_and_merge(net):
    res = depthfold.optimize(net, (torch.randn(1, 3, 12, 12),))
    assert [r["name"] for r in res.report["passes"]] == list(depthfold.DEFAULT_PASSES)
    assert depthfold.DEFAULT_PASSES == ("fold_bn", "merge_linear_chains")


def test_optimize_never_mutates_the_model(net):
    before = {k: v.clone() for k, v in net.state_dict().items()}
    depthfold.optimize(net, torch.randn(1, 3, 12, 12))
    assert net.training
    after = net.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


def test_optimized_module_is_trainable(net):
    res = depthfold.optimize(net, (torch.randn(1, 3, 12, 12),))
    module = res.module.train()
    loss = module(torch.randn(4, 3, 12, 12)).square().mean()
    loss.backward()
    grads = [p.grad for p in module.parameters()]
    assert grads and all(g is not None for g in grads)


def test_save_writes_three_files_atomically(net, tmp_path):
    res = depthfold.optimize(net, (torch.randn(1, 3, 12, 12),))
    paths = res.save(tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["model.onnx", "report.json", "report.md"]
    report = json.loads(paths["report_json"].read_text())
    assert report["onnx"]["max_rel_error"] <= 1e-4
    assert "fold_bn" in paths["report_md"].read_text()
    assert oct(os.stat(paths["report_json"]).st_mode & 0o077) != "0o0"  # not a 0600 temp file


def test_save_to_unwritable_path_is_a_clear_error(net, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    res = depthfold.optimize(net, (torch.randn(1, 3, 12, 12),))
    with pytest.raises(ArtifactError, match="not a directory"):
        res.save(blocker)


def test_unknown_pass_suggests_the_right_name(net):
    with pytest.raises(ConfigError, match="did you mean 'fold_bn'"):
        depthfold.optimize(net, torch.randn(1, 3, 12, 12), passes=["fold_batchnorm"])


def test_malformed_spec_and_bad_option(net):
    with pytest.raises(ConfigError, match="malformed"):
        depthfold.optimize(net, torch.randn(1, 3, 12, 12), passes=["fold_bn:oops"])
    with pytest.raises(ConfigError, match="max_cost_ratio"):
        depthfold.optimize(net, torch.randn(1, 3, 12, 12), passes=["merge_linear_chains:max_cost=2"])


def test_wrong_inputs_are_clear_errors(net):
    with pytest.raises(ConfigError, match="tensor"):
        depthfold.optimize(net, [1, 2, 3])
    with pytest.raises(depthfold.errors.CaptureError, match=r"\(1, 5, 12, 12\)"):
        depthfold.optimize(net, torch.randn(1, 5, 12, 12))


def test_pass_objects_are_accepted(net):
    from depthfold.passes.merge_linear_chains import MergeLinearChainsConfig

    res = depthfold.optimize(net, torch.randn(1, 3, 12, 12),
                             passes=["fold_bn", ("merge_linear_chains", MergeLinearChainsConfig(merge_convs=False))])
    merges = res.report["passes"][1]
    assert merges["changed"] is False and merges["config"]["merge_convs"] is False


def test_measure_records_interleaved_latency_in_the_report(net, tmp_path):
    res = depthfold.optimize(net, (torch.randn(1, 3, 12, 12),))
    summary = res.measure(rounds=3)
    assert summary["backend"] == "onnxruntime" and summary["target"].endswith("-cpu")
    assert set(summary["measurements"]) == {"original", "optimized"}
    assert all(m["n"] == 3 for m in summary["measurements"].values())
    assert summary["calls_per_sample"] >= 1 and summary["speedup"]["median"] > 0
    assert res.report["latency"] is summary
    paths = res.save(tmp_path)
    assert "Speed-up (median of per-round ratios)" in paths["report_md"].read_text()


def test_measure_times_on_the_backend_the_pipeline_planned_for(net):
    from depthfold.backends import LatencyProbe

    res = depthfold.optimize(net, (torch.randn(1, 3, 12, 12),), backend="torch", threads=1)
    assert res.probe.backend == "torch"
    summary = res.measure(rounds=2)
    assert summary["backend"] == "torch" and all(m["backend"] == "torch" for m in summary["measurements"].values())
    other = res.measure(rounds=2, probe=LatencyProbe("onnxruntime"))
    assert other["backend"] == "onnxruntime"


def test_target_and_device_must_agree(net):
    with pytest.raises(ConfigError, match="runs on cuda, but device='cpu'"):
        depthfold.optimize(net, (torch.randn(1, 3, 12, 12),), target="cuda", device="cpu")
    with pytest.raises(ConfigError, match="unknown target 'x68'"):
        depthfold.optimize(net, (torch.randn(1, 3, 12, 12),), target="x68")
