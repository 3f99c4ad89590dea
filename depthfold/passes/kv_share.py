"""Cross-layer KV sharing: later attention layers attend with an earlier layer's keys and values.

Idea: layer ``i`` uses the K/V of layer ``sources[i] <= i`` (a source is its own source), so only the *owner*
layers compute and cache K/V; the others keep their queries and output projection, and their K/V
projections are deleted. Cross-Layer Attention shares within groups of 2 or 3 adjacent layers (Brandon et
al., "Reducing Transformer Key-Value Cache Size with Cross-Layer Attention", arXiv:2405.12981; presets
``cla2``/``cla3``); see also LCKV (arXiv:2405.10637), YOCO (arXiv:2405.05254) and "A Systematic Study of
Cross-Layer KV Sharing" (arXiv:2410.14442). Those are trained that way; on a trained model sharing is
approximate, which ``recover`` then distils back.

``ratio`` chooses the pairing training-free from calibration data: the per-layer K/V caches, averaged over the
samples, are compared by Euclidean distance; pairs are tried in order of distance and a share is kept if the
output stays similar (mean per-token cosine >= ``threshold``), until ``ratio`` of the layers reuse another's
cache. ``criterion=dissimilar`` tries the most different pairs first (KVSharer, Yang et al., arXiv:2410.18517);
``similar`` the closest first (the intuition of MiniCache, arXiv:2405.14366). Both are reported.

The pass finds every attention site (SDPA or matmul-softmax-matmul), its key/value before grouped-query head
repetition, and its head layout; sharing needs equal heads, KV heads and head size. Exactness: APPROXIMATE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch.fx import GraphModule

from .. import ir
from ..errors import ConfigError
from .base import Change, Exactness, PassContext, PassResult
from .common.calibration import calibration_split
from .common.metrics import batched_outputs, check_metrics, evaluate, token_cosine
from .common.stream import narrow_split_projections, stream_states
from .registry import register_pass

__all__ = ["KVShareConfig", "cache_bytes_per_token", "kv_bytes_per_token", "kv_share", "preset_sources"]

logger = logging.getLogger(__name__)

_PRESETS = {"cla2": 2, "cla3": 3}


@dataclass(frozen=True)
class KVShareConfig:
    sources: tuple[int, ...] = ()
    """Per attention layer, the layer whose K/V it uses (``sources=0,0,2,2``); ``sources[i] <= i`` and every
    source is its own source."""
    preset: Literal["none", "cla2", "cla3"] = "none"
    """Cross-Layer Attention groups: ``cla2`` shares each pair of adjacent layers, ``cla3`` each triple (when
    neither ``sources`` nor ``ratio`` is given either, ``cla2``)."""
    ratio: float = 0.0
    """Choose the sharing from calibration data so that this share of the layers reuse another's K/V."""
    criterion: Literal["dissimilar", "similar"] = "dissimilar"
    """With ``ratio``: try the most different layer pairs first (KVSharer) or the most similar (MiniCache)."""
    threshold: float = 0.5
    """With ``ratio``: keep a share only if the output's mean per-token cosine to the original stays >= this."""
    eval_samples: int = 64
    train_samples: int = 32
    batch_size: int = 8
    metrics: tuple[str, ...] = ("token_cosine", "cosine", "kl", "perplexity")

    def __post_init__(self) -> None:
        given = [bool(self.sources), self.preset != "none", self.ratio > 0]
        if sum(given) > 1:
            raise ConfigError("kv_share: give one of sources=..., preset=cla2|cla3 or ratio=... (nothing: cla2); "
                              f"got sources={list(self.sources)}, preset={self.preset}, ratio={self.ratio}")
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(f"kv_share: ratio is the share of layers that reuse another's K/V, in [0, 1); "
                              f"got {self.ratio}")
        check_metrics(self.metrics)


def preset_sources(preset: str, layers: int) -> tuple[int, ...]:
    """The sources of a Cross-Layer Attention preset: groups of ``cla<k>`` adjacent layers share the first's K/V."""
    group = _PRESETS[preset]
    return tuple(i - i % group for i in range(layers))


def check_sources(sources: tuple[int, ...], layers: int) -> None:
    """Raise ``ConfigError`` unless ``sources`` is a valid sharing map for ``layers`` attention layers."""
    if len(sources) != layers:
        raise ConfigError(f"kv_share: sources has {len(sources)} entries but the model has {layers} attention "
                          f"layers; give one source per layer, e.g. sources={','.join(str(i - i % 2) for i in range(layers))}")
    for i, s in enumerate(sources):
        if not 0 <= s <= i:
            raise ConfigError(f"kv_share: sources[{i}] = {s} points forward (or below 0); a layer can only reuse "
                              "the K/V of itself or an earlier layer")
        if sources[s] != s:
            raise ConfigError(f"kv_share: sources[{i}] = {s}, but layer {s} is not its own source "
                              f"(sources[{s}] = {sources[s]}); point layer {i} at {sources[s]} instead")


def kv_bytes_per_token(sites: list[ir.AttentionSite], sources: tuple[int, ...], dtype_bytes: int) -> int:
    """Bytes of K and V cached per token over the owner layers."""
    return sum(2 * sites[i].kv_heads * sites[i].head_dim * dtype_bytes for i, s in enumerate(sources) if s == i)


def cache_bytes_per_token(gm: GraphModule) -> int:
    """Bytes of K and V a decoder caches per token when every attention layer keeps its own cache (any graph
    before ``kv_share``, e.g. after dropping or collapsing blocks)."""
    sites = _sites(gm)
    return kv_bytes_per_token(sites, tuple(range(len(sites))), _dtype_bytes(gm, sites[0])) if sites else 0


@register_pass("kv_share", exactness=Exactness.APPROXIMATE, config=KVShareConfig, uses_context=True)
def kv_share(gm: GraphModule, config: KVShareConfig, context: PassContext) -> PassResult:
    """Let later attention layers reuse earlier layers' keys and values; delete the K/V projections no one
    reads (Cross-Layer Attention; KVSharer's training-free choice)."""
    sites = _sites(gm)
    calib = calibration_split(context.data, tuple(context.example_inputs), names=ir.input_names(gm),
                              free_dims=ir.free_dims(gm), eval_samples=config.eval_samples,
                              train_samples=config.train_samples, batch_size=config.batch_size, seed=context.seed)
    search: dict[str, object] = {}
    if config.sources:
        sources = config.sources
    elif config.ratio == 0:
        sources = preset_sources("cla2" if config.preset == "none" else config.preset, len(sites))
    else:
        plans = {c: _choose(gm, sites, config, calib, c) for c in ("dissimilar", "similar")}
        sources = plans[config.criterion]["sources"]  # type: ignore[assignment]
        search = {"criterion": config.criterion, "plans": plans}
    check_sources(tuple(sources), len(sites))
    out = share(gm, sites, tuple(sources))
    dtype_bytes = _dtype_bytes(gm, sites[0])
    before, after = kv_bytes_per_token(sites, tuple(range(len(sites))), dtype_bytes), \
        kv_bytes_per_token(sites, tuple(sources), dtype_bytes)
    teacher = batched_outputs(gm, calib.held_out, calib.batch_size)
    student = batched_outputs(out, calib.held_out, calib.batch_size)
    quality = {k: v for k, v in evaluate(teacher, student, calib.held_out, config.metrics).items() if v is not None}
    changes = [Change(kind="kv_share", removed=(), added=(),
                      detail={"layer": i, "source": s, "attention": sites[i].node, "uses": sites[s].node})
               for i, s in enumerate(sources) if s != i]
    report = {"layers": len(sites), "sources": list(sources), "owners": sorted(set(sources)),
              "kv_bytes_per_token": {"before": before, "after": after, "ratio": after / before},
              "layout": [{"heads": s.heads, "kv_heads": s.kv_heads, "head_dim": s.head_dim} for s in sites],
              "quality": quality, **({"search": search} if search else {}),
              "calibration": {"samples": len(calib.train), "held_out": len(calib.held_out),
                              "synthetic": calib.synthetic}}
    logger.info("kv_share: sources %s, KV bytes/token %d -> %d; held-out %s", list(sources), before, after, quality)
    return PassResult(out, changes=changes, report=report)


def _sites(gm: GraphModule) -> list[ir.AttentionSite]:
    stack = ir.find_stack(gm)
    missing = [b.path for b in stack.blocks if b.attention is None]
    if missing:
        raise ConfigError(f"kv_share: blocks {missing} of {stack.prefix!r} have no attention site")
    return [b.attention for b in stack.blocks]  # type: ignore[misc]


def share(gm: GraphModule, sites: list[ir.AttentionSite], sources: tuple[int, ...]) -> GraphModule:
    """A copy of ``gm`` in which attention ``i`` reads the keys and values of attention ``sources[i]``."""
    check_sources(sources, len(sites))
    out = ir.clone(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    for i, s in enumerate(sources):
        if s == i:
            continue
        a, b = sites[i], sites[s]
        if (a.heads, a.kv_heads, a.head_dim) != (b.heads, b.kv_heads, b.head_dim):
            raise ConfigError(f"kv_share: layer {i} ({a.heads} heads, {a.kv_heads} KV heads, head size {a.head_dim}) "
                              f"cannot use the K/V of layer {s} ({b.heads}, {b.kv_heads}, {b.head_dim}): sharing "
                              "needs the same head layout")
        nodes[a.key].replace_all_uses_with(nodes[b.key])
        nodes[a.value].replace_all_uses_with(nodes[b.value])
    ir.remove_dead(out)
    # Fused Q/K/V projections (GPT-2's c_attn, or after fuse_qkv) keep only the pieces still read.
    narrow_split_projections(out)
    ir.remove_dead(out)
    return out


def _dtype_bytes(gm: GraphModule, site: ir.AttentionSite) -> int:
    node = next(n for n in gm.graph.nodes if n.name == site.key_cache)
    dtype = getattr(torch, str(node.meta.get(ir.META_DTYPE, "torch.float32")).removeprefix("torch."), torch.float32)
    return torch.empty((), dtype=dtype).element_size()


def _choose(gm: GraphModule, sites: list[ir.AttentionSite], config: KVShareConfig, calib, criterion: str  # type: ignore[no-untyped-def]
            ) -> dict[str, object]:
    """Greedy training-free pairing: try layer pairs by K/V distance, keep shares that keep the output close."""
    layers = len(sites)
    target = round(config.ratio * layers)
    names = [n for s in sites for n in (s.key_cache, s.value_cache)]
    states = stream_states(gm, calib.train, names, calib.batch_size)
    means = [torch.cat([states[s.key_cache].mean(0).flatten(), states[s.value_cache].mean(0).flatten()])
             for s in sites]
    pairs = sorted(((float(torch.dist(means[i].double(), means[j].double())), j, i)
                    for i in range(layers) for j in range(i)
                    if (sites[i].heads, sites[i].kv_heads, sites[i].head_dim)
                    == (sites[j].heads, sites[j].kv_heads, sites[j].head_dim)),
                   reverse=criterion == "dissimilar")
    teacher = batched_outputs(gm, calib.train, calib.batch_size)
    sources = list(range(layers))
    similarity = 1.0
    tried = 0
    for _, j, i in pairs:
        if sum(s != k for k, s in enumerate(sources)) >= target:
            break
        if sources[i] != i or sources[j] != j or i in sources[:i] + sources[i + 1:]:
            continue  # i already shares, j already shares, or i is someone's source
        candidate = sources.copy()
        candidate[i] = j
        tried += 1
        score = token_cosine(teacher, batched_outputs(share(gm, sites, tuple(candidate)), calib.train,
                                                      calib.batch_size), calib.train)
        if score >= config.threshold:
            sources, similarity = candidate, score
    shared = sum(s != k for k, s in enumerate(sources))
    if shared < target:
        logger.warning("kv_share: %s criterion reached %d of %d shared layers at threshold %.3f", criterion, shared,
                       target, config.threshold)
    return {"sources": sources, "shared": shared, "target": target, "similarity": similarity, "tried": tried}
