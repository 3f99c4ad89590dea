"""One reader for calibration and training data: whatever form a user hands in becomes :class:`Samples`.

Accepted forms (``k`` = the number of model inputs, in capture order):

* a tensor (``k == 1``): stacked samples;
* a tuple/list of ``k`` tensors (stacked inputs) or ``k + 1`` (inputs, then labels), e.g. ``(x, y)``;
* a dict of stacked tensors keyed by input name (plus ``labels``), e.g. a tokenizer's ``BatchEncoding``;
* a ``TensorDataset`` or any map-style ``Dataset`` whose items are single samples (tensors, tuples, dicts);
  items are collated with ``torch.utils.data.default_collate``, drawn in a seeded random order;
* a ``DataLoader``, a list of batches or any iterable of batches (each a tensor, tuple or dict as above),
  read lazily until enough samples are in.

A list of ``k`` or ``k + 1`` tensors is read as stacked inputs (``(x, y)``; labels of another length are
refused), except that for a one-input model a list whose tensors could each be a batch of that input
(``[x[:6], x[6:]]``), or whose first tensor does not fit it, is a list of batches, as is any other list.
Only ``limit`` samples are ever read, so a large loader costs what it yields, not its length.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset, default_collate

from .errors import ConfigError
from .ir.digest import digest_tensors
from .ir.verify import random_like

__all__ = ["ACCEPTED_FORMS", "LABEL_KEYS", "Samples", "read_samples", "synthetic_samples"]

LABEL_KEYS: tuple[str, ...] = ("labels", "label", "y", "targets", "target")
"""Keys of a dict batch that hold labels rather than a model input."""

ACCEPTED_FORMS = ("a tensor, a tuple (inputs..., [labels]) of tensors, a dict {input name: tensor, 'labels': "
                  "tensor}, a TensorDataset, a Dataset yielding tensors/tuples/dicts, a DataLoader, or any "
                  "iterable of such batches")

_DATASET_CHUNK = 256
"""Dataset items collated at a time."""


@dataclass(frozen=True)
class Samples:
    """Calibration samples: one tensor per model input (samples stacked on dim 0) and optional labels."""

    inputs: tuple[torch.Tensor, ...]
    """In the model's input order."""
    labels: torch.Tensor | None
    names: tuple[str, ...]
    """The model's input names, aligned with ``inputs``."""
    source: str = ""
    """What was read, for reports (e.g. ``"DataLoader: 4 batches"``)."""
    synthetic: bool = False
    """Random inputs made up because no data was given."""

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])

    def select(self, index: torch.Tensor | slice) -> Samples:
        """The samples at ``index`` (a slice or an index tensor)."""
        return Samples(tuple(t[index] for t in self.inputs), None if self.labels is None else self.labels[index],
                       self.names, self.source, self.synthetic)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        """The inputs in order, ``batch_size`` samples at a time (the last batch may be smaller)."""
        for start in range(0, len(self), batch_size):
            yield tuple(t[start:start + batch_size] for t in self.inputs)

    def digest(self) -> str:
        """A content hash of inputs and labels (cache keys)."""
        return digest_tensors(*self.inputs, self.labels)


def synthetic_samples(example_inputs: Sequence[torch.Tensor], count: int, *, names: Sequence[str] = (),
                      seed: int = 0, generator: torch.Generator | None = None) -> Samples:
    """``count`` random samples shaped like the example inputs: standard-normal floats, integers uniform over
    the examples' observed range (token ids), coin-flip booleans. Drawn from ``generator`` if given, else from
    one seeded with ``seed``."""
    gen = generator if generator is not None else torch.Generator().manual_seed(seed)
    inputs = [random_like(t, (count, *t.shape[1:]), gen) for t in example_inputs]
    return Samples(tuple(inputs), None, _names(names, len(inputs)), "synthetic (standard normal)", True)


def read_samples(data: Any, example_inputs: Sequence[torch.Tensor], *, names: Sequence[str] = (),
                 free_dims: Sequence[Collection[int]] = (), limit: int | None = None, seed: int = 0,
                 what: str = "data") -> Samples:
    """Read at most ``limit`` samples of ``data`` (any form in the module docstring) for a model captured on
    ``example_inputs``.

    Args:
        data: the user's data.
        example_inputs: the model's example inputs (batch first); samples must match their shapes and dtypes.
        names: the model's input names (dict batches are matched by them); default ``input0, input1, ...``.
        free_dims: per input, dimensions besides the batch that may differ from the example (a dynamic
            sequence length); they must still agree across the data.
        limit: read no more samples than this (None: all).
        seed: the order map-style datasets are drawn in.
        what: how messages name the data (``"data"``, ``"calibration data"``).

    Raises:
        ConfigError: a form it cannot read (naming what it got and the accepted forms), samples that do not
            match the example inputs (both shapes named), no samples, labels of another length, dict keys
            that name no input.
    """
    reader = _Reader(tuple(example_inputs), _names(names, len(example_inputs)), free_dims, what)
    if limit is not None and limit < 1:
        raise ConfigError(f"{what}: limit must be >= 1, got {limit}")
    if data is None:
        raise ConfigError(f"{what} is None; pass {ACCEPTED_FORMS}")
    if isinstance(data, TensorDataset):
        n = len(data)
        take = n if limit is None else min(n, limit)
        index = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:take] if take < n else slice(None)
        return reader.finish([reader.batch(tuple(t[index] for t in data.tensors), "TensorDataset")],
                             f"TensorDataset: {take} of {n} samples", limit)
    if isinstance(data, (torch.Tensor, np.ndarray, Mapping)) or (isinstance(data, (tuple, list))
                                                                   and reader.is_stacked(data)):
        return reader.finish([reader.batch(data, "data")], f"{type(data).__name__} of stacked samples", limit)
    if isinstance(data, DataLoader):
        return reader.from_batches(data, "DataLoader", limit)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        return reader.from_dataset(data, limit, seed)
    if isinstance(data, (tuple, list)) or (isinstance(data, Iterable) and not isinstance(data, (str, bytes))):
        return reader.from_batches(data, type(data).__name__, limit)
    raise ConfigError(f"{what} must be {ACCEPTED_FORMS}; got {type(data).__name__}")


def _names(names: Sequence[str], count: int) -> tuple[str, ...]:
    if names and len(names) != count:
        raise ConfigError(f"{len(names)} input names given for {count} inputs")
    return tuple(names) or tuple(f"input{i}" for i in range(count))


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


class _Reader:
    """Turns batches of any accepted form into checked ``(inputs, labels)`` and stacks them."""

    def __init__(self, examples: tuple[torch.Tensor, ...], names: tuple[str, ...],
                 free_dims: Sequence[Collection[int]], what: str) -> None:
        if not examples:
            raise ConfigError("the model has no tensor inputs to read data for")
        self.examples = examples
        self.names = names
        self.free = [frozenset(free_dims[i]) if i < len(free_dims) else frozenset() for i in range(len(examples))]
        self.what = what

    def fits(self, value: Any, i: int) -> bool:
        """Whether ``value`` could be stacked samples of input ``i``."""
        ex = self.examples[i]
        if not isinstance(value, (torch.Tensor, np.ndarray)) or value.ndim != ex.dim() or ex.dim() == 0:
            return False
        return all(d in self.free[i] or value.shape[d] == ex.shape[d] for d in range(1, ex.dim()))

    def is_stacked(self, seq: Sequence[Any]) -> bool:
        """``(inputs...)`` or ``(inputs..., labels)`` of stacked samples, rather than a list of batches."""
        k = len(self.examples)
        if not seq or not all(isinstance(t, (torch.Tensor, np.ndarray)) for t in seq):
            return False
        # With k > 1, bare tensors are never batches, so k or k + 1 of them are stacked (batch() checks shapes
        # and label length). With k == 1, a last tensor that could be a batch of the input makes it a list of
        # batches; one that could not is labels, of any length, so a wrong length is refused, not dropped.
        if len(seq) == k:
            return k > 1 or self.fits(seq[0], 0)
        if len(seq) == k + 1:
            return k > 1 or (self.fits(seq[0], 0) and not self.fits(seq[1], 0))
        return False

    def batch(self, batch: Any, where: str) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """Checked inputs and labels of one batch of stacked samples."""
        k = len(self.examples)
        labels: Any = None
        if isinstance(batch, (torch.Tensor, np.ndarray)):
            if k != 1:
                raise ConfigError(f"{self.what}: {where} is a single tensor but the model takes {k} inputs "
                                  f"({', '.join(self.names)}); give a tuple or a dict with one entry per input")
            values: list[Any] = [batch]
        elif isinstance(batch, Mapping):
            label_keys = [key for key in LABEL_KEYS if key in batch]
            labels = batch[label_keys[0]] if label_keys else None
            unknown = [key for key in batch if key not in self.names and key not in LABEL_KEYS]
            if unknown:
                raise ConfigError(f"{self.what}: {where} has key {unknown[0]!r}, which is not an input the model "
                                  f"was captured with ({', '.join(self.names)}) nor a label key "
                                  f"({', '.join(LABEL_KEYS)}); add it to the example inputs or drop it")
            missing = [name for name in self.names if name not in batch]
            if missing:
                raise ConfigError(f"{self.what}: {where} has no {missing[0]!r}; the model was captured with inputs "
                                  f"{', '.join(self.names)}, so each batch needs all of them")
            values = [batch[name] for name in self.names]
        elif isinstance(batch, (tuple, list)):
            if len(batch) not in (k, k + 1):
                raise ConfigError(f"{self.what}: {where} has {len(batch)} items but the model takes {k} input(s) "
                                  f"({', '.join(self.names)}); give {k} (inputs) or {k + 1} (inputs, then labels)")
            values = list(batch[:k])
            labels = batch[k] if len(batch) == k + 1 else None
        else:
            raise ConfigError(f"{self.what}: {where} is a {type(batch).__name__}; each batch must be a tensor, a "
                              "tuple (inputs..., [labels]) or a dict {input name: tensor}")
        inputs = tuple(self._input(v, i, where) for i, v in enumerate(values))
        if labels is not None:
            labels = self._tensor(labels, f"{where} labels")
            if labels.dim() == 0 or labels.shape[0] != inputs[0].shape[0]:
                raise ConfigError(f"{self.what}: {where} has {inputs[0].shape[0]} samples but labels of shape "
                                  f"{tuple(labels.shape)}; labels need one entry per sample (same first dimension)")
        return inputs, labels

    def _tensor(self, value: Any, where: str) -> torch.Tensor:
        if isinstance(value, torch.Tensor):
            return value.detach()
        if isinstance(value, (np.ndarray, int, float, list)):
            return torch.as_tensor(value)
        raise ConfigError(f"{self.what}: {where} is a {type(value).__name__}, not a tensor")

    def _input(self, value: Any, i: int, where: str) -> torch.Tensor:
        t = self._tensor(value, f"{where} input {self.names[i]!r}")
        ex = self.examples[i]
        if not self.fits(t, i):
            raise ConfigError(
                f"{self.what}: input {self.names[i]!r} in {where} has shape {tuple(t.shape)}, samples of shape "
                f"{tuple(t.shape[1:])}, but the model was captured with {self.names[i]!r} of shape {tuple(ex.shape)}, "
                f"samples of shape {tuple(ex.shape[1:])} (first dimension = samples); reshape or resize the data, "
                "or capture the model at the data's shape")
        if ex.dtype.is_floating_point:
            return t.to(ex.dtype)
        if t.dtype.is_floating_point:
            raise ConfigError(f"{self.what}: input {self.names[i]!r} in {where} is {_describe(t)} but the model "
                              f"takes {str(ex.dtype).removeprefix('torch.')} (e.g. token ids); pass integers")
        return t.to(ex.dtype)

    def from_batches(self, batches: Iterable[Any], kind: str, limit: int | None) -> Samples:
        read: list[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]] = []
        count = 0
        for index, batch in enumerate(batches):
            read.append(self.batch(batch, f"batch {index} of the {kind}"))
            count += int(read[-1][0][0].shape[0])
            if limit is not None and count >= limit:
                break
        if not read:
            raise ConfigError(f"{self.what} is empty: the {kind} yielded no batches; pass at least one sample")
        return self.finish(read, f"{kind}: {len(read)} batches", limit)

    def from_dataset(self, dataset: Any, limit: int | None, seed: int) -> Samples:
        n = len(dataset)
        if n == 0:
            raise ConfigError(f"{self.what} is empty: the {type(dataset).__name__} has no items")
        take = n if limit is None else min(n, limit)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:take].tolist()
        read = []
        for start in range(0, take, _DATASET_CHUNK):
            items = [dataset[i] for i in order[start:start + _DATASET_CHUNK]]
            try:
                collated = default_collate(items)
            except (TypeError, RuntimeError) as err:
                raise ConfigError(f"{self.what}: items of the {type(dataset).__name__} do not stack into a batch "
                                  f"({type(err).__name__}: {str(err).splitlines()[0]}); each item must be one "
                                  "sample (a tensor, a tuple or a dict of tensors) of the same shape") from err
            read.append(self.batch(collated, f"items {start}..{start + len(items) - 1} of the "
                                   f"{type(dataset).__name__}"))
        return self.finish(read, f"{type(dataset).__name__}: {take} of {n} samples", limit)

    def finish(self, read: list[tuple[tuple[torch.Tensor, ...], torch.Tensor | None]], source: str,
               limit: int | None) -> Samples:
        labelled = {labels is not None for _, labels in read}
        if len(labelled) > 1:
            raise ConfigError(f"{self.what}: some batches have labels and some do not; give labels with all or none")
        inputs = []
        for i in range(len(self.examples)):
            shapes = {tuple(batch[i].shape[1:]) for batch, _ in read}
            if len(shapes) > 1:
                raise ConfigError(f"{self.what}: input {self.names[i]!r} has samples of shapes "
                                  f"{', '.join(map(str, sorted(shapes)))} in different batches; pad them to one "
                                  "shape (for text: padding='max_length' in the tokenizer)")
            inputs.append(torch.cat([batch[i] for batch, _ in read]))
        labels = torch.cat([lab for _, lab in read]) if read[0][1] is not None else None  # type: ignore[misc]
        if len(inputs[0]) == 0:
            raise ConfigError(f"{self.what} is empty ({source}); pass at least one sample")
        samples = Samples(tuple(inputs), labels, self.names, source)
        return samples.select(slice(0, limit)) if limit is not None and len(samples) > limit else samples
