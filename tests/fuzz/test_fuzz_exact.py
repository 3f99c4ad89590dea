"""Differential fuzzing of the exact passes: random models from :mod:`tests.fuzz.grammar`, each run through
every exact pass alone, in a random order, and all together; the result must compute what the model computes
in torch (on the example and on fresh inputs) and in ONNX Runtime.

``make test`` runs a short slice; ``make fuzz`` runs ``DEPTHFOLD_FUZZ_EXAMPLES`` models (2,000 by default).
A failure prints the shrunk model spec; add it to ``REGRESSIONS`` when it is fixed.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import depthfold
from depthfold.backends import export_onnx

from .grammar import build, model_spec

EXAMPLES = int(os.environ.get("DEPTHFOLD_FUZZ_EXAMPLES", "30"))
TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-9, 1e-10)}
ORDERS = [("fold_bn",), ("merge_linear_chains",), ("fuse_qkv",), ("merge_linear_chains", "fold_bn"),
          ("fuse_qkv", "merge_linear_chains", "fold_bn")]


def _outputs(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=os.environ.get("DEPTHFOLD_FUZZ_RANDOM") != "1",
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
@given(spec=model_spec(), order=st.sampled_from(ORDERS))
@example(spec={"in": 3, "size": 8, "batch": 1, "seed": 1, "dtype": "float32", "head": [5],
               "ops": [{"op": "conv", "out": 6, "k": 3, "groups": 1, "stride": 1, "dilation": 1, "padding": "same",
                        "bias": True}, {"op": "bn"}, {"op": "conv", "out": 4, "k": 1, "groups": 1, "stride": 1,
                                                      "dilation": 1, "padding": "none", "bias": False},
                       {"op": "attention", "heads": 2}]},
         order=("fold_bn",))
def test_exact_passes_compute_what_the_model_computes(spec, order):
    model, inputs = build(spec)
    try:
        want = _outputs(model, inputs)
    except RuntimeError:  # the grammar drew a model whose maps shrink to nothing: not a model
        assume(False)
    dtype = inputs[0].dtype
    rtol, atol = TOLERANCE[dtype]
    fresh = tuple(torch.randn_like(t) for t in inputs)
    for passes in (order, depthfold.EXACT_PASSES):
        res = depthfold.optimize(model, inputs, list(passes))  # verifies each pass itself, too
        for batch, reference in ((inputs, want), (fresh, _outputs(model, fresh))):
            torch.testing.assert_close(_outputs(res.module, batch), reference, rtol=rtol, atol=atol * 10,
                                       msg=lambda m, p=passes: f"{p}: {m}\nspec: {spec}")
    if dtype == torch.float32:  # ONNX Runtime's CPU kernels are float32
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(res.module, inputs, Path(tmp) / "model.onnx")  # raises unless ORT matches torch


@pytest.mark.parametrize("seed", range(3))
def test_grammar_builds_runnable_models(seed):
    """The grammar is not vacuous: its draws build, run and cover the ops the passes rewrite."""
    from hypothesis import find

    spec = find(model_spec(), lambda s: s["seed"] % 3 == seed and any(o["op"] == "bn" for o in s["ops"])
                and any(o["op"] in ("residual", "concat") for o in s["ops"]),
                settings=settings(database=None, max_examples=2000))
    model, inputs = build(spec)
    assert _outputs(model, inputs).shape == (spec["batch"], spec["head"][-1])
