"""Every public entry point leaves the user's model alone: parameters, buffers, requires_grad, gradients and
the training mode of every submodule are exactly as they were (the model is captured from a private copy)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import depthfold
from depthfold import zoo
from depthfold.backends import export_onnx, measure_latency


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "training": {name: m.training for name, m in model.named_modules()},
            "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
            "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
            "storage": {n: p.data_ptr() for n, p in model.named_parameters()}}


def _assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = _snapshot(model)
    assert after["training"] == before["training"], "a submodule's training mode changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["storage"] == before["storage"], "a parameter was replaced"
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), f"{key} changed"
    for key, grad in before["grads"].items():
        got = after["grads"][key]
        assert (grad is None and got is None) or torch.equal(grad, got), f"gradient of {key} changed"


class Net(nn.Module):
    """Conv-BN-ReLU, a mergeable pair, dropout and a classifier: every CNN pass has something to do."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)).mean((2, 3)))


def _user_model() -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    model.train()
    model.body[0].eval()  # a mix of modes must survive as it is
    model.head.weight.requires_grad_(False)
    model(torch.randn(2, 3, 8, 8)).sum().backward()  # gradients present
    return model


CNN_PASSES = [
    ["fold_bn"], ["merge_linear_chains"], ["fuse_qkv"], list(depthfold.EXACT_PASSES),
    ["layermerge:speedup=1.2,importance=zero_shot,recover_steps=0,replan=1,eval_samples=8"],
    ["early_exit:after=stem,steps=5,train_samples=32,eval_samples=32"],
    ["fold_bn", "recover:steps=2,train_samples=16,eval_samples=8,batch_size=8"],
]


@pytest.mark.slow
@pytest.mark.parametrize("passes", CNN_PASSES, ids=lambda p: "+".join(s.split(":")[0] for s in p))
def test_cnn_passes_leave_the_model_untouched(passes):
    model = _user_model()
    before = _snapshot(model)
    data = (torch.randn(64, 3, 8, 8), torch.randint(0, 10, (64,)))
    res = depthfold.optimize(model, (torch.randn(1, 3, 8, 8),), passes, data=data)
    res.module(torch.randn(2, 3, 8, 8))
    _assert_untouched(model, before)


@pytest.mark.slow
@pytest.mark.parametrize("passes", [["kv_share:preset=cla2"], ["drop_layers:n=1"],
                                    ["collapse_blocks:layers=2,threshold=0"]],
                         ids=lambda p: p[0].split(":")[0])
def test_decoder_passes_leave_the_model_untouched(passes):
    torch.manual_seed(0)
    model = zoo.create("llama_tiny").train()
    before = _snapshot(model)
    ids = torch.randint(0, 256, (32, 16))
    depthfold.optimize(model, (ids[:1],), passes, data=ids)
    _assert_untouched(model, before)


@pytest.mark.slow
def test_export_measure_compile_and_decoder_leave_the_model_untouched(tmp_path):
    model = _user_model().eval()  # exported as it is: in training mode dropout would make outputs random
    before = _snapshot(model)
    x = torch.randn(1, 3, 8, 8)
    export_onnx(model, (x,), tmp_path / "model.onnx")
    measure_latency(model, (x,), repeat=2, warmup=1)
    measure_latency(model, (x,), backend="torch", repeat=2, warmup=1)
    from depthfold.backends import tvm as tvm_backend

    tvm_backend.compile(model, (x,), "x86", out_dir=tmp_path / "tvm")
    _assert_untouched(model, before)
    torch.manual_seed(0)
    llm = zoo.create("llama_tiny").train()
    before = _snapshot(llm)
    depthfold.export_decoder(llm, (torch.randint(0, 256, (1, 16)),), tmp_path / "decoder")
    _assert_untouched(llm, before)


@pytest.mark.parametrize("change", ["mode", "weight", "buffer", "requires_grad", "grad", "replaced"])
def test_the_check_sees_each_kind_of_change(change):
    model = _user_model()
    before = _snapshot(model)
    with torch.no_grad():
        if change == "mode":
            model.body[0].train()
        elif change == "weight":
            model.stem[0].weight.add_(1e-3)
        elif change == "buffer":
            model.stem[1].running_var.mul_(2)
        elif change == "requires_grad":
            model.head.weight.requires_grad_(True)
        elif change == "grad":
            model.stem[0].weight.grad.zero_()
        else:
            model.stem[0].weight = nn.Parameter(model.stem[0].weight.clone())
    with pytest.raises(AssertionError):
        _assert_untouched(model, before)
