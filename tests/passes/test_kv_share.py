"""kv_share: later attention layers use an earlier layer's keys and values; the unread K/V projections go.

Checked against a reference forward of the zoo Llama written here with shared K/V, against hand-written
attention, on parameter and KV-cache bookkeeping (GQA, MQA with biases, GPT-2's fused c_attn), and on the
training-free ratio search.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import depthfold
from depthfold import ir, zoo
from depthfold.errors import ConfigError, PreconditionError
from depthfold.passes import PassContext, PassManager, parse_pass
from depthfold.passes.common import calibration_split
from depthfold.passes.common.stream import narrow_split_projections
from depthfold.passes.kv_share import check_sources, kv_bytes_per_token, preset_sources, share

from .lm_harness import Result, _hf, _hf_inputs, _tokens

OPTS = "eval_samples=8,train_samples=8,batch_size=8"










CONTAINER = {"zoo": "layers", "llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h"}
_MODELS: dict[str, nn.Module] = {}
_CAPTURED: dict[str, ir.CapturedModel] = {}
_RESULTS: dict[tuple[str, tuple[str, ...]], Result] = {}


def model_of(key: str) -> nn.Module:
    if key not in _MODELS:
        if key == "zoo":
            torch.manual_seed(0)
            _MODELS[key] = zoo.create("llama_tiny", n_layers=4, dim=32, hidden=64, vocab_size=100).eval()
        else:
            _MODELS[key] = _hf(key)
    return _MODELS[key]


def inputs_of(key: str, seed: int = 0):  # type: ignore[no-untyped-def]
    return (_tokens(seed),) if key == "zoo" else _hf_inputs(seed)


def captured_of(key: str) -> ir.CapturedModel:
    if key not in _CAPTURED:
        _CAPTURED[key] = ir.capture(model_of(key), inputs_of(key))
    return _CAPTURED[key]


def call(module: nn.Module, key: str, seed: int = 0) -> torch.Tensor:
    inputs = inputs_of(key, seed)
    with torch.no_grad():
        out = module(*inputs) if isinstance(inputs, tuple) else module(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def spec_of(options: str = "") -> str:
    return f"kv_share:{options},{OPTS}" if options else f"kv_share:{OPTS}"


def run(key: str, *specs: str) -> Result:
    """What depthfold.optimize(model, inputs, [specs]) does, on a capture made once per model (torch.export
    dominates the run time of these tiny models); cached."""
    captured = captured_of(key)
    if (key, specs) not in _RESULTS:
        manager = PassManager(list(specs))
        manager.context = PassContext(example_inputs=captured.example_inputs)
        pipeline = manager.run(captured.graph_module, captured.example_inputs)
        _RESULTS[key, specs] = Result(pipeline.graph_module, captured.graph_module, captured.example_inputs,
                                      pipeline.records)
    return _RESULTS[key, specs]


def param_names(module: nn.Module) -> set[str]:
    return {n for n, _ in module.named_parameters()}


def numel(model: nn.Module, names: list[str]) -> int:
    return sum(model.get_parameter(n).numel() for n in names)


# --- a reference forward of the zoo Llama with shared K/V ------------------------------------------------------


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def zoo_shared(model: nn.Module, x: torch.Tensor, sources: tuple[int, ...]
               ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The zoo Llama's forward with layer i attending with the (rotated, not yet repeated) K/V of layer
    sources[i]; also returns each owner's K/V (what a KV cache holds)."""
    t = x.shape[1]
    cos, sin = model.rope_cos[:t], model.rope_sin[:t]
    h = model.embed_tokens(x)
    caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        y = layer.input_layernorm(h)
        b = y.shape[0]
        q = attn.q_proj(y).view(b, t, attn.n_heads, attn.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        if sources[i] == i:
            k = attn.k_proj(y).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(y).view(b, t, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
            caches[i] = (k * cos + _rotate_half(k) * sin, v)
        k, v = caches[sources[i]]
        rep = attn.n_heads // attn.n_kv_heads
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                             is_causal=True)
        h = h + attn.o_proj(out.transpose(1, 2).reshape(b, t, attn.n_heads * attn.head_dim))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.norm(h)), [caches[i] for i in sorted(caches)]


def test_kv_share_reference_forward_is_the_model() -> None:
    model = model_of("zoo")
    with torch.no_grad():
        torch.testing.assert_close(zoo_shared(model, _tokens(), (0, 1, 2, 3))[0], model(_tokens()), rtol=0, atol=1e-6)


# --- presets and explicit sources on the zoo Llama ---------------------------------------------------------------


@pytest.mark.parametrize(("options", "sources"), [
    ("preset=cla2", (0, 0, 2, 2)),
    ("preset=cla3", (0, 0, 0, 3)),
    ("sources=0,1,1,1", (0, 1, 1, 1)),
    ("sources=0,0,0,0", (0, 0, 0, 0)),
    ("sources=0,1,2,2", (0, 1, 2, 2)),
])
def test_kv_share_zoo_llama_matches_the_reference(options: str, sources: tuple[int, ...]) -> None:
    model = model_of("zoo")
    res = run("zoo", spec_of(options))
    rec = res.records[-1]
    owners = sorted(set(sources))
    assert rec.details["sources"] == list(sources) and rec.details["owners"] == owners
    per_layer = 2 * 2 * 8 * 4  # K and V, 2 KV heads of 8, float32
    assert rec.details["kv_bytes_per_token"] == {"before": 4 * per_layer, "after": len(owners) * per_layer,
                                                 "ratio": len(owners) / 4}
    assert rec.details["layout"] == [{"heads": 4, "kv_heads": 2, "head_dim": 8}] * 4
    sharing = [i for i, s in enumerate(sources) if s != i]
    assert [(c["layer"], c["source"]) for c in rec.changes] == [(i, sources[i]) for i in sharing]
    # The K/V projections of the sharing layers are gone, nothing else.
    gone = [f"layers.{i}.self_attn.{p}_proj.weight" for i in sharing for p in "kv"]
    left = param_names(res.module)
    assert not set(gone) & left
    assert param_names(model) - set(gone) == left
    assert rec.after["params"] == rec.before["params"] - numel(model, gone)
    for seed in (0, 5):
        x = _tokens(seed)
        with torch.no_grad():
            torch.testing.assert_close(res.module(x), zoo_shared(model, x, sources)[0], rtol=0, atol=1e-5)
            assert not torch.allclose(res.module(x), model(x), atol=1e-4)


def test_kv_share_cla3_ratio_is_ceil_of_groups() -> None:
    rec = run("zoo", spec_of("preset=cla3")).records[-1]
    assert rec.details["kv_bytes_per_token"]["ratio"] == math.ceil(4 / 3) / 4


def test_kv_share_without_options_is_cla2() -> None:
    default, cla2 = run("zoo", spec_of()), run("zoo", spec_of("preset=cla2"))
    assert default.records[-1].details["sources"] == [0, 0, 2, 2]
    assert "search" not in default.records[-1].details
    torch.testing.assert_close(call(default.module, "zoo"), call(cla2.module, "zoo"), rtol=0, atol=0)


def test_kv_share_sources_separators_parse_the_same() -> None:
    comma, plus = parse_pass("kv_share:sources=0,0,2,2"), parse_pass("kv_share:sources=0+0+2+2")
    assert comma.config.sources == plus.config.sources == (0, 0, 2, 2)
    mixed = parse_pass("kv_share:sources=0,0,2,2,eval_samples=3,threshold=0.25")
    assert mixed.config.sources == (0, 0, 2, 2)
    assert mixed.config.eval_samples == 3 and mixed.config.threshold == 0.25


# --- Hugging Face ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "kv_heads", "biases"), [("llama", 2, False), ("qwen2", 1, True)])
def test_kv_share_cla2_hugging_face(key: str, kv_heads: int, biases: bool) -> None:
    model = model_of(key)
    res = run(key, spec_of("preset=cla2"))
    rec = res.records[-1]
    assert rec.details["sources"] == [0, 0, 2, 2]
    per_layer = 2 * kv_heads * 8 * 4
    assert rec.details["kv_bytes_per_token"] == {"before": 4 * per_layer, "after": 2 * per_layer, "ratio": 0.5}
    assert [d["kv_heads"] for d in rec.details["layout"]] == [kv_heads] * 4
    kinds = ("weight", "bias") if biases else ("weight",)
    gone = [f"model.layers.{i}.self_attn.{p}_proj.{k}" for i in (1, 3) for p in "kv" for k in kinds]
    expected_drop = 2 * 2 * (kv_heads * 8 * 32 + (kv_heads * 8 if biases else 0))
    assert numel(model, gone) == expected_drop
    assert rec.after["params"] == rec.before["params"] - expected_drop
    left = param_names(res.module)
    assert not set(gone) & left and param_names(model) - set(gone) == left
    for i in range(4):
        assert f"model.layers.{i}.self_attn.q_proj.weight" in left
        assert f"model.layers.{i}.self_attn.o_proj.weight" in left
    assert call(res.module, key).shape == call(model, key).shape
    assert rec.details["quality"]["token_cosine"] < 1.0


def test_kv_share_after_fuse_qkv_is_the_same_as_alone() -> None:
    alone = run("llama", spec_of("preset=cla2"))
    fused = run("llama", "fuse_qkv", spec_of("preset=cla2"))
    assert fused.records[0].name == "fuse_qkv" and fused.records[0].changed
    assert fused.records[-1].details["sources"] == [0, 0, 2, 2]
    assert fused.records[-1].after["params"] == alone.records[-1].after["params"]
    for seed in (0, 5):
        torch.testing.assert_close(call(fused.module, "llama", seed), call(alone.module, "llama", seed),
                                   rtol=1e-4, atol=1e-5)
    # The fused Q/K/V projections of the sharing layers were narrowed to their Q rows.
    linears = [n for n in fused.module.graph.nodes if n.target is torch.ops.aten.linear.default
               and ir.shape_of(n.args[1]) in ((32, 32), (64, 32))]
    shapes = [ir.shape_of(n.args[1]) for n in linears]
    assert shapes.count((64, 32)) == 2  # owners 0, 2: Q (32) + K + V (16 + 16)
    assert shapes.count((32, 32)) == 4 + 2  # every o_proj, and the Q-only projections of layers 1, 3


def _unnarrowed_share(gm: torch.fx.GraphModule, sources: tuple[int, ...]) -> torch.fx.GraphModule:
    """Attention i reads the keys/values of sources[i], without cutting the fused projection."""
    out = ir.clone(gm)
    sites = [b.attention for b in ir.find_stack(out).blocks]
    nodes = {n.name: n for n in out.graph.nodes}
    for i, s in enumerate(sources):
        if s != i:
            nodes[sites[i].key].replace_all_uses_with(nodes[sites[s].key])
            nodes[sites[i].value].replace_all_uses_with(nodes[sites[s].value])
    ir.remove_dead(out)
    return out


def test_kv_share_gpt2_narrows_the_fused_c_attn() -> None:
    model = model_of("gpt2")
    res = run("gpt2", spec_of("preset=cla2"))
    rec = res.records[-1]
    assert rec.details["sources"] == [0, 0, 2, 2]
    n_embd = 32
    assert rec.after["params"] == rec.before["params"] - 2 * (2 * n_embd * n_embd + 2 * n_embd)
    for i in range(4):
        weight = res.module.get_parameter(f"transformer.h.{i}.attn.c_attn.weight")
        bias = res.module.get_parameter(f"transformer.h.{i}.attn.c_attn.bias")
        original_w = model.get_parameter(f"transformer.h.{i}.attn.c_attn.weight")
        original_b = model.get_parameter(f"transformer.h.{i}.attn.c_attn.bias")
        if i in (1, 3):  # Conv1D weight is [in, out]: only the Q columns are kept
            assert tuple(weight.shape) == (n_embd, n_embd) and tuple(bias.shape) == (n_embd,)
            assert torch.equal(weight, original_w[:, :n_embd]) and torch.equal(bias, original_b[:n_embd])
        else:
            assert torch.equal(weight, original_w) and torch.equal(bias, original_b)
    reference = _unnarrowed_share(captured_of("gpt2").graph_module, (0, 0, 2, 2))
    assert sum(p.numel() for p in reference.parameters()) == rec.before["params"]  # nothing cut there
    inputs = captured_of("gpt2").example_inputs
    with torch.no_grad():
        torch.testing.assert_close(res.module(*inputs).logits, reference(*inputs).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(res.module(*inputs).logits, model(**_hf_inputs()).logits, atol=1e-4)


def test_kv_share_narrow_split_projections_cuts_unread_pieces() -> None:
    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(8, 12)
            self.halves = nn.Linear(8, 12)
            self.shared = nn.Linear(8, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, _, c = self.proj(x).split([4, 3, 5], dim=-1)
            d, _ = self.halves(x).split([6, 6], dim=-1)
            e, _ = self.shared(x).split([6, 6], dim=-1)
            again = F.linear(x, self.shared.weight)  # the weight is read elsewhere too: left alone
            return torch.cat([a, c], -1).sum(-1, keepdim=True) + d + e + again[:, :6]

    torch.manual_seed(0)
    model = Fused().eval()
    x = torch.randn(3, 8)
    gm = ir.capture(model, (x,)).graph_module
    expected = model(x)
    ir.remove_dead(gm)  # unread split pieces lose their getitem users first, as in share()
    narrowed = narrow_split_projections(gm)
    ir.remove_dead(gm)
    assert len(narrowed) == 2
    assert tuple(gm.get_parameter("proj.weight").shape) == (9, 8)
    torch.testing.assert_close(gm.get_parameter("proj.weight"), torch.cat([model.proj.weight[:4], model.proj.weight[7:]]))
    torch.testing.assert_close(gm.get_parameter("proj.bias"), torch.cat([model.proj.bias[:4], model.proj.bias[7:]]))
    assert tuple(gm.get_parameter("halves.weight").shape) == (6, 8)
    assert tuple(gm.get_parameter("halves.bias").shape) == (6,)
    assert tuple(gm.get_parameter("shared.weight").shape) == (12, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-6)


# --- the training-free ratio search ------------------------------------------------------------------------------


def test_kv_share_ratio_reports_both_criteria() -> None:
    res = run("llama", spec_of("ratio=0.5,threshold=-1"))
    rec = res.records[-1]
    search = rec.details["search"]
    assert search["criterion"] == "dissimilar"
    assert set(search["plans"]) == {"dissimilar", "similar"}
    for plan in search["plans"].values():
        check_sources(tuple(plan["sources"]), 4)
        assert plan["target"] == 2 and plan["shared"] == 2  # threshold -1 accepts every candidate
        assert sum(s != i for i, s in enumerate(plan["sources"])) == 2
        assert plan["tried"] >= 2
    assert rec.details["sources"] == search["plans"]["dissimilar"]["sources"]
    assert rec.details["kv_bytes_per_token"]["ratio"] == 0.5
    similar = run("llama", spec_of("ratio=0.5,threshold=-1,criterion=similar")).records[-1]
    assert similar.details["search"]["criterion"] == "similar"
    assert similar.details["search"]["plans"] == search["plans"]  # both are always computed, the same way
    assert similar.details["sources"] == search["plans"]["similar"]["sources"]


def test_kv_share_ratio_orders_pairs_by_kv_distance() -> None:
    model = model_of("zoo")
    res = run("zoo", spec_of("ratio=0.25,threshold=-1"))
    plans = res.records[-1].details["search"]["plans"]
    # Mean K/V cache per layer over the calibration samples, from the reference forward.
    gm = res.original
    calib = calibration_split(None, res.example_inputs, names=ir.input_names(gm), free_dims=ir.free_dims(gm),
                              eval_samples=8, train_samples=8, batch_size=8, seed=0)
    with torch.no_grad():
        _, caches = zoo_shared(model, calib.train.inputs[0], (0, 1, 2, 3))
    means = [torch.cat([k.mean(0).flatten(), v.mean(0).flatten()]).double() for k, v in caches]
    distance = {(j, i): float(torch.dist(means[i], means[j])) for i in range(4) for j in range(i)}
    closest, farthest = min(distance, key=distance.__getitem__), max(distance, key=distance.__getitem__)
    for name, (j, i) in (("similar", closest), ("dissimilar", farthest)):
        expected = [0, 1, 2, 3]
        expected[i] = j
        assert plans[name]["sources"] == expected, name  # round(0.25 * 4) = 1 share: the first pair tried
        assert plans[name]["shared"] == 1 and plans[name]["tried"] == 1


def test_kv_share_ratio_threshold_rejects_shares() -> None:
    rec = run("zoo", spec_of("ratio=0.5,threshold=1.0")).records[-1]
    for plan in rec.details["search"]["plans"].values():
        assert plan["sources"] == [0, 1, 2, 3] and plan["shared"] == 0 and plan["tried"] >= 1
    assert rec.details["sources"] == [0, 1, 2, 3] and rec.changes == []
    assert rec.after["params"] == rec.before["params"]


# --- hand-written matmul attention -------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, kv_heads: int) -> None:
        super().__init__()
        self.kv_heads = kv_heads
        self.norm = nn.LayerNorm(16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 4 * kv_heads), nn.Linear(16, 4 * kv_heads)
        self.o = nn.Linear(16, 16)
        self.mlp = nn.Linear(16, 16)

    def kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        y = self.norm(x)
        return (self.k(y).view(b, t, self.kv_heads, 4).transpose(1, 2),
                self.v(y).view(b, t, self.kv_heads, 4).transpose(1, 2))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(self.norm(x)).view(b, t, 4, 4).transpose(1, 2)
        k, v = (z.repeat_interleave(4 // self.kv_heads, dim=1) for z in kv)
        out = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v
        x = x + self.o(out.transpose(1, 2).reshape(b, t, 16))
        return x + self.mlp(x)


class Net(nn.Module):
    def __init__(self, kv_heads: tuple[int, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(k) for k in kv_heads)

    def forward(self, x: torch.Tensor, sources: tuple[int, ...] | None = None) -> torch.Tensor:
        caches = {}
        for i, block in enumerate(self.blocks):
            s = i if sources is None else sources[i]
            if s == i:
                caches[i] = block.kv(x)
            x = block(x, caches[s])
        return x


def _net(kv_heads: tuple[int, ...]) -> tuple[nn.Module, ir.CapturedModel]:
    torch.manual_seed(0)
    model = Net(kv_heads).eval()
    return model, ir.capture(model, (torch.randn(2, 6, 16),))


def test_kv_share_matmul_attention_matches_the_reference() -> None:
    model, captured = _net((2, 2, 2))
    gm = captured.graph_module
    sites = [b.attention for b in ir.find_stack(gm).blocks]
    assert [s.form for s in sites] == ["matmul"] * 3
    code = gm.code
    out = share(gm, sites, (0, 0, 2))
    assert gm.code == code  # share works on a copy
    gone = {f"blocks.1.{p}.{k}" for p in "kv" for k in ("weight", "bias")}
    assert param_names(gm) - gone == param_names(out)
    x = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(out(x), model(x, sources=(0, 0, 2)), rtol=0, atol=1e-5)
        assert not torch.allclose(out(x), model(x), atol=1e-4)
    with pytest.raises(ConfigError, match="not its own source"):
        share(gm, sites, (0, 0, 1))


def test_kv_share_needs_the_same_head_layout() -> None:
    _, captured = _net((2, 1))
    with pytest.raises(ConfigError, match="same head layout"):
        PassManager([spec_of("sources=0,0")]).run(captured.graph_module, captured.example_inputs)
    # Each layer its own source is fine: nothing to compare.
    res = PassManager([spec_of("sources=0,1")]).run(captured.graph_module, captured.example_inputs)
    assert res.records[-1].details["layout"] == [{"heads": 4, "kv_heads": 2, "head_dim": 4},
                                                 {"heads": 4, "kv_heads": 1, "head_dim": 4}]
    assert res.records[-1].details["kv_bytes_per_token"] == {"before": 96, "after": 96, "ratio": 1.0}


# --- errors, helpers and purity ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("sources", "message"), [
    ("0,0,2", "has 3 entries but the model has 4"),
    ("0,0,2,2,4", "has 5 entries"),
    ("0,2,2,2", "points forward"),
    ("0,0,1,1", "not its own source"),
    ("1,1,2,2", "points forward"),
])
def test_kv_share_bad_sources(sources: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        run("zoo", spec_of(f"sources={sources}"))


def test_kv_share_bad_options_fail_at_parse_time() -> None:
    with pytest.raises(ConfigError, match="give one of"):
        parse_pass("kv_share:sources=0,0,2,2,preset=cla2")
    with pytest.raises(ConfigError, match="give one of"):
        parse_pass("kv_share:preset=cla3,ratio=0.5")
    with pytest.raises(ConfigError, match="give one of"):
        parse_pass("kv_share:sources=0+0,ratio=0.5")
    with pytest.raises(ConfigError, match=r"in \[0, 1\)"):
        parse_pass("kv_share:ratio=1.0")
    with pytest.raises(ConfigError):
        parse_pass("kv_share:preset=cla4")
    with pytest.raises(ConfigError):
        parse_pass("kv_share:criterion=random")


def test_kv_share_needs_attention() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    captured = ir.capture(model, (torch.randn(2, 8),))
    with pytest.raises(PreconditionError, match="scaled_dot_product_attention"):
        PassManager([spec_of()]).run(captured.graph_module, captured.example_inputs)


def test_kv_share_helpers() -> None:
    assert preset_sources("cla2", 4) == (0, 0, 2, 2)
    assert preset_sources("cla2", 5) == (0, 0, 2, 2, 4)
    assert preset_sources("cla3", 4) == (0, 0, 0, 3)
    assert preset_sources("cla3", 7) == (0, 0, 0, 3, 3, 3, 6)
    for sources in [(0,), (0, 0, 0), (0, 1, 1, 3), preset_sources("cla3", 8)]:
        check_sources(sources, len(sources))
    with pytest.raises(ConfigError, match="sources=0,0,2"):  # the message suggests a valid map
        check_sources((0, 0), 3)
    with pytest.raises(ConfigError, match="point layer 2 at 0 instead"):
        check_sources((0, 0, 1), 3)
    sites = [b.attention for b in ir.find_stack(captured_of("zoo").graph_module).blocks]
    assert kv_bytes_per_token(sites, (0, 1, 2, 3), 4) == 4 * 128
    assert kv_bytes_per_token(sites, (0, 0, 2, 2), 2) == 2 * 64
    assert kv_bytes_per_token(sites, (0, 0, 0, 0), 4) == 128


def test_kv_share_leaves_the_users_model_alone() -> None:
    model = model_of("zoo")
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = call(model, "zoo")
    res = depthfold.optimize(model, inputs_of("zoo"), [spec_of("preset=cla2")])
    assert res.records[-1].details["sources"] == [0, 0, 2, 2]
    with torch.no_grad():
        torch.testing.assert_close(res.module(_tokens()), zoo_shared(model, _tokens(), (0, 0, 2, 2))[0],
                                   rtol=0, atol=1e-5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.layers[1].self_attn.k_proj.weight.shape == (16, 32)
    torch.testing.assert_close(call(model, "zoo"), before, rtol=0, atol=0)
