"""VGG-19 with batch normalisation.

Simonyan, Zisserman, "Very Deep Convolutional Networks for Large-Scale Image Recognition", ICLR 2015
(arXiv:1409.1556), configuration E, with BatchNorm after every conv as in torchvision's ``vgg19_bn``
(143.68 M parameters at 1000 classes). ``features`` is a flat ``nn.Sequential`` of
Conv2d/BatchNorm2d/ReLU/MaxPool2d, so ``features[i]`` can be replaced (e.g. a ReLU by ``nn.Identity()``).
An adaptive 7x7 average pool lets any input of at least 32x32 through.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VGG", "vgg19_bn"]

# Configuration "E": output channels of each 3x3 conv, "M" a 2x2 max-pool.
_CFG_E: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)


def _make_features(cfg: tuple[int | str, ...], in_chans: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = in_chans
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out_ch = int(v)
            layers += [nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU()]
            in_ch = out_ch
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG: ``features``, adaptive 7x7 average pool, 4096-4096 ``classifier`` with dropout.

    Args:
        cfg: conv widths and ``"M"`` pooling markers.
        num_classes: size of the classifier output.
        in_chans: number of input image channels.
        dropout: dropout probability in the classifier.
    """

    def __init__(
        self, cfg: tuple[int | str, ...], *, num_classes: int = 1000, in_chans: int = 3, dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self.features = _make_features(cfg, in_chans)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def vgg19_bn(*, num_classes: int = 1000, in_chans: int = 3) -> VGG:
    """VGG-19 with BatchNorm (Simonyan & Zisserman 2015); 143.68 M parameters at 1000 classes."""
    return VGG(_CFG_E, num_classes=num_classes, in_chans=in_chans)
