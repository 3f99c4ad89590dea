"""ONNX export: checker, ORT-vs-torch verification, atomic writes, and errors that name the problem."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import depthfold.backends.ort as ort_backend
from depthfold.backends import create_session, export_onnx, run, to_onnx_model
from depthfold.errors import ArtifactError, ConfigError, VerificationError


def test_export_onnx_conv_bn_relu_linear_matches_torch(exported) -> None:
    art = exported.artifact
    assert art.path.is_file()
    onnx.checker.check_model(str(art.path), full_check=True)
    model = onnx.load(str(art.path))
    assert art.input_names == tuple(i.name for i in model.graph.input) == ("x",)
    assert art.output_names == tuple(o.name for o in model.graph.output)
    assert len(art.output_names) == 1
    assert art.opset == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert art.opset >= 18
    # The recorded error is the real one and is small.
    assert art.max_abs_error is not None and art.max_rel_error is not None
    assert 0.0 <= art.max_rel_error <= 1e-4 and art.max_abs_error <= 1e-4
    # Weights are inside the file: no external data files next to it.
    assert sorted(p.name for p in art.path.parent.iterdir()) == ["model.onnx"]
    assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)
    # Independent check: ORT on the file reproduces the GraphModule, on a fresh input too.
    session = create_session(art.path)
    for x in (exported.x, torch.randn_like(exported.x)):
        (got,) = run(session, [x])
        with torch.no_grad():
            ref = exported.gm(x).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert art.to_dict()["path"] == str(art.path)


def test_export_onnx_flattens_tuple_and_dict_outputs(tmp_path) -> None:
    class Multi(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor, y: torch.Tensor):
            return {"a": self.a(x), "rest": (self.b(y), x.sum(dim=1))}

    torch.manual_seed(0)
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    art = export_onnx(Multi().eval(), (x, y), tmp_path / "multi.onnx")
    assert len(art.input_names) == 2
    assert len(art.output_names) == 3
    assert art.max_rel_error is not None and art.max_rel_error <= 1e-4


class _Spy(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_export_onnx_is_quiet(capfd, caplog, tmp_path, captured, monkeypatch) -> None:
    import depthfold.backends.onnx as onnx_backend

    monkeypatch.setattr(onnx_backend, "_EXPORTS", type(onnx_backend._EXPORTS)())  # export, not a cache hit
    # torch's own stderr handlers bind the stream at import time (out of capfd's reach), so spy on the
    # exporter's loggers directly: nothing may reach them, and everything is re-logged at DEBUG instead.
    gm, x = captured
    spies = {name: _Spy() for name in ("torch", "torch.onnx", "onnxscript")}
    for name, spy in spies.items():
        logging.getLogger(name).addHandler(spy)
    try:
        with caplog.at_level(logging.DEBUG, logger="depthfold.backends.onnx"):
            export_onnx(gm, (x,), tmp_path / "q.onnx")
    finally:
        for name, spy in spies.items():
            logging.getLogger(name).removeHandler(spy)
    assert {name: [r.getMessage() for r in spy.records] for name, spy in spies.items()} == {
        name: [] for name in spies}
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    ours = [r for r in caplog.records if r.name == "depthfold.backends.onnx"]
    assert any("[torch.onnx]" in r.getMessage() for r in ours)  # the exporter's progress prints, re-logged
    assert all(r.levelno <= logging.INFO for r in ours)


def test_export_onnx_without_verify_records_no_error(tmp_path, captured) -> None:
    gm, x = captured
    art = export_onnx(gm, (x,), tmp_path / "sub" / "dir" / "m.onnx", verify=False)
    assert art.path.is_file() and art.max_abs_error is None and art.max_rel_error is None


def test_export_onnx_into_non_directory_raises_artifact_error(tmp_path, captured) -> None:
    gm, x = captured
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ArtifactError, match="a_file"):
        export_onnx(gm, (x,), blocker / "model.onnx")
    assert blocker.read_text() == "not a directory"
    with pytest.raises(ArtifactError, match="is a directory"):
        export_onnx(gm, (x,), tmp_path)


def test_export_onnx_verification_failure_leaves_no_file(tmp_path, captured, monkeypatch) -> None:
    gm, x = captured
    real_run = ort_backend.run

    def off_by_one(session, inputs):
        return [out + 1.0 for out in real_run(session, inputs)]

    monkeypatch.setattr(ort_backend, "run", off_by_one)
    target = tmp_path / "model.onnx"
    with pytest.raises(VerificationError, match=r"output 'linear' differs from PyTorch by"):
        export_onnx(gm, (x,), target)
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary one

    # An older good file at the path is left as it was, not replaced by the failing export.
    target.write_bytes(b"previous")
    with pytest.raises(VerificationError):
        export_onnx(gm, (x,), target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_export_onnx_module_that_onnx_cannot_reproduce_fails_verification(tmp_path) -> None:
    class Noisy(nn.Module):  # random numbers differ between PyTorch and ORT
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.rand_like(x) * 10

    with pytest.raises(VerificationError, match="relative to the output scale"):
        export_onnx(Noisy(), (torch.zeros(4, 4),), tmp_path / "noisy.onnx")
    assert not (tmp_path / "noisy.onnx").exists()


def test_export_onnx_rejects_negative_rtol(tmp_path, captured) -> None:
    gm, x = captured
    with pytest.raises(ConfigError, match="rtol"):
        export_onnx(gm, (x,), tmp_path / "m.onnx", rtol=-1)
    assert not (tmp_path / "m.onnx").exists()


def test_to_onnx_model_names_the_unsupported_op() -> None:
    class Eig(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.linalg.eigvals(x).real

    with pytest.raises(ArtifactError, match=r"aten\.linalg_eig") as info:
        to_onnx_model(Eig(), (torch.randn(3, 3),))
    assert "opset" in str(info.value) and "report" in str(info.value)


def test_to_onnx_model_refuses_silent_opset_change(captured) -> None:
    # The exporter cannot go below opset 18 for this model and would silently keep 18.
    gm, x = captured
    with pytest.raises(ArtifactError, match="opset 13 was requested"):
        to_onnx_model(gm, (x,), opset=13)
    with pytest.raises(ConfigError, match="opset"):
        to_onnx_model(gm, (x,), opset=0)


def test_to_onnx_model_returns_checked_proto_with_weights(captured) -> None:
    gm, x = captured
    model = to_onnx_model(gm, (x,), opset=18)
    onnx.checker.check_model(model, full_check=True)
    assert next(o.version for o in model.opset_import if o.domain == "") == 18
    assert len(model.graph.initializer) > 0
    # The exporter's optimizer folds the eval BatchNorm into the conv.
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}
    unoptimized = to_onnx_model(gm, (x,), optimize=False)
    assert "BatchNormalization" in {n.op_type for n in unoptimized.graph.node}


def test_to_onnx_model_uncapturable_model_says_so_quietly(capfd) -> None:
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(ArtifactError, match="torch.export could not capture"):
        to_onnx_model(DataDependent(), (torch.randn(3),))
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # torch.export prints the failing graph to stderr; it is logged instead


class _Counter:
    """Counts real exports (cache misses) by graph digest and options."""

    def __init__(self, monkeypatch) -> None:
        import depthfold.backends.onnx as onnx_backend
        from depthfold import ir

        self.calls: list[tuple[str, object]] = []
        real = onnx_backend._export

        def counting(module, args, opset, optimize, dims, *rest):
            self.calls.append((ir.digest_graph(module), dims))
            return real(module, args, opset, optimize, dims, *rest)

        monkeypatch.setattr(onnx_backend, "_export", counting)
        monkeypatch.setattr(onnx_backend, "_EXPORTS", type(onnx_backend._EXPORTS)())


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()


def test_each_distinct_graph_is_exported_once_per_optimize(monkeypatch, tmp_path) -> None:
    import depthfold

    counter = _Counter(monkeypatch)
    res = depthfold.optimize(_cnn(), (torch.randn(1, 3, 8, 8),), ["fold_bn"])
    res.measure(rounds=2)
    res.measure(rounds=2)
    res.save(tmp_path)
    assert len(counter.calls) == len(set(counter.calls)) == 3  # original, optimized (timing), saved artifact
    digests = [d for d, _ in counter.calls]
    assert len(set(digests)) == 2


def test_a_changed_weight_is_a_new_export(monkeypatch) -> None:
    from depthfold import ir

    counter = _Counter(monkeypatch)
    gm = ir.capture(_cnn(), (torch.randn(1, 3, 8, 8),)).graph_module
    first = to_onnx_model(gm, (torch.randn(1, 3, 8, 8),))
    again = to_onnx_model(gm, (torch.randn(1, 3, 8, 8),))
    assert len(counter.calls) == 1 and again == first and again is not first
    with torch.no_grad():
        next(gm.parameters()).add_(1.0)
    to_onnx_model(gm, (torch.randn(1, 3, 8, 8),))
    to_onnx_model(gm, (torch.randn(2, 3, 8, 8),))  # another input shape
    assert len(counter.calls) == 3


def test_saved_artifact_keeps_the_dynamic_batch_axis(tmp_path) -> None:
    from depthfold import ir

    x = torch.randn(1, 3, 8, 8)
    model = _cnn()
    gm = ir.capture(model, (x,)).graph_module
    art = export_onnx(gm, (x,), tmp_path / "m.onnx")
    proto = onnx.load(str(art.path))
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == \
        ["batch_size", 3, 8, 8]
    x5 = torch.randn(5, 3, 8, 8)
    (got,) = run(create_session(art.path), (x5,))
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x5).numpy(), rtol=1e-4, atol=1e-5)
    static = to_onnx_model(gm, (x,))  # what latency measurements time
    assert [d.dim_value for d in static.graph.input[0].type.tensor_type.shape.dim] == [1, 3, 8, 8]
