"""Self-written model zoo: ResNet, MobileNetV2, VGG, a small ViT and a small Llama, plus offline data.

torchvision does not import with the torch build depthfold targets, so every model here is plain
``torch.nn`` and capturable with ``torch.export.export``. Nothing is downloaded: weights are random
(``create``) or trained locally on offline data and cached (``pretrained_digits``, ``pretrained_text``).

    >>> from depthfold import zoo
    >>> model = zoo.create("resnet18", num_classes=10)
    >>> (x,) = zoo.example_inputs("resnet18", resolution=64)
    >>> trained = zoo.pretrained_digits("resnet18", resolution=32)
"""

from __future__ import annotations

from .data import digits_datasets, lm_batches, split_corpus, text_corpus
from .hf_text import HF_TEXT_MODELS, hf_text, minilm_l6, minilm_path, sentence_batch, stdlib_sentences
from .hf_vision import HF_VISION_MODELS, hf_vision
from .registry import LLM_EXAMPLE_SEQ_LEN, Family, ZooSpec, create, example_inputs, list_models, spec
from .train import evaluate_accuracy, evaluate_perplexity, pretrained_digits, pretrained_text

__all__ = [
    "Family",
    "ZooSpec",
    "LLM_EXAMPLE_SEQ_LEN",
    "list_models",
    "spec",
    "create",
    "example_inputs",
    "digits_datasets",
    "text_corpus",
    "split_corpus",
    "lm_batches",
    "pretrained_digits",
    "pretrained_text",
    "evaluate_accuracy",
    "evaluate_perplexity",
    "HF_VISION_MODELS",
    "hf_vision",
    "HF_TEXT_MODELS",
    "hf_text",
    "minilm_l6",
    "minilm_path",
    "sentence_batch",
    "stdlib_sentences",
]
