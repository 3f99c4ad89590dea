"""collapse_blocks (LaCo): runs of consecutive blocks merge into the first by RDSC,
theta*_l = theta_l + sum_k (theta_{l+k} - theta_l), and the rest of the run is removed.

Checked against the original weights, against hand-made reference models (the merged block loaded into a copy
with the other blocks deleted) and against drop_layers.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import depthfold
from depthfold import ir, zoo
from depthfold.errors import ConfigError
from depthfold.passes import PassContext, PassManager, parse_pass
from depthfold.passes.common import calibration_split

from .lm_harness import Result, _hf, _hf_inputs, _tokens

OPTS = "eval_samples=8,train_samples=8,batch_size=8"










CONTAINER = {"zoo": "layers", "zoo6": "layers", "llama": "model.layers", "bert": "encoder.layer"}
_MODELS: dict[str, nn.Module] = {}
_CAPTURED: dict[str, ir.CapturedModel] = {}
_RESULTS: dict[tuple[str, tuple[str, ...]], Result] = {}


def model_of(key: str) -> nn.Module:
    if key not in _MODELS:
        if key.startswith("zoo"):
            torch.manual_seed(0)
            _MODELS[key] = zoo.create("llama_tiny", n_layers=6 if key == "zoo6" else 4, dim=32, hidden=64,
                                      vocab_size=100).eval()
        else:
            _MODELS[key] = _hf(key)
    return _MODELS[key]


def inputs_of(key: str, seed: int = 0):  # type: ignore[no-untyped-def]
    return (_tokens(seed),) if key.startswith("zoo") else _hf_inputs(seed)


def call(module: nn.Module, key: str, seed: int = 0) -> torch.Tensor:
    inputs = inputs_of(key, seed)
    with torch.no_grad():
        out = module(*inputs) if isinstance(inputs, tuple) else module(**inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def spec_of(options: str) -> str:
    return f"collapse_blocks:{options},{OPTS}"


def run(key: str, *specs: str) -> Result:
    """What depthfold.optimize(model, inputs, [specs]) does, on a capture made once per model (torch.export
    dominates the run time of these tiny models); cached."""
    if key not in _CAPTURED:
        _CAPTURED[key] = ir.capture(model_of(key), inputs_of(key))
    captured = _CAPTURED[key]
    if (key, specs) not in _RESULTS:
        manager = PassManager(list(specs))
        manager.context = PassContext(example_inputs=captured.example_inputs)
        pipeline = manager.run(captured.graph_module, captured.example_inputs)
        _RESULTS[key, specs] = Result(pipeline.graph_module, captured.graph_module, captured.example_inputs,
                                      pipeline.records)
    return _RESULTS[key, specs]


def collapse(key: str, options: str) -> Result:
    return run(key, spec_of(options))


def block_params(model: nn.Module, path: str) -> dict[str, torch.Tensor]:
    """Parameters under ``path`` by their name relative to it."""
    return {name[len(path) + 1:]: p.detach() for name, p in model.named_parameters() if name.startswith(path + ".")}


def reference(model: nn.Module, container: str, merged: dict[int, dict[str, torch.Tensor]],
              removed: set[int]) -> nn.Module:
    """A copy of ``model`` with the merged weights loaded into their blocks and the removed blocks deleted."""
    ref = copy.deepcopy(model)
    blocks = ref.get_submodule(container)
    for index, params in merged.items():
        for rel, value in params.items():
            blocks[index].get_parameter(rel).data.copy_(value)
    owner, _, attr = container.rpartition(".")
    parent = ref.get_submodule(owner) if owner else ref
    setattr(parent, attr, nn.ModuleList(m for i, m in enumerate(blocks) if i not in removed))
    return ref


def without(model: nn.Module, container: str, removed: set[int]) -> nn.Module:
    return reference(model, container, {}, removed)


# --- RDSC ----------------------------------------------------------------------------------------------------------


def test_collapse_blocks_rdsc_sums_the_differences_of_three_blocks() -> None:
    model = model_of("zoo")
    res = collapse("zoo", "layers=3,threshold=-1,lowest=0,max_merges=1")
    rec = res.records[-1]
    (merge,) = rec.details["merges"]
    assert merge["into"] == "layers.1" and merge["blocks"] == [1, 2, 3]
    assert rec.details["remaining_blocks"] == 2
    assert [t["blocks"] for t in rec.details["tried"]] == [[1, 2, 3]]
    assert rec.changed and [c["removed"] for c in rec.changes] == [["layers.2", "layers.3"]]
    t1, t2, t3 = (block_params(model, f"layers.{i}") for i in (1, 2, 3))
    assert len(t1) == 9
    expected = {rel: t1[rel] + (t2[rel] - t1[rel]) + (t3[rel] - t1[rel]) for rel in t1}
    for rel, value in expected.items():
        got = res.module.get_parameter(f"layers.1.{rel}")
        torch.testing.assert_close(got, value, rtol=0, atol=1e-6)
        assert not torch.allclose(got, t1[rel]) or torch.equal(t1[rel], t2[rel])  # it is not block 1 unchanged
        assert not torch.allclose(got, t3[rel], atol=1e-4) or torch.equal(t1[rel], t2[rel])  # nor block 3
    for rel in ("input_layernorm.weight", "post_attention_layernorm.weight"):  # 1 + (1 - 1) + (1 - 1)
        torch.testing.assert_close(res.module.get_parameter(f"layers.1.{rel}"), torch.ones(32), rtol=0, atol=0)
    # Blocks 0 and the rest of the model are untouched.
    for rel, value in block_params(model, "layers.0").items():
        assert torch.equal(res.module.get_parameter(f"layers.0.{rel}"), value)
    ref = reference(model, "layers", {1: expected}, {2, 3})
    for seed in (0, 5):
        torch.testing.assert_close(call(res.module, "zoo", seed), call(ref, "zoo", seed), rtol=0, atol=1e-5)
    # The reported similarity is LaCo's: mean per-token cosine of the merged model's output to the original's on
    # the calibration samples.
    gm = res.original
    calib = calibration_split(None, res.example_inputs, names=ir.input_names(gm), free_dims=ir.free_dims(gm),
                              eval_samples=8, train_samples=8, batch_size=8, seed=0)
    x = calib.train.inputs[0]
    with torch.no_grad():
        cos = F.cosine_similarity(ref(x).double(), model(x).double(), dim=-1).mean()
    assert merge["similarity"] == pytest.approx(float(cos), abs=1e-5)
    assert rec.details["quality"]["token_cosine"] < 1.0


def test_collapse_blocks_differs_from_dropping_the_same_blocks() -> None:
    collapsed = collapse("zoo", "layers=3,threshold=-1,lowest=0,max_merges=1")
    dropped = run("zoo", f"drop_layers:layers=2+3,{OPTS}")
    assert dropped.records[-1].details["removed"] == [2, 3]
    a, b = call(collapsed.module, "zoo"), call(dropped.module, "zoo")
    assert a.shape == b.shape
    assert not torch.allclose(a, b, atol=1e-4)
    torch.testing.assert_close(b, call(without(model_of("zoo"), "layers", {2, 3}), "zoo"), rtol=0, atol=1e-5)


def test_collapse_blocks_two_blocks_become_the_later_one() -> None:
    model = model_of("zoo")
    res = collapse("zoo", "layers=2,threshold=-1,lowest=0,max_merges=1")
    (merge,) = res.records[-1].details["merges"]
    assert merge["into"] == "layers.2" and merge["blocks"] == [2, 3]
    for rel, value in block_params(model, "layers.3").items():  # theta_2 + (theta_3 - theta_2) = theta_3
        torch.testing.assert_close(res.module.get_parameter(f"layers.2.{rel}"), value, rtol=0, atol=1e-6)
    ref = without(model, "layers", {2})  # blocks 0, 1, 3: the same network
    torch.testing.assert_close(call(res.module, "zoo"), call(ref, "zoo"), rtol=0, atol=1e-5)
    assert not torch.allclose(call(res.module, "zoo"), call(without(model, "layers", {3}), "zoo"), atol=1e-4)


def test_collapse_blocks_removes_the_last_merged_away_blocks_mlp() -> None:
    model = model_of("zoo")
    res = collapse("zoo", "layers=3,threshold=-1,lowest=0,max_merges=1")
    left = {n for n, _ in res.module.named_parameters()}
    gone = {f"layers.3.{rel}" for rel in block_params(model, "layers.3")
            if rel.startswith(("mlp.", "post_attention_layernorm.", "self_attn.o_proj."))}
    assert len(gone) == 5 and not gone & left
    assert {f"layers.1.{rel}" for rel in block_params(model, "layers.1")} <= left


def test_collapse_blocks_removes_every_parameter_of_the_merged_away_blocks() -> None:
    model = model_of("zoo")
    res = collapse("zoo", "layers=3,threshold=-1,lowest=0,max_merges=1")
    rec = res.records[-1]
    removed = sum(p.numel() for i in (2, 3) for p in block_params(model, f"layers.{i}").values())
    assert rec.after["params"] == rec.before["params"] - removed
    assert not [n for n, _ in res.module.named_parameters() if n.startswith(("layers.2.", "layers.3."))]


# --- the LaCo search ---------------------------------------------------------------------------------------------


def test_collapse_blocks_threshold_not_reached_leaves_the_model_unchanged() -> None:
    model = model_of("zoo")
    res = collapse("zoo", "layers=2,threshold=1.0")
    rec = res.records[-1]
    assert rec.details["merges"] == [] and rec.changes == [] and not rec.changed
    # Candidates from the top down, one lower each time, not below lowest=1.
    assert [t["blocks"] for t in rec.details["tried"]] == [[2, 3], [1, 2]]
    best = rec.details["best_similarity"]
    assert best == max(t["similarity"] for t in rec.details["tried"]) and best < 1.0
    assert "remaining_blocks" not in rec.details
    assert rec.after["params"] == rec.before["params"] and rec.after["nodes"] == rec.before["nodes"]
    for name, value in model.named_parameters():
        assert torch.equal(res.module.get_parameter(name), value)
    torch.testing.assert_close(call(res.module, "zoo"), call(model, "zoo"), rtol=0, atol=0)


def test_collapse_blocks_highest_and_lowest_bound_the_candidates() -> None:
    rec = collapse("zoo6", "layers=2,threshold=1.0,lowest=2,highest=4").records[-1]
    assert [t["blocks"] for t in rec.details["tried"]] == [[3, 4], [2, 3]]
    rec = collapse("zoo6", "layers=3,threshold=1.0,lowest=0,highest=3").records[-1]
    assert [t["blocks"] for t in rec.details["tried"]] == [[1, 2, 3], [0, 1, 2]]


def test_collapse_blocks_interval_two_skips_below_a_kept_merge() -> None:
    model = model_of("zoo6")
    res = collapse("zoo6", "layers=2,threshold=-1,interval=2,lowest=1")
    rec = res.records[-1]
    assert [m["blocks"] for m in rec.details["merges"]] == [[4, 5], [2, 3]]
    assert [m["into"] for m in rec.details["merges"]] == ["layers.4", "layers.2"]
    assert rec.details["remaining_blocks"] == 4
    # Block 4 becomes theta_5 and block 2 theta_3: the network of blocks 0, 1, 3, 5.
    torch.testing.assert_close(call(res.module, "zoo6"), call(without(model, "layers", {2, 4}), "zoo6"),
                               rtol=0, atol=1e-5)


def test_collapse_blocks_interval_one_merges_into_a_merged_block_from_a_snapshot() -> None:
    model = model_of("zoo6")
    res = collapse("zoo6", "layers=2,threshold=-1,interval=1,lowest=1,max_merges=2")
    rec = res.records[-1]
    assert [m["blocks"] for m in rec.details["merges"]] == [[4, 5], [3, 4]]
    assert rec.details["remaining_blocks"] == 4
    theta5 = block_params(model, "layers.5")
    # Block 4 = theta_5 after the first merge; then block 3 = theta_3 + (theta_4* - theta_3) = theta_5.
    for rel, value in theta5.items():
        torch.testing.assert_close(res.module.get_parameter(f"layers.3.{rel}"), value, rtol=0, atol=1e-6)
    torch.testing.assert_close(call(res.module, "zoo6"), call(without(model, "layers", {3, 4}), "zoo6"),
                               rtol=0, atol=1e-5)


def test_collapse_blocks_skips_blocks_whose_parameters_differ() -> None:
    # After kv_share the sharing layers (1, 3) have no K/V projections: no run of 2 has matching parameters.
    res = run("zoo", f"kv_share:preset=cla2,{OPTS}", spec_of("layers=2,threshold=-1,lowest=0"))
    rec = res.records[-1]
    assert rec.details["merges"] == [] and rec.details["tried"] == []
    assert [s["site"] for s in rec.skipped] == ["blocks 2..3", "blocks 1..2", "blocks 0..1"]
    assert all("other parameters" in s["reason"] for s in rec.skipped)
    assert rec.details["best_similarity"] is None


# --- Hugging Face ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["llama", "bert"])
def test_collapse_blocks_hugging_face(key: str) -> None:
    container = CONTAINER[key]
    model = model_of(key)
    res = collapse(key, "layers=2,threshold=-1,max_merges=1")
    rec = res.records[-1]
    (merge,) = rec.details["merges"]
    assert merge["blocks"] == [2, 3] and merge["into"] == f"{container}.2"
    assert rec.details["stack"] == container and rec.details["blocks"] == 4
    assert rec.details["remaining_blocks"] == 3
    for rel, value in block_params(model, f"{container}.3").items():
        torch.testing.assert_close(res.module.get_parameter(f"{container}.2.{rel}"), value, rtol=0, atol=1e-6)
    left = {n for n, _ in res.module.named_parameters()}
    assert {f"{container}.{i}.{rel}" for i in (0, 1, 2) for rel in block_params(model, f"{container}.{i}")} <= left
    out = call(res.module, key)
    assert out.shape == call(model, key).shape
    torch.testing.assert_close(out, call(without(model, container, {2}), key), rtol=0, atol=1e-5)


# --- errors and purity -------------------------------------------------------------------------------------------


def test_collapse_blocks_bad_options() -> None:
    with pytest.raises(ConfigError, match="at least 2"):
        parse_pass("collapse_blocks:layers=1")
    with pytest.raises(ConfigError, match="cosine similarity"):
        parse_pass("collapse_blocks:threshold=1.5")
    with pytest.raises(ConfigError, match="interval"):
        parse_pass("collapse_blocks:interval=0")
    with pytest.raises(ConfigError, match="interval"):
        parse_pass("collapse_blocks:lowest=-1")


def test_collapse_blocks_run_longer_than_the_stack() -> None:
    with pytest.raises(ConfigError, match="fewer than layers=5"):
        collapse("zoo", "layers=5,lowest=0")
    with pytest.raises(ConfigError, match="fewer than layers=4"):
        collapse("zoo", "layers=4")  # lowest=1 leaves blocks 1..3
    with pytest.raises(ConfigError, match="fewer than layers=2"):
        collapse("zoo", "layers=2,lowest=3")


def test_collapse_blocks_leaves_the_users_model_alone() -> None:
    model = model_of("zoo")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = call(model, "zoo")
    res = depthfold.optimize(model, inputs_of("zoo"), [spec_of("layers=2,threshold=-1,max_merges=1")])
    assert res.records[-1].details["merges"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert len(model.layers) == 4
    torch.testing.assert_close(call(model, "zoo"), before, rtol=0, atol=0)
