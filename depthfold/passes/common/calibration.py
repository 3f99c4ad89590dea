"""Calibration data for approximate passes: read once (:mod:`depthfold.data`), split into train and held-out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...data import Samples, read_samples, synthetic_samples
from ...errors import ConfigError

__all__ = ["Calibration", "calibration_split"]


@dataclass(frozen=True)
class Calibration:
    """Calibration samples split once: ``train`` to fit candidates and recover on, ``held_out`` to score."""

    train: Samples
    held_out: Samples
    batch_size: int

    @property
    def synthetic(self) -> bool:
        """No data was given: the samples are random inputs shaped like the example inputs."""
        return self.train.synthetic


def calibration_split(data: Any, example_inputs: Sequence[torch.Tensor], *, names: Sequence[str] = (),
                      free_dims: Sequence[Sequence[int]] = (), eval_samples: int = 256, train_samples: int = 512,
                      batch_size: int = 64, seed: int = 0) -> Calibration:
    """Read at most ``eval_samples + train_samples`` samples of ``data`` (any form :func:`read_samples` takes)
    and split them in a seeded random order: up to a third (at most ``eval_samples``) held out, the rest to train.

    Without data, standard-normal inputs shaped like the example inputs are used (and reported).
    """
    generator = torch.Generator().manual_seed(seed)
    if data is None:
        samples = synthetic_samples(example_inputs, eval_samples + min(train_samples, 256), names=names,
                                    generator=generator)
    else:
        samples = read_samples(data, example_inputs, names=names, free_dims=free_dims,
                               limit=eval_samples + train_samples, seed=seed, what="calibration data")
        if len(samples) < 2:
            raise ConfigError(f"calibration data has {len(samples)} sample(s); give at least a few hundred")
    order = torch.randperm(len(samples), generator=generator)
    n_eval = min(eval_samples, max(1, len(samples) // 3))
    train = samples.select(order[n_eval:n_eval + train_samples])
    return Calibration(train, samples.select(order[:n_eval]), min(batch_size, len(train)) or 1)
