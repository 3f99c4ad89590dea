"""depthfold's default TVM CPU schedules: channels-last layout, register tiles sized from the vector unit,
every reduction kernel scheduled, outputs equal to torch on architectures nobody here wrote."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("tvm")

import tvm  # noqa: E402
from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: E402
from tvm.relax.frontend.torch import from_exported_program  # noqa: E402

from depthfold import zoo  # noqa: E402
from depthfold.backends import tvm as tvm_backend  # noqa: E402
from depthfold.backends.tvm import schedules  # noqa: E402

RTOL = 1e-4
AVX512 = schedules.VectorUnit(lanes=16, registers=32, channel_vectors=2)
NEON = schedules.VectorUnit(lanes=4, registers=32, channel_vectors=4)
AVX2 = schedules.VectorUnit(lanes=8, registers=16, channel_vectors=2)


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max()))


def _relax(model: nn.Module, x: torch.Tensor):  # type: ignore[no-untyped-def]
    return from_exported_program(torch.export.export(model.eval(), (x,)), keep_params_as_input=False)


def test_tiles_follow_the_vector_unit_and_divide_the_shape() -> None:
    assert schedules.choose_tile(64, 56, AVX512) == (8, 32)  # 8 pixels x 2 zmm registers of channels
    assert schedules.choose_tile(64, 56, NEON) == (4, 16)  # 4 pixels x 4 q registers
    assert schedules.choose_tile(64, 56, AVX2) == (4, 16)  # 12 accumulators of 16 registers: 6 rows fit, 4 divide
    assert schedules.choose_tile(24, 112, AVX512) == (16, 8)  # no multiple of 16 divides 24: one 8-lane piece
    assert schedules.choose_tile(144, 56, AVX512) == (14, 16)  # 32 does not divide 144: one vector, more rows
    assert schedules.choose_tile(96, 7, AVX512) == (7, 32)
    assert schedules.choose_tile(1280, 1, AVX512) == (1, 64)  # a matrix-vector product widens the channel tile
    for unit in (AVX512, NEON, AVX2):
        for c, p in ((3, 5), (17, 13), (320, 14), (1280, 1)):
            pt, ct = schedules.choose_tile(c, p, unit)
            assert c % ct == 0 and p % pt == 0
            assert ct % unit.lanes == 0 or (ct < unit.lanes and unit.lanes % ct == 0)  # whole vectors or one piece
            assert pt * -(-ct // unit.lanes) <= unit.accumulators


def test_vector_unit_is_read_from_the_target() -> None:
    arm = schedules.VectorUnit.of(tvm.target.Target(tvm_backend.target_dict("aarch64")))
    assert (arm.lanes, arm.registers) == (4, 32)
    avx512 = schedules.VectorUnit.of(tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"}))
    assert avx512.lanes == 16
    avx2 = schedules.VectorUnit.of(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))
    assert (avx2.lanes, avx2.registers) == (8, 16)


def _legalized(model: nn.Module, x: torch.Tensor, target):  # type: ignore[no-untyped-def]
    with target:
        return tvm.transform.Sequential(schedules.channels_last_passes() + cpu.legalize_passes(target))(
            _relax(model, x))


def test_channels_last_keeps_transposes_at_the_edges_of_a_relu6_network() -> None:
    model, x = zoo.create("mobilenetv2_100", num_classes=10), torch.randn(1, 3, 32, 32)
    converted = tvm.transform.Sequential(schedules.channels_last_passes())(_relax(model, x))
    text = converted["main"].script(show_meta=False)
    assert "R.clip(" not in text  # ReLU6 became maximum/minimum, which follow any layout
    assert 'data_layout="NHWC"' in text
    mod = _legalized(model, x, tvm.target.Target(tvm_backend.target_dict("x86", mcpu="skylake-avx512")))
    calls = re.findall(r"R\.call_tir\((?:cls\.)?(\w+)", mod["main"].script(show_meta=False))
    # weight and BatchNorm-parameter permutes fold into constants; on activations: the input, and at most one
    # more before the classifier's flatten (possibly fused into the pooling kernel)
    assert calls[0] == "transpose" and sum("transpose" in c for c in calls) <= 2, calls
    relu6_in_conv = [c for c in calls if "conv2d" in c and re.search(r"maximum\d*_minimum", c)]
    assert len(relu6_in_conv) == 35  # every ReLU6 in its conv's epilogue
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    assert _rel_err(tvm_backend.run(tvm_backend.build(model, (x,), "x86"), (x,))[0], ref) <= RTOL


def test_every_reduction_kernel_gets_a_register_tile() -> None:
    """Convs (dense, depthwise, strided), pools, the mean and the classifier: each fused kernel with one
    reduction is tiled, with a vectorised channel loop and the epilogue in the write-back."""
    model, x = zoo.create("mobilenetv2_100", num_classes=10), torch.randn(1, 3, 32, 32)
    target = tvm.target.Target(tvm_backend.target_dict("x86", mcpu="skylake-avx512"))
    mod = _legalized(model, x, target)
    rule = schedules.register_tiled(schedules.VectorUnit.of(target))
    reductions = 0
    for gv, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or "conv2d" not in gv.name_hint and "matmul" not in gv.name_hint:
            continue
        reductions += 1
        sch = rule.apply(func, target, False)
        assert sch is not None, gv.name_hint
        text = sch.mod["main"].script()
        assert "T.vectorized(" in text, gv.name_hint
        assert "T.parallel(" in text or "matmul" in gv.name_hint, gv.name_hint  # a 1x10 classifier is one tile
        assert re.search(r"_local\b|\"local\"", text), gv.name_hint  # accumulators live in a local tile
    assert reductions >= 25  # distinct conv shapes of MobileNetV2 (equal kernels are deduplicated) + the linear


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.HF_VISION_MODELS))
def test_default_schedules_match_torch_on_hf_vision(name: str) -> None:
    model = zoo.hf_vision(name, image_size=32)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    compiled = tvm_backend.build(model, (x,), "x86")
    assert compiled.schedules == "depthfold"
    with torch.no_grad():
        ref = model(x)
    ref = ref if isinstance(ref, torch.Tensor) else ref[0]
    assert _rel_err(tvm_backend.run(compiled, (x,))[0], ref.numpy()) <= RTOL


def test_default_and_stock_schedules_agree_and_artifact_reports_efficiency(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 24, 1), nn.Hardtanh(-1, 2),
                          nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 7)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 20, 20)
    art = tvm_backend.compile(model, (x,), "x86", out_dir=tmp_path / "default")
    stock = tvm_backend.build(model, (x,), "x86", schedules="tvm")
    got = tvm_backend.run(art, (x,))[0]
    assert _rel_err(got, tvm_backend.run(stock, (x,))[0]) <= RTOL
    assert art.meta["schedules"] == "depthfold" and art.meta["verification"]["max_rel_error"] <= RTOL
    eff = art.meta["efficiency"]
    flops = 2 * (16 * 3 * 9 * 400 + 16 * 9 * 400 + 24 * 16 * 400 + 24 * 7)  # MACs x 2 of the convs and the linear
    assert eff["gflop"] * 1e9 == pytest.approx(flops, rel=0.01)
    assert eff["gflops"] > 0 and eff["peak_gflops"] > 0
    assert eff["fraction_of_peak"] == pytest.approx(eff["gflops"] / eff["peak_gflops"])


def test_small_maps_with_large_weights_reduce_in_l1_sized_blocks() -> None:
    """Where the weights outweigh the activations (7x7 maps, 512 channels), the reduction over input channels
    is cut into blocks whose weights for one channel tile fit L1, each applied to every pixel; large maps and
    short reductions keep the plain register tile. Outputs still equal torch's."""
    rule = schedules.register_tiled(AVX512)
    block = rule._weight_block([1, 7, 7, 512, 3, 3, 512], 4, 32)
    assert block is not None and 512 % block == 0 and 4 * 9 * block * 32 <= schedules.L1_WEIGHT_BYTES
    assert rule._weight_block([1, 56, 56, 64, 3, 3, 64], 4, 32) is None  # accumulators for 3136 pixels: too many
    assert rule._weight_block([1, 7, 7, 64, 3, 3, 3], 4, 32) is None  # the whole reduction fits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.BatchNorm2d(256), nn.ReLU(),
                          nn.Conv2d(256, 128, 1)).eval()
    with torch.no_grad():
        model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(1, 256, 7, 7)
    with torch.no_grad():
        ref = model(x).numpy()
    assert _rel_err(tvm_backend.run(tvm_backend.build(model, (x,), "x86"), (x,))[0], ref) <= RTOL
