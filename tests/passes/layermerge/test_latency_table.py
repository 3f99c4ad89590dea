"""LayerMerge's latency table: the fx layer graphs it times, the checksummed disk cache, executors."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from depthfold.backends import LatencyProbe
from depthfold.errors import ConfigError, TimeBudgetError
from depthfold.passes.layermerge.candidates import enumerate_choices
from depthfold.passes.layermerge.latency_table import LayerSpec, build_latency_table, choice_spec
from depthfold.passes.layermerge.trunk import analyze_trunk

from .helpers import UnseenCNN, capture

# ------------------------------------------------------------------------------------ LayerSpec.to_graph


def conv_op(cout: int, k: int, stride: int = 1, groups: int = 1) -> tuple:
    return ("conv", cout, k, k, stride, stride, k // 2, k // 2, groups)


ACTIVATIONS = {
    "relu.default": F.relu,
    "hardtanh.default": lambda t, lo, hi: t.clamp(lo, hi),
    "hardswish.default": F.hardswish,
    "silu.default": F.silu,
    "gelu.default": F.gelu,
}

SPECS = {
    "conv_relu": LayerSpec((1, 4, 8, 8), (conv_op(6, 3), ("act", "relu.default", ()))),
    "conv_relu6": LayerSpec((1, 4, 8, 8), (conv_op(6, 3), ("act", "hardtanh.default", (0.0, 6.0)))),
    "depthwise_hardswish": LayerSpec((1, 8, 8, 8), (conv_op(8, 3, groups=8), ("act", "hardswish.default", ()))),
    "add_projection_relu": LayerSpec((1, 4, 8, 8), (conv_op(8, 3, stride=2), ("add", (1, 4, 8, 8),
                                                     (conv_op(8, 1, stride=2),)), ("act", "relu.default", ()))),
    "conv_silu": LayerSpec((1, 4, 8, 8), (conv_op(4, 1), ("act", "silu.default", ()))),
    "conv_gelu": LayerSpec((1, 4, 8, 8), (conv_op(4, 5), ("act", "gelu.default", ()))),
}


def torch_reference(spec: LayerSpec, layer: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The layer computed with torch.nn.functional from the graph's own weights (conv tensors in order)."""
    counter = iter(range(100))

    def conv(value: torch.Tensor, op: tuple) -> torch.Tensor:
        _, _, _, _, sh, sw, ph, pw, groups = op
        i = next(counter)
        return F.conv2d(value, getattr(layer, f"w{i}"), getattr(layer, f"b{i}"), (sh, sw), (ph, pw), groups=groups)

    value = inputs[0]
    for op in spec.ops:
        if op[0] == "conv":
            value = conv(value, op)
        elif op[0] == "act":
            value = ACTIVATIONS[op[1]](value, *op[2])
        elif op[0] == "add":
            short = inputs[1]
            for side in op[2]:
                short = conv(short, side)
            value = value + short
    return value


@pytest.mark.parametrize("name", sorted(SPECS))
def test_layer_spec_graph_computes_the_layer(name: str) -> None:
    spec = SPECS[name]
    layer, inputs = spec.to_graph(), spec.example_inputs()
    assert [n.name for n in layer.graph.nodes if n.op == "placeholder"] == ["x", "shortcut"][:len(inputs)]
    with torch.no_grad():
        out = layer(*inputs)
    expected_shape = {"add_projection_relu": (1, 8, 4, 4), "depthwise_hardswish": (1, 8, 8, 8)}.get(name)
    assert tuple(out.shape) == (expected_shape or (1, spec.ops[0][1], 8, 8))
    torch.testing.assert_close(out, torch_reference(spec, layer, inputs))
    assert torch.equal(spec.to_graph().w0, layer.w0)  # fixed seed: the same layer every time


@pytest.mark.parametrize("name", sorted(SPECS))
def test_layer_spec_graph_lowers_to_onnx_that_matches_torch(name: str) -> None:
    from depthfold.backends import to_onnx_model

    spec = SPECS[name]
    layer, inputs = spec.to_graph(), spec.example_inputs()
    model = to_onnx_model(layer, inputs, exporter="torchscript")  # checked by onnx.checker
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    (out,) = session.run(None, feeds)
    with torch.no_grad():
        np.testing.assert_allclose(out, layer(*inputs).numpy(), rtol=1e-4, atol=1e-5)


def test_activation_ops_are_read_from_the_trunk_nodes() -> None:
    from depthfold.passes.layermerge.latency_table import _activation_op

    class Acts(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.leaky_relu(F.relu6(torch.relu_(x * 1.0)), 0.2)

    gm = torch.export.export(Acts(), (torch.randn(2, 3),)).module()
    ops = [_activation_op(n) for n in gm.graph.nodes if n.op == "call_function" and "mul" not in str(n.target)]
    assert ("act", "relu.default", ()) in ops  # relu_ costed as its out-of-place form
    assert ("act", "relu6.default", ()) in ops
    assert ("act", "leaky_relu.default", (0.2,)) in ops


def test_layer_spec_signature_is_stable_and_distinguishes_layers() -> None:
    a, b = SPECS["conv_relu"], SPECS["conv_relu6"]
    assert a.signature() == LayerSpec(a.input_shape, a.ops).signature()
    assert a.signature() != b.signature()
    assert json.loads(a.signature())["input"] == [1, 4, 8, 8]


# ---------------------------------------------------------------------------------- build_latency_table


@pytest.fixture(scope="module")
def tiny_cnn():
    """UnseenCNN (width 4) captured at 16x16, its trunk and every candidate."""
    torch.manual_seed(0)
    gm, x = capture(UnseenCNN(width=4), 16)
    trunk = analyze_trunk(gm)
    return gm, trunk, enumerate_choices(trunk)


@pytest.fixture(scope="module")
def probe() -> LatencyProbe:
    return LatencyProbe(repeat=3, warmup=1)


def cache_files(root: Path) -> list[Path]:
    return sorted((root / "layermerge" / "latency").glob("*.json"))


def test_build_latency_table_measures_caches_and_rejects_bad_entries(tiny_cnn, probe, tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path))
    gm, trunk, choices = tiny_cnn
    first = build_latency_table(gm, trunk, choices, probe, executor="serial")
    assert len(first.median_ms) == len(first.p10_ms) == len(first.p90_ms) == len(choices)
    for choice, median, p10, p90 in zip(choices, first.median_ms, first.p10_ms, first.p90_ms):
        assert math.isfinite(median) and median >= 0.0 and p10 >= 0.0 and p90 >= 0.0
        if choice.kind == "barrier":
            assert median == 0.0
    specs = {choice_spec(gm, trunk, c).signature() for c in choices if c.kind != "barrier"}
    assert first.distinct_layers == len(specs)  # kernels only: no identity (call overhead) models
    assert (first.cache_hits, first.measured, first.rejected_entries) == (0, first.distinct_layers, 0)
    files = cache_files(tmp_path)
    assert len(files) == first.distinct_layers
    assert first.summary()["probe"]["repeat"] == 3

    second = build_latency_table(gm, trunk, choices, probe, executor="serial")
    assert (second.cache_hits, second.measured, second.rejected_entries) == (second.distinct_layers, 0, 0)
    assert second.median_ms == first.median_ms

    # Garbage in one entry: detected, deleted, re-measured (only that one).
    files[0].write_text("{ not json")
    third = build_latency_table(gm, trunk, choices, probe, executor="serial")
    assert (third.rejected_entries, third.measured, third.cache_hits) == (1, 1, third.distinct_layers - 1)
    assert json.loads(files[0].read_text())["checksum"]

    # Valid JSON whose stored median no longer matches its checksum: also rejected.
    entry = json.loads(files[1].read_text())
    entry["result"]["median_ms"] = float(entry["result"]["median_ms"]) + 1.0
    files[1].write_text(json.dumps(entry))
    fourth = build_latency_table(gm, trunk, choices, probe, executor="serial")
    assert (fourth.rejected_entries, fourth.measured) == (1, 1)
    assert json.loads(files[1].read_text())["result"]["median_ms"] != entry["result"]["median_ms"]

    # An entry stored under another key (a file renamed onto another layer's name) is rejected too.
    files[3].write_text(files[2].read_text())
    fifth = build_latency_table(gm, trunk, choices, probe, executor="serial")
    assert (fifth.rejected_entries, fifth.measured) == (1, 1)
    assert len(cache_files(tmp_path)) == first.distinct_layers


class EndToEndProbe(LatencyProbe):
    """Times whole calls, as every backend but ORT CPU does."""

    @property
    def layer_scope(self) -> str:
        return "end_to_end"


def test_end_to_end_timings_subtract_the_call_overhead_of_an_identity_model(tiny_cnn, tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path))
    gm, trunk, choices = tiny_cnn
    probe = EndToEndProbe(repeat=3, warmup=1)
    table = build_latency_table(gm, trunk, choices, probe, executor="serial")
    specs = {choice_spec(gm, trunk, c) for c in choices if c.kind != "barrier"}
    shapes = {s.input_shape for s in specs}
    assert table.distinct_layers == len(specs) + len(shapes)
    stored = {}
    for path in cache_files(tmp_path):
        entry = json.loads(path.read_text())
        stored[json.loads(entry["key"])["layer"]] = entry["result"]["median_ms"]
    for choice, median in zip(choices, table.median_ms):
        if choice.kind == "barrier":
            continue
        spec = choice_spec(gm, trunk, choice)
        identity = LayerSpec(spec.input_shape, ())
        assert median == pytest.approx(max(0.0, stored[spec.signature()] - stored[identity.signature()]))


def test_any_executor_gives_the_same_cache_entries(tiny_cnn, probe, tmp_path, monkeypatch):
    gm, trunk, choices = tiny_cnn
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path / "serial"))
    serial = build_latency_table(gm, trunk, choices, probe, executor="serial")
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path / "threads"))
    with cf.ThreadPoolExecutor(2) as pool:
        threaded = build_latency_table(gm, trunk, choices, probe, executor=pool)
    assert threaded.measured == serial.measured == serial.distinct_layers
    names = [p.name for p in cache_files(tmp_path / "serial")]
    assert names and names == [p.name for p in cache_files(tmp_path / "threads")]
    for a, b in zip(cache_files(tmp_path / "serial"), cache_files(tmp_path / "threads")):
        assert json.loads(a.read_text())["key"] == json.loads(b.read_text())["key"]


def test_unknown_executor_is_a_config_error(tiny_cnn, probe, tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path))
    gm, trunk, choices = tiny_cnn
    with pytest.raises(ConfigError, match="executor"):
        build_latency_table(gm, trunk, choices, probe, executor="threads")


def test_no_probe_is_a_config_error(tiny_cnn, tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path))
    gm, trunk, choices = tiny_cnn
    with pytest.raises(ConfigError, match="LatencyProbe"):
        build_latency_table(gm, trunk, choices, None)


@pytest.mark.slow
def test_ray_executor(tiny_cnn, probe, tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path))
    gm, trunk, choices = tiny_cnn
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        table = build_latency_table(gm, trunk, choices, probe, executor="ray", use_cache=False)
    finally:
        ray.shutdown()
    assert table.measured == table.distinct_layers
    assert len(table.median_ms) == len(choices) and all(m >= 0.0 for m in table.median_ms)


class RecordingProbe(LatencyProbe):
    """Records the cold flag of every layer timed; pretends the CPU cache holds ``cache`` bytes."""

    def __init__(self, cache: int) -> None:
        super().__init__(repeat=1, warmup=0)
        object.__setattr__(self, "_cache", cache)
        object.__setattr__(self, "calls", [])

    @property
    def cache_bytes(self) -> int:
        return self._cache  # type: ignore[attr-defined]

    def measure_layer(self, model, inputs, *, cold=False):  # type: ignore[no-untyped-def]
        self.calls.append(cold)  # type: ignore[attr-defined]
        return {"median_ms": 1.0, "p10_ms": 1.0, "p90_ms": 1.0}


@pytest.mark.parametrize("cache, cold", [(1, True), (1 << 40, False)])
def test_layers_of_a_network_too_big_for_the_cache_are_timed_cold(tiny_cnn, tmp_path, monkeypatch, cache, cold):
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path))
    gm, trunk, choices = tiny_cnn
    probe = RecordingProbe(cache)
    table = build_latency_table(gm, trunk, choices, probe, executor="serial")
    assert table.cold is cold and table.summary()["cold_weights"] is cold
    assert probe.calls and set(probe.calls) == {cold}


def test_a_time_budget_stops_the_build_after_the_entry_in_progress_and_keeps_it(tiny_cnn, probe, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path))
    gm, trunk, choices = tiny_cnn
    with pytest.raises(TimeBudgetError, match=r"time budget with \d+ of \d+ entries still to compute \(1 done; "
                                              r"they are cached"):
        build_latency_table(gm, trunk, choices, probe, executor="serial", deadline=time.monotonic())
    assert len(cache_files(tmp_path)) == 1
    resumed = build_latency_table(gm, trunk, choices, probe, executor="serial", deadline=time.monotonic() + 3600)
    assert (resumed.cache_hits, resumed.measured) == (1, resumed.distinct_layers - 1)


def test_layermerge_time_budget_is_checked_and_reaches_the_tables(tiny_cnn, tmp_path, monkeypatch):
    import depthfold

    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path))
    model = UnseenCNN(width=4).eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ConfigError, match="time_budget_s must be >= 0"):
        depthfold.optimize(model, x, ["layermerge:speedup=1.5,time_budget_s=-1"])
    with pytest.raises(TimeBudgetError, match="the latency table reached its time budget"):
        depthfold.optimize(model, x, ["layermerge:speedup=1.5,time_budget_s=1e-9"])
