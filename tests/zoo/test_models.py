"""Zoo models: forward shapes, torch.export capture, eval mode, and the real architectures' sizes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from depthfold import zoo
from depthfold.errors import ConfigError

# Small settings per model so the whole file stays fast: (create kwargs, example resolution).
SMALL: dict[str, tuple[dict[str, object], int | None]] = {
    "llama_tiny": ({}, None),
    "mobilenetv2_100": ({"num_classes": 10}, 64),
    "mobilenetv2_140": ({"num_classes": 10}, 64),
    "resnet18": ({"num_classes": 10}, 64),
    "resnet34": ({"num_classes": 10}, 64),
    "resnet50": ({"num_classes": 10}, 64),
    "vgg19_bn": ({"num_classes": 10}, 32),
    "vit_tiny": ({"num_classes": 10, "img_size": 32, "patch_size": 8}, 32),
}

# Parameter counts at 1000 classes, as published for torchvision's reference definitions.
KNOWN_PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenetv2_100": 3_504_872,
    "vgg19_bn": 143_678_248,
}


def _small(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    kwargs, res = SMALL[name]
    torch.manual_seed(0)
    model = zoo.create(name, **kwargs)
    return model, zoo.example_inputs(name, batch=2, resolution=res)


def test_list_models_is_the_documented_set() -> None:
    assert zoo.list_models() == [
        "llama_tiny", "mobilenetv2_100", "mobilenetv2_140", "resnet18", "resnet34", "resnet50",
        "vgg19_bn", "vit_tiny",
    ]
    assert set(SMALL) == set(zoo.list_models())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_model_forward_shape_eval_mode_and_export(name: str) -> None:
    model, inputs = _small(name)
    assert not model.training
    assert all(not m.training for m in model.modules())
    with torch.no_grad():
        out = model(*inputs)
    if zoo.spec(name).family == "llm":
        assert inputs[0].dtype == torch.int64
        assert out.shape == (2, zoo.LLM_EXAMPLE_SEQ_LEN, 256)
    else:
        assert out.shape == (2, 10)
    assert torch.isfinite(out).all()
    exported = torch.export.export(model, inputs)
    with torch.no_grad():
        replay = exported.module()(*inputs)
    torch.testing.assert_close(replay, out, rtol=1e-5, atol=1e-5)  # same graph, same kernels: float32 noise only


@pytest.mark.parametrize("name", sorted(KNOWN_PARAMS))
def test_parameter_count_matches_reference(name: str) -> None:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = zoo.create(name)
    assert sum(p.numel() for p in model.parameters()) == KNOWN_PARAMS[name]


def test_cnns_accept_other_resolutions() -> None:
    torch.manual_seed(0)
    model = zoo.create("resnet18", num_classes=7, in_chans=1)
    (x,) = zoo.example_inputs("resnet18", resolution=48, in_chans=1)
    assert model(x).shape == (1, 7)


def test_resnet_relus_are_distinct_modules() -> None:
    model = zoo.create("resnet18")
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * 8  # stem + two per BasicBlock
    assert len({id(m) for m in relus}) == len(relus)


def test_vgg_features_relu_can_be_replaced() -> None:
    model = zoo.create("vgg19_bn", num_classes=10)
    feats = model.features
    assert isinstance(feats, nn.Sequential)
    assert isinstance(feats[0], nn.Conv2d) and isinstance(feats[1], nn.BatchNorm2d)
    assert isinstance(feats[2], nn.ReLU)
    assert sum(isinstance(m, nn.Conv2d) for m in feats) == 16
    assert sum(isinstance(m, nn.MaxPool2d) for m in feats) == 5
    (x,) = zoo.example_inputs("vgg19_bn", resolution=32)
    before = model(x)
    feats[2] = nn.Identity()
    after = model(x)
    assert after.shape == before.shape
    assert not torch.equal(after, before)


def test_vit_has_separate_qkv_projections() -> None:
    model = zoo.create("vit_tiny", img_size=32, patch_size=8, depth=2)
    names = {n for n, _ in model.named_modules()}
    for proj in ("q", "k", "v", "proj"):
        assert f"blocks.0.attn.{proj}" in names
    assert "blocks.1.mlp.fc1" in names and "blocks.1.mlp.fc2" in names
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def test_llama_structure_and_causality() -> None:
    torch.manual_seed(0)
    model = zoo.create("llama_tiny")
    assert len(model.layers) == 4
    attn = model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * 32 and attn.q_proj.out_features == 4 * 32  # GQA: 2 KV heads
    assert all(lin.bias is None for lin in model.modules() if isinstance(lin, nn.Linear))
    assert not any(k.startswith("rope") for k in model.state_dict())  # rotary tables are not persistent
    (ids,) = zoo.example_inputs("llama_tiny", batch=1, seed=1)
    with torch.no_grad():
        full = model(ids)
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % 256
        other = model(changed)
    # Changing the last token must not change any earlier position's logits.
    torch.testing.assert_close(other[:, :-1], full[:, :-1])
    assert not torch.equal(other[:, -1], full[:, -1])


def test_llama_rejects_too_long_sequences() -> None:
    model = zoo.create("llama_tiny", max_seq=16)
    with pytest.raises(ValueError, match="max_seq"):
        model(torch.zeros(1, 17, dtype=torch.int64))


def test_create_seeded_by_global_rng() -> None:
    torch.manual_seed(3)
    a = zoo.create("resnet18", num_classes=10)
    torch.manual_seed(3)
    b = zoo.create("resnet18", num_classes=10)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_example_inputs_deterministic_and_shaped() -> None:
    (a,) = zoo.example_inputs("resnet50", batch=3, seed=5)
    (b,) = zoo.example_inputs("resnet50", batch=3, seed=5)
    (c,) = zoo.example_inputs("resnet50", batch=3, seed=6)
    assert a.shape == (3, 3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    (ids,) = zoo.example_inputs("llama_tiny", batch=2)
    assert ids.shape == (2, 32) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 256


def test_spec_fields() -> None:
    s = zoo.spec("vit_tiny")
    assert (s.name, s.family, s.default_resolution) == ("vit_tiny", "vit", 224)
    assert "Dosovitskiy" in s.description
    assert zoo.spec("llama_tiny").family == "llm" and zoo.spec("resnet18").family == "cnn"
    with pytest.raises(AttributeError):
        s.name = "other"  # type: ignore[misc]


def test_unknown_name_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'resnet18'\?") as info:
        zoo.create("resnet81")
    assert "vit_tiny" in str(info.value)  # lists the known names
    with pytest.raises(ConfigError, match="unknown zoo model"):
        zoo.example_inputs("alexnet")


def test_unknown_option_suggests_closest() -> None:
    with pytest.raises(ConfigError, match=r"did you mean 'num_classes'\?"):
        zoo.create("resnet18", num_clases=10)
