"""fuse_qkv: sibling linears/convs reading one tensor become one wider layer plus a split, exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from depthfold import ir
from depthfold.passes import PassManager

RTOL = ir.TOLERANCE[torch.float32]  # 1e-4 of the output scale: a wider GEMM may sum in another order
LINEAR = "aten.linear.default"
CONV = "aten.conv2d.default"
SPLIT = "aten.split_with_sizes.default"


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max|out - ref| / max(1, max|ref|): the measure the pass manager verifies with."""
    return ir.compare_outputs(ref, out).max_rel


def fuse(model: nn.Module, x: torch.Tensor, spec: str = "fuse_qkv"):  # type: ignore[no-untyped-def]
    model = model.eval()
    captured = ir.capture(model, (x,))
    result = PassManager([spec]).run(captured.graph_module, captured.example_inputs)
    gm = result.graph_module
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _ in range(2):  # fresh inputs, not the ones the manager verified with
            fresh = torch.randn(x.shape, generator=gen)
            assert rel_err(model(fresh), gm(fresh)) <= RTOL
    return captured.graph_module, gm, result.records[0]


def hist(gm: torch.fx.GraphModule) -> dict[str, int]:
    return ir.op_histogram(gm)


class Attention(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim, bias=False)  # mixed bias, as in some LLM projections
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)


def test_fuse_qkv_attention_projections() -> None:
    torch.manual_seed(0)
    before, gm, record = fuse(Layer(), torch.randn(2, 5, 16))
    assert hist(before)[LINEAR] == 4
    assert hist(gm)[LINEAR] == 2  # q/k/v -> one, plus the output projection
    assert hist(gm)[SPLIT] == 1
    (change,) = record.changes
    assert change["kind"] == "linear" and change["sizes"] == [16, 16, 16]
    assert len(change["removed"]) == 3
    fused = next(n for n in gm.graph.nodes if n.name == change["added"][0])
    assert ir.shape_of(fused.args[1]) == (48, 16)
    assert fused.args[2] is not None  # q and v have biases; k's is filled with zeros
    assert str(fused.args[1].target).startswith("attn.")  # the common owner of q, k and v
    assert fused.meta[ir.META_FROM][0] == "fuse_qkv"


class SwiGLU(nn.Module):
    def __init__(self, dim: int = 12, hidden: int = 20) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def test_fuse_qkv_swiglu_gate_up() -> None:
    torch.manual_seed(0)
    _, gm, record = fuse(SwiGLU(), torch.randn(3, 4, 12))
    assert hist(gm)[LINEAR] == 2
    (change,) = record.changes
    assert change["sizes"] == [20, 20]
    fused = next(n for n in gm.graph.nodes if n.name == change["added"][0])
    assert fused.args[2] is None  # no bias anywhere: none invented


class ParallelConvs(nn.Module):
    def __init__(self, kernels: tuple[int, ...] = (1, 1, 1), padding: int | str = 0) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Conv2d(6, 4 + i, k, padding=padding, bias=i != 1)
                                      for i, k in enumerate(kernels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [b(x) for b in self.branches]
        return torch.cat([o[:, :, :3, :3] for o in outs], dim=1)


def test_fuse_qkv_parallel_pointwise_convs() -> None:
    torch.manual_seed(0)
    _, gm, record = fuse(ParallelConvs(), torch.randn(1, 6, 5, 5), "fuse_qkv:fuse_convs=true")
    assert hist(gm)[CONV] == 1
    (change,) = record.changes
    assert change["kind"] == "conv" and change["sizes"] == [4, 5, 6]


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_fuse_qkv_convs_with_string_padding(padding: str) -> None:
    # nn.Conv2d(padding="same"/"valid") exports as aten.conv2d.padding, whose padding argument is a string.
    torch.manual_seed(0)
    _, gm, record = fuse(ParallelConvs((3, 3), padding=padding), torch.randn(1, 6, 5, 5), "fuse_qkv:fuse_convs=true")
    assert len(record.changes) == 1
    assert sum(n for op, n in hist(gm).items() if op.startswith("aten.conv2d")) == 1


def test_fuse_qkv_convs_with_different_kernels_not_fused_together() -> None:
    torch.manual_seed(0)
    before, gm, record = fuse(ParallelConvs((1, 3, 1), padding=0), torch.randn(1, 6, 5, 5), "fuse_qkv:fuse_convs=true")
    assert hist(before)[CONV] == 3
    assert hist(gm)[CONV] == 2  # the two 1x1s fuse, the 3x3 stays on its own
    (change,) = record.changes
    assert change["sizes"] == [4, 6]


class Single(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + x


def test_fuse_qkv_single_linear_not_fused() -> None:
    before, gm, record = fuse(Single(), torch.randn(2, 8))
    assert record.changes == [] and record.skipped == []
    assert hist(gm) == hist(before)


class GroupedSiblings(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, groups=2)
        self.b = nn.Conv2d(4, 4, 3, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) - self.b(x)


def test_fuse_qkv_grouped_convs_not_fused() -> None:
    before, gm, record = fuse(GroupedSiblings(), torch.randn(1, 4, 6, 6), "fuse_qkv:fuse_convs=true")
    assert record.changes == []
    assert hist(gm) == hist(before)


class TiedSiblings(nn.Module):
    """q and k share one module (tied weights): the shared weight must not be replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x) * self.q(x) + self.v(x)


def test_fuse_qkv_tied_weights_skipped() -> None:
    torch.manual_seed(0)
    _, gm, record = fuse(TiedSiblings(), torch.randn(2, 8))
    assert record.changes == []
    assert hist(gm)[LINEAR] == 3
    assert any("shared" in s["reason"] for s in record.skipped)


def test_fuse_qkv_min_group() -> None:
    torch.manual_seed(0)
    _, gm, record = fuse(SwiGLU(), torch.randn(2, 12), "fuse_qkv:min_group=3")
    assert record.changes == []
    assert hist(gm)[LINEAR] == 3


def test_fuse_qkv_convs_are_opt_in() -> None:
    _, gm, record = fuse(ParallelConvs(), torch.randn(1, 6, 5, 5))
    assert not record.changes
    assert ir.op_histogram(gm)["aten.conv2d.default"] == 3


def test_fuse_qkv_convs_disabled_by_config() -> None:
    torch.manual_seed(0)
    _, gm, record = fuse(ParallelConvs(), torch.randn(1, 6, 5, 5), "fuse_qkv:fuse_convs=false")
    assert record.changes == []
    assert hist(gm)[CONV] == 3
