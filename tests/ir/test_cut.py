"""ir.cut: clean cuts of a captured graph (one activation crossing) and the segments between them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthfold import ir, zoo
from depthfold.errors import ConfigError
from depthfold.ir.cut import block_cuts, crossing_edges, cut_points, resolve_cut, split_graph


def _captured(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    return ir.capture(model.eval(), x).graph_module


@pytest.fixture(scope="module")
def resnet18() -> torch.fx.GraphModule:
    torch.manual_seed(0)
    return _captured(zoo.create("resnet18", num_classes=10), torch.randn(2, 3, 32, 32))


def test_block_cuts_are_residual_block_ends(resnet18: torch.fx.GraphModule) -> None:
    names = [c.name for c in block_cuts(resnet18)]
    assert names == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert all(len(c.shape) == 4 for c in block_cuts(resnet18))


def test_segments_compose_to_the_graph_at_other_batch_sizes(resnet18: torch.fx.GraphModule) -> None:
    cuts = [resolve_cut(resnet18, "layer1.1"), resolve_cut(resnet18, 4)]
    assert cuts[1].name == "layer3.0"
    segments = split_graph(resnet18, cuts)
    assert len(segments) == 3
    x = torch.randn(5, 3, 32, 32)
    value = x
    for segment in segments:
        value = segment(value)
    torch.testing.assert_close(value, ir.flatten_outputs(resnet18(x))[0], rtol=0, atol=0)


def test_a_cut_inside_a_residual_block_names_the_skip_edge(resnet18: torch.fx.GraphModule) -> None:
    with pytest.raises(ConfigError, match=r"layer2\.0\.downsample.*-> add.*skip connection"):
        resolve_cut(resnet18, "layer2.0.conv1")
    node = next(n for n in resnet18.graph.nodes if ir.module_path(n) == "layer2.0.conv1")
    producers = {p.name for p, _ in crossing_edges(resnet18, node)}
    assert len(producers) == 2  # the conv's output and the block input on the downsample path


def test_bad_cut_names(resnet18: torch.fx.GraphModule) -> None:
    with pytest.raises(ConfigError, match="names no module.*did you mean 'layer1.1'"):
        resolve_cut(resnet18, "layer1.11")
    with pytest.raises(ConfigError, match="out of range: the network has 8 blocks"):
        resolve_cut(resnet18, 8)
    with pytest.raises(ConfigError, match="nothing after it but the output"):
        resolve_cut(resnet18, "fc")


class _ReadsInputLater(nn.Module):
    """A suffix that reads the graph input again: no cut between the convs is clean."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) + x


class _FlattenByBatch(nn.Module):
    """``view(x.size(0), -1)`` after the cut: the batch-size query is recomputed in the suffix."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.fc = nn.Linear(4 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.size(0)
        return self.fc(self.features(x).view(batch, -1))


def test_an_input_read_after_the_cut_is_refused() -> None:
    gm = _captured(_ReadsInputLater(), torch.randn(2, 3, 8, 8))
    with pytest.raises(ConfigError, match="does not cut the graph.*x \\(placeholder\\)"):
        resolve_cut(gm, "a")
    assert all(c.name != "a" for c in cut_points(gm))


def test_batch_size_queries_are_recomputed_in_the_suffix() -> None:
    torch.manual_seed(0)
    gm = _captured(_FlattenByBatch(), torch.randn(2, 3, 8, 8))
    cut = resolve_cut(gm, "features.1")
    prefix, suffix = split_graph(gm, [cut])
    x = torch.randn(7, 3, 8, 8)
    torch.testing.assert_close(suffix(prefix(x)), ir.flatten_outputs(gm(x))[0], rtol=0, atol=0)


def test_transformers_resnet_blocks() -> None:
    model = zoo.hf_vision("resnet_basic", image_size=32)
    gm = _captured(model, torch.randn(2, 3, 32, 32))
    blocks = block_cuts(gm)
    assert len(blocks) >= 3
    segments = split_graph(gm, blocks[1:3])
    x = torch.randn(3, 3, 32, 32)
    value = x
    for segment in segments:
        value = segment(value)
    torch.testing.assert_close(value, ir.flatten_outputs(gm(x))[0], rtol=0, atol=0)
