"""Self-speculative decoding on decoder artifacts: a draft with blocks dropped proposes, the full model verifies.

The tokens must equal plain greedy decoding of the full model with its cache (itself checked against
re-running the captured model without a cache in test_decoder.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import depthfold
from depthfold import zoo
from depthfold.errors import ConfigError

pytest.importorskip("onnxruntime")


def _prompts(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 100, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def zoo_decoders(tmp_path_factory):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = zoo.create("llama_tiny", n_layers=4, vocab_size=100, dim=64, hidden=128).eval()
    root = tmp_path_factory.mktemp("speculative")
    example = (_prompts(1, 16, 0),)
    depthfold.export_decoder(depthfold.optimize(model, example, []), out_dir=root / "full")
    depthfold.export_decoder(depthfold.optimize(model, example, ["drop_layers:layers=2,3"]), out_dir=root / "draft")
    return root / "full", root / "draft"


@pytest.mark.parametrize("draft_tokens", [1, 3, 6])
def test_speculative_tokens_equal_greedy(zoo_decoders, draft_tokens) -> None:  # type: ignore[no-untyped-def]
    full, draft = zoo_decoders
    prompts = _prompts(3, 12, 1)
    plain = depthfold.generate(full, prompts, 40)
    got, stats = depthfold.generate(full, prompts, 40, draft=draft, draft_tokens=draft_tokens, stats=True)
    np.testing.assert_array_equal(got, plain)
    assert 0.0 <= stats["acceptance_rate"] <= 1.0
    assert stats["verify_steps"] >= 3 * 39 / (draft_tokens + 1)
    assert stats["tokens_per_s"] > 0


def test_the_model_as_its_own_draft_accepts_everything(zoo_decoders) -> None:  # type: ignore[no-untyped-def]
    full, _ = zoo_decoders
    prompt = _prompts(1, 8, 2)
    got, stats = depthfold.generate(full, prompt, 33, draft=full, draft_tokens=4, stats=True)
    np.testing.assert_array_equal(got, depthfold.generate(full, prompt, 33))
    assert stats["acceptance_rate"] == 1.0
    assert stats["verify_steps"] == 7  # 32 tokens after the prefill's: 4 drafted + 1 from the verifier per step


def test_speculative_stops_at_eos(zoo_decoders) -> None:  # type: ignore[no-untyped-def]
    full, draft = zoo_decoders
    prompts = _prompts(2, 10, 3)
    plain = depthfold.generate(full, prompts, 30)
    eos = int(plain[0, 10 + 12])
    want = depthfold.generate(full, prompts, 30, eos_token_id=eos)
    got = depthfold.generate(full, prompts, 30, eos_token_id=eos, draft=draft, draft_tokens=3)
    np.testing.assert_array_equal(got, want)
    assert (got[0, 10 + 13:] == eos).all()


def test_hf_llama_draft(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = zoo.hf_text("llama")
    example = {"input_ids": _prompts(1, 16, 0), "attention_mask": torch.ones(1, 16, dtype=torch.long)}
    depthfold.export_decoder(depthfold.optimize(model, example, []), out_dir=tmp_path / "full")
    depthfold.export_decoder(depthfold.optimize(model, example, ["drop_layers:layers=1"]), out_dir=tmp_path / "draft")
    prompts = _prompts(2, 8, 4)
    np.testing.assert_array_equal(
        depthfold.generate(tmp_path / "full", prompts, 24, draft=tmp_path / "draft", draft_tokens=3),
        depthfold.generate(tmp_path / "full", prompts, 24))


def test_bad_drafts(zoo_decoders, tmp_path) -> None:  # type: ignore[no-untyped-def]
    full, draft = zoo_decoders
    with pytest.raises(ConfigError, match="draft_tokens must be at least 1"):
        depthfold.generate(full, _prompts(1, 8, 0), 4, draft=draft, draft_tokens=0)
    torch.manual_seed(0)
    other = zoo.create("llama_tiny", n_layers=2, vocab_size=50, dim=64, hidden=128).eval()
    depthfold.export_decoder(depthfold.optimize(other, (_prompts(1, 16, 0) % 50,), []), out_dir=tmp_path / "other")
    with pytest.raises(ConfigError, match=r"vocabulary \(50\) differs"):
        depthfold.generate(full, _prompts(1, 8, 0), 4, draft=tmp_path / "other")
