"""Export a captured model to ONNX (``torch.onnx.export(dynamo=True)``), check it and verify it in ONNX Runtime.

Lowering runs in stages: export -> an optional rewrite of the ``onnx_ir`` model -> ``onnx.checker`` ->
verification in ONNX Runtime -> atomic write; exports of captured graphs are cached by graph digest, so each
distinct graph is exported once per process. An ONNX file is written only after ``onnx.checker.check_model(full_check=True)`` passes and, with
``verify=True``, after ONNX Runtime (CPU) reproduces ``module(*example_inputs)`` on the example inputs. The
file is written through a temporary file and renamed, so a failed export or verification leaves nothing at
the target path.

The exporter's own optimizer (onnxscript: constant folding, BatchNorm-into-Conv folding, removal of
``Expand``/``CastLike`` shape plumbing) runs by default (``optimize=True``); see ``docs/backends.md``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import torch
from torch import nn

from .. import ir
from .._atomic import atomic_write
from ..errors import ArtifactError, ConfigError, VerificationError, suggest
from ..ir import flatten_outputs

__all__ = ["OnnxArtifact", "to_onnx_model", "export_onnx", "to_numpy"]

logger = logging.getLogger(__name__)

Exporter = Literal["dynamo", "torchscript"]
EXPORTERS: tuple[str, ...] = ("dynamo", "torchscript")
Rewrite = Callable[[Any], Any]
"""Edits an ``onnx_ir.Model`` in place (returning None) or returns a new one."""
_TORCHSCRIPT_OPSET = 18

# Protobuf refuses to serialise a message over 2 GiB; the weights must then go to external data files.
_PROTO_LIMIT_BYTES = 2**31 - 1
# Logger namespaces the exporter chats on (torchvision-missing notices, torch.export graph dumps, version-converter
# tracebacks): while exporting, their records are captured and re-logged at DEBUG on this module's logger instead of reaching the console.
_EXPORTER_LOGGERS = ("torch", "onnxscript", "onnx_ir")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass(frozen=True)
class OnnxArtifact:
    """An ONNX file that passed the checker and, unless ``verify=False``, matched the module in ORT."""

    path: Path
    """Where the model was written (weights inside the file)."""
    input_names: tuple[str, ...]
    """Graph input names, in the order inputs are fed."""
    output_names: tuple[str, ...]
    """Graph output names, in the order of the module's flattened outputs."""
    opset: int
    """Version of the default (``ai.onnx``) opset the model uses."""
    max_abs_error: float | None
    """Largest absolute difference between ORT and PyTorch over all outputs; None when not verified."""
    max_rel_error: float | None
    """Largest ``max_abs / max(1, max|ref|)`` over the outputs (error relative to the output scale); None when
    not verified."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (path as a string)."""
        return {"path": str(self.path), "input_names": list(self.input_names),
                "output_names": list(self.output_names), "opset": self.opset,
                "max_abs_error": self.max_abs_error, "max_rel_error": self.max_rel_error}


def to_numpy(value: torch.Tensor | np.ndarray, *, name: str = "input") -> np.ndarray:
    """Convert a tensor (any device) to a contiguous NumPy array; arrays pass through unchanged."""
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.dtype == torch.bfloat16:
            raise ConfigError(f"{name} is bfloat16, which NumPy (and so ONNX Runtime's Python API) cannot hold; "
                              "cast it to float32 or float16 first")
        return np.ascontiguousarray(t.cpu().numpy())
    raise ConfigError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(value).__name__}")


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[_Capture]:
    """Keep the exporter's stdout/stderr prints, warnings and log chatter off the console (library code never
    prints); everything is re-logged at DEBUG on this module's logger."""
    capture = _Capture()
    saved: list[tuple[logging.Logger, list[logging.Handler], bool]] = []
    # torch installs its own stderr handlers (on "torch", "torch.onnx", ...) with propagate=False, so route
    # every logger of these namespaces that has handlers to the capture, then restore them exactly.
    existing = [lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    for lg in existing:
        if lg.handlers and any(lg.name == ns or lg.name.startswith(ns + ".") for ns in _EXPORTER_LOGGERS):
            saved.append((lg, lg.handlers, lg.propagate))
            lg.handlers, lg.propagate = [], True
    for name in _EXPORTER_LOGGERS:
        lg = logging.getLogger(name)
        if not any(entry[0] is lg for entry in saved):
            saved.append((lg, lg.handlers, lg.propagate))
        lg.handlers, lg.propagate = [capture], False
    stdout, stderr = io.StringIO(), io.StringIO()
    caught: list[warnings.WarningMessage] = []
    try:
        # torch.export prints the failing graph to stderr itself, the exporter its progress to stdout.
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            warnings.simplefilter("always")
            yield capture
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate
        for line in (stdout.getvalue() + stderr.getvalue()).splitlines():
            logger.debug("exporter: %s", line)
        for w in caught:
            logger.debug("exporter warning: %s: %s", w.category.__name__, w.message)
        for rec in capture.records:
            logger.debug("exporter log %s %s: %s", rec.name, rec.levelname, rec.getMessage())


def _describe_export_failure(err: BaseException) -> str:
    """Name the failing op and node, if the exporter's exception chain says, and the deepest cause."""
    chain = _exception_chain(err)
    text = _ANSI.sub("", "\n".join(str(e) for e in chain))
    parts = []
    node = re.search(r"translating node %([\w.]+)", text)
    op = re.search(r"OpOverload\(op='([^']+)', overload='([^']+)'\)", text)
    if op:
        parts.append(f"op '{op.group(1)}.{op.group(2)}'")
    else:
        target = re.search(r"target=((?:torch\.ops\.)?[\w]+\.[\w.]+)", text)
        if target:
            parts.append(f"op '{target.group(1).removeprefix('torch.ops.')}'")
    if node:
        parts.append(f"node '{node.group(1)}'")
    deepest = chain[-1]
    first_line = next((ln.strip() for ln in _ANSI.sub("", str(deepest)).splitlines() if ln.strip()), "")
    where = f" at {' / '.join(parts)}" if parts else ""
    return f"{where}: {type(deepest).__name__}: {first_line}"


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    cur: BaseException | None = err
    while cur is not None and not any(cur is seen for seen in chain):
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    return chain


def _export_failure_hint(err: BaseException) -> str:
    if any(type(e).__name__ == "TorchExportError" for e in _exception_chain(err)):
        return ("torch.export could not capture the model (often data-dependent control flow or shapes); "
                "make it capturable with torch.export.export(model, args) first, e.g. torch.cond for branches")
    return ("If the op has no ONNX translation, try another opset (opset=...) or replace it in the model; "
            "otherwise report it to PyTorch (component: onnx) with torch.onnx.export(..., report=True)")


def _opset_of(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    raise ArtifactError("exported ONNX model declares no default (ai.onnx) opset; this is an exporter bug, "
                        "please report it")


def _initializer_bytes(program: Any) -> int:
    total = 0
    for value in program.model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None:
            total += int(getattr(tensor, "nbytes", 0))
    return total


def to_onnx_model(
    module: nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    opset: int | None = None,
    optimize: bool = True,
    dynamic: bool = False,
    exporter: Exporter = "dynamo",
    rewrite: Rewrite | None = None,
) -> onnx.ModelProto:
    """Export ``module`` to an in-memory ONNX model with weights inside and check it.

    The stages: export (``torch.onnx.export``) -> ``rewrite`` (optional, on the ``onnx_ir`` model) ->
    ``onnx.checker``. A captured graph (``GraphModule``) is exported once per content: the result is kept,
    keyed by the graph's digest (code and weights), the inputs' shapes and dtypes and the options, and later
    calls with an equal graph get a copy of it without exporting again.

    Args:
        module: Any ``nn.Module``; in practice ``torch.export.export(model, args).module()``. Not modified.
        example_inputs: Positional inputs; their shapes and dtypes become the model's input types.
        opset: Default-domain opset to target; None: the exporter's recommended one.
        optimize: Run the exporter's onnxscript optimizer (constant folding, BN-into-Conv, shape-op cleanup).
            Keep it on for deployment; turn it off to see a pass's effect that the optimizer would duplicate.
        dynamic: Keep the dimensions a captured graph has dynamic as symbolic ONNX axes (``batch_size``, and
            ``sequence_length`` for token inputs); off, every axis has the example's size (what latency
            measurements time).
        exporter: ``"dynamo"`` (``torch.export``-based, the deployment exporter) or ``"torchscript"`` (the
            tracing exporter: about a hundred times faster on the small static graphs a latency table times,
            one layer each; static shapes only, ``optimize`` and ``dynamic`` do not apply).
        rewrite: A function editing the exported model as an ``onnx_ir.Model`` (in place, or returning a new
            one) before it is checked: a graph rewrite with onnx_ir / onnxscript's rewriter.

    Returns:
        A ``ModelProto`` that passed ``onnx.checker.check_model(full_check=True)``.

    Raises:
        ConfigError: ``opset`` is not a positive integer.
        ArtifactError: export failed (naming the op when the exporter says), the requested opset could not be
            produced, the weights exceed the 2 GiB protobuf limit, or the checker rejected the model.
    """
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 1):
        raise ConfigError(f"opset must be a positive integer or None, got {opset!r}")
    if exporter not in EXPORTERS:
        raise ConfigError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}"
                          f"{suggest(str(exporter), EXPORTERS)}")
    if rewrite is not None and not callable(rewrite):
        raise ConfigError(f"rewrite must be a function taking an onnx_ir.Model, got {type(rewrite).__name__}")
    args = _as_tuple(example_inputs)
    dims = ir.dynamic_dims(module) if dynamic and isinstance(module, torch.fx.GraphModule) else ()
    if exporter == "torchscript":
        optimize, dims = False, ()
    key = _cache_key(module, args, (opset, optimize, dims, exporter, rewrite))
    if key is not None and key in _EXPORTS:
        _EXPORTS.move_to_end(key)
        logger.debug("ONNX export of %s reused (same graph digest)", type(module).__name__)
        return onnx.load_model_from_string(_EXPORTS[key])
    model = _export(module, args, opset, optimize, dims, exporter, rewrite)
    if key is not None:
        _remember(key, model.SerializeToString())
    return model


_EXPORTS: OrderedDict[tuple[Any, ...], bytes] = OrderedDict()
"""Serialised exports of captured graphs, most recently used last."""
_EXPORTS_MAX_BYTES = 1 << 30


def _cache_key(module: nn.Module, args: tuple[Any, ...], options: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What an export of a captured graph depends on; None for other modules (their code has no digest)."""
    if not isinstance(module, torch.fx.GraphModule):
        return None
    specs = tuple((tuple(a.shape), str(a.dtype)) if isinstance(a, (torch.Tensor, np.ndarray)) else repr(a)
                  for a in args)
    return (ir.digest_graph(module), specs, options)


def _remember(key: tuple[Any, ...], data: bytes) -> None:
    if len(data) > _EXPORTS_MAX_BYTES:
        return
    _EXPORTS[key] = data
    while sum(len(v) for v in _EXPORTS.values()) > _EXPORTS_MAX_BYTES:
        _EXPORTS.popitem(last=False)


def _dynamic_shapes(args: tuple[Any, ...], dims: tuple[tuple[int, ...], ...]) -> tuple[dict[int, Any], ...] | None:
    """Named export dims for the dynamic axes: dim 0 ``batch_size``, others ``sequence_length``."""
    if not any(dims):
        return None
    batch = torch.export.Dim("batch_size", min=1)
    seq = torch.export.Dim("sequence_length", min=1)
    return tuple({d: batch if d == 0 else seq for d in (dims[i] if i < len(dims) else ())} for i in range(len(args)))


def _export(module: nn.Module, args: tuple[Any, ...], opset: int | None, optimize: bool,
            dims: tuple[tuple[int, ...], ...], exporter: Exporter, rewrite: Rewrite | None) -> onnx.ModelProto:
    if not isinstance(module, torch.fx.GraphModule) and module.training and any(
            isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd))
            for m in module.modules()):
        logger.warning("exporting %s in training mode: BatchNorm/Dropout are exported with their training "
                       "behaviour; call .eval() first for inference", type(module).__name__)
    with _quiet_exporter() as capture:
        try:
            if exporter == "torchscript":
                model = _run_torchscript(module, args, opset)
            else:
                program = _run_exporter(module, args, opset, optimize, _dynamic_shapes(args, dims))
                size = _initializer_bytes(program)
                if size > _PROTO_LIMIT_BYTES:
                    raise ArtifactError(f"model weights take {size / 2**30:.2f} GiB, over the 2 GiB ONNX protobuf "
                                        "limit; depthfold keeps weights inside the .onnx file, so export a smaller "
                                        "model")
                model = program.model_proto
        except ArtifactError:
            raise
        except Exception as err:
            raise ArtifactError(
                f"ONNX export of {type(module).__name__} failed{_describe_export_failure(err)}. "
                f"{_export_failure_hint(err)}"
            ) from err
    _localize_initializers(model)
    if rewrite is not None:
        model = _rewritten(model, rewrite)
    got = _opset_of(model)
    if opset is not None and got != opset:
        converter_msgs = [r.getMessage() for r in capture.records if "version" in r.getMessage().lower()]
        why = f" ({converter_msgs[-1].splitlines()[0]})" if converter_msgs else ""
        raise ArtifactError(f"opset {opset} was requested but the exporter produced opset {got}: the version "
                            f"converter could not convert the model{why}; use opset >= {got} or opset=None")
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as err:  # ValidationError, InferenceError: both mean the exported model is invalid
        raise ArtifactError(f"exported ONNX model of {type(module).__name__} fails onnx.checker: "
                            f"{str(err).strip().splitlines()[0]}; please report this exporter bug") from err
    logger.debug("exported %s to ONNX opset %d with %s: %d nodes", type(module).__name__, got, exporter,
                 len(model.graph.node))
    return model


def _subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes (``If`` branches, ``Loop`` bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _subgraphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _subgraphs(g)


def _localize_initializers(model: onnx.ModelProto) -> int:
    """Move every initializer that only nodes of one subgraph read into that subgraph; returns how many moved.

    The exporter keeps all weights in the main graph, so a ``torch.cond`` branch reads them from the outer scope;
    ONNX Runtime applies its layout and weight-prepacking optimizations (NCHWc convolutions) to a subgraph only
    for weights the subgraph owns.
    """
    graphs = list(_subgraphs(model.graph))
    if len(graphs) == 1:
        return 0
    readers: dict[str, set[int]] = {}
    for index, graph in enumerate(graphs):
        for node in graph.node:
            for name in node.input:
                readers.setdefault(name, set()).add(index)
    for output in model.graph.output:
        readers.setdefault(output.name, set()).add(0)
    kept, moved = [], 0
    for init in model.graph.initializer:
        where = readers.get(init.name, set())
        if len(where) == 1 and 0 not in where:
            graphs[next(iter(where))].initializer.append(init)
            moved += 1
        else:
            kept.append(init)
    if moved:
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return moved


def _run_torchscript(module: nn.Module, args: tuple[Any, ...], opset: int | None) -> onnx.ModelProto:
    buffer = io.BytesIO()
    torch.onnx.export(module, args, buffer, dynamo=False, opset_version=opset or _TORCHSCRIPT_OPSET)
    return onnx.load_model_from_string(buffer.getvalue())


def _rewritten(model: onnx.ModelProto, rewrite: Rewrite) -> onnx.ModelProto:
    """Apply a user rewrite to the exported model, on its ``onnx_ir`` form."""
    import onnx_ir

    ir_model = onnx_ir.from_proto(model)
    try:
        result = rewrite(ir_model)
    except Exception as err:
        raise ArtifactError(f"the ONNX rewrite {getattr(rewrite, '__name__', rewrite)!r} failed: "
                            f"{type(err).__name__}: {err}") from err
    if result is not None and not isinstance(result, onnx_ir.Model):
        raise ArtifactError(f"the ONNX rewrite {getattr(rewrite, '__name__', rewrite)!r} returned a "
                            f"{type(result).__name__}; return an onnx_ir.Model or None (edited in place)")
    return onnx_ir.to_proto(result if result is not None else ir_model)


def _run_exporter(module: nn.Module, args: tuple[Any, ...], opset: int | None, optimize: bool,
                  dynamic_shapes: Any) -> Any:
    """``torch.onnx.export``; with dynamic axes first, and with static ones if the exporter cannot keep them."""
    options = {"dynamo": True, "opset_version": opset, "optimize": optimize, "external_data": False}
    if dynamic_shapes is not None:
        try:
            return torch.onnx.export(module, args, dynamic_shapes=dynamic_shapes, **options)
        except Exception as err:  # the graph pins a size the capture left symbolic: export the example's shapes
            logger.warning("ONNX export with dynamic axes failed (%s: %s); exporting static shapes",
                           type(err).__name__, str(err).strip().splitlines()[0] if str(err).strip() else "")
    return torch.onnx.export(module, args, **options)


def _as_tuple(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConfigError(f"example_inputs must be a tuple of positional inputs, got {type(example_inputs).__name__}; "
                      "write (x,) for a single tensor")


_HALF_RTOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _compare(names: Sequence[str], got: Sequence[np.ndarray], ref: Sequence[torch.Tensor],
             rtol: float) -> tuple[float, float]:
    """Return (max_abs, max_scaled) over outputs; raise VerificationError naming the worst output."""
    if len(got) != len(ref):
        raise VerificationError(f"ONNX model returns {len(got)} outputs but the module returns {len(ref)} "
                                "tensors; the export dropped or added outputs")
    max_abs, worst, worst_name = 0.0, 0.0, ""
    # Half-precision outputs carry a rounding error of their own (eps 9.8e-4 for float16, 7.8e-3 for
    # bfloat16); a float32 tolerance would reject every faithful half-precision export.
    rtol = max(rtol, *(_HALF_RTOL.get(r.dtype, 0.0) for r in ref))
    for name, g, r in zip(names, got, ref, strict=True):
        r_np = to_numpy(r.float() if r.dtype == torch.bfloat16 else r, name=f"output {name!r}")
        if tuple(g.shape) != tuple(r_np.shape):
            raise VerificationError(f"output {name!r}: ONNX Runtime shape {list(g.shape)} differs from "
                                    f"PyTorch shape {list(r_np.shape)}")
        g64, r64 = g.astype(np.float64), r_np.astype(np.float64)
        diff = np.abs(g64 - r64)
        both_nan = np.isnan(g64) & np.isnan(r64)
        diff = np.where(both_nan, 0.0, np.nan_to_num(diff, nan=np.inf))
        abs_err = float(diff.max()) if diff.size else 0.0
        scale = max(1.0, float(np.nanmax(np.abs(r64)))) if r64.size and not np.all(np.isnan(r64)) else 1.0
        scaled = abs_err / scale
        max_abs = max(max_abs, abs_err)
        if scaled > worst or not worst_name:
            worst, worst_name = scaled, name
    if not worst <= rtol:
        raise VerificationError(f"ONNX Runtime output {worst_name!r} differs from PyTorch by {worst:.3g} relative "
                                f"to the output scale (max_abs / max(1, max|ref|)), over rtol={rtol:g}; "
                                "the exported model is not written")
    return max_abs, worst


def export_onnx(
    module: nn.Module,
    example_inputs: tuple[Any, ...],
    path: str | Path,
    *,
    opset: int | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    optimize: bool = True,
    dynamic: bool = True,
    rewrite: Rewrite | None = None,
) -> OnnxArtifact:
    """Export ``module`` to an ONNX file at ``path``, checked and (by default) verified in ONNX Runtime.

    Args:
        module: The model; in practice a GraphModule from ``torch.export``. Not modified.
        example_inputs: Positional example inputs, also used for verification.
        path: Target file; written atomically, parent directories created.
        opset: Default-domain opset; None: the exporter's choice.
        verify: Run the written file in ONNX Runtime (CPU) and compare with ``module(*example_inputs)``.
        rtol: Largest accepted ``max_abs / max(1, max|ref|)`` per output.
        optimize: Run the exporter's optimizer (see :func:`to_onnx_model`).
        dynamic: Keep a captured graph's dynamic batch (and sequence) axes in the file (see :func:`to_onnx_model`).
        rewrite: Edit the exported model before it is checked, verified and written (see :func:`to_onnx_model`).

    Returns:
        The OnnxArtifact with names, opset and the measured error (None when ``verify=False``).

    Raises:
        ConfigError: ``rtol`` is negative or NaN, or bad ``opset``/inputs.
        ArtifactError: export or checker failure, or ``path`` cannot be written.
        VerificationError: ORT's outputs differ beyond ``rtol``; no file is left at ``path``.
    """
    if not isinstance(rtol, (int, float)) or isinstance(rtol, bool) or not rtol >= 0:
        raise ConfigError(f"rtol must be a number >= 0, got {rtol!r}")
    target = Path(path)
    if target.is_dir():
        raise ArtifactError(f"{str(target)!r} is a directory; pass a file path such as "
                            f"{str(target / 'model.onnx')!r}")
    args = _as_tuple(example_inputs)
    model = to_onnx_model(module, args, opset=opset, optimize=optimize, dynamic=dynamic, rewrite=rewrite)
    input_names = tuple(i.name for i in model.graph.input)
    output_names = tuple(o.name for o in model.graph.output)
    errors: list[tuple[float, float]] = []

    def write(tmp: Path) -> None:
        onnx.save_model(model, str(tmp))
        if verify:
            errors.append(_verify_file(tmp, module, args, output_names, rtol))

    try:
        atomic_write(target, write)
    except OSError as err:
        raise ArtifactError(f"cannot write ONNX model to {str(target)!r}: {err.strerror or err}; "
                            "choose a writable file path") from err
    max_abs, max_rel = errors[0] if errors else (None, None)
    logger.info("wrote %s (opset %d, %d nodes%s)", target, _opset_of(model), len(model.graph.node),
                f", max rel error {max_rel:.2g}" if max_rel is not None else ", not verified")
    return OnnxArtifact(path=target, input_names=input_names, output_names=output_names, opset=_opset_of(model),
                        max_abs_error=max_abs, max_rel_error=max_rel)


def _verify_file(file: Path, module: nn.Module, args: tuple[Any, ...], output_names: Sequence[str],
                 rtol: float) -> tuple[float, float]:
    from . import ort  # onnxruntime is imported only where it is used

    with torch.no_grad():
        ref = flatten_outputs(module(*args))
    session = ort.create_session(file, device="cpu", threads=1)
    got = ort.run(session, flatten_outputs(args))
    return _compare(output_names, got, ref, rtol)
