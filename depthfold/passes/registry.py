"""Pass registry: string names, ``name:key=value,...`` specs parsed into typed config dataclasses."""

from __future__ import annotations

import dataclasses
import enum
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from torch.fx import GraphModule

from ..errors import ConfigError, suggest
from .base import Exactness, PassResult

__all__ = ["PassInfo", "PassSpec", "get_pass", "list_passes", "parse_pass", "register_pass"]

PassFn = Callable[[GraphModule, Any], PassResult]


@dataclass(frozen=True)
class PassInfo:
    """A registered pass: its transform, config class, exactness and ordering constraints."""

    name: str
    fn: PassFn
    exactness: Exactness
    config: type
    requires: tuple[str, ...]
    """Passes that must run earlier in the same pipeline."""
    idempotent: bool
    """Running it twice changes nothing more, so fixed-point loops run it once."""
    uses_context: bool = False
    """The transform is ``fn(gm, config, context)`` and receives a :class:`~.base.PassContext`."""

    @property
    def summary(self) -> str:
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""


_REGISTRY: dict[str, PassInfo] = {}


def register_pass(name: str, *, exactness: Exactness, config: type, requires: tuple[str, ...] = (),
                  idempotent: bool = True, uses_context: bool = False) -> Callable[[PassFn], PassFn]:
    """Decorator registering ``fn(gm, config) -> PassResult`` (``fn(gm, config, context)`` with
    ``uses_context``) under ``name``."""
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config of pass {name!r} must be a dataclass")

    def wrap(fn: PassFn) -> PassFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"pass {name!r} is already registered")
        _REGISTRY[name] = PassInfo(name, fn, exactness, config, tuple(requires), idempotent, uses_context)
        return fn

    return wrap


def get_pass(name: str) -> PassInfo:
    """The registered pass called ``name``; unknown names list the known ones."""
    _load_builtin_passes()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigError(f"unknown pass {name!r}{suggest(name, _REGISTRY)} "
                          f"Known passes: {known}") from None


def list_passes() -> list[dict[str, str]]:
    """Name, exactness and one-line summary of every registered pass."""
    _load_builtin_passes()
    return [{"name": p.name, "exactness": p.exactness.value, "summary": p.summary}
            for p in sorted(_REGISTRY.values(), key=lambda p: p.name)]


@dataclass(frozen=True)
class PassSpec:
    """A pass and its config instance, ready to run."""

    info: PassInfo
    config: Any

    @property
    def name(self) -> str:
        return self.info.name


def parse_pass(spec: str | tuple[str, Any] | PassSpec) -> PassSpec:
    """Turn ``"name"``, ``"name:key=value,..."`` or ``("name", Config(...))`` into a :class:`PassSpec`."""
    if isinstance(spec, PassSpec):
        return spec
    if isinstance(spec, tuple):
        if len(spec) != 2 or not isinstance(spec[0], str):
            raise ConfigError(f"a pass given as a tuple must be (name, config), got {spec!r}")
        info = get_pass(spec[0])
        if not isinstance(spec[1], info.config):
            raise ConfigError(f"pass {info.name!r} takes a {info.config.__name__}, "
                              f"got {type(spec[1]).__name__}")
        return PassSpec(info, spec[1])
    if not isinstance(spec, str):
        raise ConfigError(f"a pass must be a name string, 'name:key=value,...' or (name, config); "
                          f"got {type(spec).__name__}")
    name, _, options = spec.strip().partition(":")
    info = get_pass(name.strip())
    values: dict[str, Any] = {}
    if options.strip():
        hints = typing.get_type_hints(info.config)
        fields = {f.name for f in dataclasses.fields(info.config)}
        for item in _option_items(options):
            key, eq, raw = item.partition("=")
            key = key.strip()
            if not eq or not key:
                raise ConfigError(f"malformed pass spec {spec!r}: expected 'name:key=value,...', "
                                  f"got {item!r}")
            if key not in fields:
                raise ConfigError(f"pass {info.name!r} has no option {key!r}{suggest(key, fields)} "
                                  f"Valid options: {', '.join(sorted(fields)) or '(none)'}")
            values[key] = _parse_value(raw.strip(), hints[key], f"{info.name}:{key}")
    try:
        return PassSpec(info, info.config(**values))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid options for pass {info.name!r}: {err}") from err


def _option_items(options: str) -> list[str]:
    """``key=value`` items of a spec; a comma-separated piece without ``=`` continues the value before it, so
    tuples can be written ``sources=0,0,2,2`` as well as ``sources=0+0+2+2``."""
    items: list[str] = []
    for piece in options.split(","):
        if "=" not in piece and items and piece.strip():
            items[-1] += "," + piece
        else:
            items.append(piece)
    return items


def _parse_value(raw: str, hint: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _parse_value(raw, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: cannot parse {raw!r} as {hint}")
    if origin is typing.Literal:
        for option in args:
            if str(option) == raw:
                return option
        raise ConfigError(f"{where}: {raw!r} is not one of {', '.join(map(str, args))}")
    if origin is tuple:
        item = args[0] if args else str
        return tuple(_parse_value(part.strip(), item, where) for part in re.split(r"[+,]", raw) if part.strip())
    if hint is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {raw!r}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(raw)
        except ValueError:
            raise ConfigError(f"{where}: {raw!r} is not one of "
                              f"{', '.join(str(m.value) for m in hint)}") from None
    if hint in (int, float, str):
        try:
            return hint(raw)
        except ValueError:
            raise ConfigError(f"{where}: expected {hint.__name__}, got {raw!r}") from None
    raise ConfigError(f"{where}: options of type {hint} cannot be given as text; pass a config object")


def _load_builtin_passes() -> None:
    # Importing the package registers every built-in pass (each module decorates its function).
    from . import (  # noqa: F401
        collapse_blocks,
        drop_layers,
        early_exit,
        fold_bn,
        fuse_qkv,
        kv_share,
        layermerge,
        merge_linear_chains,
        recover,
    )
