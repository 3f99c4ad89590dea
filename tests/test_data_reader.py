"""depthfold.data: every accepted data form reads to the same calibration tensors, and bad data is refused."""

from __future__ import annotations

import re
from collections import UserDict

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from depthfold.data import ACCEPTED_FORMS, LABEL_KEYS, Samples, read_samples, synthetic_samples
from depthfold.errors import ConfigError

N = 12
NAMES = ("x",)
TOKEN_NAMES = ("input_ids", "attention_mask")


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    return torch.randn(N, 3, 4, 4, generator=gen), torch.arange(N) % 3


X, Y = _data()
EXAMPLE = (torch.randn(1, 3, 4, 4),)
TOKEN_EXAMPLE = (torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long))


def _tokens(n: int = 10, length: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 100, (n, length), generator=gen)
    mask = torch.randint(0, 2, (n, length), generator=gen)
    return ids, mask, torch.arange(n) % 2


class TupleDataset(Dataset):
    """Map-style: (sample, int label) per item; counts item reads."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y, self.reads = x, y, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.reads.append(i)
        return self.x[i], int(self.y[i])


class DictDataset(Dataset):
    """Map-style: one dict {name: sample, ..., 'labels': label} per item."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int):
        return {key: value[i] for key, value in self.columns.items()}


class TensorItemDataset(Dataset):
    """Map-style: a bare tensor per item (no labels)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i]


def _gen_batches(x: torch.Tensor, y: torch.Tensor | None, size: int):
    for start in range(0, len(x), size):
        yield x[start:start + size] if y is None else (x[start:start + size], y[start:start + size])


def _row_index(rows: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """For each row of ``rows``, the index of the (unique) equal row of ``reference``; fails if there is none."""
    equal = (rows.flatten(1)[:, None, :] == reference.flatten(1)[None, :, :]).all(-1)
    assert bool((equal.sum(1) == 1).all()), "a returned sample is not a sample of the data"
    return equal.int().argmax(1)


def _read(data, **kw) -> Samples:
    return read_samples(data, EXAMPLE, names=NAMES, **kw)


# ---------------------------------------------------------------------------------------------------------------
# 1. Every form reads to the same tensors
# ---------------------------------------------------------------------------------------------------------------

ORDERED_FORMS = [
    pytest.param(lambda: X, False, id="tensor"),
    pytest.param(lambda: (X, Y), True, id="tuple"),
    pytest.param(lambda: [X, Y], True, id="list_x_y"),
    pytest.param(lambda: {"x": X, "labels": Y}, True, id="dict"),
    pytest.param(lambda: UserDict({"x": X, "labels": Y}), True, id="mapping"),
    pytest.param(lambda: TensorDataset(X, Y), True, id="TensorDataset"),
    pytest.param(lambda: TensorDataset(X), False, id="TensorDataset_inputs_only"),
    pytest.param(lambda: DataLoader(TensorDataset(X, Y), batch_size=5), True, id="DataLoader"),
    pytest.param(lambda: DataLoader(TensorDataset(X), batch_size=5), False, id="DataLoader_inputs_only"),
    pytest.param(lambda: [(X[:5], Y[:5]), (X[5:], Y[5:])], True, id="list_of_batches"),
    pytest.param(lambda: [{"x": X[:7], "labels": Y[:7]}, {"x": X[7:], "labels": Y[7:]}], True,
                 id="list_of_dict_batches"),
    pytest.param(lambda: [X[:4], X[4:8], X[8:]], False, id="list_of_input_batches"),
    pytest.param(lambda: [X[:6], X[6:]], False, id="two_equal_input_batches"),
    pytest.param(lambda: [X[:5], X[5:]], False, id="two_unequal_input_batches"),
    pytest.param(lambda: _gen_batches(X, Y, 5), True, id="generator"),
    pytest.param(lambda: _gen_batches(X, None, 5), False, id="generator_inputs_only"),
    pytest.param(lambda: iter([(X[:3], Y[:3]), (X[3:], Y[3:])]), True, id="iterator"),
    pytest.param(lambda: X.numpy(), False, id="numpy"),
    pytest.param(lambda: (X.numpy(), Y.numpy()), True, id="numpy_tuple"),
]


@pytest.mark.parametrize(("make", "labelled"), ORDERED_FORMS)
def test_every_ordered_form_reads_the_same_samples(make, labelled):
    samples = _read(make())
    assert isinstance(samples, Samples)
    assert len(samples) == N and len(samples.inputs) == 1
    assert samples.names == NAMES and not samples.synthetic
    assert samples.inputs[0].dtype == torch.float32
    assert torch.equal(samples.inputs[0], X)
    if labelled:
        assert samples.labels is not None and torch.equal(samples.labels, Y)
    else:
        assert samples.labels is None


DATASET_FORMS = [
    pytest.param(lambda: TupleDataset(X, Y), True, id="tuple_items"),
    pytest.param(lambda: DictDataset({"x": X, "labels": Y}), True, id="dict_items"),
    pytest.param(lambda: TensorItemDataset(X), False, id="tensor_items"),
    pytest.param(lambda: TensorItemDataset(X.numpy()), False, id="numpy_items"),
]


@pytest.mark.parametrize(("make", "labelled"), DATASET_FORMS)
def test_map_style_datasets_read_every_sample_once_with_its_label(make, labelled):
    samples = _read(make())
    assert len(samples) == N
    index = _row_index(samples.inputs[0], X)
    assert sorted(index.tolist()) == list(range(N))  # every sample exactly once
    assert torch.equal(samples.inputs[0], X[index])
    if labelled:
        assert samples.labels is not None and torch.equal(samples.labels, Y[index])
    else:
        assert samples.labels is None


def test_map_style_dataset_order_is_seeded():
    first = _read(TupleDataset(X, Y), seed=3).inputs[0]
    again = _read(TupleDataset(X, Y), seed=3).inputs[0]
    other = _read(TupleDataset(X, Y), seed=4).inputs[0]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, X)  # drawn in a random order, not the dataset's


def test_dataset_items_chunked_past_the_collate_chunk(monkeypatch):
    import depthfold.data as data_module

    monkeypatch.setattr(data_module, "_DATASET_CHUNK", 5)  # 12 items -> chunks of 5, 5, 2
    samples = _read(TupleDataset(X, Y))
    index = _row_index(samples.inputs[0], X)
    assert sorted(index.tolist()) == list(range(N))
    assert torch.equal(samples.labels, Y[index])


def test_dataloader_over_a_map_style_dataset_keeps_its_order():
    samples = _read(DataLoader(TupleDataset(X, Y), batch_size=5))
    assert torch.equal(samples.inputs[0], X) and torch.equal(samples.labels, Y)
    assert samples.source == "DataLoader: 3 batches"


@pytest.mark.parametrize("key", LABEL_KEYS)
def test_every_label_key_is_read_as_labels(key):
    samples = _read({"x": X, key: Y})
    assert torch.equal(samples.inputs[0], X) and torch.equal(samples.labels, Y)


def test_python_list_labels_in_a_dict():
    samples = _read({"x": X, "labels": Y.tolist()})
    assert torch.equal(samples.labels, Y)


def test_iterable_dataset_with_len_is_read_as_batches():
    class Batches(IterableDataset):
        def __iter__(self):
            yield from _gen_batches(X, Y, 5)

        def __len__(self) -> int:
            return 3

    samples = _read(Batches())
    assert torch.equal(samples.inputs[0], X) and torch.equal(samples.labels, Y)


# ---------------------------------------------------------------------------------------------------------------
# 2. Multi-input / token models
# ---------------------------------------------------------------------------------------------------------------


def _read_tokens(data, **kw) -> Samples:
    return read_samples(data, TOKEN_EXAMPLE, names=TOKEN_NAMES, **kw)


def _assert_tokens(samples: Samples, ids, mask, labels) -> None:
    assert samples.names == TOKEN_NAMES and len(samples.inputs) == 2
    assert samples.inputs[0].dtype == torch.long and samples.inputs[1].dtype == torch.long
    assert torch.equal(samples.inputs[0], ids) and torch.equal(samples.inputs[1], mask)
    if labels is None:
        assert samples.labels is None
    else:
        assert samples.labels is not None and torch.equal(samples.labels, labels)


def test_tokens_list_of_dict_batches():
    ids, mask, labels = _tokens()
    batches = [{"input_ids": ids[s], "attention_mask": mask[s], "labels": labels[s]}
               for s in (slice(0, 4), slice(4, 8), slice(8, None))]
    _assert_tokens(_read_tokens(batches), ids, mask, labels)


def test_tokens_dataloader_over_dataset_of_dicts():
    ids, mask, labels = _tokens()
    loader = DataLoader(DictDataset({"input_ids": ids, "attention_mask": mask, "labels": labels}), batch_size=3)
    _assert_tokens(_read_tokens(loader), ids, mask, labels)


def test_tokens_map_style_dataset_of_dicts():
    ids, mask, labels = _tokens()
    samples = _read_tokens(DictDataset({"input_ids": ids, "attention_mask": mask, "labels": labels}))
    index = _row_index(torch.cat([samples.inputs[0], samples.inputs[1]], 1), torch.cat([ids, mask], 1))
    assert sorted(index.tolist()) == list(range(len(ids)))
    _assert_tokens(samples, ids[index], mask[index], labels[index])


def test_tokens_stacked_dict_matched_by_name_not_order():
    ids, mask, labels = _tokens()
    encoding = UserDict({"attention_mask": mask, "labels": labels, "input_ids": ids})  # like a BatchEncoding
    _assert_tokens(_read_tokens(encoding), ids, mask, labels)


def test_tokens_tuple_without_and_with_labels():
    ids, mask, labels = _tokens()
    _assert_tokens(_read_tokens((ids, mask)), ids, mask, None)
    _assert_tokens(_read_tokens((ids, mask, labels)), ids, mask, labels)
    _assert_tokens(_read_tokens([(ids[:5], mask[:5]), (ids[5:], mask[5:])]), ids, mask, None)


def test_tokens_int32_data_is_cast_to_the_example_dtype():
    ids, mask, _ = _tokens()
    samples = _read_tokens((ids.int(), mask.int()))
    _assert_tokens(samples, ids, mask, None)


def test_free_dims_accept_another_sequence_length():
    ids, mask, labels = _tokens(length=8)
    samples = _read_tokens({"input_ids": ids, "attention_mask": mask, "labels": labels}, free_dims=((1,), (1,)))
    _assert_tokens(samples, ids, mask, labels)
    assert samples.inputs[0].shape == (10, 8)
    _assert_tokens(_read_tokens((ids, mask), free_dims=((1,), (1,))), ids, mask, None)


@pytest.mark.parametrize("form", ["dict", "tuple", "batches"])
def test_other_sequence_length_without_free_dims_names_both_shapes(form):
    ids, mask, _ = _tokens(length=8)
    data = {"dict": {"input_ids": ids, "attention_mask": mask}, "tuple": (ids, mask),
            "batches": [(ids[:5], mask[:5]), (ids[5:], mask[5:])]}[form]
    with pytest.raises(ConfigError, match=r"'input_ids'.*has shape \((10|5), 8\).*of shape \(1, 6\)"):
        _read_tokens(data)


def test_free_dims_batches_of_different_lengths_must_be_padded():
    ids6, mask6, _ = _tokens(length=6)
    ids8, mask8, _ = _tokens(length=8)
    batches = [{"input_ids": ids6, "attention_mask": mask6}, {"input_ids": ids8, "attention_mask": mask8}]
    with pytest.raises(ConfigError, match=r"'input_ids' has samples of shapes \(6,\), \(8,\).*pad"):
        _read_tokens(batches, free_dims=((1,), (1,)))


def test_tokens_float_data_for_integer_input_is_refused():
    ids, mask, _ = _tokens()
    with pytest.raises(ConfigError, match=r"'input_ids'.*float32.*int64.*pass integers"):
        _read_tokens({"input_ids": ids.float(), "attention_mask": mask})


def test_tokens_unknown_key_names_the_key_and_the_inputs():
    ids, mask, _ = _tokens()
    with pytest.raises(ConfigError, match=r"'token_type_ids'.*\(input_ids, attention_mask\)"):
        _read_tokens({"input_ids": ids, "attention_mask": mask, "token_type_ids": mask})


def test_tokens_missing_key_is_refused():
    ids, _, _ = _tokens()
    with pytest.raises(ConfigError, match=r"has no 'attention_mask'.*input_ids, attention_mask"):
        _read_tokens({"input_ids": ids})


def test_tokens_single_tensor_for_two_inputs_is_refused():
    ids, _, _ = _tokens()
    with pytest.raises(ConfigError, match=r"single tensor but the model takes 2 inputs"):
        _read_tokens(ids)
    with pytest.raises(ConfigError, match=r"batch 0 of the generator is a single tensor but the model takes 2"):
        _read_tokens(t for t in (ids[:5], ids[5:]))
    with pytest.raises(ConfigError, match=r"batch 0 of the DataLoader has 1 items but the model takes 2 input"):
        _read_tokens(DataLoader(TensorDataset(ids), batch_size=4))


def test_tokens_batch_with_wrong_item_count_is_refused():
    ids, mask, labels = _tokens()
    with pytest.raises(ConfigError, match=r"has 4 items but the model takes 2 input"):
        _read_tokens([(ids, mask, labels, labels)])


def test_tokens_labels_of_wrong_length_in_a_tuple_are_refused():
    ids, mask, labels = _tokens()
    with pytest.raises(ConfigError, match=r"10 samples but labels of shape \(3,\)"):
        _read_tokens((ids, mask, labels[:3]))


# ---------------------------------------------------------------------------------------------------------------
# 3. limit
# ---------------------------------------------------------------------------------------------------------------


def test_limit_stops_a_generator_once_enough_samples_are_in():
    pulled = []

    def batches():
        for start in range(0, N, 5):
            pulled.append(start)
            yield X[start:start + 5], Y[start:start + 5]
        raise AssertionError("read past the end")

    samples = _read(batches(), limit=8)
    assert pulled == [0, 5]  # the third batch was never requested
    assert torch.equal(samples.inputs[0], X[:8]) and torch.equal(samples.labels, Y[:8])


def test_limit_never_advances_a_generator_past_the_needed_batches():
    def batches():
        yield X[:5]
        yield X[5:10]
        raise AssertionError("advanced past the batches needed")

    samples = _read(batches(), limit=10)
    assert len(samples) == 10 and torch.equal(samples.inputs[0], X[:10])


def test_limit_reads_only_limit_dataset_items():
    dataset = TupleDataset(X, Y)
    samples = _read(dataset, limit=4)
    assert len(samples) == 4 and len(dataset.reads) == 4 and len(set(dataset.reads)) == 4
    assert torch.equal(samples.inputs[0], X[dataset.reads])
    assert torch.equal(samples.labels, Y[dataset.reads])
    assert samples.source == "TupleDataset: 4 of 12 samples"


def test_limit_reads_only_the_dataloader_batches_needed():
    dataset = TupleDataset(X, Y)
    samples = _read(DataLoader(dataset, batch_size=3), limit=5)
    assert dataset.reads == list(range(6))  # two batches of 3, not four
    assert torch.equal(samples.inputs[0], X[:5]) and torch.equal(samples.labels, Y[:5])


def test_limit_on_a_tensor_dataset_draws_a_seeded_subset():
    samples = _read(TensorDataset(X, Y), limit=5, seed=0)
    index = _row_index(samples.inputs[0], X)
    assert len(samples) == 5 and len(set(index.tolist())) == 5
    assert torch.equal(samples.labels, Y[index])
    assert torch.equal(_read(TensorDataset(X, Y), limit=5, seed=0).inputs[0], samples.inputs[0])
    assert not torch.equal(_read(TensorDataset(X, Y), limit=5, seed=1).inputs[0], samples.inputs[0])
    assert samples.source == "TensorDataset: 5 of 12 samples"


@pytest.mark.parametrize("make", [lambda: X, lambda: (X, Y), lambda: {"x": X, "labels": Y},
                                  lambda: [X[:4], X[4:8], X[8:]]], ids=["tensor", "tuple", "dict", "batches"])
def test_limit_takes_the_first_samples_of_ordered_forms(make):
    samples = _read(make(), limit=5)
    assert torch.equal(samples.inputs[0], X[:5])
    assert samples.labels is None or torch.equal(samples.labels, Y[:5])


def test_limit_above_the_data_size_reads_everything():
    assert torch.equal(_read(TupleDataset(X, Y), limit=100).labels.sort().values, Y.sort().values)
    assert len(_read((X, Y), limit=100)) == N


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_below_one_is_refused(limit):
    with pytest.raises(ConfigError, match=rf"limit must be >= 1, got {limit}"):
        _read(X, limit=limit)


# ---------------------------------------------------------------------------------------------------------------
# 4. Refused forms and bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "name"), [(3, "int"), ("images/", "str"), (b"raw", "bytes"), (2.5, "float"),
                                            (object(), "object")])
def test_unreadable_form_names_what_it_got_and_the_accepted_forms(data, name):
    with pytest.raises(ConfigError, match=rf"got {name}$") as err:
        _read(data)
    assert ACCEPTED_FORMS in str(err.value)


def test_messages_use_what():
    with pytest.raises(ConfigError, match=r"^calibration data must be .*got int"):
        _read(3, what="calibration data")


def test_none_is_refused():
    with pytest.raises(ConfigError, match=r"data is None; pass a tensor"):
        _read(None)


@pytest.mark.parametrize("make", [lambda: torch.randn(N, 3, 5, 5), lambda: (torch.randn(N, 3, 5, 5), Y),
                                  lambda: {"x": torch.randn(N, 3, 5, 5)}, lambda: TensorDataset(torch.randn(N, 3, 5, 5)),
                                  lambda: [torch.randn(N, 3, 5, 5)]],
                         ids=["tensor", "tuple", "dict", "TensorDataset", "list"])
def test_shape_mismatch_names_both_shapes(make):
    with pytest.raises(ConfigError, match=r"'x'.*has shape \(12, 3, 5, 5\).*captured with 'x' of shape \(1, 3, 4, 4\)"):
        _read(make())


def test_wrong_rank_is_refused():
    with pytest.raises(ConfigError, match=r"has shape \(12, 4, 4\).*of shape \(1, 3, 4, 4\)"):
        _read(X[:, 0])


def test_map_style_items_of_the_wrong_shape_are_refused():
    with pytest.raises(ConfigError, match=r"has shape \(12, 3, 5, 5\).*of shape \(1, 3, 4, 4\)"):
        _read(TensorItemDataset(torch.randn(N, 3, 5, 5)))


@pytest.mark.parametrize("make", [lambda: DataLoader(TensorDataset(X[:0], Y[:0]), batch_size=4), lambda: [],
                                  lambda: iter(()), lambda: X[:0], lambda: TensorDataset(X[:0]),
                                  lambda: TupleDataset(X[:0], Y[:0]), lambda: {"x": X[:0]}],
                         ids=["DataLoader", "list", "iterator", "tensor", "TensorDataset", "Dataset", "dict"])
def test_empty_data_is_refused(make):
    with pytest.raises(ConfigError, match=r"empty"):
        _read(make())


@pytest.mark.parametrize("make", [lambda: {"x": X, "labels": Y[:5]}, lambda: (X, Y[:5]), lambda: [X, Y[:5]],
                                  lambda: (X, torch.tensor(1)), lambda: [(X[:5], Y[:4])],
                                  lambda: [{"x": X[:5], "labels": Y}]],
                         ids=["dict", "tuple", "list", "scalar_labels", "batch", "dict_batch"])
def test_labels_of_the_wrong_length_are_refused(make):
    with pytest.raises(ConfigError, match=r"labels"):
        _read(make())


def test_short_labels_are_refused_even_when_limit_is_reached_by_the_inputs():
    # (x, y) with too few labels used to be read as two batches, x then y: with limit the labels were dropped
    # silently.
    with pytest.raises(ConfigError, match=r"12 samples but labels of shape \(5,\)"):
        _read((X, Y[:5]), limit=8)


def test_unknown_dict_key_names_the_key_and_the_inputs():
    with pytest.raises(ConfigError, match=r"key 'pixel_values'.*captured with \(x\)"):
        _read({"pixel_values": X})
    with pytest.raises(ConfigError, match=r"key 'extra'"):
        _read([{"x": X, "extra": Y}])


def test_missing_dict_input_is_refused():
    with pytest.raises(ConfigError, match=r"has no 'x'"):
        _read({"labels": Y})


def test_float_data_for_an_integer_input_is_refused():
    with pytest.raises(ConfigError, match=r"'ids'.*float32.*pass integers"):
        read_samples(torch.rand(4, 6), (torch.zeros(1, 6, dtype=torch.long),), names=("ids",))


def test_batches_of_different_sample_shapes_must_be_padded():
    with pytest.raises(ConfigError, match=r"shapes \(3, 4, 4\), \(3, 4, 6\).*pad"):
        read_samples([torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 6)], EXAMPLE, names=NAMES,
                     free_dims=((3,),))


def test_some_batches_with_labels_and_some_without_are_refused():
    with pytest.raises(ConfigError, match=r"some batches have labels and some do not"):
        _read([(X[:5], Y[:5]), X[5:]])
    with pytest.raises(ConfigError, match=r"some batches have labels and some do not"):
        _read([{"x": X[:5]}, {"x": X[5:], "labels": Y[5:]}])


@pytest.mark.parametrize(("data", "match"), [([3, 4], r"batch 0 of the list is a int"),
                                             ([(X[:5], Y[:5], Y[:5])], r"has 3 items but the model takes 1"),
                                             ({"x": "pixels"}, r"input 'x' is a str, not a tensor"),
                                             ([(X, "labels")], r"labels is a str, not a tensor")])
def test_malformed_batches_are_refused(data, match):
    with pytest.raises(ConfigError, match=match):
        _read(data)


def test_dataset_items_that_do_not_stack_are_refused():
    class Ragged(Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            return torch.randn(3, 4, 4 + i)

    with pytest.raises(ConfigError, match=r"items of the Ragged do not stack into a batch"):
        _read(Ragged())


def test_names_must_match_the_number_of_inputs():
    with pytest.raises(ConfigError, match=r"2 input names given for 1 inputs"):
        read_samples(X, EXAMPLE, names=("a", "b"))


def test_default_names_and_a_model_without_inputs():
    samples = read_samples(X, EXAMPLE)
    assert samples.names == ("input0",)
    with pytest.raises(ConfigError, match=r"no tensor inputs"):
        read_samples(X, ())


# ---------------------------------------------------------------------------------------------------------------
# 5. dtypes
# ---------------------------------------------------------------------------------------------------------------


def test_float64_data_is_cast_to_the_model_dtype():
    for data in (X.double(), (X.double(), Y), X.double().numpy(), [X[:5].double(), X[5:].double()]):
        samples = _read(data)
        assert samples.inputs[0].dtype == torch.float32
        assert torch.equal(samples.inputs[0], X)


def test_float16_model_gets_float16_inputs_and_integer_data_becomes_float():
    samples = read_samples(X, (torch.randn(1, 3, 4, 4, dtype=torch.float16),))
    assert samples.inputs[0].dtype == torch.float16 and torch.equal(samples.inputs[0], X.half())
    ints = torch.randint(0, 5, (4, 3, 4, 4))
    assert torch.equal(_read(ints).inputs[0], ints.float())


def test_labels_keep_their_dtype():
    float_targets = torch.randn(N, dtype=torch.float64)
    assert _read((X, float_targets)).labels.dtype == torch.float64
    assert _read(TupleDataset(X, Y)).labels.dtype == torch.int64


# ---------------------------------------------------------------------------------------------------------------
# 6. synthetic_samples
# ---------------------------------------------------------------------------------------------------------------

SYN_EXAMPLE = (torch.randn(1, 3, 4, 4), torch.tensor([[3, 7, 5, 4, 9, 3]]), torch.tensor([[True, False, True]]),
               torch.randn(2, 5, dtype=torch.float16))


def test_synthetic_shapes_and_dtypes():
    samples = synthetic_samples(SYN_EXAMPLE, 50)
    assert [tuple(t.shape) for t in samples.inputs] == [(50, 3, 4, 4), (50, 6), (50, 3), (50, 5)]
    assert [t.dtype for t in samples.inputs] == [torch.float32, torch.int64, torch.bool, torch.float16]
    assert samples.synthetic and samples.labels is None
    assert samples.names == ("input0", "input1", "input2", "input3") and len(samples) == 50
    assert "synthetic" in samples.source


def test_synthetic_integers_cover_the_examples_range_inclusive():
    ints = synthetic_samples(SYN_EXAMPLE, 50).inputs[1]
    assert int(ints.min()) == 3 and int(ints.max()) == 9  # both ends of the observed range, nothing outside


def test_synthetic_distributions():
    floats, _, flags, _ = synthetic_samples(SYN_EXAMPLE, 200).inputs
    assert abs(float(floats.mean())) < 0.1 and 0.9 < float(floats.std()) < 1.1
    assert 0.3 < float(flags.float().mean()) < 0.7


def test_synthetic_constant_integer_example():
    samples = synthetic_samples((torch.full((1, 4), 5, dtype=torch.int32),), 8)
    assert samples.inputs[0].dtype == torch.int32 and bool((samples.inputs[0] == 5).all())


def test_synthetic_is_deterministic_for_a_seed():
    a = synthetic_samples(SYN_EXAMPLE, 10, seed=5)
    b = synthetic_samples(SYN_EXAMPLE, 10, seed=5)
    c = synthetic_samples(SYN_EXAMPLE, 10, seed=6)
    assert all(torch.equal(s, t) for s, t in zip(a.inputs, b.inputs))
    assert a.digest() == b.digest() != c.digest()
    assert not torch.equal(a.inputs[0], c.inputs[0])


def test_synthetic_draws_from_a_given_generator():
    from_gen = synthetic_samples(SYN_EXAMPLE, 10, seed=0, generator=torch.Generator().manual_seed(5))
    assert from_gen.digest() == synthetic_samples(SYN_EXAMPLE, 10, seed=5).digest()


def test_synthetic_names_are_checked():
    assert synthetic_samples(TOKEN_EXAMPLE, 2, names=TOKEN_NAMES).names == TOKEN_NAMES
    with pytest.raises(ConfigError, match=r"1 input names given for 2 inputs"):
        synthetic_samples(TOKEN_EXAMPLE, 2, names=("input_ids",))


# ---------------------------------------------------------------------------------------------------------------
# 7. Samples
# ---------------------------------------------------------------------------------------------------------------


def _samples() -> Samples:
    ids, mask, labels = _tokens(n=12)
    return Samples((ids, mask), labels, TOKEN_NAMES, "test source")


def test_select_by_slice_and_index():
    samples = _samples()
    part = samples.select(slice(2, 5))
    assert len(part) == 3 and torch.equal(part.inputs[1], samples.inputs[1][2:5])
    assert torch.equal(part.labels, samples.labels[2:5])
    assert (part.names, part.source, part.synthetic) == (TOKEN_NAMES, "test source", False)
    index = torch.tensor([7, 0, 3])
    picked = samples.select(index)
    assert torch.equal(picked.inputs[0], samples.inputs[0][index]) and torch.equal(picked.labels, samples.labels[index])
    unlabelled = synthetic_samples(EXAMPLE, 6).select(slice(0, 2))
    assert unlabelled.labels is None and unlabelled.synthetic and len(unlabelled) == 2


def test_batches_sizes_and_order():
    samples = _samples()
    batches = list(samples.batches(5))
    assert [tuple(len(t) for t in b) for b in batches] == [(5, 5), (5, 5), (2, 2)]
    assert torch.equal(torch.cat([b[0] for b in batches]), samples.inputs[0])
    assert torch.equal(torch.cat([b[1] for b in batches]), samples.inputs[1])
    assert [len(b[0]) for b in samples.batches(12)] == [12]
    assert [len(b[0]) for b in samples.batches(100)] == [12]


def test_digest_follows_content():
    samples = _samples()
    digest = samples.digest()
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    copy = Samples(tuple(t.clone() for t in samples.inputs), samples.labels.clone(), ("a", "b"), "other")
    assert copy.digest() == digest  # content only: names and source do not count
    changed_input = samples.inputs[1].clone()
    changed_input[3, 2] += 1
    assert Samples((samples.inputs[0], changed_input), samples.labels, TOKEN_NAMES).digest() != digest
    changed_labels = samples.labels.clone()
    changed_labels[0] += 1
    assert Samples(samples.inputs, changed_labels, TOKEN_NAMES).digest() != digest
    assert Samples(samples.inputs, None, TOKEN_NAMES).digest() != digest
    assert Samples(samples.inputs[::-1], samples.labels, TOKEN_NAMES).digest() != digest  # input order counts


def test_digest_counts_dtype_and_shape():
    x = _read(X).inputs[0]
    digest = Samples((x,), None, NAMES).digest()
    assert Samples((x.double(),), None, NAMES).digest() != digest
    assert Samples((x.reshape(N, 3, 16),), None, NAMES).digest() != digest
    assert _read((X, Y)).digest() == _read(TensorDataset(X, Y)).digest() == _read([(X[:5], Y[:5]), (X[5:], Y[5:])]).digest()
