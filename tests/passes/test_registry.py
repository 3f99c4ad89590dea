"""The pass registry: every entry is documented and tested; specs parse into typed configs or fail clearly."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from depthfold.errors import ConfigError
from depthfold.passes import Exactness, get_pass, list_passes, parse_pass
from depthfold.passes.fold_bn import FoldBNConfig
from depthfold.passes.fuse_qkv import FuseQKVConfig
from depthfold.passes.merge_linear_chains import MergeLinearChainsConfig

TESTS = Path(__file__).parent
BUILTIN = {"fold_bn", "merge_linear_chains", "fuse_qkv"}


def test_registry_lists_the_builtin_passes() -> None:
    names = [p["name"] for p in list_passes()]
    assert BUILTIN <= set(names)
    assert names == sorted(names)


@pytest.mark.parametrize("name", [p["name"] for p in list_passes() if not p["name"].startswith("_test")])
def test_registry_entry_is_complete(name: str) -> None:
    info = get_pass(name)
    listed = next(p for p in list_passes() if p["name"] == name)
    summary = listed["summary"]
    assert summary and "\n" not in summary, f"{name}: no one-line summary"
    assert dataclasses.is_dataclass(info.config) and isinstance(info.config, type)
    info.config()  # every option has a default, so "name" alone is a valid spec
    for f in dataclasses.fields(info.config):
        assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
    assert isinstance(info.exactness, Exactness)
    assert listed["exactness"] in ("exact", "approximate")
    assert (TESTS / f"test_{name}.py").is_file() or (TESTS / name).is_dir(), \
        f"pass {name!r} has no tests/passes/test_{name}.py (or tests/passes/{name}/)"


def test_registry_builtin_exactness() -> None:
    for name in BUILTIN:
        assert get_pass(name).exactness is Exactness.EXACT


def test_registry_parses_float_option() -> None:
    spec = parse_pass("merge_linear_chains:max_cost_ratio=2.5")
    assert spec.name == "merge_linear_chains"
    assert isinstance(spec.config, MergeLinearChainsConfig)
    assert spec.config.max_cost_ratio == 2.5 and isinstance(spec.config.max_cost_ratio, float)
    assert math.isinf(parse_pass("merge_linear_chains:max_cost_ratio=inf").config.max_cost_ratio)


@pytest.mark.parametrize("raw, value", [("true", True), ("1", True), ("yes", True), ("on", True),
                                        ("false", False), ("0", False), ("no", False), ("OFF", False)])
def test_registry_parses_bool_option(raw: str, value: bool) -> None:
    config = parse_pass(f"fold_bn:fold_before={raw}").config
    assert config == FoldBNConfig(fold_before=value)


def test_registry_parses_several_options_with_spaces() -> None:
    config = parse_pass(" merge_linear_chains: max_cost_ratio = 3 , merge_convs=false").config
    assert config == MergeLinearChainsConfig(max_cost_ratio=3.0, merge_convs=False)
    assert parse_pass("fuse_qkv:min_group=3").config == FuseQKVConfig(min_group=3)


def test_registry_bad_bool_rejected() -> None:
    with pytest.raises(ConfigError, match="true/false"):
        parse_pass("fold_bn:fold_before=maybe")


def test_registry_bad_number_rejected() -> None:
    with pytest.raises(ConfigError, match="expected int"):
        parse_pass("fuse_qkv:min_group=two")


def test_registry_unknown_pass_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'fold_bn'") as info:
        parse_pass("fold_batchnorm")
    assert "fold_batchnorm" in str(info.value)
    for name in BUILTIN:
        assert name in str(info.value)  # the known passes are listed


def test_registry_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ConfigError) as info:
        parse_pass("merge_linear_chains:max_cost=2")
    message = str(info.value)
    assert "max_cost" in message
    for field in ("max_cost_ratio", "merge_convs", "merge_linears"):
        assert field in message


@pytest.mark.parametrize("spec", ["fold_bn:oops", "fold_bn:=1", "fold_bn:fold_before=true,"])
def test_registry_malformed_spec(spec: str) -> None:
    with pytest.raises(ConfigError, match="malformed"):
        parse_pass(spec)


def test_registry_tuple_form() -> None:
    config = MergeLinearChainsConfig(max_cost_ratio=4.0)
    spec = parse_pass(("merge_linear_chains", config))
    assert spec.config is config
    assert parse_pass(spec) is spec


@pytest.mark.parametrize("spec", [("merge_linear_chains", FoldBNConfig()), ("fold_bn", {"fold_before": False}),
                                  ("fold_bn",), ("fold_bn", FoldBNConfig(), 1)])
def test_registry_tuple_form_wrong_config(spec: tuple) -> None:
    with pytest.raises(ConfigError):
        parse_pass(spec)


def test_registry_non_string_spec() -> None:
    with pytest.raises(ConfigError, match="name string"):
        parse_pass(42)  # type: ignore[arg-type]
