"""A small Llama-style decoder-only language model.

Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", 2023 (arXiv:2302.13971):
RMSNorm pre-normalisation (Zhang & Sennrich 2019), rotary position embeddings (Su et al. 2021,
arXiv:2104.09864), SwiGLU MLP (Shazeer 2020), no biases; grouped-query attention (Ainslie et al. 2023,
arXiv:2305.13245) when ``n_kv_heads < n_heads``. Attention keeps separate ``q_proj``/``k_proj``/``v_proj``/
``o_proj`` and the MLP separate ``gate_proj``/``up_proj``/``down_proj``, with Hugging Face's names, so
passes find sibling projections to fuse and blocks (``layers``) to share, collapse or drop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm", "LlamaAttention", "LlamaMLP", "LlamaBlock", "LlamaModel", "llama_tiny"]


class RMSNorm(nn.Module):
    """Root-mean-square layer norm: ``x / sqrt(mean(x^2) + eps) * weight`` (no centring, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope_tables(head_dim: int, max_seq: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_seq, head_dim) in the "rotate half" layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


class LlamaAttention(nn.Module):
    """Causal multi-head attention with rotary embeddings and optional grouped-query K/V heads."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int) -> None:
        super().__init__()
        if dim % n_heads != 0 or n_heads % n_kv_heads != 0:
            raise ValueError(f"need dim % n_heads == 0 and n_heads % n_kv_heads == 0, got dim={dim}, "
                             f"n_heads={n_heads}, n_kv_heads={n_kv_heads}")
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if self.n_kv_heads != self.n_heads:
            # Grouped-query attention: each K/V head serves n_heads // n_kv_heads query heads.
            rep = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    """Pre-norm decoder block: ``x + self_attn(input_layernorm(x))``, ``x + mlp(post_attention_layernorm(x))``."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden: int, eps: float) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = LlamaAttention(dim, n_heads, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = LlamaMLP(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Decoder-only LM: token ids (batch, seq) int64 -> logits (batch, seq, vocab_size).

    Args:
        vocab_size: number of tokens (256 for raw bytes).
        dim: model width.
        n_layers: number of decoder blocks, kept in ``self.layers``.
        n_heads: query heads per block.
        n_kv_heads: key/value heads per block (``None``: same as ``n_heads``).
        hidden: SwiGLU hidden width.
        max_seq: longest sequence the rotary tables cover.
        rope_theta: rotary base frequency.
        norm_eps: RMSNorm epsilon.
        tie_embeddings: share ``lm_head.weight`` with ``embed_tokens.weight``.
    """

    def __init__(
        self,
        *,
        vocab_size: int = 256,
        dim: int = 128,
        n_layers: int = 4,
        n_heads: int = 4,
        n_kv_heads: int | None = 2,
        hidden: int = 344,
        max_seq: int = 128,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-6,
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.vocab_size = vocab_size
        self.max_seq = max_seq
        self.embed_tokens = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(LlamaBlock(dim, n_heads, n_kv_heads, hidden, norm_eps) for _ in range(n_layers))
        self.norm = RMSNorm(dim, norm_eps)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        cos, sin = _rope_tables(dim // n_heads, max_seq, rope_theta)
        # Non-persistent: derived from the config, so they stay out of the state dict.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()
        if tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        if t > self.max_seq:
            raise ValueError(f"sequence length {t} exceeds max_seq={self.max_seq}; "
                             "build the model with a larger max_seq")
        x = self.embed_tokens(input_ids)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))


def llama_tiny(
    *,
    vocab_size: int = 256,
    dim: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    n_kv_heads: int | None = 2,
    hidden: int = 344,
    max_seq: int = 128,
    rope_theta: float = 10000.0,
    tie_embeddings: bool = False,
) -> LlamaModel:
    """A tiny byte-level Llama (Touvron et al. 2023): width 128, 4 layers, 4 query / 2 KV heads."""
    return LlamaModel(
        vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        hidden=hidden, max_seq=max_seq, rope_theta=rope_theta, tie_embeddings=tie_embeddings,
    )
