"""Capture a ``torch.nn.Module`` into depthfold's IR with ``torch.export``.

The IR is the ATen-level ``torch.fx.GraphModule`` of the exported program (training IR: convs,
linears and batch norms stay single ops), parameters as ``nn.Parameter`` attributes under their
original module paths, plus per-node metadata (see :mod:`depthfold.ir.graph`). ``torch.export``
also captures Hugging Face models, which ``symbolic_trace`` cannot.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import GraphModule

from ..errors import CaptureError, ConfigError, suggest
from .graph import META_DYNAMIC_DIMS, META_MODULE_PATH, META_MODULE_TYPE, annotate

__all__ = ["CapturedModel", "capture", "describe_inputs", "dynamic_dims", "free_dims", "input_names", "normalize_inputs", "split_inputs"]

logger = logging.getLogger(__name__)


@dataclass
class CapturedModel:
    """A captured model: the graph module, the example inputs it was captured with, and its origin.

    The graph takes its inputs positionally, in ``input_names`` order (positional arguments first, then
    keyword arguments in the order of ``forward``'s parameters).
    """

    graph_module: GraphModule
    example_inputs: tuple[torch.Tensor, ...]
    model_name: str
    input_names: tuple[str, ...] = field(default=())
    dynamic: dict[str, Any] = field(default_factory=dict)
    """Which dimensions were captured dynamic: ``{"batch": bool, "seq": bool, "dims": {input: [dims]},
    "fallback": reason or None, "max_seq": the sequence bound the capture holds for, or None}``."""


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
                          "Pass tensors positionally, e.g. (torch.randn(1, 3, 224, 224),), or keyword "
                          "arguments as a dict, e.g. {'input_ids': ids, 'attention_mask': mask}")
    raise ConfigError(f"example_inputs must be a tensor, a non-empty tuple of tensors, a dict of keyword "
                      f"arguments or an (args, kwargs) pair, got {type(example_inputs).__name__}; e.g. "
                      "(torch.randn(1, 3, 224, 224),) or {'input_ids': ids, 'attention_mask': mask}")


def split_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """``(args, kwargs)`` from a tensor, a tuple of tensors, a dict of keyword arguments or an ``(args, kwargs)``
    pair; keyword arguments are checked against ``model.forward`` and put in its parameter order."""
    args: Any = example_inputs
    kwargs: Any = {}
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), example_inputs
    elif (isinstance(example_inputs, (tuple, list)) and len(example_inputs) == 2
          and isinstance(example_inputs[0], (tuple, list)) and isinstance(example_inputs[1], Mapping)):
        args, kwargs = example_inputs
    # With keyword inputs, no positional ones is fine; otherwise normalize_inputs says what is wrong.
    args = () if kwargs and isinstance(args, (tuple, list)) and not args else normalize_inputs(args)
    bad = [k for k, v in kwargs.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConfigError(f"keyword example input {bad[0]!r} is a {type(kwargs[bad[0]]).__name__}; every example "
                          "input must be a torch.Tensor (leave optional arguments out)")
    if not kwargs:
        return args, {}
    params = inspect.signature(model.forward).parameters
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    unknown = [k for k in kwargs if k not in params]
    if unknown and not open_kwargs:
        raise ConfigError(f"{type(model).__name__}.forward() has no parameter {unknown[0]!r}"
                          f"{suggest(unknown[0], named)} Its parameters: {', '.join(named)}")
    taken = [n for n in named[:len(args)] if n in kwargs]
    if taken:
        raise ConfigError(f"example input {taken[0]!r} is given both positionally and as a keyword argument")
    order = {name: i for i, name in enumerate(named)}
    return args, dict(sorted(kwargs.items(), key=lambda kv: order.get(kv[0], len(order))))


def _check_values(model: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """Refuse what would make every later check meaningless: empty example inputs, and NaN or infinite values
    in the inputs or the parameters (a NaN compares unequal to itself, so verification could not catch a
    pass that changed the outputs)."""
    for i, t in enumerate(inputs):
        if t.numel() == 0:
            raise ConfigError(f"example input {i} has shape {tuple(t.shape)}, which holds no values; give inputs "
                              "at a deployment shape (batch and sequence at least 1)")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ConfigError(f"example input {i} of shape {tuple(t.shape)} contains NaN or infinite values; give "
                              "finite inputs (outputs are compared against the original's on them)")
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    if bad:
        raise ConfigError(f"parameter{'s' if len(bad) > 1 else ''} {', '.join(bad[:5])}"
                          f"{f' (and {len(bad) - 5} more)' if len(bad) > 5 else ''} of {type(model).__name__} "
                          f"{'contain' if len(bad) > 1 else 'contains'} NaN or infinite values; the model is broken before any pass runs (check the "
                          "checkpoint it was loaded from, or the training run that produced it)")


def describe_inputs(inputs: Sequence[torch.Tensor]) -> str:
    """``"(1, 3, 224, 224) float32"`` per input, for error messages."""
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in inputs)


def capture(model: nn.Module, example_inputs: Any, *, dynamic: bool = True,
            dynamic_shapes: Any = None) -> CapturedModel:
    """Export ``model`` (a private eval-mode copy of it) on ``example_inputs`` into the IR.

    Args:
        model: the trained model. It is deep-copied and put in eval mode; the caller's object,
            its mode and its weights are never touched.
        example_inputs: a tensor, a tuple of tensors, a dict of keyword arguments (``model(**batch)``, as
            Hugging Face models are called) or an ``(args, kwargs)`` pair, at deployment shapes.
        dynamic: capture the batch dimension (and the sequence dimension of integer token inputs) dynamic, so
            the graph runs at any batch size and sequence length; where the model pins a size (say a reshape
            to a constant batch), capture falls back to static shapes and ``CapturedModel.dynamic`` says why.
        dynamic_shapes: forwarded to ``torch.export.export`` instead (overrides ``dynamic``).

    Raises:
        ConfigError: ``model`` is not an ``nn.Module``, the inputs are not tensors, or a keyword names no
            parameter of ``forward``.
        CaptureError: the model fails on the inputs, or ``torch.export`` cannot trace it; the
            message names the failing source line when it can and suggests a fix.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args, kwargs = split_inputs(model, example_inputs)
    inputs = (*args, *kwargs.values())
    name = type(model).__name__
    _check_values(model, inputs)
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
            private(*args, **kwargs)
    except Exception as err:
        raise CaptureError(f"{name} failed on the example inputs [{describe_inputs(inputs)}]: "
                           f"{_first_line(err)}. Check the inputs' number, shapes and dtypes "
                           "against the model's forward().") from err
    exported, report = _export(private, args, kwargs, dynamic=dynamic and dynamic_shapes is None,
                               dynamic_shapes=dynamic_shapes, name=name)
    gm = _plain_graph_module(exported.module())
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, module_type = list(stack.values())[-1]
            node.meta[META_MODULE_PATH] = _clean_path(path)
            node.meta[META_MODULE_TYPE] = module_type if isinstance(module_type, str) else module_type.__name__
        else:
            node.meta.setdefault(META_MODULE_PATH, "")
        if node.op == "placeholder":
            node.meta[META_DYNAMIC_DIMS] = _symbolic_dims(node)
    annotate(gm, inputs)
    names = input_names(gm)
    report["dims"] = {n: list(d) for n, d in zip(names, dynamic_dims(gm)) if d}
    return CapturedModel(gm, tuple(t.detach().clone() for t in inputs), name, names, report)


def input_names(gm: GraphModule) -> tuple[str, ...]:
    """The graph's input (placeholder) names, in the order it takes them."""
    return tuple(n.name for n in gm.graph.nodes if n.op == "placeholder")


def dynamic_dims(gm: GraphModule) -> tuple[tuple[int, ...], ...]:
    """Per graph input (placeholder order), the dimensions captured dynamic (recorded at capture as
    ``depthfold.dynamic_dims``, else read from export's symbolic ``meta["val"]``)."""
    return tuple(tuple(n.meta.get(META_DYNAMIC_DIMS, _symbolic_dims(n))) for n in gm.graph.nodes
                 if n.op == "placeholder")


def _symbolic_dims(placeholder: torch.fx.Node) -> tuple[int, ...]:
    shape = getattr(placeholder.meta.get("val"), "shape", ())
    return tuple(d for d, size in enumerate(shape) if isinstance(size, torch.SymInt))


def free_dims(gm: GraphModule) -> tuple[tuple[int, ...], ...]:
    """Per graph input, its dynamic dimensions besides the batch (a sequence length): where data samples may
    differ in shape from the example input."""
    return tuple(tuple(d for d in dims if d) for dims in dynamic_dims(gm))


def _is_token(t: torch.Tensor) -> bool:
    return not t.dtype.is_floating_point and t.dim() >= 2


def _dynamic_spec(inputs: Sequence[torch.Tensor], seq: bool, max_seq: int | None) -> list[dict[int, Any]]:
    """Per input, ``{dim: Dim}``: the batch (dim 0) of every input, and dim 1 of token inputs when ``seq``."""
    batch = torch.export.Dim("batch", min=1)
    lengths = {t.shape[1] for t in inputs if _is_token(t)}
    seq_dim = torch.export.Dim("seq", min=1, max=max_seq) if seq and len(lengths) == 1 else None
    specs = []
    for t in inputs:
        spec: dict[int, Any] = {0: batch} if t.dim() >= 1 else {}
        if seq_dim is not None and _is_token(t):
            spec[1] = seq_dim
        specs.append(spec)
    return specs


def _widen(t: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``t`` with every size-1 dimension in ``dims`` repeated to 2: export specialises sizes 0 and 1, so a
    dynamic dimension is traced at 2 (the graph still runs at 1)."""
    reps = [2 if d in dims and t.shape[d] == 1 else 1 for d in range(t.dim())]
    return t.repeat(*reps) if any(r > 1 for r in reps) else t


def _export(model: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor], *, dynamic: bool,
            dynamic_shapes: Any, name: str) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """Export dynamic (batch and sequence, then batch only) where the model allows it, else static."""
    inputs = (*args, *kwargs.values())
    max_seq = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    attempts: list[Any] = ([True, False] if any(_is_token(t) for t in inputs) else [False]) if dynamic else []
    reasons = []
    while attempts:
        seq = attempts.pop(0)
        specs = _dynamic_spec(inputs, seq, max_seq)
        wide = [_widen(t, list(s)) for t, s in zip(inputs, specs)]
        wide_args, wide_kwargs = tuple(wide[:len(args)]), dict(zip(kwargs, wide[len(args):]))
        try:
            with _quiet_fake_tensor():
                exported = torch.export.export(model, wide_args, kwargs=wide_kwargs, strict=False,
                                               dynamic_shapes=_shapes_for(model, args, kwargs, specs))
            seq_dynamic = any(1 in s for s in specs)
            report = {"batch": True, "seq": seq_dynamic, "fallback": "; ".join(reasons) or None,
                      "max_seq": max_seq if seq_dynamic else None}
            return exported, report
        except Exception as err:  # any failure: the model pins that size; try less dynamic
            bound = _sequence_bound(err) if seq else None
            if bound is not None and bound != max_seq:
                # The model checks its sequence length against a maximum (rotary tables, position embeddings):
                # capture the sequence dynamic up to that bound.
                max_seq = bound
                attempts.insert(0, True)
                continue
            what = "batch and sequence" if seq else "batch"
            reasons.append(f"{what} not dynamic: {_constraint_reason(err)}")
            logger.info("capture: %s of %s cannot be dynamic (%s); trying %s", what, name, reasons[-1],
                        "batch only" if seq else "static shapes")
    try:
        exported = torch.export.export(model, args, kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as err:
        raise CaptureError(_explain_export_failure(name, err)) from err
    if reasons:
        logger.warning("capture: %s captured with static shapes (%s); passes that calibrate run it at the "
                       "example batch size", name, "; ".join(reasons))
    return exported, {"batch": False, "seq": False, "fallback": "; ".join(reasons) or None, "max_seq": None}


def _shapes_for(model: nn.Module, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor],
                specs: list[dict[int, Any]]) -> Any:
    """``dynamic_shapes`` in the form export wants: a tuple for positional-only calls (nested for a
    ``forward(*inputs)``), else by parameter name."""
    params = inspect.signature(model.forward).parameters
    if not kwargs:
        if [p.kind for p in params.values()] == [inspect.Parameter.VAR_POSITIONAL]:
            return (tuple(specs),)
        return tuple(specs)
    positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    out: dict[str, Any] = dict(zip(positional, specs[:len(args)]))
    var_kw = next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), None)
    for key, spec in zip(kwargs, specs[len(args):]):
        if key in params:
            out[key] = spec
        elif var_kw is not None:
            out.setdefault(var_kw, {})[key] = spec
    return out


def _sequence_bound(err: BaseException) -> int | None:
    """The upper bound in an export guard like ``2 <= L['x'].size()[1] and L['x'].size()[1] <= 128``."""
    match = re.search(r"\.size\(\)\[1\] <= (\d+)", str(err))
    return int(match.group(1)) if match else None


def _constraint_reason(err: BaseException) -> str:
    """The line of an export failure that says which size got pinned, and where."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if "specialized" in ln or "Not all values" in ln or "must be" in ln:
            return ln[:300]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


@contextlib.contextmanager
def _quiet_fake_tensor() -> Any:
    """A failed dynamic trace logs the failing meta kernel at ERROR; the fallback makes that expected."""
    lg = logging.getLogger("torch._subclasses.fake_tensor")
    level = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(level)


def _plain_graph_module(module: GraphModule) -> GraphModule:
    """Drop export's input-guard call and rebuild as a plain ``GraphModule`` (which allows ``.train()``)."""
    graph = module.graph
    guards = set()
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            guards.add(str(node.target))
            graph.erase_node(node)
    gm = GraphModule(module, graph, class_name=type(module).__name__)
    for attr in ("_in_spec", "_out_spec"):
        if hasattr(module, attr):
            setattr(gm, attr, getattr(module, attr))
    for target in guards:  # only these: torch.cond branches are submodules the root graph does not name
        if hasattr(gm, target):
            delattr(gm, target)
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
