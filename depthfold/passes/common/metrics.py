"""Task metrics for approximate passes: a registry of teacher/student measures on calibration samples.

Each metric compares the student's outputs with the teacher's (the pipeline's original) on the same
samples: ``accuracy`` (top-1 against labels), ``kl`` (KL(teacher || student) of the output softmax),
``perplexity`` (of a causal LM on its own next tokens, Jelinek et al. 1977), ``cosine`` (mean cosine
similarity of the outputs, e.g. sentence embeddings; mean-pooled over the attention mask for token outputs) and
``token_cosine`` (cosine per position, averaged over the unpadded positions: how close token representations
or logits stay, the similarity LaCo and ShortGPT use).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...data import Samples
from ...errors import ConfigError, suggest

__all__ = ["METRICS", "Metric", "accuracy", "batched_outputs", "check_metrics", "cosine", "evaluate", "kl_divergence", "logits_of",
           "perplexity", "token_cosine", "token_mask"]


@dataclass(frozen=True)
class Metric:
    """A measure of one model's outputs on samples, given the teacher's outputs on the same samples."""

    name: str
    higher_is_better: bool
    fn: Callable[[torch.Tensor, torch.Tensor, Samples], float | None]
    """``fn(teacher_out, student_out, samples)``; None where it does not apply (say, accuracy without labels)."""


def logits_of(value: Any) -> torch.Tensor | None:
    """The main output of a model: the tensor itself, ``.logits``, or the first tensor in a tuple/list/dict."""
    if isinstance(value, torch.Tensor):
        return value
    logits = value.get("logits") if isinstance(value, dict) else getattr(value, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:  # a Hugging Face ModelOutput is a dict
        found = logits_of(item)
        if found is not None:
            return found
    return None


def batched_outputs(model: nn.Module, samples: Samples, batch_size: int) -> torch.Tensor:
    """The model's main output (:func:`logits_of`) on every sample, ``batch_size`` at a time, concatenated."""
    chunks = []
    with torch.no_grad():
        for batch in samples.batches(batch_size):
            out = logits_of(model(*batch))
            if out is None:
                raise ConfigError(f"{type(model).__name__} returned no tensor; metrics need a model that returns "
                                  "logits (a tensor, or a tuple or dict holding one)")
            chunks.append(out)
    return torch.cat(chunks)


def accuracy(teacher: torch.Tensor, student: torch.Tensor, samples: Samples) -> float | None:
    """Top-1 accuracy against the labels (classification outputs ``[N, classes]`` only)."""
    labels = samples.labels
    if labels is None or student.dim() != 2 or labels.shape != student.shape[:1]:
        return None
    return float((student.argmax(-1) == labels.to(student.device)).float().mean())


def kl_divergence(teacher: torch.Tensor, student: torch.Tensor, samples: Samples) -> float:
    """Mean KL(softmax(teacher) || softmax(student)) over samples (and positions), last dimension = classes."""
    t = F.log_softmax(teacher.flatten(0, -2).double(), dim=-1)
    s = F.log_softmax(student.flatten(0, -2).double(), dim=-1)
    return float(F.kl_div(s, t, log_target=True, reduction="batchmean"))


def perplexity(teacher: torch.Tensor, student: torch.Tensor, samples: Samples) -> float | None:
    """exp of the mean next-token cross-entropy of a causal LM's logits ``[N, S, V]`` on its ``input_ids``
    (or the labels), ignoring padded positions (``attention_mask == 0``) and labels of -100."""
    if student.dim() != 3:
        return None
    names = dict(zip(samples.names, samples.inputs))
    tokens = samples.labels if samples.labels is not None and samples.labels.dim() == 2 else names.get("input_ids")
    if tokens is None or tokens.shape != student.shape[:2] or int(tokens.max()) >= student.shape[-1]:
        return None  # not next-token logits over this vocabulary (say, hidden states of an encoder)
    target = tokens[:, 1:].clone()
    mask = names.get("attention_mask")
    if mask is not None and mask.shape == tokens.shape:
        target[mask[:, 1:] == 0] = -100
    loss = F.cross_entropy(student[:, :-1].reshape(-1, student.shape[-1]).double(), target.reshape(-1).long(),
                           ignore_index=-100)
    return float(math.exp(loss))


def cosine(teacher: torch.Tensor, student: torch.Tensor, samples: Samples) -> float:
    """Mean cosine similarity of student and teacher outputs per sample (token outputs ``[N, S, H]`` are
    mean-pooled over the attention mask first, as sentence-embedding models pool)."""
    if student.dim() == 3:
        mask = dict(zip(samples.names, samples.inputs)).get("attention_mask")
        weights = (mask.to(student.dtype) if mask is not None and mask.shape == student.shape[:2]
                   else torch.ones(student.shape[:2], dtype=student.dtype)).unsqueeze(-1)
        teacher = (teacher * weights).sum(1) / weights.sum(1).clamp_min(1)
        student = (student * weights).sum(1) / weights.sum(1).clamp_min(1)
    return float(F.cosine_similarity(student.flatten(1).double(), teacher.flatten(1).double(), dim=-1).mean())


def token_mask(samples: Samples, shape: Sequence[int]) -> torch.Tensor | None:
    """The samples' ``attention_mask`` as a bool ``[N, S]`` tensor when it matches ``shape[:2]``, else None."""
    mask = dict(zip(samples.names, samples.inputs)).get("attention_mask")
    return mask.bool() if mask is not None and tuple(mask.shape) == tuple(shape[:2]) else None


def token_cosine(teacher: torch.Tensor, student: torch.Tensor, samples: Samples) -> float:
    """Mean cosine similarity along the last dimension per position, over unpadded positions (``[N, S, H]``;
    other ranks are compared per sample)."""
    if student.dim() != 3:
        return cosine(teacher, student, samples)
    cos = F.cosine_similarity(student.double(), teacher.double(), dim=-1)
    mask = token_mask(samples, cos.shape)
    return float(cos[mask].mean() if mask is not None else cos.mean())


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("accuracy", True, accuracy),
    Metric("kl", False, kl_divergence),
    Metric("perplexity", False, perplexity),
    Metric("cosine", True, cosine),
    Metric("token_cosine", True, token_cosine),
)}


def check_metrics(names: Sequence[str]) -> None:
    """Raise ``ConfigError`` for a name that is not in :data:`METRICS`, suggesting the closest."""
    for name in names:
        if name not in METRICS:
            raise ConfigError(f"unknown metric {name!r}; known: {', '.join(METRICS)}{suggest(name, METRICS)}")


def evaluate(teacher: torch.Tensor, student: torch.Tensor, samples: Samples,
             metrics: Sequence[str] = ("kl", "accuracy")) -> dict[str, float | None]:
    """Each named metric of the student's outputs (``teacher``: the original's outputs on the same samples)."""
    check_metrics(metrics)
    return {name: METRICS[name].fn(teacher, student, samples) for name in metrics}
