"""Session caches for the LayerMerge tests: zoo captures and candidate enumerations are shared between
test files (capturing vgg19_bn or enumerating resnet18's candidates takes seconds)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch.fx import GraphModule

from depthfold import zoo
from depthfold.passes.layermerge.candidates import SegmentChoice, enumerate_choices
from depthfold.passes.layermerge.trunk import Trunk, analyze_trunk

from .helpers import UnseenCNN, capture


@dataclass
class Case:
    """A captured CNN (random weights) at 32x32 and its analysed trunk; never modified by tests."""

    name: str
    model: torch.nn.Module
    gm: GraphModule
    x: torch.Tensor
    trunk: Trunk
    choices: dict[str, list[SegmentChoice]]

    def enumerate(self, mode: str = "layermerge") -> list[SegmentChoice]:
        if mode not in self.choices:
            self.choices[mode] = enumerate_choices(self.trunk, mode=mode)  # type: ignore[arg-type]
        return self.choices[mode]


@pytest.fixture(scope="session")
def cnn_case() -> Callable[[str], Case]:
    """``cnn_case(name)``: a zoo CNN (``num_classes=10``) or ``"unseen"`` (UnseenCNN), captured once."""
    cache: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cache:
            torch.manual_seed(0)
            model = UnseenCNN() if name == "unseen" else zoo.create(name, num_classes=10)
            gm, x = capture(model, 32)
            cache[name] = Case(name, model, gm, x, analyze_trunk(gm), {})
        return cache[name]

    return get


HF_RESOLUTION = 80
"""Odd map sizes deep in the network (80 -> 40 -> 20 -> 10 -> 5 -> 3): where re-padding goes wrong."""


@pytest.fixture(scope="session")
def hf_case() -> Callable[[str], Case]:
    """``hf_case(name)``: a Hugging Face ``transformers`` CNN from a small config (:func:`zoo.hf_vision`)."""
    pytest.importorskip("transformers")
    cache: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in cache:
            model = zoo.hf_vision(name, image_size=HF_RESOLUTION)
            gm, x = capture(model, HF_RESOLUTION)
            cache[name] = Case(name, model, gm, x, analyze_trunk(gm), {})
        return cache[name]

    return get
