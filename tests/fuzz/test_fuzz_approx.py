"""Fuzzing the approximate passes: on random CNNs (:func:`tests.fuzz.grammar.model_spec`) and random transformer
stacks (:func:`tests.fuzz.grammar.stack_spec`), each pass either refuses with a depthfold error that says why
(the model has nothing it can rewrite, a budget no plan reaches) or returns a graph that runs on the example and
on fresh inputs, keeps the output's shape, reports its measured error, and exports to ONNX that ONNX Runtime
runs as torch does. On the stacks, the exact passes must also compute exactly what the model computes.

``make test`` runs a short slice; ``make fuzz`` runs a tenth of ``DEPTHFOLD_FUZZ_EXAMPLES`` models per test (200).
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import depthfold
from depthfold.backends import export_onnx
from depthfold.errors import (
    ArtifactError,
    ConfigError,
    DepthfoldError,
    InfeasibleBudgetError,
    PreconditionError,
)

from .grammar import build, build_stack, model_spec, stack_spec, trunk_spec

EXAMPLES = max(6, int(os.environ.get("DEPTHFOLD_FUZZ_EXAMPLES", "30")) // 10)
"""Models per test: a tenth of the exact fuzzer's, at least 6 (LayerMerge times a latency table for each)."""
CNN_PASSES = ["layermerge:speedup=1.2", "layermerge:speedup=1.5,importance=local",
              "early_exit:auto=1,steps=10,eval_samples=24,train_samples=48,batch_size=16"]
STACK_PASSES = ["drop_layers:n=1", "drop_layers:n=1,sublayer=attention,strategy=contiguous",
                "drop_layers:n=1,sublayer=mlp,strategy=spread", "collapse_blocks:layers=2,threshold=0.0",
                "kv_share:preset=cla2", "kv_share:ratio=0.5,criterion=similar"]
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("DEPTHFOLD_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])


def _run(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


def _refusal(err: DepthfoldError, dtype: torch.dtype) -> bool:
    """A pass may refuse a model it cannot rewrite (and say why); any other failure is a bug in the pass."""
    if isinstance(err, (ConfigError, PreconditionError, InfeasibleBudgetError)):
        return True
    # ONNX Runtime, the default latency backend, has no float64 Conv kernel: said, with the fix
    return isinstance(err, ArtifactError) and dtype == torch.float64 and "float64" in str(err)


def _check_approximate(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], fresh: tuple[torch.Tensor, ...],
                       spec: str, where: object, data: object = None) -> None:
    want = _run(model, inputs)
    try:
        res = depthfold.optimize(model, inputs, [spec], data=data)
    except DepthfoldError as err:  # a refusal must say what was wrong, in depthfold's words
        if not _refusal(err, want.dtype):
            raise AssertionError(f"{spec} failed on a model it should rewrite or refuse\nmodel: {where}") from err
        assert str(err).strip(), f"{spec}: {type(err).__name__} with no message\nmodel: {where}"
        event(f"{spec.partition(':')[0]}: refused ({type(err).__name__})")
        return
    event(f"{spec.partition(':')[0]}: rewrote the model")
    for batch, reference in ((inputs, want), (fresh, _run(model, fresh))):
        got = _run(res.module, batch)
        assert got.shape == reference.shape, f"{spec} changed the output shape\nmodel: {where}"
        assert bool(torch.isfinite(got).all()), f"{spec} produced NaN/Inf\nmodel: {where}"
    [record] = res.records
    assert not record.exact and record.error is not None, f"{spec} reported no error\nmodel: {where}"
    assert all(math.isfinite(v) and v >= 0 for v in record.error.values()), record.error
    if want.dtype == torch.float32:
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(res.module, inputs, Path(tmp) / "model.onnx")  # raises unless ORT matches torch


@FUZZ
@given(spec=st.one_of(trunk_spec(), model_spec()), pass_spec=st.sampled_from(CNN_PASSES))
def test_approximate_passes_on_random_cnns(spec, pass_spec):
    model, inputs = build(spec)
    try:
        _run(model, inputs)
    except RuntimeError:  # the grammar drew a model whose maps shrink to nothing: not a model
        assume(False)
    x = inputs[0]
    data = torch.randn(72, *x.shape[1:], generator=torch.Generator().manual_seed(spec["seed"])).to(x.dtype)
    _check_approximate(model, inputs, tuple(torch.randn_like(t) for t in inputs), pass_spec, spec, data)


@FUZZ
@given(spec=stack_spec(), pass_spec=st.sampled_from(STACK_PASSES))
def test_approximate_passes_on_random_transformer_stacks(spec, pass_spec):
    model, inputs = build_stack(spec)
    fresh = (torch.randint(0, spec["vocab"], inputs[0].shape, generator=torch.Generator().manual_seed(1)),)
    _check_approximate(model, inputs, fresh, pass_spec, spec)


@FUZZ
@given(spec=stack_spec())
def test_exact_passes_on_random_transformer_stacks(spec):
    model, inputs = build_stack(spec)
    fresh = (torch.randint(0, spec["vocab"], inputs[0].shape, generator=torch.Generator().manual_seed(1)),)
    res = depthfold.optimize(model, inputs, list(depthfold.EXACT_PASSES))
    for batch in (inputs, fresh):
        torch.testing.assert_close(_run(res.module, batch), _run(model, batch), rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{m}\nspec: {spec}")
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(res.module, inputs, Path(tmp) / "model.onnx")
