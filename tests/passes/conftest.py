"""Every pass run in tests/passes is checked for well-formedness and purity (TVM's relax conftest does this).

The wrapper is installed once per session around each registered pass: the returned graph must lint and
resolve every attribute, and the input graph (code, parameters, buffers) must be left untouched.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import pytest
import torch

from depthfold import ir
from depthfold.passes import registry


def _snapshot(gm: torch.fx.GraphModule) -> tuple[str, dict[str, torch.Tensor]]:
    state = {k: v.detach().clone() for k, v in gm.state_dict(keep_vars=True).items()}
    return gm.code, state


def _checked(name: str, fn):  # type: ignore[no-untyped-def]
    @functools.wraps(fn)
    def run(gm, config, *context):  # type: ignore[no-untyped-def]
        code, state = _snapshot(gm)
        result = fn(gm, config, *context)  # passes registered with uses_context also get a PassContext
        ir.structural_check(result.graph_module)
        after_code, after_state = _snapshot(gm)
        assert after_code == code, f"pass {name!r} edited its input graph"
        assert after_state.keys() == state.keys(), f"pass {name!r} added/removed input parameters"
        for key, value in state.items():
            assert torch.equal(after_state[key], value), f"pass {name!r} changed input tensor {key!r}"
        return result

    return run


@pytest.fixture(scope="session", autouse=True)
def well_formed_passes() -> Iterator[None]:
    """Wrap the built-in passes (the registry as it is at session start) with the checks above."""
    registry.list_passes()  # loads the built-in passes
    original = dict(registry._REGISTRY)
    for name, info in original.items():
        registry._REGISTRY[name] = dataclasses.replace(info, fn=_checked(name, info.fn))
    yield
    for name, info in original.items():
        registry._REGISTRY[name] = info
