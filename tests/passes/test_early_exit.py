"""early_exit: heads distilled at clean cuts, calibrated gates, torch.cond lowered to ONNX If.

The gated model is checked against a reference computed here without torch.cond: per sample, the first exit
whose head is confident answers, else the original network does.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import depthfold
from depthfold import zoo
from depthfold.backends import ort as ort_backend
from depthfold.backends.onnx import export_onnx
from depthfold.errors import ConfigError
from depthfold.passes.early_exit import EXIT_META, EarlyExitModel, confidence
from depthfold.zoo.data import digits_datasets

FAST = "steps=200,rounds=2"


class _SmallCNN(nn.Sequential):
    """Three conv stages and a pooled linear classifier (blocks 0, 1, 2 are clean cuts)."""

    def __init__(self) -> None:
        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        super().__init__(stage(1, 8), stage(8, 16), stage(16, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.utils.data.TensorDataset, torch.utils.data.TensorDataset]:
    return digits_datasets(16, channels=1)


@pytest.fixture(scope="module")
def cnn(digits) -> nn.Module:  # type: ignore[no-untyped-def]
    train, _ = digits
    torch.manual_seed(0)
    model = _SmallCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = train.tensors
    model.train()
    for epoch in range(6):
        for index in torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).split(64):
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def gated(cnn, digits) -> depthfold.OptimizeResult:  # type: ignore[no-untyped-def]
    train, test = digits
    return depthfold.optimize(cnn, test.tensors[0][:1], [f"early_exit:after=0,1,{FAST}"], data=train,
                              backend="torch")


def _ops(graph: onnx.GraphProto) -> list[str]:
    """Op types of a graph and of every subgraph (If branches), depth first."""
    out = []
    for node in graph.node:
        out.append(node.op_type)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                out.extend(_ops(attr.g))
    return out


def _reference(model: EarlyExitModel, x: torch.Tensor) -> torch.Tensor:
    """Per sample: the logits of the first confident exit, else the last segment's output (no torch.cond)."""
    with torch.no_grad():
        feature = model.segments[0](x)
        out = torch.empty(len(x), 10)
        pending = torch.ones(len(x), dtype=torch.bool)
        for k, head in enumerate(model.heads):
            logits = head(feature)
            leave = pending & (confidence(logits, model.confidence) >= model.thresholds[k])
            out[leave] = logits[leave]
            pending &= ~leave
            feature = model.segments[k + 1](feature)
        out[pending] = feature[pending]
    return out


def test_gated_outputs_match_the_cascade_reference(gated, cnn, digits) -> None:  # type: ignore[no-untyped-def]
    _, test = digits
    x = test.tensors[0][:96]
    model = gated.module.meta[EXIT_META]
    taken = model.exits(x)
    assert len(set(taken.tolist())) >= 2, "the test needs a batch where samples leave at different exits"
    with torch.no_grad():
        got = gated.module(x)
        torch.testing.assert_close(got, _reference(model, x), rtol=1e-5, atol=1e-5)
        final = taken == len(model.heads)
        torch.testing.assert_close(got[final], cnn(x)[final], rtol=1e-4, atol=1e-4)
    for i in range(0, 96, 13):  # one sample at a time gives the same answers as the batch
        torch.testing.assert_close(gated.module(x[i:i + 1]), got[i:i + 1], rtol=1e-5, atol=1e-5)


def test_calibrated_loss_stays_within_tolerance_and_report(gated) -> None:  # type: ignore[no-untyped-def]
    report = gated.records[-1].details
    assert report["loss_metric"] == "accuracy"
    assert report["loss"] <= report["tolerance"] + 1e-9
    assert [e["after"] for e in report["exits"]] == ["0", "1"]
    assert sum(report["histogram"].values()) == pytest.approx(1.0)
    assert report["histogram"]["final"] < 0.7  # digits at 16x16: most samples are easy
    fractions = [e["latency_fraction"] for e in report["exits"]]
    # expected compute is measured (on a model this small it may not beat the original); it is at least the
    # exit-rate-weighted cost of the prefixes that answered plus the full network for the rest
    floor = sum(e["exit_rate"] * e["latency_fraction"] for e in report["exits"]) + report["histogram"]["final"]
    assert report["expected_compute"] >= floor - 1e-9 > 0.0
    assert fractions == sorted(fractions)
    assert all(e["head_agreement"] > 0.5 for e in report["exits"])


def test_test_accuracy_close_to_the_original(gated, cnn, digits) -> None:  # type: ignore[no-untyped-def]
    _, test = digits
    x, y = test.tensors
    with torch.no_grad():
        original = (cnn(x).argmax(-1) == y).float().mean().item()
        early = (gated.module(x).argmax(-1) == y).float().mean().item()
    assert early >= original - 0.03


def test_onnx_has_if_nodes_and_matches_torch(gated, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, test = digits
    x = test.tensors[0]
    artifact = export_onnx(gated.module, gated.example_inputs, tmp_path / "gated.onnx")
    graph = onnx.load(str(artifact.path)).graph
    assert [n.op_type for n in graph.node].count("If") == 1
    assert _ops(graph).count("If") == 2  # the second exit's If is nested in the first's else-branch
    # The branches own the weights only they read (ONNX Runtime optimizes subgraph convs only for those).
    top = {i.name for i in graph.initializer}
    branch = max((a.g for n in graph.node if n.op_type == "If" for a in n.attribute), key=lambda g: len(g.node))
    assert branch.initializer
    assert not [n for n in top if n.startswith(("segments.1.", "segments.2.", "heads.1."))], "weights read only in branches"
    assert any(n.startswith("segments.0.") for n in top)
    session = ort_backend.create_session(artifact.path)
    taken = gated.module.meta[EXIT_META].exits(x[:64])
    for batch in (x[:64], x[:1], x[5:6]):
        got = ort_backend.run(session, [batch])[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, gated.module(batch).numpy(), rtol=1e-4, atol=1e-4)
    assert len(set(taken.tolist())) >= 2, "the batch should mix exits"


@pytest.mark.parametrize("thresholds,expect", [("0.0,0.0", "first"), ("1.0,1.0", "original")])
def test_fixed_thresholds(cnn, digits, thresholds, expect) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    x = test.tensors[0][:32]
    res = depthfold.optimize(cnn, x[:1], [f"early_exit:after=0,1,thresholds={thresholds},{FAST}"], data=train,
                             backend="torch")
    model = res.module.meta[EXIT_META]
    with torch.no_grad():
        got = res.module(x)
        want = model.heads[0](model.segments[0](x)) if expect == "first" else cnn(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_split_and_all_policies_agree(cnn, digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    x = test.tensors[0][:64]
    # Fixed thresholds: calibrated ones depend on measured latencies, which differ between two runs.
    results = {p: depthfold.optimize(cnn, x[:1], [f"early_exit:after=0,1,thresholds=0.9,0.9,policy={p},{FAST}"],
                                     data=train,
                                     backend="torch") for p in ("split", "all")}
    with torch.no_grad():
        split, every = (results[p].module(x) for p in ("split", "all"))
    assert len(set(results["all"].module.meta[EXIT_META].exits(x).tolist())) >= 2
    torch.testing.assert_close(split, every, rtol=1e-5, atol=1e-5)
    reference = _reference(results["all"].module.meta[EXIT_META], x)
    torch.testing.assert_close(every, reference, rtol=1e-5, atol=1e-5)
    artifact = export_onnx(results["all"].module, (x[:8],), tmp_path / "all.onnx")
    session = ort_backend.create_session(artifact.path)
    np.testing.assert_allclose(ort_backend.run(session, [x])[0], every.numpy(), rtol=1e-4, atol=1e-4)


def test_auto_picks_exits_by_measured_latency(cnn, digits) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    res = depthfold.optimize(cnn, test.tensors[0][:1], [f"early_exit:auto=1,{FAST}"], data=train,
                             backend="torch")
    report = res.records[-1].details
    assert len(report["exits"]) == 1
    assert {c["after"] for c in report["candidates"]} == {"0", "1", "2"}
    assert report["loss"] <= 0.01 + 1e-9


def test_auto_exits_are_reproduced_by_naming_them(cnn, digits) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    x = test.tensors[0][:64]
    auto = depthfold.optimize(cnn, x[:1], [f"early_exit:auto=1,{FAST}"], data=train, backend="torch")
    chosen = auto.records[-1].details["exits"][0]
    named = depthfold.optimize(cnn, x[:1], [f"early_exit:after={chosen['after']},thresholds={chosen['threshold']},"
                                            f"{FAST}"], data=train, backend="torch")
    with torch.no_grad():
        torch.testing.assert_close(named.module(x), auto.module(x), rtol=0, atol=0)


def test_after_fold_bn_and_on_onnx_runtime_costs(cnn, digits) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    x = test.tensors[0][:32]
    res = depthfold.optimize(cnn, x[:1], ["fold_bn", f"early_exit:after=1,{FAST}"], data=train)
    assert res.records[-1].details["backend"] == "onnxruntime"
    assert not any("batch_norm" in str(n.target) for m in res.module.modules() if isinstance(m, torch.fx.GraphModule)
                   for n in m.graph.nodes)
    torch.testing.assert_close(res.module(x), _reference(res.module.meta[EXIT_META], x), rtol=1e-5, atol=1e-5)


def test_transformers_resnet(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = zoo.hf_vision("resnet_basic", image_size=32)
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(192, 3, 32, 32, generator=generator)
    res = depthfold.optimize(model, data[:1], ["early_exit:auto=1,tolerance=0.05,steps=100,rounds=2"], data=data,
                             backend="torch")
    report = res.records[-1].details
    assert report["loss_metric"] == "agreement"
    gated = res.module.meta[EXIT_META]
    with torch.no_grad():
        torch.testing.assert_close(res.module(data[:32]), _reference(gated, data[:32]), rtol=1e-4, atol=1e-4)
    artifact = export_onnx(res.module, res.example_inputs, tmp_path / "hf.onnx")
    assert "If" in [n.op_type for n in onnx.load(str(artifact.path)).graph.node]


# --- bad input ---------------------------------------------------------------------------------------------------

def test_exit_inside_a_residual_block_names_the_crossing_edge(digits) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    torch.manual_seed(0)
    model = zoo.create("resnet18", num_classes=10, in_chans=1).eval()
    with pytest.raises(ConfigError, match="layer1.0.conv1.*does not cut.*edges cross"):
        depthfold.optimize(model, train.tensors[0][:1], ["early_exit:after=layer1.0.conv1"], data=train)


def test_unreachable_tolerance_reports_the_best_reachable(cnn, digits) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    with pytest.raises(ConfigError, match=r"no exit threshold keeps the loss within tolerance=0.0.*best reachable "
                                          r"is exit 0.*raise tolerance to at least"):
        depthfold.optimize(cnn, test.tensors[0][:1], ["early_exit:after=0,tolerance=0.0,steps=0,rounds=2"],
                           data=train, backend="torch")


class _Volumes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(1, 4, 3, padding=1)
        self.b = nn.Conv3d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(torch.relu(self.a(x))).mean(dim=(2, 3, 4)))


def test_features_a_head_cannot_pool_are_refused() -> None:
    x = torch.randn(8, 1, 4, 6, 6)
    with pytest.raises(ConfigError, match="feature after a has shape .* choose another exit point"):
        depthfold.optimize(_Volumes().eval(), x[:1], ["early_exit:after=a"], data=x, backend="torch")


def test_model_without_classifier_output_is_refused(digits) -> None:  # type: ignore[no-untyped-def]
    train, _ = digits
    features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    with pytest.raises(ConfigError, match=r"one \(batch, classes\) logits tensor.*shape \(1, 4, 12, 12\)"):
        depthfold.optimize(features, train.tensors[0][:1], ["early_exit:after=0"], data=train)


@pytest.mark.parametrize("spec,match", [
    ("early_exit", "needs exit points"),
    ("early_exit:after=0,auto=1", "not both"),
    ("early_exit:after=0,1,thresholds=0.5", "1 thresholds for 2 exit points"),
    ("early_exit:after=0,tolerance=1.5", "tolerance is a fraction"),
    ("early_exit:after=0,policy=some", "policy"),
])
def test_bad_options(cnn, digits, spec, match) -> None:  # type: ignore[no-untyped-def]
    train, test = digits
    with pytest.raises(ConfigError, match=match):
        depthfold.optimize(cnn, test.tensors[0][:1], [spec], data=train, backend="torch")


def test_no_data_is_refused(cnn, digits) -> None:  # type: ignore[no-untyped-def]
    _, test = digits
    with pytest.raises(ConfigError, match="pass data="):
        depthfold.optimize(cnn, test.tensors[0][:1], ["early_exit:after=0"], backend="torch")


# --- host gating (backends without control flow) -------------------------------------------------------------

@pytest.mark.parametrize("backend,policy", [("torch", "split"), ("onnxruntime", "split"), ("onnxruntime", "all"),
                                            pytest.param("tvm", "split", marks=pytest.mark.slow)])
def test_host_gated_segments_match_the_graph(cnn, digits, backend, policy) -> None:  # type: ignore[no-untyped-def]
    if backend == "tvm":
        pytest.importorskip("tvm")
    from depthfold.backends import get_backend
    from depthfold.backends.exits import HostGatedModel

    train, test = digits
    x = test.tensors[0][:24]
    res = depthfold.optimize(cnn, x[:1], [f"early_exit:after=0,1,thresholds=0.9,0.95,policy={policy},{FAST}"],
                             data=train, backend="torch")
    assert len(set(res.module.meta[EXIT_META].exits(x).tolist())) == 3
    runner = HostGatedModel(get_backend(backend), res.module)
    with torch.no_grad():
        want = res.module(x).numpy()
    np.testing.assert_allclose(runner(x), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(runner(x[3:4]), want[3:4], rtol=1e-4, atol=1e-4)


def test_host_gating_needs_an_early_exit_graph(cnn) -> None:  # type: ignore[no-untyped-def]
    from depthfold.backends import get_backend
    from depthfold.backends.exits import HostGatedModel

    plain = depthfold.optimize(cnn, torch.randn(1, 1, 16, 16), [])
    with pytest.raises(ConfigError, match="pipeline ending in early_exit"):
        HostGatedModel(get_backend("torch"), plain.module)


def test_early_exit_must_be_the_last_pass(cnn, digits) -> None:  # type: ignore[no-untyped-def]
    from depthfold.errors import PreconditionError

    train, test = digits
    with pytest.raises(PreconditionError, match="early_exit must be the last pass.*run 'recover' before"):
        depthfold.optimize(cnn, test.tensors[0][:1], ["early_exit:after=0", "recover"], data=train)


def test_a_float64_network_gets_float64_heads(cnn, digits) -> None:  # type: ignore[no-untyped-def]
    """Found by the fuzzer: heads were built in float32 and failed on a float64 network's features."""
    import copy

    train, test = digits
    model = copy.deepcopy(cnn).double()
    res = depthfold.optimize(model, test.tensors[0][:1].double(), [f"early_exit:after=1,{FAST}"],
                             data=train.tensors[0][:256].double(), backend="torch")
    x = test.tensors[0][:32].double()
    with torch.no_grad():
        out = res.module(x)
        assert out.dtype == torch.float64
        assert all(p.dtype == torch.float64 for p in res.module.parameters())
        agree = (out.argmax(1) == model(x).argmax(1)).float().mean().item()
    assert agree > 0.8
