"""Node classification on captured graphs: conv geometry, identities, inference-mode batch norms."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthfold import ir
from depthfold.ir import ops


def _nodes(model: nn.Module, x: torch.Tensor) -> list[torch.fx.Node]:
    gm = ir.capture(model.eval(), (x,)).graph_module
    return [n for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("kwargs, padding, padded", [
    ({"kernel_size": 3}, (0, 0), False),
    ({"kernel_size": 3, "padding": 1}, (1, 1), True),
    ({"kernel_size": (3, 5), "padding": (1, 2)}, (1, 2), True),
    ({"kernel_size": 3, "padding": "same"}, (1, 1), True),
    ({"kernel_size": 1, "padding": "same"}, (0, 0), False),
    ({"kernel_size": 3, "padding": "valid"}, (0, 0), False),
    ({"kernel_size": 2, "padding": "same"}, "same", True),  # asymmetric: stays a string
    ({"kernel_size": 3, "padding": "same", "dilation": 2}, (2, 2), True),
])
def test_ops_conv_params_normalises_padding(kwargs: dict, padding: object, padded: bool) -> None:
    (conv,) = _nodes(nn.Conv2d(2, 2, **kwargs), torch.randn(1, 2, 8, 8))
    assert ops.is_conv(conv) and ops.kind_of(conv) == "conv" and ops.spatial_dims(conv) == 2
    params = ops.conv_params(conv)
    assert params.padding == padding and params.padded == padded
    assert params.stride == (1, 1) and params.groups == 1


def test_ops_conv_params_reads_stride_dilation_groups() -> None:
    (conv,) = _nodes(nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2, bias=False),
                     torch.randn(1, 4, 12))
    params = ops.conv_params(conv)
    assert (params.stride, params.padding, params.dilation, params.groups) == ((2,), (1,), (2,), 2)
    assert params.bias is None and ops.is_stored(params.weight)
    assert ops.spatial_dims(conv) == 1


def test_ops_identities_and_kinds() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5), nn.ReLU(), nn.BatchNorm1d(3))
    nodes = _nodes(model, torch.randn(2, 3))
    assert [ops.kind_of(n) for n in nodes] == ["linear", "identity", "activation", "batch_norm"]


def test_ops_batch_norm_without_running_stats_is_not_inference_mode() -> None:
    # track_running_stats=False normalises with batch statistics even in eval(): not an affine map.
    (bn,) = _nodes(nn.BatchNorm2d(3, track_running_stats=False), torch.randn(2, 3, 4, 4))
    assert not ops.is_batch_norm(bn)
    assert ops.kind_of(bn) == "other"


def test_ops_residual_add_is_not_a_bias_add() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("offset", torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(x)
            return (x + y) + self.offset + 1.0

    adds = [n for n in _nodes(M(), torch.randn(3)) if "add" in str(n.target)]
    assert [ops.is_residual_add(n) for n in adds] == [True, False, False]
