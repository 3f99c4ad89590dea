"""measure_latency: one helper for whole models and single layers, on onnxruntime and torch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthfold.backends import BACKENDS, available_providers, measure_latency, to_onnx_model
from depthfold.errors import BackendUnavailableError, ConfigError


def test_measure_latency_whole_model_onnxruntime(captured) -> None:
    gm, x = captured
    m = measure_latency(gm, (x,), warmup=2, repeat=20)
    assert m.n == 20 and len(m.samples_ms) == 20 and m.warmup == 2
    assert m.threads == 1 and m.backend == "onnxruntime" and m.device == "cpu"
    assert all(s > 0 for s in m.samples_ms)
    assert m.min_ms <= m.median_ms <= m.p90_ms


def test_measure_latency_single_conv_layer_on_both_backends() -> None:
    layer = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(1, 16, 14, 14)
    ort_m = measure_latency(layer, (x,), backend="ort", threads=2, warmup=1, repeat=5)
    assert ort_m.n == 5 and ort_m.threads == 2 and ort_m.backend == "onnxruntime"

    before = torch.get_num_threads()
    torch_m = measure_latency(layer, (x,), backend="torch", threads=1, warmup=1, repeat=6)
    assert torch_m.n == 6 and torch_m.threads == 1 and torch_m.backend == "torch" and torch_m.device == "cpu"
    assert torch.get_num_threads() == before  # restored
    assert layer.weight.device.type == "cpu" and layer.training  # the caller's layer is untouched


def test_measure_latency_onnx_path_and_proto(exported) -> None:
    m = measure_latency(exported.artifact.path, (exported.x,), warmup=0, repeat=3)
    assert m.n == 3 and m.backend == "onnxruntime"
    proto = to_onnx_model(exported.gm, (exported.x,))
    assert measure_latency(proto, (exported.x,), repeat=2, graph_optimization="disable").n == 2


def test_measure_latency_unknown_backend_suggests_name(captured) -> None:
    gm, x = captured
    with pytest.raises(ConfigError, match="did you mean 'onnxruntime'") as info:
        measure_latency(gm, (x,), backend="onnxrutime")
    for known in BACKENDS:
        assert known in str(info.value)


def test_measure_latency_rejects_bad_arguments(exported) -> None:
    with pytest.raises(ConfigError, match="repeat"):
        measure_latency(exported.gm, (exported.x,), repeat=0)
    with pytest.raises(ConfigError, match="backend=.torch. runs an nn.Module"):
        measure_latency(exported.artifact.path, (exported.x,), backend="torch")
    with pytest.raises(ConfigError, match="threads"):
        measure_latency(exported.artifact.path, (exported.x,), threads=0)


@pytest.mark.skipif("CUDAExecutionProvider" in available_providers(),
                    reason="CUDAExecutionProvider is present; the missing-EP error cannot happen")
def test_measure_latency_cuda_without_gpu_is_unavailable(captured) -> None:
    gm, x = captured
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        measure_latency(gm, (x,), device="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_measure_latency_torch_cuda_without_gpu_is_unavailable() -> None:
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        measure_latency(nn.Linear(2, 2), (torch.randn(1, 2),), backend="torch", device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of PyTorch and a GPU")
def test_measure_latency_torch_cuda() -> None:
    layer = nn.Linear(64, 64)
    m = measure_latency(layer, (torch.randn(8, 64),), backend="torch", device="cuda", repeat=3)
    assert m.device == "cuda" and m.n == 3 and layer.weight.device.type == "cpu"
