"""ONNX Runtime sessions: fixed threading, input checking, devices, profiling, the Backend protocol."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from depthfold.backends import (
    OrtBackend,
    Target,
    available_providers,
    create_session,
    default_device,
    measure,
    run,
)
from depthfold.backends.base import host_arch
from depthfold.backends.ort import (
    LAYOUT_OPS,
    last_level_cache_bytes,
    measure_kernels,
    session_device,
    session_threads,
)
from depthfold.errors import ArtifactError, BackendUnavailableError, ConfigError

HAS_CUDA_EP = "CUDAExecutionProvider" in available_providers()


def test_create_session_fixes_threads_and_sequential_execution(exported) -> None:
    import onnxruntime as ort

    session = create_session(exported.artifact.path, threads=2, graph_optimization="basic")
    opts = session.get_session_options()
    assert opts.intra_op_num_threads == 2 and session_threads(session) == 2
    assert opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert session.get_providers() == ["CPUExecutionProvider"] and session_device(session) == "cpu"


@pytest.mark.parametrize("kind", ["path", "str", "bytes", "proto"])
def test_create_session_accepts_every_model_form(exported, kind: str) -> None:
    path = exported.artifact.path
    model = {"path": path, "str": str(path), "bytes": path.read_bytes(), "proto": onnx.load(str(path))}[kind]
    (out,) = run(create_session(model), [exported.x])
    with torch.no_grad():
        np.testing.assert_allclose(out, exported.gm(exported.x).numpy(), rtol=1e-4, atol=1e-5)


def test_run_wrong_shape_names_input_and_both_shapes(exported) -> None:
    session = create_session(exported.artifact.path)
    with pytest.raises(ConfigError) as info:
        run(session, [torch.randn(1, 3, 9, 9)])
    msg = str(info.value)
    assert "'x'" in msg and "[2, 3, 8, 8]" in msg and "[1, 3, 9, 9]" in msg


def test_run_wrong_dtype_and_count(exported) -> None:
    session = create_session(exported.artifact.path)
    with pytest.raises(ConfigError, match=r"'x'.*float32.*float64"):
        run(session, [exported.x.double()])
    with pytest.raises(ConfigError, match=r"takes 1 input\(s\) \['x'\], got 2"):
        run(session, [exported.x, exported.x])
    # NumPy arrays are accepted as they are.
    (out,) = run(session, [exported.x.numpy()])
    assert out.shape == (2, 10)


def test_create_session_rejects_bad_settings(exported, tmp_path) -> None:
    path = exported.artifact.path
    with pytest.raises(ConfigError, match="did you mean 'extended'"):
        create_session(path, graph_optimization="extend")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="threads"):
        create_session(path, threads=0)
    with pytest.raises(ConfigError, match="did you mean 'cuda'"):
        create_session(path, device="cude")
    with pytest.raises(ArtifactError, match="does not exist"):
        create_session(tmp_path / "missing.onnx")
    with pytest.raises(ArtifactError, match="cannot load"):
        create_session(b"not an onnx model")


@pytest.mark.skipif(HAS_CUDA_EP, reason="CUDAExecutionProvider is present; the missing-EP error cannot happen")
def test_create_session_cuda_without_ep_names_the_package(exported) -> None:
    assert default_device() == "cpu"
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        create_session(exported.artifact.path, device="cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_EP, reason="needs onnxruntime-gpu's CUDAExecutionProvider")
def test_cuda_session_runs_model(exported) -> None:
    assert default_device() == "cuda"
    session = create_session(exported.artifact.path, device="cuda")
    assert session_device(session) == "cuda"
    (out,) = run(session, [exported.x])
    with torch.no_grad():
        np.testing.assert_allclose(out, exported.gm(exported.x).numpy(), rtol=1e-3, atol=1e-4)
    m = measure(session, [exported.x], warmup=1, repeat=3)
    assert m.device == "cuda" and m.n == 3


def test_profile_dir_receives_ort_trace(exported, tmp_path) -> None:
    session = create_session(exported.artifact.path, profile_dir=tmp_path / "prof")
    run(session, [exported.x])
    trace = session.end_profiling()
    files = list((tmp_path / "prof").iterdir())
    assert len(files) == 1 and files[0].name == trace.split("/")[-1]
    events = json.loads(files[0].read_text())
    assert any(e.get("cat") == "Node" for e in events)


def test_measure_records_settings(exported) -> None:
    session = create_session(exported.artifact.path, threads=1)
    m = measure(session, [exported.x], warmup=2, repeat=7)
    assert m.n == 7 and m.warmup == 2 and m.threads == 1
    assert m.backend == "onnxruntime" and m.device == "cpu"
    assert all(s > 0 for s in m.samples_ms)
    with pytest.raises(ConfigError, match="repeat"):
        measure(session, [exported.x], repeat=0)


def test_measure_kernels_sums_each_runs_kernels_without_the_excluded_ops(exported) -> None:
    model = onnx.load(exported.artifact.path)
    m = measure_kernels(model, [exported.x], warmup=2, repeat=6)
    assert m.n == 6 and m.warmup == 2 and m.threads == 1 and m.backend == "onnxruntime"
    assert all(s > 0 for s in m.samples_ms)
    everything = {*LAYOUT_OPS, *(n.op_type for n in model.graph.node), "FusedConv", "FusedGemm"}  # after ORT's fusions
    silent = measure_kernels(model, [exported.x], warmup=0, repeat=3, exclude=tuple(everything))
    assert silent.samples_ms == (0.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="repeat"):
        measure_kernels(model, [exported.x], repeat=0)
    cold = measure_kernels(model, [exported.x], warmup=1, repeat=4, flush_bytes=1 << 20)
    assert cold.n == 4 and all(s > 0 for s in cold.samples_ms)


def test_last_level_cache_bytes_reads_the_largest_cache() -> None:
    from pathlib import Path

    sizes = [p.read_text().strip() for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")]
    found = last_level_cache_bytes(default=12345)
    assert found == 12345 if not sizes else found >= 32 << 10


def test_probe_times_layers_by_their_kernels_on_ort_cpu_only() -> None:
    from depthfold.backends import LatencyProbe

    probe = LatencyProbe(warmup=1, repeat=3)
    assert probe.layer_scope == "kernels" and probe.fingerprint()["layer_scope"] == "kernels"
    assert probe.cache_bytes == last_level_cache_bytes()
    assert LatencyProbe(backend="tvm").layer_scope == "end_to_end"
    assert LatencyProbe(target="cuda").layer_scope == "end_to_end"


def test_ort_backend_round_trip(captured, tmp_path) -> None:
    gm, x = captured
    backend = OrtBackend(threads=1, warmup=0, repeat=2)
    artifact = backend.export(gm, (x,), tmp_path)
    assert artifact.path == tmp_path / "model.onnx" and artifact.max_rel_error is not None
    for source in (artifact, artifact.path, gm):
        (out,) = backend.run(backend.compile(source, (x,)), [x])
        with torch.no_grad():
            np.testing.assert_allclose(out, gm(x).numpy(), rtol=1e-4, atol=1e-5)
    assert backend.measure(artifact, [x]).n == 2
    other = "aarch64" if host_arch() == "x86" else "x86"
    with pytest.raises(BackendUnavailableError, match="tvm"):
        OrtBackend(Target(arch=other))  # type: ignore[arg-type]


def test_target_validates_fields() -> None:
    assert str(Target()) == "x86-cpu"
    with pytest.raises(ConfigError, match="did you mean 'x86'"):
        Target(arch="x86_64")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="did you mean 'cuda'"):
        Target(device="gpu_cuda")  # type: ignore[arg-type]


def test_probe_speedup_times_both_models_interleaved(captured) -> None:
    from depthfold.backends import LatencyProbe

    gm, x = captured
    result = LatencyProbe(warmup=1, repeat=3).speedup(gm, gm, (x,), rounds=4)
    assert result["rounds"] == 4
    assert 0 < result["p10"] <= result["median"] <= result["p90"]
    assert result["reference_ms"] > 0 and result["candidate_ms"] > 0


def test_remote_speedup_alternates_whole_measurements() -> None:
    from depthfold.backends import Measurement, TvmBackend

    calls: list[str] = []

    def scripted(model, inputs):  # type: ignore[no-untyped-def]
        """Reference 6 ms, candidate 2 ms, but the machine slows down 1.5x every call."""
        calls.append(model)
        ms = {"ref": 6.0, "cand": 2.0}[model] * 1.5 ** len(calls)
        return Measurement(samples_ms=(ms,), warmup=0, threads=1, backend="tvm", device="cpu")

    backend = TvmBackend("x86", remote="127.0.0.1:9")  # timed over RPC: no call can be timed from here
    backend.measure = scripted  # type: ignore[method-assign]
    result = backend.speedup("ref", "cand", (), rounds=4)
    assert calls == ["ref", "cand", "cand", "ref", "ref", "cand", "cand", "ref"]
    # Rounds alternate the order, so drift inflates half the ratios and deflates the other half alike.
    assert (result["p10"], result["p90"]) == pytest.approx((2.0, 4.5))
    assert result["median"] == pytest.approx((3.0 / 1.5 + 3.0 * 1.5) / 2)
