"""LayerMerge's latency table ``T(s, e, candidate)``, measured on the target backend and cached on disk.

Each candidate replacement of a segment becomes a tiny fx graph at its real input shape (its conv(s), the
shortcut add and the trailing activation, batch norm folded as at deployment), which the backend lowers
itself and times through the :class:`~depthfold.backends.LatencyProbe` the API hands the pass (ONNX Runtime CPU by default, TVM, a
GPU, a remote board). Identical layers are measured once: entries are keyed by the layer's op signature
and the probe's fingerprint (backend, device, threads, machine, library versions, timing settings) and
stored one JSON file each with a checksum, so a rerun is instant, an interrupted build resumes, and a
corrupted or foreign entry is detected, deleted and re-measured, never used.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.fx import Graph, GraphModule, Node

from ...cache import cache_dir
from ...errors import ConfigError
from ..common.jobs import run_jobs
from ..common.table_cache import fill_table
from .candidates import Geometry, SegmentChoice
from .trunk import Act, Join, Layer, Trunk

__all__ = ["LatencyTable", "LayerSpec", "build_latency_table", "choice_spec", "measure_spec"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten


@dataclass(frozen=True)
class LayerSpec:
    """What a candidate costs at deployment: ops applied to an input of ``input_shape``.

    ``ops`` entries: ``("conv", out_channels, kh, kw, sh, sw, ph, pw, groups)``, ``("pad", left, right,
    top, bottom)`` (a zero pad: asymmetric padding before a valid conv), ``("linear", out_features)`` (on
    the last dim of a channels-last input), ``("act", aten_op, scalar_args)``,
    ``("add", shortcut_shape, side_convs)`` (at most one add).
    """

    input_shape: tuple[int, ...]
    ops: tuple[tuple[Any, ...], ...]

    def signature(self) -> str:
        return json.dumps({"input": list(self.input_shape), "ops": self.ops}, sort_keys=True, default=list)

    def to_graph(self) -> GraphModule:
        """The layer as a standalone fx graph of ATen ops with random weights (fixed seed), taking
        :meth:`example_inputs`; the backend lowers it like any other model."""
        generator = torch.Generator().manual_seed(0)
        root, graph = nn.Module(), Graph()
        value = graph.placeholder("x")
        shortcut = graph.placeholder("shortcut") if any(op[0] == "add" for op in self.ops) else None
        counter = iter(range(10_000))

        def affine(value: Node, channels: int, op: tuple[Any, ...]) -> tuple[Node, int]:
            """A conv, linear or zero pad (the ops a shortcut may hold too)."""
            if op[0] == "pad":
                return graph.call_function(aten.constant_pad_nd.default, (value, list(op[1:]), 0.0)), channels
            i = next(counter)
            if op[0] == "linear":
                root.register_buffer(f"w{i}", torch.randn((op[1], channels), generator=generator) * 0.05)
                root.register_buffer(f"b{i}", torch.zeros(op[1]))
                return graph.call_function(aten.linear.default, (value, graph.get_attr(f"w{i}"),
                                                                 graph.get_attr(f"b{i}"))), op[1]
            _, cout, kh, kw, sh, sw, ph, pw, groups = op
            weight = torch.randn((cout, channels // groups, kh, kw), generator=generator) * 0.05
            root.register_buffer(f"w{i}", weight)
            root.register_buffer(f"b{i}", torch.zeros(cout))
            node = graph.call_function(aten.conv2d.default, (value, graph.get_attr(f"w{i}"), graph.get_attr(f"b{i}"),
                                                              [sh, sw], [ph, pw], [1, 1], groups))
            return node, cout

        channels = int(self.input_shape[-1 if any(op[0] == "linear" for op in self.ops) else 1])
        for op in self.ops:
            if op[0] in ("conv", "pad", "linear"):
                value, channels = affine(value, channels, op)
            elif op[0] == "act":
                value = graph.call_function(_aten_op(op[1]), (value, *op[2]))
            elif op[0] == "add":
                _, shape, side = op
                short, short_channels = shortcut, int(shape[1])
                for side_op in side:
                    short, short_channels = affine(short, short_channels, side_op)
                value = graph.call_function(aten.add.Tensor, (value, short))
        graph.output(value)
        return GraphModule(root, graph)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(1)
        shapes = [self.input_shape] + [op[1] for op in self.ops if op[0] == "add"][:1]
        return tuple(torch.randn(s, generator=generator) for s in shapes)


def _aten_op(name: str) -> Any:
    """``"relu.default"`` -> ``torch.ops.aten.relu.default``."""
    op, overload = name.split(".")
    return getattr(getattr(aten, op), overload)


def _activation_op(node: torch.fx.Node) -> tuple[Any, ...]:
    """The activation as ``("act", "<aten op>.<overload>", scalar args)``, in its out-of-place form; an op
    with tensor arguments besides its input (none of the trunk's activations) is costed as a ReLU."""
    target = node.target
    scalars = node.args[1:]
    if isinstance(target, torch._ops.OpOverload) and all(isinstance(a, (int, float, bool)) for a in scalars):
        name = target._opname.removesuffix("_")
        if hasattr(aten, name) and hasattr(getattr(aten, name), target._overloadname):
            return ("act", f"{name}.{target._overloadname}", tuple(scalars))
    return ("act", "relu.default", ())


def _conv_ops(layer: Layer | Geometry) -> list[tuple[Any, ...]]:
    """A conv as deployed: its padding in the conv when symmetric, else an explicit pad and a valid conv."""
    if layer.linear:
        return [("linear", layer.out_channels)]
    begin, end = layer.padding, layer.end_padding
    if begin == end:
        return [("conv", layer.out_channels, *layer.kernel, *layer.stride, *begin, layer.groups)]
    return [("pad", begin[1], end[1], begin[0], end[0]),
            ("conv", layer.out_channels, *layer.kernel, *layer.stride, 0, 0, layer.groups)]


def choice_spec(gm: GraphModule, trunk: Trunk, choice: SegmentChoice) -> LayerSpec | None:
    """The deployed form of ``choice`` (``None`` for a barrier: its cost is the same for every plan)."""
    if choice.kind == "barrier":
        return None
    nodes = {n.name: n for n in gm.graph.nodes}
    items = trunk.between(choice.start, choice.end)
    ops: list[tuple[Any, ...]] = []
    if choice.kind == "merged":
        assert choice.geometry is not None
        ops.extend(_conv_ops(choice.geometry))
    kept = set(choice.kept)
    for item in items:
        if isinstance(item, Layer) and choice.kind != "merged" and item.conv in kept:
            ops.extend(_conv_ops(item))
        elif isinstance(item, Join) and (item.entry < choice.start or choice.kind != "merged"):
            shape = tuple(trunk.positions[item.entry].shape)
            ops.append(("add", shape, tuple(op for s in item.side for op in _conv_ops(s))))
        elif isinstance(item, Act) and item is items[-1]:
            ops.append(_activation_op(nodes[item.node]))
    return LayerSpec(tuple(trunk.positions[choice.start].shape), tuple(ops))


def _overhead_spec(spec: LayerSpec) -> LayerSpec:
    """An identity model at the layer's input shape: the per-call cost (feeding inputs, launching the
    session) that a layer timed end to end pays and a layer inside the whole model does not."""
    return LayerSpec(spec.input_shape, ())


def measure_spec(spec: LayerSpec, probe: Any, cold: bool = False) -> dict[str, Any]:
    """Time one layer with ``probe.measure_layer`` (a job: runs in worker processes too)."""
    return probe.measure_layer(spec.to_graph(), spec.example_inputs(), cold=cold)


@dataclass
class LatencyTable:
    """Measured latency (median ms, with p10/p90 spread) per candidate, and how the table was built.

    Each entry is the layer's cost inside a network: on ORT CPU its own kernels' time from the profiler
    (timed alone end to end, a layer also pays the NCHWc layout reorders at its boundary, which made the
    MobileNetV2 layers at 224x224 sum to 123% of the whole model), with the CPU caches flushed before each
    run when the network's weights exceed the last-level cache (inside such a network every layer reads its
    weights from memory: 64x64 ResNet-34's layers timed warm summed to 64% of its kernel time); on other
    backends its end-to-end time minus that of an identity model at the same input shape (the call overhead).
    """

    median_ms: list[float]
    p10_ms: list[float]
    p90_ms: list[float]
    distinct_layers: int
    cache_hits: int
    measured: int
    rejected_entries: int
    """Cache entries found corrupted or not matching their key: deleted and re-measured."""
    seconds: float
    cold: bool = False
    """Layers were timed with the CPU caches flushed: the network's weights exceed the last-level cache."""
    probe: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"candidates": len(self.median_ms), "distinct_layers": self.distinct_layers,
                "cache_hits": self.cache_hits, "measured": self.measured,
                "rejected_cache_entries": self.rejected_entries, "seconds": self.seconds, "cold_weights": self.cold,
                "probe": self.probe}


def build_latency_table(gm: GraphModule, trunk: Trunk, choices: Sequence[SegmentChoice], probe: Any, *,
                        executor: Any = None, use_cache: bool = True, progress: bool = False,
                        deadline: float | None = None) -> LatencyTable:
    """Measure every candidate of ``choices`` with ``probe`` (cached; identical layers timed once).

    ``probe``: a :class:`~depthfold.backends.LatencyProbe` or anything with its ``fingerprint()``,
    ``measure_layer(model, inputs)`` and ``layer_scope``. ``deadline``: see
    :func:`~depthfold.passes.common.table_cache.fill_table`."""
    if probe is None:
        raise ConfigError("layermerge needs a latency probe to build its table: run it through "
                          "depthfold.optimize(...) or give PassContext(latency_probe=LatencyProbe(...))")
    start = time.perf_counter()
    fingerprint = probe.fingerprint()
    root = cache_dir("layermerge", "latency")
    specs = [choice_spec(gm, trunk, c) for c in choices]
    end_to_end = probe.layer_scope == "end_to_end"
    weight_bytes = sum(p.numel() * p.element_size() for p in gm.parameters())
    cold = not end_to_end and weight_bytes > probe.cache_bytes
    distinct: dict[str, LayerSpec] = {}
    for spec in specs:
        if spec is not None and spec.ops:
            distinct.setdefault(spec.signature(), spec)
            if end_to_end:
                overhead = _overhead_spec(spec)
                distinct.setdefault(overhead.signature(), overhead)
    keys = {signature: json.dumps({"layer": signature, "probe": fingerprint, "cold": cold}, sort_keys=True)
            for signature in distinct}

    def measure(todo: list[str], store: Callable[[str, dict[str, Any]], None]) -> None:
        run_jobs(measure_spec, [(distinct[s], probe, cold) for s in todo], lambda k, r: store(todo[k], r),
                 executor=executor, threads_per_job=int(fingerprint.get("threads", 1)), progress=progress,
                 desc="latency table")

    table = fill_table(root, keys, measure, use_cache=use_cache, what="the latency table", deadline=deadline)
    results = table.results
    medians, p10s, p90s = [], [], []
    for spec in specs:
        r = results[spec.signature()] if spec is not None and spec.ops else None
        base = float(results[_overhead_spec(spec).signature()]["median_ms"]) if r and spec and end_to_end else 0.0
        medians.append(max(0.0, float(r["median_ms"]) - base) if r else 0.0)
        p10s.append(max(0.0, float(r["p10_ms"]) - base) if r else 0.0)
        p90s.append(max(0.0, float(r["p90_ms"]) - base) if r else 0.0)
    return LatencyTable(medians, p10s, p90s, len(distinct), table.hits, table.computed, table.rejected,
                        time.perf_counter() - start, cold, fingerprint)
