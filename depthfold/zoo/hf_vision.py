"""Hugging Face ``transformers`` vision architectures from small configs: CNNs nobody here wrote.

The passes are tested and benchmarked on these besides the zoo (random weights, nothing downloaded): the
definitions are the library's own, with its quirks (TF-style explicit padding, squeeze-excite gates,
grouped convs, channels-last ConvNeXt blocks, in-place residual adds).

    >>> from depthfold import zoo
    >>> model = zoo.hf_vision("regnet_y", num_classes=10)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError

__all__ = ["HF_VISION_MODELS", "hf_vision"]


def _transformers():  # type: ignore[no-untyped-def]
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is a test and benchmark dependency
        raise ConfigError("the Hugging Face vision models need transformers: pip install 'depthfold[hf]'") from err
    return transformers


def _resnet(layer_type: str) -> Callable[[int, int], torch.nn.Module]:
    def build(num_classes: int, image_size: int) -> torch.nn.Module:
        t = _transformers()
        widths = [16, 32, 64, 128] if layer_type == "basic" else [32, 64, 128, 256]
        config = t.ResNetConfig(embedding_size=16, hidden_sizes=widths, depths=[1, 2, 1, 1], layer_type=layer_type,
                                num_labels=num_classes)
        return t.ResNetForImageClassification(config)
    return build


def _mobilenetv2(tf_padding: bool) -> Callable[[int, int], torch.nn.Module]:
    def build(num_classes: int, image_size: int) -> torch.nn.Module:
        t = _transformers()
        config = t.MobileNetV2Config(depth_multiplier=0.35, num_labels=num_classes, image_size=image_size,
                                     tf_padding=tf_padding)
        return t.MobileNetV2ForImageClassification(config)
    return build


def _efficientnet(num_classes: int, image_size: int) -> torch.nn.Module:
    t = _transformers()
    # hidden_dim is the head's width: round_filters(1280) at this width coefficient.
    config = t.EfficientNetConfig(width_coefficient=0.25, depth_coefficient=0.34, hidden_dim=320,
                                  num_labels=num_classes, image_size=image_size)
    return t.EfficientNetForImageClassification(config)


def _regnet_y(num_classes: int, image_size: int) -> torch.nn.Module:
    t = _transformers()
    config = t.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], groups_width=8,
                            layer_type="y", num_labels=num_classes)
    return t.RegNetForImageClassification(config)


def _convnext(num_classes: int, image_size: int) -> torch.nn.Module:
    t = _transformers()
    config = t.ConvNextConfig(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], num_labels=num_classes,
                              image_size=image_size)
    return t.ConvNextForImageClassification(config)


HF_VISION_MODELS: dict[str, Callable[[int, int], torch.nn.Module]] = {
    "resnet_basic": _resnet("basic"),
    "resnet_bottleneck": _resnet("bottleneck"),
    "mobilenetv2_tf_padding": _mobilenetv2(True),
    "mobilenetv2": _mobilenetv2(False),
    "efficientnet_b0": _efficientnet,
    "regnet_y": _regnet_y,
    "convnext": _convnext,
}
"""Name -> builder ``(num_classes, image_size)``; small configs of each architecture."""


_NORMS = (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)


def hf_vision(name: str, *, num_classes: int = 10, image_size: int = 96, seed: int = 0) -> torch.nn.Module:
    """A ``transformers`` image classifier from a small config, random weights (seeded), in eval mode.

    The norms' scales and shifts are then set to torch's defaults (1 and 0): ``transformers`` initialises
    some of these models' batch-norm scales like conv weights (N(0, 0.02): EfficientNet), so every block
    shrinks its input ~50x, the random network's output is the same for every input and it cannot train."""
    if name not in HF_VISION_MODELS:
        raise ConfigError(f"unknown Hugging Face vision model {name!r}; choose one of {sorted(HF_VISION_MODELS)}")
    torch.manual_seed(seed)
    model = HF_VISION_MODELS[name](num_classes, image_size)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _NORMS) and module.weight is not None:
                module.weight.fill_(1.0)
                module.bias.zero_()
    return model.eval()
