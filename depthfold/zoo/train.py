"""Quick trainers for zoo models on offline data, with a weight cache outside the repository.

``pretrained_digits`` trains an image model on scikit-learn's digits and ``pretrained_text`` trains
``llama_tiny`` on the standard-library text corpus; both use AdamW (Loshchilov & Hutter 2019) with a
linear warm-up and cosine decay, and cache the state dict under ``depthfold.cache.cache_dir("zoo")``
(``$DEPTHFOLD_CACHE/zoo``). Cache files are written atomically, read with ``torch.load(weights_only=True)``
(nothing but tensors is unpickled), and a file that fails to load or does not match the model is
deleted and retrained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .._atomic import atomic_write
from ..cache import cache_dir, cache_lock
from ..errors import ArtifactError, ConfigError
from .data import digits_datasets, lm_batches, split_corpus, text_corpus
from .hf_vision import HF_VISION_MODELS, hf_vision
from .registry import create, spec

__all__ = [
    "CODE_VERSION",
    "DEFAULT_DIGITS_EPOCHS",
    "pretrained_digits",
    "pretrained_text",
    "evaluate_accuracy",
    "evaluate_perplexity",
    "cache_path",
]

logger = logging.getLogger(__name__)

CODE_VERSION = 1
"""Bump when model definitions, data or training recipes change, so stale cached weights are not reused."""

DEFAULT_DIGITS_EPOCHS: dict[str, int] = {
    "resnet18": 3,
    "resnet34": 4,
    "resnet50": 6,
    "mobilenetv2_100": 15,
    "mobilenetv2_140": 15,
    "vgg19_bn": 6,
    "vit_tiny": 30,
}
"""Epochs ``pretrained_digits`` trains when ``epochs`` is not given."""

_DIGITS_LR: dict[str, float] = {"vit_tiny": 1e-3, "vgg19_bn": 1e-4}
_DIGITS_DEFAULT_LR = 2e-3
_DIGITS_BATCH = 64
_TEXT_SEQ_LEN = 64
_TEXT_BATCH = 32


def _digest(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_path(stem: str, payload: dict[str, Any]) -> Path:
    """Return ``cache_dir("zoo") / f"{stem}-{hash}.pt"``, the hash covering ``payload`` and ``CODE_VERSION``."""
    return cache_dir("zoo") / f"{stem}-{_digest({**payload, 'code_version': CODE_VERSION})}.pt"


def _check_state(state: object, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check a loaded object is a finite state dict with exactly ``expected``'s keys and shapes."""
    if not isinstance(state, dict):
        raise TypeError(f"expected a state dict, found {type(state).__name__}")
    if state.keys() != expected.keys():
        missing = sorted(expected.keys() - state.keys())
        unexpected = sorted(state.keys() - expected.keys())
        raise KeyError(f"missing keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape:
            raise ValueError(f"entry {key!r} is not a tensor of shape {tuple(expected[key].shape)}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"entry {key!r} holds NaN or infinite values")
    return state


def _try_load(model: nn.Module, path: Path) -> bool:
    """Load cached weights into ``model``; delete a corrupt or mismatched file and return False.

    The file is checked in full before anything is copied, so on failure ``model`` is untouched.
    """
    if not path.is_file():
        return False
    try:
        state = _check_state(torch.load(path, map_location="cpu", weights_only=True), model.state_dict())
        model.load_state_dict(state, strict=True)
    except Exception as err:
        # Damaged bytes make torch.load raise almost anything (UnpicklingError, RuntimeError, IndexError,
        # EOFError, ...). The file is only a cache: whatever went wrong, the remedy is to rebuild it.
        logger.warning("cached weights %s are unusable (%s: %s); deleting and retraining",
                       path, type(err).__name__, err)
        path.unlink(missing_ok=True)
        return False
    logger.info("loaded cached weights %s", path)
    return True


def _save(model: nn.Module, path: Path) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    try:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    except (OSError, ArtifactError) as err:
        # The trained model is still good; only the next call pays for training again.
        logger.warning("could not cache weights at %s (%s); set $DEPTHFOLD_CACHE to a writable directory",
                       path, err)
        return
    logger.info("cached weights at %s", path)


def _warmup_cosine(total_steps: int, warmup: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _progress(items: Iterable[Any], enabled: bool, total: int, desc: str) -> Iterable[Any]:
    if not enabled:
        return items
    from tqdm.auto import tqdm
    return tqdm(items, total=total, desc=desc)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, dataset: TensorDataset, batch_size: int = 256) -> float:
    """Return top-1 accuracy of ``model`` on an (images, labels) dataset, evaluated in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    correct = 0
    total = 0
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            correct += int((_logits(model(x)).argmax(dim=1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    return correct / max(1, total)


@torch.no_grad()
def evaluate_perplexity(
    model: nn.Module, corpus: bytes, seq_len: int = _TEXT_SEQ_LEN, *, batch_size: int = 32,
    max_batches: int | None = 8,
) -> float:
    """Return byte-level perplexity ``exp(mean cross-entropy)`` of a language model on ``corpus``.

    The corpus is cut into consecutive, non-overlapping windows of ``seq_len + 1`` bytes (deterministic);
    at most ``max_batches`` batches are scored (``None``: all). Eval mode is used and restored afterwards.

    Raises:
        ConfigError: the corpus is shorter than one window.
    """
    n_windows = (len(corpus) - 1) // seq_len
    if n_windows < 1:
        raise ConfigError(f"corpus of {len(corpus)} bytes is shorter than one window of {seq_len + 1}")
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    data = torch.frombuffer(bytearray(corpus[: n_windows * seq_len + 1]), dtype=torch.uint8).to(torch.int64)
    inputs = data[:-1].view(n_windows, seq_len)
    targets = data[1:].view(n_windows, seq_len)
    was_training = model.training
    model.eval()
    total_loss = 0.0
    try:
        for i in range(0, n_windows, batch_size):
            logits = model(inputs[i:i + batch_size])
            total_loss += float(F.cross_entropy(
                logits.flatten(0, 1), targets[i:i + batch_size].flatten(), reduction="sum"))
    finally:
        model.train(was_training)
    return math.exp(total_loss / (n_windows * seq_len))


def _logits(output: Any) -> torch.Tensor:
    """A classifier's logits, whether it returns them or a ``transformers`` output holding them."""
    return output.logits if hasattr(output, "logits") else output


def _digits_kwargs(name: str, resolution: int, model_kwargs: dict[str, Any]) -> dict[str, Any]:
    if "num_classes" in model_kwargs and model_kwargs["num_classes"] != 10:
        raise ConfigError(f"digits has 10 classes; got num_classes={model_kwargs['num_classes']}")
    kwargs = {**model_kwargs, "num_classes": 10}
    if name in HF_VISION_MODELS:
        kwargs.setdefault("image_size", resolution)
        return kwargs
    if spec(name).family == "vit":
        # A ViT's position embedding fixes its input size. Default to a 4x4 grid of patches: each covers
        # 2x2 pixels of the original 8x8 digit, so nothing is lost and there are only 17 tokens.
        kwargs.setdefault("img_size", resolution)
        if resolution % 4 == 0:
            kwargs.setdefault("patch_size", resolution // 4)
    return kwargs


def pretrained_digits(
    name: str,
    resolution: int = 32,
    *,
    epochs: int | None = None,
    seed: int = 0,
    progress: bool = False,
    use_cache: bool = True,
    **model_kwargs: Any,
) -> nn.Module:
    """Return zoo model ``name`` (or a Hugging Face one of ``HF_VISION_MODELS``) trained on the digits train
    split (10 classes), in eval mode.

    Trains with AdamW, batch 64, linear warm-up then cosine decay, for ``epochs`` epochs (default from
    ``DEFAULT_DIGITS_EPOCHS``), on ``digits_datasets(resolution, in_chans, seed)``. Weights are cached as
    ``<name>-digits-r<res>-s<seed>-<hash>.pt`` under ``$DEPTHFOLD_CACHE/zoo``; a later call with the same
    arguments loads them. Training seeds its own RNG from ``seed`` and leaves torch's global RNG as it was.

    Args:
        name: an image model from ``zoo.list_models()``.
        resolution: input height and width (at least 32). A ``vit_tiny`` gets ``img_size=resolution``
            and, when ``resolution`` is a multiple of 4, ``patch_size=resolution // 4`` unless given.
        epochs: training epochs; ``None`` uses the per-model default.
        seed: seeds the split, the initialisation and the batch order.
        progress: show a tqdm progress bar.
        use_cache: read and write the weight cache (``False`` always trains and writes nothing).
        **model_kwargs: passed to ``zoo.create`` (``num_classes`` is fixed to 10).

    Raises:
        ConfigError: unknown model, a language model, or a bad option.
    """
    if name not in HF_VISION_MODELS and spec(name).family == "llm":
        raise ConfigError(f"{name!r} is a language model; use pretrained_text({name!r}) instead")
    if resolution < 32:
        raise ConfigError(f"resolution must be at least 32 for the zoo's image models, got {resolution}")
    kwargs = _digits_kwargs(name, resolution, model_kwargs)
    epochs = DEFAULT_DIGITS_EPOCHS.get(name, 10) if epochs is None else epochs
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")
    lr = _DIGITS_LR.get(name, _DIGITS_DEFAULT_LR)
    key = {"name": name, "task": "digits", "resolution": resolution, "seed": seed, "kwargs": kwargs,
           "epochs": epochs, "lr": lr, "batch_size": _DIGITS_BATCH}
    path = cache_path(f"{name}-digits-r{resolution}-s{seed}", key) if use_cache else None
    with cache_lock(path, f"zoo weights {path.name}") if path is not None else nullcontext():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = hf_vision(name, seed=seed, **kwargs) if name in HF_VISION_MODELS else create(name, **kwargs)
            if path is not None and _try_load(model, path):
                return model.eval()
            train, test = digits_datasets(resolution, channels=int(kwargs.get("in_chans", 3)), seed=seed)
            start = time.perf_counter()
            _train_classifier(model, train, epochs=epochs, lr=lr, seed=seed, progress=progress, desc=name)
            acc = evaluate_accuracy(model, test)
        logger.info("trained %s on digits at %dx%d: %d epochs, %.1f s, test accuracy %.4f",
                    name, resolution, resolution, epochs, time.perf_counter() - start, acc)
        if path is not None:
            _save(model, path)
        return model.eval()


def _train_classifier(
    model: nn.Module, train: TensorDataset, *, epochs: int, lr: float, seed: int, progress: bool, desc: str,
) -> None:
    loader = DataLoader(train, batch_size=_DIGITS_BATCH, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    total = epochs * len(loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(total, max(1, total // 20)))
    model.train()

    def steps() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for _ in range(epochs):
            yield from loader

    for x, y in _progress(steps(), progress, total, desc):
        loss = F.cross_entropy(_logits(model(x)), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()


def pretrained_text(
    name: str = "llama_tiny",
    *,
    steps: int = 300,
    seed: int = 0,
    seq_len: int = _TEXT_SEQ_LEN,
    batch_size: int = _TEXT_BATCH,
    lr: float = 3e-3,
    progress: bool = False,
    use_cache: bool = True,
    **model_kwargs: Any,
) -> nn.Module:
    """Return language model ``name`` trained on the train part of ``text_corpus()``, in eval mode.

    Trains for ``steps`` AdamW steps on random byte windows (``lm_batches``) with warm-up and cosine decay.
    Weights are cached as ``<name>-text-s<seed>-<hash>.pt`` under ``$DEPTHFOLD_CACHE/zoo``; the hash also
    covers the corpus, so another Python version's standard library retrains. Score it with
    ``evaluate_perplexity(model, split_corpus(text_corpus())[1])``.

    Raises:
        ConfigError: unknown model, an image model, or a bad option.
    """
    s = spec(name)
    if s.family != "llm":
        raise ConfigError(f"{name!r} is an image model; use pretrained_digits({name!r}) instead")
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    corpus = text_corpus()
    train, val = split_corpus(corpus)
    key = {"name": name, "task": "text", "seed": seed, "kwargs": model_kwargs, "steps": steps,
           "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "corpus": hashlib.sha256(corpus).hexdigest()}
    path = cache_path(f"{name}-text-s{seed}", key) if use_cache else None
    with cache_lock(path, f"zoo weights {path.name}") if path is not None else nullcontext():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = create(name, **model_kwargs)
            if path is not None and _try_load(model, path):
                return model.eval()
            start = time.perf_counter()
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps, max(1, steps // 20)))
            model.train()
            batches = lm_batches(train, seq_len, batch_size, seed, num_batches=steps)
            for x, y in _progress(batches, progress, steps, name):
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
            model.eval()
            ppl = evaluate_perplexity(model, val, seq_len)
        logger.info("trained %s on text: %d steps, %.1f s, validation perplexity %.2f",
                    name, steps, time.perf_counter() - start, ppl)
        if path is not None:
            _save(model, path)
        return model.eval()
