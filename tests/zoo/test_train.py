"""Zoo trainers and their weight cache (isolated in a temporary ``$DEPTHFOLD_CACHE``)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from depthfold import zoo
from depthfold.errors import ConfigError
from depthfold.zoo import train as zoo_train


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path))
    return tmp_path


# A very small ViT keeps the cache tests fast; the cache logic does not depend on the model.
TINY: dict[str, object] = {"depth": 1, "embed_dim": 24, "num_heads": 2}


def _tiny(**kwargs: object) -> nn.Module:
    return zoo.pretrained_digits("vit_tiny", resolution=32, **{"epochs": 1, **TINY, **kwargs})


def _cached_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "zoo").glob("*.pt"))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _CountingTrainer:
    """Stands in for the real training loop: nudges one weight so results differ from the init."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: nn.Module, *args: object, **kwargs: object) -> None:
        self.calls += 1
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        model.eval()


@pytest.fixture
def fake_training(monkeypatch: pytest.MonkeyPatch) -> _CountingTrainer:
    trainer = _CountingTrainer()
    monkeypatch.setattr(zoo_train, "_train_classifier", trainer)
    return trainer


def test_cache_file_name_and_reuse(tmp_path: Path, fake_training: _CountingTrainer) -> None:
    first = _tiny(seed=0)
    assert fake_training.calls == 1
    (path,) = _cached_files(tmp_path)
    assert path.name.startswith("vit_tiny-digits-r32-s0-") and path.suffix == ".pt"
    second = _tiny(seed=0)
    assert fake_training.calls == 1  # loaded, not retrained
    assert not second.training
    assert _same_weights(first, second)
    # Another epoch count is another cache entry.
    _tiny(seed=0, epochs=2)
    assert fake_training.calls == 2 and len(_cached_files(tmp_path)) == 2
    # So is another model option.
    _tiny(seed=0, embed_dim=12)
    assert fake_training.calls == 3 and len(_cached_files(tmp_path)) == 3


def test_cache_holds_only_tensors(tmp_path: Path, fake_training: _CountingTrainer) -> None:
    _tiny()
    (path,) = _cached_files(tmp_path)
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_keys", "wrong_shape", "nan", "wrong_type"])
def test_corrupt_cache_is_retrained(
    tmp_path: Path, fake_training: _CountingTrainer, caplog: pytest.LogCaptureFixture, damage: str,
) -> None:
    first = _tiny()
    (path,) = _cached_files(tmp_path)
    if damage == "garbage":
        path.write_bytes(b"this is not a checkpoint")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "wrong_keys":
        torch.save({"head.weight": torch.zeros(3, 3)}, path)
    elif damage in ("wrong_shape", "nan"):
        state = torch.load(path, weights_only=True)
        # Only the last entry is bad: the earlier ones must not leak into the retrained model.
        last = next(reversed(state))
        state = {k: v + 1.0 if v.is_floating_point() else v for k, v in state.items()}
        state[last] = torch.zeros(7) if damage == "wrong_shape" else torch.full_like(state[last], float("nan"))
        torch.save(state, path)
    else:
        torch.save([torch.zeros(1)], path)
    with caplog.at_level(logging.WARNING, logger="depthfold.zoo.train"):
        again = _tiny()
    assert fake_training.calls == 2
    assert any("unusable" in r.getMessage() for r in caplog.records)
    assert _same_weights(first, again)  # same seed, same (fake) training
    state = torch.load(path, weights_only=True)  # rewritten and loadable again
    assert state.keys() == first.state_dict().keys()


def test_use_cache_false_writes_nothing(tmp_path: Path, fake_training: _CountingTrainer) -> None:
    _tiny(use_cache=False)
    assert _cached_files(tmp_path) == []


def test_unwritable_cache_still_returns_model(
    monkeypatch: pytest.MonkeyPatch, fake_training: _CountingTrainer, caplog: pytest.LogCaptureFixture,
) -> None:
    def _fail(*args: object, **kwargs: object) -> None:
        raise OSError("read-only file system")

    monkeypatch.setattr(zoo_train, "atomic_write", _fail)
    with caplog.at_level(logging.WARNING, logger="depthfold.zoo.train"):
        model = _tiny()
    assert fake_training.calls == 1 and not model.training
    assert any("could not cache" in r.getMessage() for r in caplog.records)


def test_global_rng_untouched(fake_training: _CountingTrainer) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _tiny(seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_vit_digits_defaults_to_resolution(fake_training: _CountingTrainer) -> None:
    model = _tiny()
    assert model.img_size == 32 and model.patch_size == 8
    (x,) = zoo.example_inputs("vit_tiny", resolution=32)
    assert model(x).shape == (1, 10)


def test_pretrained_rejects_wrong_family_and_options() -> None:
    with pytest.raises(ConfigError, match="pretrained_text"):
        zoo.pretrained_digits("llama_tiny")
    with pytest.raises(ConfigError, match="pretrained_digits"):
        zoo.pretrained_text("resnet18")
    with pytest.raises(ConfigError, match="10 classes"):
        zoo.pretrained_digits("resnet18", num_classes=5)
    with pytest.raises(ConfigError, match="did you mean"):
        zoo.pretrained_digits("resnet81")


def test_evaluate_accuracy_restores_mode() -> None:
    _, test = zoo.digits_datasets(resolution=32)
    model = zoo.create("vit_tiny", num_classes=10, img_size=32, patch_size=8, **TINY).train()
    acc = zoo.evaluate_accuracy(model, torch.utils.data.TensorDataset(*(t[:64] for t in test.tensors)))
    assert 0.0 <= acc <= 1.0
    assert model.training


def test_pretrained_text_trains_caches_and_lowers_perplexity(tmp_path: Path) -> None:
    kwargs = {"dim": 32, "n_layers": 1, "hidden": 64}
    torch.manual_seed(0)
    untrained = zoo.create("llama_tiny", **kwargs)
    _, val = zoo.split_corpus(zoo.text_corpus())
    model = zoo.pretrained_text(steps=40, seq_len=32, batch_size=16, **kwargs)
    (path,) = _cached_files(tmp_path)
    assert path.name.startswith("llama_tiny-text-s0-")
    ppl_before = zoo.evaluate_perplexity(untrained, val, 32, max_batches=2)
    ppl_after = zoo.evaluate_perplexity(model, val, 32, max_batches=2)
    assert ppl_before > 200  # about uniform over 256 bytes
    assert ppl_after < 0.5 * ppl_before
    again = zoo.pretrained_text(steps=40, seq_len=32, batch_size=16, **kwargs)
    assert _same_weights(model, again)


@pytest.mark.slow
def test_pretrained_digits_resnet18_real_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = zoo.pretrained_digits("resnet18", resolution=32)
    _, test = zoo.digits_datasets(resolution=32)
    assert zoo.evaluate_accuracy(model, test) >= 0.9
    (path,) = _cached_files(tmp_path)
    assert path.name.startswith("resnet18-digits-r32-s0-")

    def _no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the second call must load from the cache, not train")

    monkeypatch.setattr(zoo_train, "_train_classifier", _no_training)
    again = zoo.pretrained_digits("resnet18", resolution=32)
    assert _same_weights(model, again)
    assert zoo.evaluate_accuracy(again, test) >= 0.9


def test_hugging_face_cnn_trains_on_digits(tmp_path: Path) -> None:
    """A transformers classifier (it returns an output object holding the logits) trains with the zoo
    recipe, is cached under its name, and learns: one epoch beats chance by far."""
    pytest.importorskip("transformers")
    _, test = zoo.digits_datasets(resolution=32)
    untrained = zoo.evaluate_accuracy(zoo.hf_vision("regnet_y", image_size=32), test)
    model = zoo.pretrained_digits("regnet_y", resolution=32, epochs=2)
    assert type(model).__name__ == "RegNetForImageClassification"
    assert [p.name for p in _cached_files(tmp_path)][0].startswith("regnet_y-digits-r32-s0-")
    trained = zoo.evaluate_accuracy(model, test)
    assert trained > max(0.5, untrained + 0.3), (untrained, trained)
