"""The zoo's registry: model names, their specs, factories and example inputs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError, suggest
from .llama import llama_tiny
from .mobilenetv2 import mobilenetv2_100, mobilenetv2_140
from .resnet import resnet18, resnet34, resnet50
from .vgg import vgg19_bn
from .vit import vit_tiny

__all__ = [
    "Family",
    "ZooSpec",
    "list_models",
    "spec",
    "create",
    "example_inputs",
    "LLM_EXAMPLE_SEQ_LEN",
]

Family = Literal["cnn", "vit", "llm"]

LLM_EXAMPLE_SEQ_LEN = 32
"""Sequence length of the token ids ``example_inputs`` returns for language models."""


@dataclass(frozen=True)
class ZooSpec:
    """What the zoo knows about one model."""

    name: str
    """Registry name, as accepted by ``create`` (and ``zoo:<name>`` on the command line)."""
    family: Family
    """``"cnn"`` and ``"vit"`` take images (batch, C, H, W); ``"llm"`` takes int64 token ids (batch, seq)."""
    factory: Callable[..., nn.Module]
    """Builds a randomly initialised model; keyword arguments only."""
    default_resolution: int | None
    """Default input height/width for image models; ``None`` for language models."""
    description: str
    """One line: architecture and paper."""


_SPECS: dict[str, ZooSpec] = {
    s.name: s
    for s in (
        ZooSpec("llama_tiny", "llm", llama_tiny, None,
                "Llama-style byte-level decoder, 4 layers, GQA 4/2 heads (Touvron et al. 2023)"),
        ZooSpec("mobilenetv2_100", "cnn", mobilenetv2_100, 224,
                "MobileNetV2, width 1.0 (Sandler et al. 2018)"),
        ZooSpec("mobilenetv2_140", "cnn", mobilenetv2_140, 224,
                "MobileNetV2, width 1.4 (Sandler et al. 2018)"),
        ZooSpec("resnet18", "cnn", resnet18, 224, "ResNet-18, BasicBlock (He et al. 2016)"),
        ZooSpec("resnet34", "cnn", resnet34, 224, "ResNet-34, BasicBlock (He et al. 2016)"),
        ZooSpec("resnet50", "cnn", resnet50, 224, "ResNet-50, Bottleneck (He et al. 2016)"),
        ZooSpec("vgg19_bn", "cnn", vgg19_bn, 224,
                "VGG-19 with BatchNorm (Simonyan & Zisserman 2015)"),
        ZooSpec("vit_tiny", "vit", vit_tiny, 224,
                "Vision Transformer, dim 192, depth 6, 3 heads, patch 16 (Dosovitskiy et al. 2021)"),
    )
}


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_SPECS)


def spec(name: str) -> ZooSpec:
    """Return the ``ZooSpec`` for ``name``.

    Raises:
        ConfigError: ``name`` is not a zoo model; the message lists the known names.
    """
    try:
        return _SPECS[name]
    except KeyError:
        known = list_models()
        raise ConfigError(
            f"unknown zoo model {name!r}{suggest(name, known)} (known models: {', '.join(known)})"
        ) from None


def _check_kwargs(s: ZooSpec, kwargs: dict[str, Any]) -> None:
    params = [p for p in inspect.signature(s.factory).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
    valid = [p.name for p in params]
    for key in kwargs:
        if key not in valid:
            raise ConfigError(
                f"zoo model {s.name!r} has no option {key!r}{suggest(key, valid)} "
                f"(valid options: {', '.join(valid)})"
            )


def create(name: str, **kwargs: Any) -> nn.Module:
    """Build a fresh, randomly initialised zoo model in eval mode.

    Initialisation draws from torch's global RNG, so ``torch.manual_seed`` makes it reproducible.

    Args:
        name: a name from ``list_models()``.
        **kwargs: options of the model's factory, e.g. ``num_classes=10``, ``in_chans=1``;
            ``vit_tiny`` also takes ``img_size``, ``patch_size``, ``depth``, ``embed_dim``, ``num_heads``;
            ``llama_tiny`` takes ``vocab_size``, ``dim``, ``n_layers``, ``n_heads``, ``n_kv_heads``, ...

    Raises:
        ConfigError: unknown model name or option.
    """
    s = spec(name)
    _check_kwargs(s, kwargs)
    return s.factory(**kwargs).eval()


def example_inputs(
    name: str,
    batch: int = 1,
    resolution: int | None = None,
    seed: int = 0,
    *,
    in_chans: int = 3,
    seq_len: int = LLM_EXAMPLE_SEQ_LEN,
    vocab_size: int = 256,
) -> tuple[torch.Tensor, ...]:
    """Return deterministic example inputs for ``name`` (from ``seed``; torch's global RNG is untouched).

    Image models get ``(randn(batch, in_chans, res, res),)`` with ``res`` defaulting to the model's
    ``default_resolution`` (a ``vit_tiny`` at another resolution must be created with ``img_size=res``);
    language models get ``(randint(0, vocab_size, (batch, seq_len)),)`` as int64.

    Raises:
        ConfigError: unknown model name, or a non-positive size.
    """
    s = spec(name)
    gen = torch.Generator().manual_seed(seed)
    if batch < 1:
        raise ConfigError(f"batch must be at least 1, got {batch}")
    if s.family == "llm":
        if seq_len < 1:
            raise ConfigError(f"seq_len must be at least 1, got {seq_len}")
        return (torch.randint(0, vocab_size, (batch, seq_len), generator=gen, dtype=torch.int64),)
    res = s.default_resolution if resolution is None else resolution
    if res is None or res < 32:
        raise ConfigError(f"resolution must be at least 32 for {name!r}, got {res}")
    return (torch.randn(batch, in_chans, res, res, generator=gen),)
