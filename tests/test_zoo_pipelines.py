"""Exact pipelines on every zoo model: verified, ONNX Runtime agrees, and a checked-in golden summary.

The golden files (tests/golden/<model>.txt) hold the op histogram and node counts before and after
the exact pipeline. Regenerate deliberately with ``DEPTHFOLD_UPDATE_GOLDEN=1 pytest tests/test_zoo_pipelines.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

import depthfold
from depthfold import ir, zoo
from depthfold.backends.onnx import export_onnx

GOLDEN = Path(__file__).parent / "golden"
SMALL = {"vit_tiny": {"img_size": 32, "patch_size": 8}}


def _model_and_inputs(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    family = zoo.spec(name).family
    if family == "vit":
        return zoo.create(name, **SMALL[name]), zoo.example_inputs(name, resolution=32)
    if family == "llm":
        return zoo.create(name), zoo.example_inputs(name)
    return zoo.create(name), zoo.example_inputs(name, resolution=64)


def _randomise_bn_stats(model: nn.Module) -> None:
    # Fresh BNs are identities (mean 0, var 1); real statistics make folding non-trivial.
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) * 0.5 + 0.75)


def _summary(res: depthfold.OptimizeResult) -> str:
    s = res.report["summary"]
    lines = [f"nodes {s['before']['nodes']} -> {s['after']['nodes']}",
             f"params {s['before']['params']} -> {s['after']['params']}"]
    lines += [f"{r['name']}: {len(r['changes'])} rewrites, {len(r['skipped'])} skipped"
              for r in res.report["passes"]]
    lines += [f"{op} {n}" for op, n in ir.op_histogram(res.module).items()]
    return "\n".join(lines) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("name", zoo.list_models())
def test_exact_pipeline_on_zoo_model(name, tmp_path):
    model, inputs = _model_and_inputs(name)
    _randomise_bn_stats(model)
    res = depthfold.optimize(model, inputs, depthfold.EXACT_PASSES)
    assert res.report["summary"]["verification"]["max_rel"] <= 1e-4
    assert not any("batch_norm" in op for op in ir.op_histogram(res.module)), "every BN folds in the zoo"
    artifact = export_onnx(res.module, inputs, tmp_path / "model.onnx")  # verifies ORT vs torch
    assert artifact.max_rel_error is not None and artifact.max_rel_error <= 1e-4
    golden = GOLDEN / f"{name}.txt"
    text = _summary(res)
    if os.environ.get("DEPTHFOLD_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}; run with DEPTHFOLD_UPDATE_GOLDEN=1 once"
    assert text == golden.read_text()


def _vgg_with_identity_blocks(repad: bool) -> nn.Module:
    """VGG-19-BN with the inner ReLU of blocks 1 and 2 replaced by nn.Identity.

    With ``repad`` the two convs of each such block are re-padded LayerMerge-style (the segment's
    total padding at its input, inner conv unpadded), which makes the chain exactly mergeable.
    """
    torch.manual_seed(0)
    model = zoo.create("vgg19_bn", num_classes=10)
    _randomise_bn_stats(model)
    features = model.features
    convs = [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]
    for first, second in ((convs[0], convs[1]), (convs[2], convs[3])):
        relu = first + 2
        assert isinstance(features[relu], nn.ReLU)
        features[relu] = nn.Identity()
        if repad:
            features[first].padding = (2, 2)
            features[second].padding = (0, 0)
    return model


@pytest.mark.slow
def test_vgg19_identity_chains_unpadded_are_skipped_with_reason():
    model = _vgg_with_identity_blocks(repad=False)
    x = torch.randn(1, 3, 32, 32)
    res = depthfold.optimize(model, x, passes=["fold_bn", "merge_linear_chains"])
    assert not any("batch_norm" in op for op in ir.op_histogram(res.module))
    merge = res.report["passes"][1]
    assert not merge["changes"]
    assert len(merge["skipped"]) == 2 and all("zero-pads" in s["reason"] for s in merge["skipped"])


@pytest.mark.slow
def test_vgg19_identity_chains_merge_exactly(tmp_path):
    model = _vgg_with_identity_blocks(repad=True)
    x = torch.randn(1, 3, 32, 32)
    res = depthfold.optimize(model, x, passes=["fold_bn", "merge_linear_chains"])
    before, after = res.report["summary"]["before"], res.report["summary"]["after"]
    hist_before, hist_after = ir.op_histogram(res.original), ir.op_histogram(res.module)
    assert hist_before["aten.conv2d.default"] == 16
    assert hist_after["aten.conv2d.default"] == 14, "each identity chain became one conv"
    assert not any("batch_norm" in op for op in hist_after)
    assert after["nodes"] < before["nodes"]
    merges = res.report["passes"][1]["changes"]
    assert len(merges) == 2 and all(m["kernel"] == [5, 5] for m in merges)
    assert res.report["summary"]["verification"]["max_rel"] <= 1e-4
    artifact = export_onnx(res.module, (x,), tmp_path / "vgg.onnx")
    assert artifact.max_rel_error <= 1e-4
