"""ir.find_stack: transformer blocks, residual sublayers and attention sites (with KV cache points) of captured
graphs, on the zoo Llama, Hugging Face decoders/encoders (config-built, nothing downloaded) and hand-written
matmul-softmax-matmul attention; ir.remove_dead."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from depthfold import ir, zoo
from depthfold.errors import PreconditionError
from depthfold.passes.common.stream import bypass

SDPA = torch.ops.aten.scaled_dot_product_attention.default
BATCH, SEQ = 2, 16


def _shape(gm: torch.fx.GraphModule, name: str) -> tuple[int, ...]:
    node = next(n for n in gm.graph.nodes if n.name == name)
    return tuple(node.meta["depthfold.shape"])


def _node(gm: torch.fx.GraphModule, name: str) -> torch.fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _hf_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 100, (BATCH, SEQ), generator=g),
            "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


def _zoo_llama() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = zoo.create("llama_tiny", n_layers=4, dim=32, hidden=64, vocab_size=100).eval()
    return model, (torch.randint(0, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(0)),)


def _hf(name: str) -> nn.Module:
    pytest.importorskip("transformers")
    return zoo.hf_text(name)


# name -> (stack prefix, heads, kv_heads, head_dim, causal flag on the SDPA call)
HF = {
    "llama": ("model.layers", 4, 2, 8, False),
    "qwen2": ("model.layers", 4, 1, 8, False),
    "gpt2": ("transformer.h", 4, 4, 8, False),
    "bert": ("encoder.layer", 4, 4, 8, False),
}


@pytest.fixture(scope="module")
def zoo_llama():  # type: ignore[no-untyped-def]
    model, inputs = _zoo_llama()
    return model, ir.capture(model, inputs).graph_module


@pytest.fixture(scope="module", params=sorted(HF))
def hf_model(request):  # type: ignore[no-untyped-def]
    model = _hf(request.param)
    return request.param, model, ir.capture(model, _hf_inputs()).graph_module


def _check_block_params(block: ir.TransformerBlock, model: nn.Module, gm: torch.fx.GraphModule) -> None:
    """block.params maps exactly the model's parameters under block.path to get_attr targets that resolve."""
    expected = {name[len(block.path) + 1:] for name, _ in model.named_parameters() if name.startswith(block.path + ".")}
    assert set(block.params) == expected
    for rel, target in block.params.items():
        assert target == f"{block.path}.{rel}"
        assert torch.equal(gm.get_parameter(target), model.get_parameter(target))


def test_blocks_find_stack_zoo_llama(zoo_llama) -> None:  # type: ignore[no-untyped-def]
    model, gm = zoo_llama
    stack = ir.find_stack(gm)
    assert stack.prefix == "layers"
    assert len(stack) == 4
    assert [b.index for b in stack.blocks] == [0, 1, 2, 3]
    assert [b.path for b in stack.blocks] == [f"layers.{i}" for i in range(4)]
    for i, block in enumerate(stack.blocks):
        assert [s.kind for s in block.sublayers] == ["attention", "mlp"]
        attn, mlp = block.sublayers
        # The stream path: block input -> attention residual -> MLP residual -> block output.
        assert attn.input == block.input and mlp.output == block.output and attn.output == mlp.input
        assert attn.output == attn.add and mlp.add == mlp.output  # pre-norm: the adds are the outputs
        for sub in block.sublayers:
            add = _node(gm, sub.add)
            assert add.target is torch.ops.aten.add.Tensor and _node(gm, sub.input) in add.all_input_nodes
        if i:  # blocks chain on the residual stream
            assert block.input == stack.blocks[i - 1].output
        site = block.attention
        assert site is not None and site.form == "sdpa" and site.node in block.nodes
        assert _node(gm, site.node).target is SDPA
        assert (site.heads, site.kv_heads, site.head_dim, site.causal) == (4, 2, 8, True)
        # The cache point is before grouped-query repetition; the key the call reads is after it.
        assert _shape(gm, site.key_cache) == (BATCH, 2, SEQ, 8)
        assert _shape(gm, site.value_cache) == (BATCH, 2, SEQ, 8)
        assert _shape(gm, site.key) == (BATCH, 4, SEQ, 8)
        assert _shape(gm, site.query) == (BATCH, 4, SEQ, 8)
        assert site.key != site.key_cache
        _check_block_params(block, model, gm)
    # Block node sets are disjoint.
    seen: set[str] = set()
    for block in stack.blocks:
        assert not (seen & block.nodes)
        seen |= block.nodes
    assert stack.blocks[0].input == "embedding"


def test_blocks_find_stack_hugging_face(hf_model) -> None:  # type: ignore[no-untyped-def]
    name, model, gm = hf_model
    prefix, heads, kv_heads, head_dim, causal = HF[name]
    stack = ir.find_stack(gm)
    assert stack.prefix == prefix
    assert len(stack) == 4
    assert [b.path for b in stack.blocks] == [f"{prefix}.{i}" for i in range(4)]
    for block in stack.blocks:
        assert [s.kind for s in block.sublayers] == ["attention", "mlp"]
        attn, mlp = block.sublayers
        assert attn.output == mlp.input and mlp.output == block.output
        # The attention sublayer starts at the block input or a cast of it (HF Llama/Qwen2 cast the stream).
        start = _node(gm, attn.input)
        while start.name != block.input:
            assert str(start.target).startswith("aten.to.") or str(start.target).startswith("aten._to_copy"), start
            start = start.args[0]
        site = block.attention
        assert site is not None and site.form == "sdpa"
        assert (site.heads, site.kv_heads, site.head_dim, site.causal) == (heads, kv_heads, head_dim, causal)
        assert _shape(gm, site.key_cache) == (BATCH, kv_heads, SEQ, head_dim)
        assert _shape(gm, site.value_cache) == (BATCH, kv_heads, SEQ, head_dim)
        assert _shape(gm, site.key) == (BATCH, heads, SEQ, head_dim)
        if kv_heads == heads:
            assert site.key_cache == site.key  # nothing repeated: the key read is the cache point
        else:
            assert site.key_cache != site.key
        _check_block_params(block, model, gm)


def test_blocks_post_norm_bert_sublayers_end_in_norms() -> None:
    model = _hf("bert")
    gm = ir.capture(model, _hf_inputs()).graph_module
    stack = ir.find_stack(gm)
    for block in stack.blocks:
        attn, mlp = block.sublayers
        # Post-norm: each sublayer's output is the LayerNorm after its residual add, not the add itself.
        assert attn.output != attn.add and mlp.output != mlp.add
        assert _node(gm, attn.output).target is torch.ops.aten.layer_norm.default
        assert _node(gm, mlp.output).target is torch.ops.aten.layer_norm.default
        assert _node(gm, attn.add) in _node(gm, attn.output).all_input_nodes
        assert mlp.input == attn.output and mlp.output == block.output


def test_blocks_qwen2_params_include_projection_biases() -> None:
    model = _hf("qwen2")
    gm = ir.capture(model, _hf_inputs()).graph_module
    block = ir.find_stack(gm).blocks[2]
    assert {"self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"} <= set(block.params)
    assert "self_attn.o_proj.bias" not in block.params
    assert block.params["self_attn.k_proj.bias"] == "model.layers.2.self_attn.k_proj.bias"


def test_blocks_eager_hf_llama_is_matmul_form_with_cache_before_repeat_kv() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    gm = ir.capture(model, _hf_inputs()).graph_module
    stack = ir.find_stack(gm)
    assert len(stack) == 2
    for block in stack.blocks:
        site = block.attention
        assert site is not None and site.form == "matmul"
        assert (site.heads, site.kv_heads, site.head_dim) == (4, 2, 8)
        # repeat_kv (unsqueeze -> expand -> reshape) is walked back through its 5-D middle to the 4-D cache.
        assert _shape(gm, site.key_cache) == (BATCH, 2, SEQ, 8)
        assert _shape(gm, site.value_cache) == (BATCH, 2, SEQ, 8)
        assert _shape(gm, site.key) == (BATCH, 4, SEQ, 8)


# --- hand-written models -------------------------------------------------------------------------------------


class MatmulAttention(nn.Module):
    """q @ k^T * scale -> softmax -> @ v with heads as a 4-D [batch, heads, seq, head_dim] layout."""

    def __init__(self, dim: int = 16, heads: int = 4, kv_heads: int = 4) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, kv_heads * self.head_dim)
        self.v = nn.Linear(dim, kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim))
        out = torch.softmax(scores, dim=-1) @ v
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, kv_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(16)
        self.attn = MatmulAttention(kv_heads=kv_heads)
        self.norm2 = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MatmulNet(nn.Module):
    def __init__(self, kv_heads: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(kv_heads) for _ in range(2))
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_blocks_matmul_softmax_matmul_attention(kv_heads: int) -> None:
    torch.manual_seed(0)
    model = MatmulNet(kv_heads).eval()
    gm = ir.capture(model, (torch.randn(2, 6, 16),)).graph_module
    stack = ir.find_stack(gm)
    assert stack.prefix == "blocks" and len(stack) == 2
    for block in stack.blocks:
        assert [s.kind for s in block.sublayers] == ["attention", "mlp"]
        site = block.attention
        assert site is not None and site.form == "matmul" and not site.causal
        assert _node(gm, site.node).target is torch.ops.aten.matmul.default
        assert site.node in block.nodes
        assert (site.heads, site.kv_heads, site.head_dim) == (4, kv_heads, 4)
        assert _shape(gm, site.key_cache) == (2, kv_heads, 6, 4)
        assert _shape(gm, site.value_cache) == (2, kv_heads, 6, 4)
        assert _shape(gm, site.query) == (2, 4, 6, 4)
        assert (site.key == site.key_cache) == (kv_heads == 4)
        _check_block_params(block, model, gm)


def test_blocks_no_attention_raises_precondition() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    gm = ir.capture(model, (torch.randn(2, 8),)).graph_module
    with pytest.raises(PreconditionError, match="scaled_dot_product_attention"):
        ir.find_stack(gm)


class LoneAttention(nn.Module):
    """Attention, but not inside a numbered container of blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.o = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (y.view(b, t, 4, 4).transpose(1, 2) for y in self.qkv(x).split(16, dim=-1))
        return x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))


def test_blocks_attention_outside_repeated_blocks_raises_precondition() -> None:
    torch.manual_seed(0)
    gm = ir.capture(LoneAttention().eval(), (torch.randn(2, 6, 16),)).graph_module
    with pytest.raises(PreconditionError, match="none inside a repeated block"):
        ir.find_stack(gm)


# --- remove_dead -----------------------------------------------------------------------------------------------


def _block_params_left(gm: torch.fx.GraphModule, path: str) -> list[str]:
    return [name for name, _ in gm.named_parameters() if name.startswith(path + ".")]


def test_blocks_remove_dead_deletes_a_bypassed_matmul_block_and_its_parameters() -> None:
    torch.manual_seed(0)
    model = MatmulNet().eval()
    x = torch.randn(2, 6, 16)
    gm = ir.capture(model, (x,)).graph_module
    block = ir.find_stack(gm).blocks[1]
    bypass(gm, block.output, block.input)
    ir.remove_dead(gm)
    assert not (block.nodes & {n.name for n in gm.graph.nodes})
    assert _block_params_left(gm, "blocks.1") == []
    assert _block_params_left(gm, "blocks.0")  # the other block is kept
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model.head(model.blocks[0](x)), rtol=0, atol=1e-6)


def test_blocks_remove_dead_deletes_a_bypassed_sdpa_block(zoo_llama) -> None:  # type: ignore[no-untyped-def]
    _, captured = zoo_llama
    gm = ir.clone(captured)
    block = ir.find_stack(gm).blocks[1]
    bypass(gm, block.output, block.input)
    ir.remove_dead(gm)
    assert not [n.name for n in gm.graph.nodes if n.target is SDPA and n.name == block.attention.node]
    assert _block_params_left(gm, "layers.1") == []
