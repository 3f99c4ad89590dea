"""The KV-cache decoder artifact: decode step derived from the captured graph, ONNX I/O names, greedy generation."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import depthfold
from depthfold import zoo
from depthfold.backends.decoder import greedy_reference
from depthfold.errors import ArtifactError, ConfigError, DepthfoldError, PreconditionError

transformers = pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


def _zoo(layers: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.create("llama_tiny", n_layers=layers, vocab_size=100, dim=64, hidden=128).eval()


def _llama() -> torch.nn.Module:
    return zoo.hf_text("llama")


def _tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hf_example() -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(1, 16), "attention_mask": torch.ones(1, 16, dtype=torch.long)}


def _inputs(path) -> dict[str, list]:  # type: ignore[no-untyped-def]
    model = onnx.load(str(path))
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def _outputs(path) -> list[str]:  # type: ignore[no-untyped-def]
    return [o.name for o in onnx.load(str(path)).graph.output]


@pytest.mark.slow
@pytest.mark.parametrize("passes", [[], ["kv_share:preset=cla2"]], ids=["original", "cla2"])
def test_decoder_zoo_generates_the_greedy_tokens(passes, tmp_path) -> None:
    res = depthfold.optimize(_zoo(), (_tokens(1, 16),), passes)
    art = depthfold.export_decoder(res, out_dir=tmp_path)
    owners = [0, 1, 2, 3] if not passes else [0, 2]
    names = _inputs(art.onnx_path)
    assert list(names) == ["input_ids", "attention_mask"] + [f"past_key_values.{i}.{k}" for i in owners
                                                             for k in ("key", "value")]
    assert _outputs(art.onnx_path) == ["logits"] + [f"present.{i}.{k}" for i in owners for k in ("key", "value")]
    assert names["input_ids"] == ["batch_size", "sequence_length"]
    assert names["past_key_values.0.key"] == ["batch_size", 2, "past_sequence_length", 16]
    meta = json.loads(art.json_path.read_text())
    assert meta["owners"] == owners and meta["max_length"] == 128
    assert meta["sources"] == ([0, 1, 2, 3] if not passes else [0, 0, 2, 2])
    assert meta["kv_bytes_per_token"] == len(owners) * 2 * 2 * 16 * 4
    assert res.report["decoder"]["owners"] == owners
    prompt = _tokens(2, 8, seed=3)
    got, stats = depthfold.generate(tmp_path, prompt, max_new_tokens=32, stats=True)
    assert got.shape == (2, 40)
    np.testing.assert_array_equal(got, greedy_reference(res.module, prompt, 32).numpy())
    assert stats["kv_bytes_per_token"] == meta["kv_bytes_per_token"] and stats["new_tokens"] == 32
    assert stats["prefill_ms"] > 0 and stats["decode_tokens_per_s"] > 0


@pytest.mark.slow
def test_decoder_hf_llama_matches_transformers_generate(tmp_path) -> None:
    model = _llama()
    depthfold.export_decoder(model, _hf_example(), tmp_path)
    prompt = _tokens(1, 6, seed=5)
    got = depthfold.generate(tmp_path, prompt, max_new_tokens=32)
    model.generation_config.eos_token_id = None  # a random model may pick the EOS id; plain greedy goes on
    model.generation_config.pad_token_id = 0
    with torch.no_grad():
        want = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False)
    np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.slow
def test_decoder_hf_llama_shared_cache_has_owner_io_only(tmp_path) -> None:
    res = depthfold.optimize(_llama(), _hf_example(), ["kv_share:preset=cla3"])
    art = depthfold.export_decoder(res, out_dir=tmp_path)
    assert [n for n in _inputs(art.onnx_path) if n.startswith("past")] == [
        "past_key_values.0.key", "past_key_values.0.value", "past_key_values.3.key", "past_key_values.3.value"]
    assert art.meta["sources"] == [0, 0, 0, 3]
    prompt = _tokens(2, 5, seed=2)
    np.testing.assert_array_equal(depthfold.generate(tmp_path, prompt, max_new_tokens=16),
                                  greedy_reference(res.module, prompt, 16).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_decoder_other_hf_decoders(name, tmp_path) -> None:
    model = zoo.hf_text(name, layers=2)
    res = depthfold.optimize(model.eval(), _hf_example(), [])
    art = depthfold.export_decoder(res, out_dir=tmp_path)
    kv_heads = 1 if name == "qwen2" else 4
    assert _inputs(art.onnx_path)["past_key_values.1.value"] == ["batch_size", kv_heads, "past_sequence_length", 8]
    prompt = _tokens(1, 4, seed=9)
    np.testing.assert_array_equal(depthfold.generate(tmp_path, prompt, max_new_tokens=12),
                                  greedy_reference(res.module, prompt, 12).numpy())


def test_decoder_refuses_an_encoder_and_writes_nothing(tmp_path) -> None:
    bert = zoo.hf_text("bert", layers=2)
    with pytest.raises(DepthfoldError, match="decode step does not reproduce|causal"):
        depthfold.export_decoder(bert, _hf_example(), tmp_path / "out")
    assert not (tmp_path / "out" / "decoder.onnx").exists() and not (tmp_path / "out" / "decoder.json").exists()


def test_decoder_refuses_a_model_without_attention(tmp_path) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Linear(8, 10))
    with pytest.raises(PreconditionError, match="no attention"):
        depthfold.export_decoder(model, (torch.randint(0, 10, (1, 6)),), tmp_path)


def test_decoder_needs_example_inputs_for_a_model(tmp_path) -> None:
    with pytest.raises(ConfigError, match="example inputs"):
        depthfold.export_decoder(_zoo(1), None, tmp_path)


@pytest.mark.slow
def test_decoder_generate_checks_its_inputs_and_stops_at_eos(tmp_path) -> None:
    with pytest.raises(ArtifactError, match="export_decoder"):
        depthfold.generate(tmp_path / "missing", [1, 2, 3])
    res = depthfold.optimize(_zoo(2), (_tokens(1, 16),), [])
    depthfold.export_decoder(res, out_dir=tmp_path)
    with pytest.raises(ConfigError, match="max_length 128"):
        depthfold.generate(tmp_path, _tokens(1, 100), max_new_tokens=40)
    with pytest.raises(ConfigError, match=r"\[0, 100\)"):
        depthfold.generate(tmp_path, [1, 2, 300])
    prompt = _tokens(1, 6, seed=1)
    free = depthfold.generate(tmp_path, prompt, max_new_tokens=10)
    eos = int(free[0, 8])  # the third generated token
    stopped = depthfold.generate(tmp_path, prompt, max_new_tokens=10, eos_token_id=eos)
    assert stopped.shape == free.shape
    first = int(np.argmax(free[0, 6:] == eos)) + 6
    np.testing.assert_array_equal(stopped[0, :first + 1], free[0, :first + 1])
    assert (stopped[0, first:] == eos).all()


@pytest.mark.slow
def test_decoder_after_dropping_blocks_reindexes_the_cache_and_reports_timing(tmp_path) -> None:
    res = depthfold.optimize(_zoo(), (_tokens(1, 16),), ["drop_layers:layers=1+2,train_samples=8,eval_samples=8",
                                                        "kv_share:preset=cla2,train_samples=8,eval_samples=8"])
    art = depthfold.export_decoder(res, out_dir=tmp_path, measure=True)
    assert art.meta["layers"] == 2 and art.meta["owners"] == [0] and art.meta["sources"] == [0, 0]
    assert [n for n in _inputs(art.onnx_path) if n.startswith("past")] == ["past_key_values.0.key",
                                                                          "past_key_values.0.value"]
    timing = res.report["decoder"]["generation"]
    assert timing["prefill_ms"] > 0 and timing["decode_tokens_per_s"] > 0 and timing["kv_bytes_per_token"] == 256
    prompt = _tokens(1, 5, seed=4)
    np.testing.assert_array_equal(depthfold.generate(tmp_path, prompt, max_new_tokens=8),
                                  greedy_reference(res.module, prompt, 8).numpy())
