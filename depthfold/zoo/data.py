"""Offline data for the zoo: scikit-learn's digits images and a byte-level text corpus.

Nothing is downloaded. ``load_digits`` ships inside scikit-learn (1,797 8x8 grey images of the digits 0-9,
from the UCI "Optical Recognition of Handwritten Digits" set); the text corpus is the source of a fixed
list of standard-library modules, which every Python install has.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from ..errors import ConfigError

__all__ = [
    "CORPUS_MODULES",
    "CORPUS_MAX_BYTES",
    "digits_datasets",
    "text_corpus",
    "split_corpus",
    "lm_batches",
]

logger = logging.getLogger(__name__)

CORPUS_MODULES: tuple[str, ...] = (
    "_pydecimal", "argparse", "ast", "bisect", "calendar", "collections", "contextlib", "csv",
    "dataclasses", "difflib", "email.message", "enum", "fractions", "functools", "heapq", "http.client",
    "inspect", "json", "logging", "pathlib", "pprint", "random", "shlex", "shutil", "statistics", "string",
    "subprocess", "tarfile", "textwrap", "this", "threading", "tokenize", "typing", "zipfile",
)
"""Standard-library modules whose ``.py`` source makes up ``text_corpus()``, in this (sorted) order."""

CORPUS_MAX_BYTES = 2 * 1024 * 1024
"""``text_corpus()`` is cut to at most this many bytes."""


def digits_datasets(
    resolution: int = 32, channels: int = 3, seed: int = 0, *, test_fraction: float = 0.2,
) -> tuple[TensorDataset, TensorDataset]:
    """Return (train, test) ``TensorDataset``s of scikit-learn's digits as (images, labels).

    Pixels are scaled to [0, 1], upsampled bilinearly from 8x8 to ``resolution`` x ``resolution``,
    replicated to ``channels`` and normalised with the mean and standard deviation of the train split
    (one scalar each), so train images have mean 0 and std 1. The split is stratified by class and fixed
    by ``seed``. Images are float32 (N, channels, resolution, resolution); labels int64 (N,).

    Raises:
        ConfigError: ``resolution`` below 8, ``channels`` below 1, or ``test_fraction`` outside (0, 1).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if resolution < 8:
        raise ConfigError(f"digits resolution must be at least 8 (the images are 8x8), got {resolution}")
    if channels < 1:
        raise ConfigError(f"channels must be at least 1, got {channels}")
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed,
    )
    x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, 8, 8)
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x_train, x_test = x[torch.from_numpy(idx_train)], x[torch.from_numpy(idx_test)]
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y = torch.from_numpy(labels)
    y_train, y_test = y[torch.from_numpy(idx_train)], y[torch.from_numpy(idx_test)]
    return (
        TensorDataset(x_train.expand(-1, channels, -1, -1).contiguous(), y_train),
        TensorDataset(x_test.expand(-1, channels, -1, -1).contiguous(), y_test),
    )


def text_corpus(max_bytes: int = CORPUS_MAX_BYTES) -> bytes:
    """Return a deterministic byte-level corpus: the sources of ``CORPUS_MODULES``, concatenated.

    Modules are read in sorted order, separated by a blank line, and the result is cut to ``max_bytes``.
    A module missing from this install, or frozen without a ``.py`` file, is left out (logged at DEBUG),
    so the corpus is fixed for one Python install but may differ between Python versions.
    """
    parts: list[bytes] = []
    for name in sorted(CORPUS_MODULES):
        found = importlib.util.find_spec(name)
        origin = found.origin if found is not None else None
        if origin is None or not origin.endswith(".py") or not Path(origin).is_file():
            logger.debug("text_corpus: no source file for module %s; left out", name)
            continue
        parts.append(Path(origin).read_bytes())
    return b"\n\n".join(parts)[:max_bytes]


def split_corpus(corpus: bytes, val_fraction: float = 0.1) -> tuple[bytes, bytes]:
    """Split a corpus into (train, validation): the last ``val_fraction`` of its bytes is held out."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    cut = int(len(corpus) * (1.0 - val_fraction))
    return corpus[:cut], corpus[cut:]


def lm_batches(
    corpus: bytes, seq_len: int, batch_size: int, seed: int = 0, *, num_batches: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (input_ids, targets) int64 batches of random windows from ``corpus``.

    Each row is a window of ``seq_len + 1`` consecutive bytes starting at a random offset:
    ``input_ids`` is its first ``seq_len`` bytes, ``targets`` the same shifted by one. Offsets come from a
    generator seeded with ``seed`` (torch's global RNG is untouched). The iterator is endless unless
    ``num_batches`` is given.

    Raises:
        ConfigError: the corpus is shorter than one window, or a size is not positive.
    """
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
    if len(corpus) < seq_len + 1:
        raise ConfigError(f"corpus of {len(corpus)} bytes is shorter than one window of {seq_len + 1}")
    data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(torch.int64)
    gen = torch.Generator().manual_seed(seed)
    window = torch.arange(seq_len + 1)
    count = 0
    while num_batches is None or count < num_batches:
        starts = torch.randint(0, len(data) - seq_len, (batch_size, 1), generator=gen)
        rows = data[starts + window]
        yield rows[:, :-1], rows[:, 1:]
        count += 1
