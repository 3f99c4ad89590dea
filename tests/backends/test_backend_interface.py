"""One Backend interface (ONNX Runtime, TVM, eager torch) and one Target vocabulary."""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import pytest
import torch

from depthfold.backends import (
    BACKENDS,
    Backend,
    LatencyProbe,
    OrtBackend,
    Target,
    TorchBackend,
    TvmBackend,
    export_onnx,
    get_backend,
    host_arch,
    to_onnx_model,
)
from depthfold.errors import ArtifactError, BackendUnavailableError, ConfigError, VerificationError
from depthfold.passes.layermerge.latency_table import LayerSpec

HOST = host_arch()


@pytest.mark.parametrize(("spec", "device", "want"), [
    ("x86", None, Target("x86", "cpu")),
    ("aarch64", None, Target("aarch64", "cpu")),
    ("aarch64-cuda", None, Target("aarch64", "cuda")),
    ("cuda", None, Target(HOST, "cuda")),  # type: ignore[arg-type]
    ("cpu", None, Target(HOST, "cpu")),  # type: ignore[arg-type]
    (None, "cuda", Target(HOST, "cuda")),  # type: ignore[arg-type]
    (None, None, Target(HOST, "cpu")),  # type: ignore[arg-type]
    (" X86-CPU ", "cpu", Target("x86", "cpu")),
    (Target("aarch64"), None, Target("aarch64", "cpu")),
])
def test_target_parse_reads_every_spelling(spec, device, want) -> None:
    got = Target.parse(spec, device=device)
    assert got == want and Target.parse(str(got)) == got


def test_target_parse_refusals_say_what_to_write() -> None:
    with pytest.raises(ConfigError, match="unknown target 'arm64'; known: .*aarch64"):
        Target.parse("arm64")
    with pytest.raises(ConfigError, match="did you mean 'x86-cuda'"):
        Target.parse("x86-cdua")
    with pytest.raises(ConfigError, match="runs on cpu, but device='cuda' .*target='x86-cuda'"):
        Target.parse("x86", device="cuda")
    with pytest.raises(ConfigError, match="a Target or a string"):
        Target.parse(86)  # type: ignore[arg-type]


def test_registry_holds_one_class_per_backend() -> None:
    assert BACKENDS == {"onnxruntime": OrtBackend, "tvm": TvmBackend, "torch": TorchBackend}
    assert all(issubclass(cls, Backend) for cls in BACKENDS.values())
    assert isinstance(get_backend("ort"), OrtBackend)
    with pytest.raises(ConfigError, match="unknown backend 'tmv'.*did you mean 'tvm'"):
        get_backend("tmv")
    with pytest.raises(ConfigError, match="backend 'onnxruntime' has no option 'remote'"):
        get_backend("onnxruntime", remote="127.0.0.1:9090")
    with pytest.raises(ConfigError, match="no option 'tagret'.*did you mean 'target'"):
        get_backend("tvm", tagret="x86")
    with pytest.raises(ConfigError, match="threads"):
        get_backend("torch", threads=0)
    with pytest.raises(ConfigError, match="graph_optimization"):
        get_backend("onnxruntime", graph_optimization="most")
    with pytest.raises(ConfigError, match="x86 host only"):
        get_backend("tvm", "aarch64-cuda")


def _local_backends() -> list[Backend]:
    backends: list[Backend] = [OrtBackend(warmup=1, repeat=3), TorchBackend(warmup=1, repeat=3)]
    try:
        import tvm  # noqa: F401

        backends.append(TvmBackend(warmup=1, repeat=3))
    except ImportError:
        pass
    return backends


@pytest.mark.parametrize("backend", _local_backends(), ids=lambda b: b.name)
def test_every_backend_compiles_runs_measures_compares_and_exports(backend: Backend, captured, tmp_path) -> None:
    gm, x = captured
    compiled = backend.compile(gm, (x,))
    (out,) = backend.run(compiled, (x,))
    with torch.no_grad():
        np.testing.assert_allclose(out, gm(x).numpy(), rtol=1e-4, atol=1e-4)
    m = backend.measure(gm, (x,))
    assert (m.n, m.warmup, m.backend, m.device, m.threads) == (3, 1, backend.name, "cpu", 1)
    result = backend.compare({"a": gm, "b": gm}, (x,), rounds=3)
    assert set(result["measurements"]) == {"a", "b"} and len(result["ratios"]["b"]["samples"]) == 3
    assert result["ratios"]["a"]["median"] == 1.0  # the baseline against itself
    fp = backend.fingerprint()
    assert fp["backend"] == backend.name and fp["target"] == f"{HOST}-cpu" and fp["threads"] == 1
    assert fp["versions"]["onnx"] is not None
    art = backend.export(gm, (x,), tmp_path / "out")
    assert (tmp_path / "out").is_dir() and any((tmp_path / "out").iterdir())
    (again,) = backend.run(backend.compile(art, (x,)), (x,)) if backend.name != "torch" else (out,)
    np.testing.assert_allclose(again, out, rtol=1e-4, atol=1e-4)


def test_torch_export_artifact_loads_back(captured, tmp_path) -> None:
    gm, x = captured
    path = TorchBackend().export(gm, (x,), tmp_path)
    loaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x))


def test_fingerprints_name_what_timings_depend_on() -> None:
    ort1, ort4 = OrtBackend(threads=1).fingerprint(), OrtBackend(threads=4).fingerprint()
    assert ort1 != ort4 and ort1["layer_scope"] == "kernels" and "onnxruntime" in ort1["versions"]
    tvm_fp = TvmBackend("aarch64", mcpu="cortex-a72").fingerprint()
    assert tvm_fp["target"] == "aarch64-cpu" and ["mcpu", "cortex-a72"] in tvm_fp["options"]
    assert tvm_fp["layer_scope"] == "end_to_end" and "apache-tvm" in tvm_fp["versions"]


def _layer() -> LayerSpec:
    return LayerSpec((1, 8, 12, 12), (("conv", 8, 3, 3, 1, 1, 1, 1, 1), ("add", (1, 8, 12, 12), ()),
                                      ("act", "hardtanh.default", (0.0, 6.0))))


def test_a_layer_is_an_fx_graph_the_backend_lowers_itself(monkeypatch) -> None:
    import depthfold.backends.onnx as onnx_backend

    spec = _layer()
    layer, inputs = spec.to_graph(), spec.example_inputs()
    with torch.no_grad():
        ref = layer(*inputs)
    assert torch.equal(ref, torch.clamp(torch.nn.functional.conv2d(inputs[0], layer.w0, layer.b0, padding=1)
                                        + inputs[1], 0.0, 6.0))
    lowered: list[str] = []
    real = onnx_backend._run_torchscript
    monkeypatch.setattr(onnx_backend, "_run_torchscript",
                        lambda *a: lowered.append("x") or real(*a))  # type: ignore[func-returns-value]
    monkeypatch.setattr(onnx_backend, "_EXPORTS", type(onnx_backend._EXPORTS)())
    backend = OrtBackend(warmup=1, repeat=3)
    for cold in (False, True):
        m = backend.measure_layer(layer, inputs, cold=cold)
        assert m.n == 3 and m.median_ms > 0
    assert lowered == ["x"]  # one lowering, reused
    model = to_onnx_model(layer, inputs, exporter="torchscript")
    assert {"Conv", "Add", "Clip"} <= {n.op_type for n in model.graph.node}
    torch_m = TorchBackend(warmup=1, repeat=3).measure_layer(layer, inputs)
    assert torch_m.backend == "torch" and torch_m.n == 3


def test_lowering_refuses_an_unknown_exporter(captured) -> None:
    gm, x = captured
    with pytest.raises(ConfigError, match="unknown exporter 'dynamic'.*did you mean 'dynamo'"):
        to_onnx_model(gm, (x,), exporter="dynamic")  # type: ignore[arg-type]


def _rename_graph(model) -> None:  # type: ignore[no-untyped-def]
    model.graph.name = "rewritten"


def _relu_to_sigmoid(model) -> None:  # type: ignore[no-untyped-def]
    for node in model.graph:
        if node.op_type == "Relu":
            node.op_type = "Sigmoid"


def test_the_rewrite_stage_edits_the_onnx_ir_model_before_check_and_verification(captured, tmp_path) -> None:
    gm, x = captured
    assert to_onnx_model(gm, (x,), rewrite=_rename_graph).graph.name == "rewritten"
    assert to_onnx_model(gm, (x,)).graph.name != "rewritten"  # another cache entry
    art = export_onnx(gm, (x,), tmp_path / "ok.onnx", rewrite=_rename_graph)
    assert onnx.load(str(art.path)).graph.name == "rewritten" and art.max_rel_error is not None
    with pytest.raises(VerificationError):
        export_onnx(gm, (x,), tmp_path / "bad.onnx", rewrite=_relu_to_sigmoid)
    assert not (tmp_path / "bad.onnx").exists()

    def broken(model):  # type: ignore[no-untyped-def]
        raise KeyError("no such node")

    with pytest.raises(ArtifactError, match="rewrite 'broken' failed: KeyError"):
        to_onnx_model(gm, (x,), rewrite=broken)
    with pytest.raises(ArtifactError, match="returned a str"):
        to_onnx_model(gm, (x,), rewrite=lambda m: "done")


def test_latency_probe_is_a_small_picklable_value() -> None:
    probe = LatencyProbe("tvm", "aarch64", threads=2, options=(("mcpu", "cortex-a72"),))
    assert probe.target == Target("aarch64") and probe.device == "cpu"
    assert pickle.loads(pickle.dumps(probe)) == probe
    backend = probe.open()
    assert isinstance(backend, TvmBackend) and backend.threads == 2 and backend.options == {"mcpu": "cortex-a72"}
    assert probe.fingerprint() == backend.fingerprint()
    with pytest.raises(ConfigError, match="no option 'mcup'.*did you mean 'mcpu'"):
        LatencyProbe("tvm", options=(("mcup", "x"),))
    other = "aarch64" if HOST == "x86" else "x86"
    with pytest.raises(BackendUnavailableError, match="cross-compile"):
        LatencyProbe("onnxruntime", other)
