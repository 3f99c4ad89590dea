"""Block fusion: inverted residuals found by structure in channels-last Relax and compiled into one kernel each,
with outputs equal to torch and to the one-kernel-per-layer build."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm import relax  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from depthfold import zoo  # noqa: E402
from depthfold.backends import tvm as tvm_backend  # noqa: E402
from depthfold.backends.tvm import block_fusion, schedules  # noqa: E402

RTOL = 1e-4
X86 = tvm.target.Target(tvm_backend.target_dict("x86", mcpu="skylake-avx512"))


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


def _matched(model: nn.Module, x: torch.Tensor) -> list[block_fusion.InvertedResidual]:
    mod = from_exported_program(torch.export.export(model.eval(), (x,)), keep_params_as_input=False)
    with X86:
        mod = tvm.transform.Sequential(schedules.channels_last_passes() + [relax.transform.FoldConstant()])(mod)
    return block_fusion.match(mod["main"])


class Block(nn.Module):
    """An inverted residual written here, with the knobs the matcher must follow: expansion (or none), kernel
    size, stride, conv biases, activation, and an optional residual."""

    def __init__(self, cin: int, cout: int, *, expand: int, kernel: int, stride: int, bias: bool,
                 act: type[nn.Module], residual: bool) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=bias), nn.BatchNorm2d(hidden), act()]
        layers += [nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=bias),
                   nn.BatchNorm2d(hidden), act(), nn.Conv2d(hidden, cout, 1, bias=bias), nn.BatchNorm2d(cout)]
        self.body = nn.Sequential(*layers)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x) if self.residual else self.body(x)


def _randomise_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


CASES = {
    "relu6_residual": dict(cin=16, cout=16, expand=6, kernel=3, stride=1, bias=False, act=nn.ReLU6, residual=True),
    "stride2_k5_bias_relu": dict(cin=8, cout=24, expand=4, kernel=5, stride=2, bias=True, act=nn.ReLU,
                                 residual=False),
    "no_expand": dict(cin=24, cout=16, expand=1, kernel=3, stride=1, bias=False, act=nn.ReLU6, residual=False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hand_written_block_is_fused_and_matches_torch(case: str) -> None:
    torch.manual_seed(0)
    cfg = CASES[case]
    model = _randomise_bn(nn.Sequential(nn.Conv2d(3, cfg["cin"], 3, padding=1), nn.ReLU(), Block(**cfg)))
    x = torch.randn(2, 3, 14, 14)  # batch 2; 14 columns: pixel tiles that are not powers of two
    blocks = _matched(model, x)
    assert len(blocks) == 1
    (b,) = blocks
    assert (b.expand is not None) == (cfg["expand"] != 1)
    assert (b.kernel, b.stride, b.residual) == (cfg["kernel"], cfg["stride"], cfg["residual"])
    assert b.depthwise.high == (6.0 if cfg["act"] is nn.ReLU6 else None) and b.depthwise.low == 0.0
    assert b.project.low is None and b.project.high is None  # the projection is linear
    with torch.no_grad():
        ref = model(x).numpy()
    fused = tvm_backend.build(model, (x,), "x86")
    per_layer = tvm_backend.build(model, (x,), "x86", schedules="per_layer")
    got = tvm_backend.run(fused, (x,))[0]
    assert _rel_err(got, ref) <= RTOL
    assert _rel_err(got, tvm_backend.run(per_layer, (x,))[0]) <= RTOL


def _workspace(source: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    ring = re.search(r"E = T.decl_buffer\(\(([\d, ]+)\)", source)
    rows = re.search(r"D = T.decl_buffer\(\(([\d, ]+)\)", source)
    assert ring and rows
    return tuple(int(d) for d in ring.group(1).split(", ")), tuple(int(d) for d in rows.group(1).split(", "))


@pytest.mark.parametrize(("size", "stride", "step"), [(112, 1, 4), (112, 2, 4), (28, 1, 14), (7, 1, 7)])
def test_kernel_streams_rows_through_a_ring(size: int, stride: int, step: int) -> None:
    """One kernel per block: each step's output rows need a ring of (rows - 1) x stride + K expanded rows and
    the step's depthwise rows; a step takes as many rows as fit the workspace (large maps stream a few rows at a
    time; a 7x7 map is one step, so its weights are read once)."""
    model = _randomise_bn(Block(16, 16, expand=6, kernel=3, stride=stride, bias=False, act=nn.ReLU6,
                                residual=stride == 1))
    (b,) = _matched(model, torch.randn(1, 16, size, size))
    source, _ = block_fusion.kernel_source(b, schedules.VectorUnit.of(X86))
    (ring, width, hidden), (rows, out_width, hidden_d) = _workspace(source)
    out = (size - 1) // stride + 1
    assert (hidden, hidden_d, out_width) == (96, 96, out) and width >= size + 1
    assert rows == step and ring == (rows - 1) * stride + 3
    assert 4 * hidden * (ring * width + rows * out_width) <= block_fusion.WORKSPACE_BYTES
    assert "T.parallel(1)" in source  # one core: one band of rows
    assert source.count("T.vectorized(") >= 6


def test_kernel_bands_and_folds_batchnorm_into_relaid_weights() -> None:
    """With more cores the rows are cut into parallel bands with a ring each; BatchNorm's scale is folded into
    the expand weights, relaid as [hidden tiles, in, tile]."""
    torch.manual_seed(0)
    model = _randomise_bn(Block(16, 16, expand=6, kernel=3, stride=1, bias=False, act=nn.ReLU6, residual=True))
    (b,) = _matched(model, torch.randn(1, 16, 28, 28))
    unit = schedules.VectorUnit.of(X86)
    banded, consts = block_fusion.kernel_source(b, unit, cores=4)
    assert "T.parallel(4)" in banded  # 4 bands of 7 rows
    assert _workspace(banded)[1][0] == 7
    w1 = consts[0]  # [hidden tiles, in, tile]
    bn = model.body[1]
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    dense = model.body[0].weight.detach().numpy()[:, :, 0, 0].T * scale  # [in, hidden]
    tile = w1.shape[2]
    assert np.allclose(w1.transpose(1, 0, 2).reshape(16, 96), dense, rtol=1e-5, atol=1e-6)
    assert 96 % tile == 0


def test_shared_intermediates_are_not_fused() -> None:
    """A block whose expanded map is also read elsewhere keeps its layers apart (the map must exist)."""

    class Tapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand = nn.Sequential(nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
            self.rest = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=32, bias=False), nn.BatchNorm2d(32),
                                      nn.ReLU6(), nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            expanded = self.expand(x)
            return x + self.rest(expanded), expanded.mean(dim=(2, 3))

    torch.manual_seed(0)
    model = _randomise_bn(Tapped())
    x = torch.randn(1, 8, 10, 10)
    (b,) = _matched(model, x)  # depthwise + projection only: the expanded map is an output too
    assert b.expand is None and not b.residual
    with torch.no_grad():
        ref = [t.numpy() for t in model(x)]
    got = tvm_backend.run(tvm_backend.build(model, (x,), "x86"), (x,))
    for g, r in zip(got, ref):
        assert _rel_err(g, r) <= RTOL


def test_zoo_mobilenetv2_fuses_every_inverted_residual() -> None:
    model, x = zoo.create("mobilenetv2_100", num_classes=10), torch.randn(1, 3, 32, 32)
    blocks = _matched(model, x)
    assert len(blocks) == 17  # every inverted residual, the first (no expansion) included
    assert sum(b.residual for b in blocks) == 10 and sum(b.stride == 2 for b in blocks) == 4
    assert sum(b.expand is None for b in blocks) == 1
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    assert _rel_err(tvm_backend.run(tvm_backend.build(model, (x,), "x86"), (x,))[0], ref) <= RTOL


@pytest.mark.parametrize("tf_padding", [False, True])
def test_hf_mobilenetv2_blocks_are_fused(tf_padding: bool) -> None:
    """transformers' MobileNetV2: plain padding fuses whole blocks; TF padding (an explicit pad op before each
    depthwise conv) leaves the expand apart and fuses depthwise + projection."""
    model = zoo.hf_vision("mobilenetv2_tf_padding" if tf_padding else "mobilenetv2", image_size=32)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    blocks = _matched(model, x)
    assert len(blocks) >= 10
    if not tf_padding:
        assert sum(b.expand is not None for b in blocks) == len(blocks) - 1
    with torch.no_grad():
        ref = model(x)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    assert _rel_err(tvm_backend.run(tvm_backend.build(model, (x,), "x86"), (x,))[0], ref.numpy()) <= RTOL
