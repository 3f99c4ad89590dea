"""Hugging Face models capture with torch.export and go through the exact pipeline (no downloads: config-built)."""

from __future__ import annotations

import pytest
import torch

import depthfold

transformers = pytest.importorskip("transformers")


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))


def test_bert_qkv_fused_and_output_type_kept():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(config).eval()
    res = depthfold.optimize(model, (_ids(),), depthfold.EXACT_PASSES)
    fuse = next(r for r in res.records if r.name == "fuse_qkv")
    assert len(fuse.changes) == 2  # one Q/K/V fusion per layer
    assert all(c["sizes"] == [32, 32, 32] for c in fuse.changes)
    out = res.module(_ids())
    assert type(out).__name__ == type(model(_ids())).__name__
    torch.testing.assert_close(out.last_hidden_state, model(_ids()).last_hidden_state, rtol=1e-4, atol=1e-5)


def test_llama_decoder_captures_without_touching_the_users_cache_setting():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64)
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.config.use_cache
    res = depthfold.optimize(model, (_ids(),), depthfold.EXACT_PASSES)
    assert model.config.use_cache, "the user's model config must not change"
    fuse = next(r for r in res.records if r.name == "fuse_qkv")
    kinds = sorted(tuple(c["sizes"]) for c in fuse.changes)
    assert kinds == [(32, 16, 16), (32, 16, 16), (64, 64), (64, 64)]  # q/k/v (GQA) and gate/up per layer
    torch.testing.assert_close(res.module(_ids()).logits, model(_ids(), use_cache=False).logits,
                               rtol=1e-4, atol=1e-5)


def _tokens(batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 2:] = 0  # a padded sample
    return {"input_ids": torch.randint(0, 100, (batch, seq), generator=gen), "attention_mask": mask}


def _bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def _llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.slow
@pytest.mark.parametrize(("make", "output"), [(_bert, "last_hidden_state"), (_llama, "logits")])
def test_hf_keyword_inputs_capture_dynamic_and_run_in_onnxruntime(make, output, tmp_path):
    """``model(**batch)`` inputs: captured with dynamic batch and sequence, exact passes, then ONNX Runtime at
    another batch size and sequence length than the example's."""
    ort = pytest.importorskip("onnxruntime")
    model = make()
    res = depthfold.optimize(model, _tokens(2, 8), depthfold.EXACT_PASSES)
    assert res.report["capture"]["batch"] and res.report["capture"]["seq"], res.report["capture"]
    other = _tokens(3, 11, seed=1)
    with torch.no_grad():
        want = getattr(model(**other), output)
        got = getattr(res.module(**other), output)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    artifact = res.export_onnx(tmp_path / "model.onnx")
    assert artifact.input_names == ("input_ids", "attention_mask")
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in
            __import__("onnx").load(str(artifact.path)).graph.input]
    assert dims == [["batch_size", "sequence_length"]] * 2
    (onnx_out, *_) = session.run(None, {k: v.numpy() for k, v in other.items()})
    assert abs(onnx_out - want.numpy()).max() < 1e-4
