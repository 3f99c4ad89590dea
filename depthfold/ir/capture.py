"""Capture a ``torch.nn.Module`` into depthfold's IR with ``torch.export``.

The IR is the ATen-level ``torch.fx.GraphModule`` of the exported program (training IR: convs,
linears and batch norms stay single ops), parameters as ``nn.Parameter`` attributes under their
original module paths, plus per-node metadata (see :mod:`depthfold.ir.graph`). ``torch.export``
also captures Hugging Face models, which ``symbolic_trace`` cannot.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from ..errors import CaptureError, ConfigError
from .graph import META_MODULE_PATH, META_MODULE_TYPE, annotate

__all__ = ["CapturedModel", "capture", "normalize_inputs", "describe_inputs"]

logger = logging.getLogger(__name__)


@dataclass
class CapturedModel:
    """A captured model: the graph module, the example inputs it was captured with, and its origin."""

    graph_module: GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    model_name: str
    input_names: tuple[str, ...] = field(default=())


def normalize_inputs(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Accept a tensor, or a tuple/list of tensors; anything else is a ``ConfigError`` saying how to fix it."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and example_inputs:
        bad = [i for i, t in enumerate(example_inputs) if not isinstance(t, torch.Tensor)]
        if not bad:
            return tuple(example_inputs)
        kinds = ", ".join(f"#{i}: {type(example_inputs[i]).__name__}" for i in bad)
        raise ConfigError(f"example_inputs must all be torch.Tensor; got {kinds}. "
                          "Pass tensors positionally, e.g. (torch.randn(1, 3, 224, 224),)")
    raise ConfigError(f"example_inputs must be a tensor or a non-empty tuple of tensors, got "
                      f"{type(example_inputs).__name__}; e.g. (torch.randn(1, 3, 224, 224),)")


def describe_inputs(inputs: Sequence[torch.Tensor]) -> str:
    """``"(1, 3, 224, 224) float32"`` per input, for error messages."""
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)


def capture(model: nn.Module, example_inputs: Any, *, dynamic_shapes: Any = None) -> CapturedModel:
    """Export ``model`` (a private eval-mode copy of it) on ``example_inputs`` into the IR.

    Args:
        model: the trained model. It is deep-copied and put in eval mode; the caller's object,
            its mode and its weights are never touched.
        example_inputs: a tensor or tuple of tensors with the shapes the model will be deployed at.
        dynamic_shapes: forwarded to ``torch.export.export`` (default: static shapes).

    Raises:
        ConfigError: ``model`` is not an ``nn.Module`` or the inputs are not tensors.
        CaptureError: the model fails on the inputs, or ``torch.export`` cannot trace it; the
            message names the failing source line when it can and suggests a fix.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = normalize_inputs(example_inputs)
    name = type(model).__name__
    try:
        private = copy.deepcopy(model).eval()
    except Exception as err:  # deepcopy failures are arbitrary user-code errors
        raise CaptureError(f"could not copy {name} (depthfold never modifies your model, so it works "
                           f"on a copy): {err}. Make the model deep-copyable (no open files, locks "
                           "or generators as attributes).") from err
    config = getattr(private, "config", None)
    if getattr(config, "use_cache", False):
        # Hugging Face decoders return a KV-cache object by default, which torch.export cannot
        # output; the logits do not depend on it. Only the private copy is changed.
        config.use_cache = False
        logger.info("capture: set config.use_cache=False on the private copy of %s (KV-cache outputs "
                    "are not captured)", name)
    try:
        with torch.no_grad():
            private(*inputs)
    except Exception as err:
        raise CaptureError(f"{name} failed on the example inputs [{describe_inputs(inputs)}]: "
                           f"{_first_line(err)}. Check the inputs' number, shapes and dtypes "
                           "against the model's forward().") from err
    try:
        exported = torch.export.export(private, inputs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:
        raise CaptureError(_explain_export_failure(name, err)) from err

    gm = _plain_graph_module(exported.module())
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, module_type = list(stack.values())[-1]
            node.meta[META_MODULE_PATH] = _clean_path(path)
            node.meta[META_MODULE_TYPE] = module_type if isinstance(module_type, str) else module_type.__name__
        else:
            node.meta.setdefault(META_MODULE_PATH, "")
    annotate(gm, inputs)
    input_names = tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")
    return CapturedModel(gm, tuple(t.detach().clone() for t in inputs), name, input_names)


def _plain_graph_module(module: GraphModule) -> GraphModule:
    """Drop export's input-guard call and rebuild as a plain ``GraphModule`` (which allows ``.train()``)."""
    graph = module.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    gm = GraphModule(module, graph, class_name=type(module).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(module, attr):
            setattr(gm, attr, getattr(module, attr))
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _clean_path(path: str) -> str:
    # Non-strict export records paths such as "L['self'].layer1[0].conv1" in some versions.
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    return path.strip(".")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _explain_export_failure(name: str, err: BaseException) -> str:
    text = str(err)
    where = ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\w+)', text)
    user = [f for f in frames if "site-packages/torch" not in f[0] and "/torch/" not in f[0]]
    if user:
        file, line, func = user[-1]
        where = f" at {file}:{line} in {func}()"
    lowered = text.lower()
    if "data-dependent" in lowered or "guardondatadependent" in lowered or "could not guard" in lowered:
        hint = ("the model branches or sizes tensors on tensor *values*; rewrite that control flow with "
                "torch.cond / torch.where, or pass dynamic_shapes=... if it depends on input sizes")
    elif "register a pytree" in lowered or "not a known type" in lowered:
        hint = ("forward() returns an object torch.export cannot flatten; return tensors, tuples or "
                "dicts of tensors (for Hugging Face models, pass return_dict=False or disable caches)")
    elif "unsupported" in lowered or "not supported" in lowered:
        hint = "replace the unsupported Python construct or op there with a traceable torch equivalent"
    else:
        hint = "see the torch.export error above; torch.export must be able to trace forward()"
    return f"torch.export failed to capture {name}{where}: {_first_line(err)}. Fix: {hint} (docs/capture.md)."
