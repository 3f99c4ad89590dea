"""capture: torch.export into the IR without touching the user's model, with paths and shapes on every node."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.fx import Interpreter

from depthfold import ir
from depthfold.errors import CaptureError, ConfigError


class BasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.drop(self.bn1(self.conv1(x))))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.layer1 = nn.Sequential(BasicBlock(4), BasicBlock(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layer1(self.stem(x)).mean((2, 3)))


def _model() -> TinyResNet:
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model


def test_capture_never_mutates_the_model() -> None:
    model = _model().train()
    model.layer1[1].eval()  # a mixed-mode model keeps exactly its per-module modes
    modes = {name: m.training for name, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    x = torch.randn(2, 3, 6, 6)
    captured = ir.capture(model, (x,))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), f"{name} changed (BN statistics updated?)"
    # The graph owns its own tensors: editing them cannot reach the model.
    with torch.no_grad():
        for p in captured.graph_module.parameters():
            p.add_(1.0)
    assert torch.equal(model.stem.weight, state["stem.weight"])


def test_capture_graph_matches_the_eval_model() -> None:
    model = _model().train()
    x = torch.randn(2, 3, 6, 6)
    captured = ir.capture(model, (x,))
    model.eval()
    fresh = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(captured.graph_module(fresh), model(fresh), atol=1e-6)
    # Inference mode: dropout is off and BN uses running statistics (no aten.batch_norm with training=True).
    assert any(ir.ops.is_batch_norm(n) for n in captured.graph_module.graph.nodes)
    assert all(ir.ops.is_identity(n) for n in captured.graph_module.graph.nodes if "dropout" in str(n.target))


def test_capture_records_module_paths_and_types() -> None:
    captured = ir.capture(_model(), (torch.randn(1, 3, 5, 5),))
    paths = {n.name: ir.module_path(n) for n in captured.graph_module.graph.nodes}
    convs = [n for n in captured.graph_module.graph.nodes if ir.ops.is_conv(n)]
    assert [ir.module_path(n) for n in convs] == ["stem", "layer1.0.conv1", "layer1.1.conv1"]
    assert convs[1].meta[ir.META_MODULE_TYPE].endswith("Conv2d")
    bns = [n for n in captured.graph_module.graph.nodes if ir.ops.is_batch_norm(n)]
    assert [ir.module_path(n) for n in bns] == ["layer1.0.bn1", "layer1.1.bn1"]
    adds = [n for n in captured.graph_module.graph.nodes if ir.ops.is_residual_add(n)]
    assert [ir.module_path(n) for n in adds] == ["layer1.0", "layer1.1"]  # functional ops: their block
    assert all(ir.META_MODULE_PATH in n.meta for n in captured.graph_module.graph.nodes)
    assert paths["x"] == ""


class _Recorder(Interpreter):
    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, object] = {}

    def run_node(self, n: torch.fx.Node) -> object:
        value = super().run_node(n)
        self.values[n.name] = value
        return value


def test_capture_records_shape_and_dtype_on_every_node() -> None:
    x = torch.randn(2, 3, 7, 5)
    captured = ir.capture(_model(), (x,))
    gm = captured.graph_module
    recorder = _Recorder(gm)
    with torch.no_grad():
        recorder.run(x)
    for node in gm.graph.nodes:
        assert ir.META_SHAPE in node.meta and ir.META_DTYPE in node.meta, node.name
        value = recorder.values[node.name]
        if isinstance(value, torch.Tensor):
            assert ir.shape_of(node) == tuple(value.shape), node.name
            assert node.meta[ir.META_DTYPE] == str(value.dtype), node.name
    assert ir.shape_of(next(n for n in gm.graph.nodes if n.op == "placeholder")) == (2, 3, 7, 5)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    assert output.meta[ir.META_SHAPE] == ((2, 3),)


def test_capture_keeps_private_copies_of_the_inputs() -> None:
    x = torch.randn(1, 3, 5, 5)
    captured = ir.capture(_model(), x)  # a bare tensor is accepted
    assert captured.model_name == "TinyResNet"
    assert captured.input_names == ("x",)
    assert torch.equal(captured.example_inputs[0], x)
    x.zero_()
    assert not torch.equal(captured.example_inputs[0], x)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.emb(ids) * mask.unsqueeze(-1)
        return h, h.sum(1)


def test_capture_several_inputs_and_outputs() -> None:
    ids = torch.randint(0, 10, (2, 5))
    mask = torch.ones(2, 5)
    model = TwoInputs()
    captured = ir.capture(model, [ids, mask])
    assert captured.input_names == ("ids", "mask")
    mask = (torch.rand(2, 5) > 0.5).float()
    out, ref = captured.graph_module(ids, mask), model(ids, mask)
    assert isinstance(out, tuple) and len(out) == 2
    assert all(torch.equal(a, b) for a, b in zip(out, ref))


def test_capture_wrong_shape_is_a_capture_error_naming_the_shapes() -> None:
    with pytest.raises(CaptureError) as info:
        ir.capture(_model(), (torch.randn(1, 5, 6, 6),))
    message = str(info.value)
    assert "(1, 5, 6, 6) float32" in message
    assert "TinyResNet" in message
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("inputs", [3, None, (), (torch.randn(1, 3, 4, 4), 2.0), [torch.randn(1), "x"]])
def test_capture_non_tensor_inputs_are_a_config_error(inputs: object) -> None:
    with pytest.raises(ConfigError, match="example_inputs"):
        ir.capture(_model(), inputs)


def test_capture_non_module_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="nn.Module"):
        ir.capture(lambda x: x, (torch.randn(2),))  # type: ignore[arg-type]


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # branches on a tensor value: torch.export cannot trace this
            return self.fc(x)
        return -self.fc(x)


def test_capture_untraceable_model_explains_the_export_failure() -> None:
    with pytest.raises(CaptureError) as info:
        ir.capture(DataDependent(), (torch.randn(2, 4),))
    message = str(info.value)
    assert "torch.export failed" in message and "DataDependent" in message
    names_the_line = f"{Path(__file__).name}:" in message
    gives_a_fix = "Fix:" in message and "torch.cond" in message
    assert names_the_line or gives_a_fix, message
    assert info.value.__cause__ is not None


def test_to_module_is_trainable() -> None:
    captured = ir.capture(_model(), (torch.randn(2, 3, 5, 5),))
    module = ir.to_module(captured.graph_module)
    assert module is not captured.graph_module
    params = list(module.parameters())
    assert params and all(p.requires_grad for p in params)
    module.train()
    loss = module(torch.randn(2, 3, 5, 5)).square().sum()
    loss.backward()
    assert all(p.grad is not None for p in params)
    assert any(float(p.grad.abs().sum()) > 0 for p in params)
    before = [p.detach().clone() for p in params]
    torch.optim.SGD(params, lr=0.1).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    # The captured graph is not affected by training the copy.
    assert all(p.grad is None for p in captured.graph_module.parameters())
    frozen = ir.to_module(captured.graph_module, trainable=False)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_capture_accepts_keyword_inputs_in_forward_order() -> None:
    x = torch.randn(1, 3, 5, 5)
    for inputs in ({"x": x}, ((), {"x": x})):
        captured = ir.capture(_model(), inputs)
        assert captured.input_names == ("x",)
        torch.testing.assert_close(captured.graph_module(x), _model().eval()(x))


class TokenModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
        h = self.emb(ids) * scale
        return h if mask is None else h * mask.unsqueeze(-1)


def test_capture_orders_kwargs_by_the_signature_and_makes_batch_and_sequence_dynamic() -> None:
    ids = torch.randint(0, 10, (1, 6))
    mask = torch.ones(1, 6, dtype=torch.long)
    model = TokenModel()
    captured = ir.capture(model, {"mask": mask, "ids": ids})
    assert captured.input_names == ("ids", "mask")
    assert captured.dynamic["batch"] and captured.dynamic["seq"]
    assert ir.dynamic_dims(captured.graph_module) == ((0, 1), (0, 1))
    ids3, mask3 = torch.randint(0, 10, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    torch.testing.assert_close(captured.graph_module(ids3, mask3), model(ids3, mask=mask3))


def test_capture_kwarg_naming_no_parameter_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"no parameter 'idz'.*did you mean 'ids'"):
        ir.capture(TokenModel(), {"idz": torch.randint(0, 10, (1, 6))})


class BatchReshape(nn.Module):
    """Reshapes with its batch size, as Hugging Face EfficientNet's pooler does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return self.fc(y.reshape(x.shape[0], -1))


class PinnedBatch(BatchReshape):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)).reshape(1, -1))


def test_capture_batch_is_dynamic_by_default() -> None:
    captured = ir.capture(BatchReshape(), (torch.randn(1, 3, 8, 8),))
    assert captured.dynamic["batch"] and captured.dynamic["fallback"] is None
    assert ir.dynamic_dims(captured.graph_module) == ((0,),)
    assert captured.graph_module(torch.randn(16, 3, 8, 8)).shape == (16, 2)


def test_capture_falls_back_to_static_and_says_why() -> None:
    captured = ir.capture(PinnedBatch(), (torch.randn(1, 3, 8, 8),))
    assert not captured.dynamic["batch"]
    assert "batch not dynamic" in captured.dynamic["fallback"]
    assert ir.dynamic_dims(captured.graph_module) == ((),)
    assert captured.graph_module(torch.randn(1, 3, 8, 8)).shape == (1, 2)


def test_capture_static_when_asked() -> None:
    captured = ir.capture(BatchReshape(), (torch.randn(2, 3, 8, 8),), dynamic=False)
    assert ir.dynamic_dims(captured.graph_module) == ((),)


@pytest.mark.parametrize(("inputs", "message"), [
    ((torch.randn(0, 3, 8, 8),), r"example input 0 has shape \(0, 3, 8, 8\), which holds no values"),
    ((torch.full((1, 3, 8, 8), float("nan")),), "example input 0 of shape .* contains NaN or infinite values"),
    ((torch.full((1, 3, 8, 8), float("inf")),), "contains NaN or infinite values"),
])
def test_capture_refuses_empty_or_non_finite_inputs(inputs, message):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with pytest.raises(ConfigError, match=message):
        ir.capture(model, inputs)


def test_capture_refuses_non_finite_weights_naming_them():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = float("nan")
        model[1].bias[1] = float("-inf")
    with pytest.raises(ConfigError, match=r"parameters 0\.weight, 1\.bias of Sequential contain NaN or infinite"):
        ir.capture(model, (torch.randn(1, 3, 8, 8),))
    # the user's model is reported, not repaired
    assert torch.isnan(model[0].weight[0, 0, 0, 0])
