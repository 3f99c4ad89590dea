"""Random models from a small grammar, for differential testing of the passes.

A model is a list of ops applied to an image-shaped tensor. Each op is drawn from what real CNN and
transformer blocks contain and what passes rewrite:

* convs: any kernel, stride, dilation, padding and groups (depthwise included), with or without bias;
* BatchNorm with random running statistics, before or after a conv;
* activations: ReLU, ReLU6, GELU, SiLU, Hardswish, or none (consecutive convs, where merges apply);
* explicit zero pads, max/avg pooling;
* residual blocks and concatenations of two branches;
* squeeze-excite gates, LayerNorm over channels;
* an attention block over the flattened pixels, whose Q/K/V read one tensor (where fuse_qkv applies).

The head pools and classifies with one or two linears (a linear chain). :func:`trunk_spec` draws CNN trunks
in the same format (stem, residual, inverted-residual and strided blocks), and :func:`stack_spec` transformer
stacks. Weights, running statistics and inputs are random; models are in eval mode. The draw is a plain list
of dicts, so hypothesis shrinks a failing model to its smallest form and prints it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU, "hardswish": nn.Hardswish}


@st.composite
def conv_spec(draw: st.DrawFn, channels: int) -> dict[str, Any]:
    k = draw(st.sampled_from([1, 1, 3, 3, 5]))
    kind = draw(st.sampled_from(["dense", "dense", "depthwise", "grouped"]))
    if kind == "depthwise":
        groups, out = channels, channels * draw(st.sampled_from([1, 1, 2]))
    elif kind == "grouped" and channels % 2 == 0:
        groups, out = 2, 2 * draw(st.integers(1, 4))
    else:
        groups, out = 1, draw(st.integers(1, 12))
    return {"op": "conv", "out": out, "k": k, "groups": groups, "stride": draw(st.sampled_from([1, 1, 2])),
            "dilation": draw(st.sampled_from([1, 1, 2])) if k > 1 else 1,
            "padding": draw(st.sampled_from(["same", "none", "half"])), "bias": draw(st.booleans())}


@st.composite
def block_spec(draw: st.DrawFn, channels: int, depth: int = 0) -> tuple[dict[str, Any], int]:
    """One op and the channel count after it."""
    choices = ["conv", "conv", "conv", "bn", "act", "pad", "pool", "se", "layernorm"]
    if depth < 2:
        choices += ["residual", "concat", "attention"]
    op = draw(st.sampled_from(choices))
    if op == "conv":
        spec = draw(conv_spec(channels))
        return spec, spec["out"]
    if op == "bn":
        return {"op": "bn"}, channels
    if op == "act":
        return {"op": "act", "kind": draw(st.sampled_from(sorted(ACTIVATIONS)))}, channels
    if op == "pad":
        return {"op": "pad", "pads": draw(st.lists(st.integers(0, 2), min_size=4, max_size=4))}, channels
    if op == "pool":
        return {"op": "pool", "kind": draw(st.sampled_from(["max", "avg"])), "k": draw(st.sampled_from([2, 3])),
                "stride": draw(st.sampled_from([1, 2]))}, channels
    if op == "se":
        return {"op": "se", "hidden": draw(st.integers(1, 4))}, channels
    if op == "layernorm":
        return {"op": "layernorm"}, channels
    if op == "attention":
        return {"op": "attention", "heads": draw(st.sampled_from([h for h in (1, 2) if channels % h == 0]))}, \
            channels
    inner, c = [], channels
    for _ in range(draw(st.integers(1, 3))):
        spec, c = draw(block_spec(c, depth + 1))
        inner.append(spec)
    if op == "residual":  # the branch must come back to the block's shape: same-padded, stride 1, or a 1x1
        inner = [s if s["op"] != "conv" else {**s, "stride": 1, "padding": "same"} for s in inner
                 if s["op"] not in ("pad", "pool")]
        if c != channels or not inner:
            inner.append({"op": "conv", "out": channels, "k": 1, "groups": 1, "stride": 1, "dilation": 1,
                          "padding": "same", "bias": draw(st.booleans())})
        return {"op": "residual", "body": inner}, channels
    other, c2 = [], channels
    for _ in range(draw(st.integers(0, 2))):
        spec, c2 = draw(block_spec(c2, depth + 1))
        other.append(spec)
    keep = [s for s in inner + other if s["op"] in ("pad", "pool") or s.get("stride", 1) != 1]
    if keep:  # concat needs equal spatial sizes: same-padded, stride-1 branches without pads or pools
        inner = [s for s in inner if s not in keep]
        other = [s for s in other if s not in keep]
        inner = [{**s, "padding": "same"} if s["op"] == "conv" else s for s in inner]
        other = [{**s, "padding": "same"} if s["op"] == "conv" else s for s in other]
    inner = [{**s, "padding": "same"} if s["op"] == "conv" else s for s in inner]
    other = [{**s, "padding": "same"} if s["op"] == "conv" else s for s in other]
    return {"op": "concat", "a": inner, "b": other}, _channels(inner, channels) + _channels(other, channels)


def _channels(specs: list[dict[str, Any]], channels: int) -> int:
    for s in specs:
        if s["op"] == "conv":
            channels = s["out"]
        elif s["op"] == "concat":
            channels = _channels(s["a"], channels) + _channels(s["b"], channels)
    return channels


@st.composite
def model_spec(draw: st.DrawFn) -> dict[str, Any]:
    channels = draw(st.integers(1, 6))
    ops, c = [], channels
    for _ in range(draw(st.integers(1, 6))):
        spec, c = draw(block_spec(c))
        ops.append(spec)
    return {"in": channels, "size": draw(st.integers(6, 14)), "batch": draw(st.integers(1, 2)), "ops": ops,
            "head": draw(st.lists(st.integers(2, 10), min_size=1, max_size=2)), "seed": draw(st.integers(0, 2**16)),
            "dtype": draw(st.sampled_from(["float32", "float32", "float64"]))}


@st.composite
def trunk_spec(draw: st.DrawFn) -> dict[str, Any]:
    """A CNN trunk in the same spec format, shaped like the networks LayerMerge and early exits are for: a
    conv-BN-activation stem, then 2-5 basic residual, inverted-residual (expand, depthwise, project) or
    plain strided blocks."""
    c = draw(st.sampled_from([4, 6, 8]))

    def conv(out: int, k: int, stride: int = 1, groups: int = 1) -> dict[str, Any]:
        return {"op": "conv", "out": out, "k": k, "groups": groups, "stride": stride, "dilation": 1,
                "padding": "same", "bias": False}

    def act() -> dict[str, Any]:
        return {"op": "act", "kind": draw(st.sampled_from(sorted(ACTIVATIONS)))}

    ops = [conv(c, 3, draw(st.sampled_from([1, 2]))), {"op": "bn"}, act()]
    for _ in range(draw(st.integers(2, 5))):
        kind = draw(st.sampled_from(["basic", "inverted", "plain"]))
        if kind == "basic":
            ops += [{"op": "residual", "body": [conv(c, 3), {"op": "bn"}, act(), conv(c, 3), {"op": "bn"}]}, act()]
        elif kind == "inverted":
            e = c * draw(st.sampled_from([2, 3]))
            ops.append({"op": "residual", "body": [conv(e, 1), {"op": "bn"}, act(), conv(e, 3, groups=e), {"op": "bn"},
                                                   act(), conv(c, 1), {"op": "bn"}]})
        else:
            out = draw(st.sampled_from([c, 2 * c]))
            ops += [conv(out, 3, draw(st.sampled_from([1, 2]))), {"op": "bn"}, act()]
            c = out
    return {"in": draw(st.integers(1, 4)), "size": draw(st.integers(8, 16)), "batch": 1, "ops": ops,
            "head": [draw(st.integers(2, 10))], "seed": draw(st.integers(0, 2**16)), "dtype": "float32"}


class _SE(nn.Module):
    def __init__(self, c: int, hidden: int) -> None:
        super().__init__()
        self.down, self.up = nn.Conv2d(c, hidden, 1), nn.Conv2d(hidden, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.up(torch.relu(self.down(x.mean((2, 3), keepdim=True)))))


class _ChannelNorm(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _Attention(nn.Module):
    def __init__(self, c: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        q, k, v = (p(t).view(n, h * w, self.heads, c // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h * w, c)
        return x + self.o(y).transpose(1, 2).reshape(n, c, h, w)


class _Pad(nn.Module):
    def __init__(self, pads: list[int]) -> None:
        super().__init__()
        self.pads = tuple(pads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, self.pads)


class _Residual(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _Concat(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.a(x), self.b(x)], dim=1)


def _layers(specs: list[dict[str, Any]], c: int) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for s in specs:
        if s["op"] == "conv":
            pad = {"same": s["dilation"] * (s["k"] // 2), "none": 0, "half": s["k"] // 4}[s["padding"]]
            out = s["out"] if s["groups"] == 1 or s["out"] % s["groups"] == 0 else s["groups"]
            layers.append(nn.Conv2d(c, out, s["k"], stride=s["stride"], padding=pad, dilation=s["dilation"],
                                    groups=s["groups"] if c % s["groups"] == 0 else 1, bias=s["bias"]))
            c = out
        elif s["op"] == "bn":
            layers.append(nn.BatchNorm2d(c))
        elif s["op"] == "act":
            layers.append(ACTIVATIONS[s["kind"]]())
        elif s["op"] == "pad":
            layers.append(_Pad(s["pads"]))
        elif s["op"] == "pool":
            layers.append((nn.MaxPool2d if s["kind"] == "max" else nn.AvgPool2d)(s["k"], s["stride"], ceil_mode=True))
        elif s["op"] == "se":
            layers.append(_SE(c, s["hidden"]))
        elif s["op"] == "layernorm":
            layers.append(_ChannelNorm(c))
        elif s["op"] == "attention":
            layers.append(_Attention(c, s["heads"] if c % s["heads"] == 0 else 1))
        elif s["op"] == "residual":
            body, c_out = _layers(s["body"], c)
            if c_out != c:
                body.append(nn.Conv2d(c_out, c, 1))
            layers.append(_Residual(body))
        else:
            a, ca = _layers(s["a"], c)
            b, cb = _layers(s["b"], c)
            layers.append(_Concat(a, b))
            c = ca + cb
    return nn.Sequential(*layers), c


class FuzzNet(nn.Module):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.body, c = _layers(spec["ops"], spec["in"])
        dims = [c, *spec["head"]]
        self.head = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(dims, dims[1:])))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).amax((2, 3)))


def build(spec: dict[str, Any]) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model and an example input for ``spec``; random weights and BatchNorm statistics from its seed."""
    gen = torch.Generator().manual_seed(spec["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = FuzzNet(spec)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    dtype = getattr(torch, spec["dtype"])
    model = model.eval().to(dtype)
    x = torch.randn(spec["batch"], spec["in"], spec["size"], spec["size"], generator=gen).to(dtype)
    return model, (x,)


# ------------------------------------------------------------------------------------------ transformer stacks
# Token ids -> embedding -> blocks -> final norm -> logits over the vocabulary, as decoder and encoder language
# models are built: pre-norm (LayerNorm or RMSNorm) residual blocks, attention through scaled_dot_product_attention
# or spelled out as matmul -> softmax -> matmul, causal or not, grouped K/V heads, a GELU or SwiGLU MLP.


@st.composite
def stack_spec(draw: st.DrawFn) -> dict[str, Any]:
    heads = draw(st.sampled_from([1, 2, 4]))
    return {"vocab": draw(st.integers(8, 40)), "dim": heads * draw(st.sampled_from([4, 8])), "heads": heads,
            "kv_heads": draw(st.sampled_from([h for h in (1, 2, 4) if heads % h == 0])),
            "blocks": draw(st.integers(2, 5)), "norm": draw(st.sampled_from(["layernorm", "rmsnorm"])),
            "attention": draw(st.sampled_from(["sdpa", "matmul"])), "causal": draw(st.booleans()),
            "mlp": draw(st.sampled_from(["gelu", "swiglu"])), "hidden": draw(st.sampled_from([8, 16, 24])),
            "bias": draw(st.booleans()), "seq": draw(st.integers(3, 12)), "batch": draw(st.integers(1, 2)),
            "seed": draw(st.integers(0, 2**16))}


class _RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


class _SelfAttention(nn.Module):
    def __init__(self, s: dict[str, Any]) -> None:
        super().__init__()
        d, self.heads, self.kv_heads = s["dim"], s["heads"], s["kv_heads"]
        self.hd, self.causal, self.sdpa = d // self.heads, s["causal"], s["attention"] == "sdpa"
        self.q_proj = nn.Linear(d, d, bias=s["bias"])
        self.k_proj = nn.Linear(d, self.kv_heads * self.hd, bias=s["bias"])
        self.v_proj = nn.Linear(d, self.kv_heads * self.hd, bias=s["bias"])
        self.o_proj = nn.Linear(d, d, bias=s["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.hd).transpose(1, 2)
        k, v = (p(x).view(b, t, self.kv_heads, self.hd).transpose(1, 2) for p in (self.k_proj, self.v_proj))
        k, v = (z.repeat_interleave(self.heads // self.kv_heads, dim=1) for z in (k, v))
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            scores = q @ k.transpose(-2, -1) / self.hd ** 0.5
            if self.causal:
                scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            y = scores.softmax(-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class _MLP(nn.Module):
    def __init__(self, s: dict[str, Any]) -> None:
        super().__init__()
        d, h, self.swiglu = s["dim"], s["hidden"], s["mlp"] == "swiglu"
        self.up = nn.Linear(d, h, bias=s["bias"])
        self.gate = nn.Linear(d, h, bias=s["bias"]) if self.swiglu else None
        self.down = nn.Linear(h, d, bias=s["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x) if self.gate is not None else F.gelu(self.up(x)))


def _norm(s: dict[str, Any]) -> nn.Module:
    return nn.LayerNorm(s["dim"]) if s["norm"] == "layernorm" else _RMSNorm(s["dim"])


class _Block(nn.Module):
    def __init__(self, s: dict[str, Any]) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = _norm(s), _SelfAttention(s), _norm(s), _MLP(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class StackNet(nn.Module):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__()
        self.embed = nn.Embedding(spec["vocab"], spec["dim"])
        self.layers = nn.ModuleList(_Block(spec) for _ in range(spec["blocks"]))
        self.norm = _norm(spec)
        self.lm_head = nn.Linear(spec["dim"], spec["vocab"], bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))


def build_stack(spec: dict[str, Any]) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The transformer and example token ids for ``spec``; random weights from its seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = StackNet(spec).eval()
        ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]))
    return model, (ids,)
