"""Offline zoo data: digits datasets and the byte-level text corpus."""

from __future__ import annotations

import pytest
import torch

from depthfold import zoo
from depthfold.errors import ConfigError
from depthfold.zoo.data import CORPUS_MAX_BYTES


def test_digits_shapes_split_and_normalisation() -> None:
    train, test = zoo.digits_datasets(resolution=32, channels=3, seed=0)
    x_train, y_train = train.tensors
    x_test, y_test = test.tensors
    assert len(train) + len(test) == 1797
    assert len(test) == pytest.approx(0.2 * 1797, abs=1)
    assert x_train.shape[1:] == (3, 32, 32) and x_train.dtype == torch.float32
    assert y_train.dtype == torch.int64 and set(y_train.tolist()) == set(range(10))
    assert abs(float(x_train.mean())) < 1e-4
    assert float(x_train.std()) == pytest.approx(1.0, abs=1e-3)
    assert abs(float(x_test.mean())) < 0.1  # test split uses the train statistics
    assert torch.equal(x_train[:, 0], x_train[:, 2])  # channels are replicas
    # Stratified: every class has about the same share in both splits.
    share_train = torch.bincount(y_train, minlength=10) / len(y_train)
    share_test = torch.bincount(y_test, minlength=10) / len(y_test)
    assert torch.allclose(share_train, share_test, atol=0.01)


def test_digits_deterministic_by_seed_and_other_sizes() -> None:
    a, _ = zoo.digits_datasets(resolution=8, channels=1, seed=1)
    b, _ = zoo.digits_datasets(resolution=8, channels=1, seed=1)
    c, _ = zoo.digits_datasets(resolution=8, channels=1, seed=2)
    assert a.tensors[0].shape[1:] == (1, 8, 8)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[1], c.tensors[1])
    big, _ = zoo.digits_datasets(resolution=64, channels=3)
    assert big.tensors[0].shape[1:] == (3, 64, 64)


def test_digits_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="at least 8"):
        zoo.digits_datasets(resolution=4)
    with pytest.raises(ConfigError, match="channels"):
        zoo.digits_datasets(channels=0)


def test_text_corpus_deterministic_and_substantial() -> None:
    corpus = zoo.text_corpus()
    assert isinstance(corpus, bytes)
    assert corpus == zoo.text_corpus()
    assert 500_000 < len(corpus) <= CORPUS_MAX_BYTES
    assert b"import" in corpus and b"def " in corpus
    assert len(zoo.text_corpus(max_bytes=1000)) == 1000


def test_split_corpus() -> None:
    train, val = zoo.split_corpus(b"x" * 100, val_fraction=0.1)
    assert (len(train), len(val)) == (90, 10)


def test_lm_batches_shift_by_one_and_seeded() -> None:
    corpus = bytes(range(256)) * 4
    batches = list(zoo.lm_batches(corpus, seq_len=16, batch_size=4, seed=0, num_batches=3))
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], (x[:, -1] + 1) % 256)  # consecutive bytes in this corpus
    again = next(iter(zoo.lm_batches(corpus, seq_len=16, batch_size=4, seed=0)))
    assert torch.equal(again[0], x)
    other = next(iter(zoo.lm_batches(corpus, seq_len=16, batch_size=4, seed=1)))
    assert not torch.equal(other[0], x)


def test_lm_batches_rejects_short_corpus() -> None:
    with pytest.raises(ConfigError, match="shorter"):
        next(iter(zoo.lm_batches(b"abc", seq_len=16, batch_size=2)))
