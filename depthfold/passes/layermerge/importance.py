"""LayerMerge's importance table ``I(s, e, candidate)``: how much of the network's function survives when
only that segment is replaced by that candidate.

The metric is ``-KL(original || compressed)`` of the network's output on held-out calibration inputs
(0 for the original layers), and the importance is ``exp(metric)`` as in LayerMerge. The DP maximises the
*product* of importances, i.e. the sum of metrics: summing ``exp`` terms instead would reward tilings with
more segments whatever their accuracy. Three estimators:

* ``zero_shot`` — no training: the candidate's network as it is (pruned convs dropped, re-padded merge);
* ``local`` (default) — the merged replacement is first trained for a few steps to reproduce the original
  segment's output from the original segment's input (only that segment runs), then measured; pruned
  candidates (nothing merged to train) are measured as in ``zero_shot``;
* ``finetune`` — paper-faithful and slow: the whole candidate network is briefly fine-tuned towards the
  original with distillation (:func:`depthfold.recover`), then measured.

Each candidate is scored by an independent job over plain data (the graph travels as
:class:`~depthfold.ir.PortableGraph`), so the table can be built on a process pool or a Ray cluster.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import CodeGen

from ...cache import cache_dir
from ...data import Samples
from ...errors import ConfigError
from ...ir import PortableGraph, digest_graph, digest_tensors, flatten_outputs, ops
from ..common import metrics
from ..common.calibration import Calibration
from ..common.jobs import job_location, run_jobs
from ..common.table_cache import fill_table
from ..recover import recover
from .apply import AppliedSegment, apply_plan, share_graph
from .candidates import SegmentChoice
from .trunk import Trunk

__all__ = ["ESTIMATORS", "ImportanceTable", "build_importance_table"]

Estimator = Literal["zero_shot", "local", "finetune"]
ESTIMATORS: tuple[str, ...] = ("zero_shot", "local", "finetune")
_LOCAL_BATCH = 16
"""Samples per local training step: a segment is small, and many short steps fit it faster than few big ones."""


@dataclass
class ImportanceTable:
    """Metric (``-KL``, 0 for the original) and held-out accuracy per candidate, and how they were built."""

    metric: list[float]
    accuracy: list[float | None]
    estimator: str
    seconds: float
    trained: int
    original_accuracy: float | None
    synthetic_data: bool
    cache_hits: int = 0
    notes: list[str] = field(default_factory=list)
    executor: str | None = None
    """Where the candidates were scored: ``"serial"`` (in the calling process), ``"process"``, ``"ray"`` or the
    executor's class name; ``None`` when every entry came from the cache."""
    ran_on: dict[str, int] = field(default_factory=dict)
    """Candidates scored per process, ``{"host:pid": count}``."""

    @property
    def importance(self) -> list[float]:
        return [math.exp(m) for m in self.metric]

    def summary(self) -> dict[str, Any]:
        return {"estimator": self.estimator, "candidates": len(self.metric), "trained": self.trained,
                "cache_hits": self.cache_hits,
                "seconds": self.seconds, "original_accuracy": self.original_accuracy,
                "synthetic_data": self.synthetic_data, "notes": self.notes, "executor": self.executor,
                "ran_on": self.ran_on}


@dataclass(frozen=True)
class _Shared:
    """What every importance job reads; shipped once per worker (the graph as :class:`ir.PortableGraph`)."""

    graph: PortableGraph
    trunk: Trunk
    teacher: torch.Tensor
    """The original's held-out outputs."""
    held_out: Samples
    train_inputs: torch.Tensor | None
    """The training inputs ``finetune`` fine-tunes on (``None`` for the other estimators)."""
    estimator: str
    steps: int
    lr: float
    batch_size: int


def build_importance_table(gm: GraphModule, trunk: Trunk, choices: Sequence[SegmentChoice], calib: Calibration, *,
                           estimator: Estimator = "local", steps: int = 30, lr: float = 1e-3,
                           use_cache: bool = True, executor: Any = None, progress: bool = False,
                           deadline: float | None = None) -> ImportanceTable:
    """Score every candidate of ``choices`` on ``calib`` with ``estimator`` (``gm`` is not modified).

    Entries are cached on disk, keyed by the graph and its weights, the calibration data, the estimator
    settings and the candidate, so rerunning on the same model and data only reads them back. Candidates
    not cached are scored as independent jobs on ``executor`` (``None``, ``"serial"``, ``"process"``,
    ``"ray"`` or a ``concurrent.futures.Executor``, see :func:`~depthfold.passes.common.jobs.run_jobs`);
    the table is the same wherever they run, and records where that was. ``deadline``: see
    :func:`~depthfold.passes.common.table_cache.fill_table`.
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown importance estimator {estimator!r}; known: {', '.join(ESTIMATORS)}")
    start = time.perf_counter()
    bs = calib.batch_size
    held_out = calib.held_out
    teacher = metrics.batched_outputs(gm, held_out, bs)
    original_acc = metrics.accuracy(teacher, teacher, held_out)
    root = cache_dir("layermerge", "importance")
    common = {"model": digest_graph(gm),
              "calibration": digest_tensors(calib.train.inputs[0], held_out.inputs[0], held_out.labels),
              "batch_size": bs, "estimator": estimator, "steps": steps, "lr": lr}
    results: dict[int, dict[str, Any]] = {i: {"metric": 0.0, "accuracy": original_acc}
                                          for i, c in enumerate(choices) if c.kind in ("original", "barrier")}
    keys = {i: json.dumps({**common, "choice": c.to_dict()}, sort_keys=True)
            for i, c in enumerate(choices) if i not in results}
    trained = 0
    ran_on: Counter[str] = Counter()

    def score(todo: list[int], store: Callable[[int, dict[str, Any]], None]) -> str:
        def stored(k: int, out: dict[str, Any]) -> None:
            nonlocal trained
            trained += out["trained"]
            ran_on[out["ran_on"]] += 1
            store(todo[k], {"metric": out["metric"], "accuracy": out["accuracy"]})

        shared = _Shared(PortableGraph(gm), trunk, teacher, held_out,
                         calib.train.inputs[0] if estimator == "finetune" else None, estimator, steps, lr, bs)
        return run_jobs(_score_candidate, _jobs(gm, trunk, [choices[i] for i in todo], calib, estimator), stored,
                        shared=shared, executor=executor, progress=progress, desc="importance")

    table = fill_table(root, keys, score, use_cache=use_cache, what="the importance table", deadline=deadline)
    results.update(table.results)
    cache_hits, where = table.hits, table.ran
    metric = [float(results[i]["metric"]) for i in range(len(choices))]
    accuracies = [results[i]["accuracy"] for i in range(len(choices))]
    notes = ["no calibration data: importance measured on standard-normal inputs"] if calib.synthetic else []
    return ImportanceTable(metric, accuracies, estimator, time.perf_counter() - start, trained, original_acc,
                           calib.synthetic, cache_hits, notes, where, dict(ran_on))


def _jobs(gm: GraphModule, trunk: Trunk, choices: Sequence[SegmentChoice], calib: Calibration, estimator: str
          ) -> list[tuple[SegmentChoice, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Per candidate: the candidate, the original values its local training reads (training inputs), and
    those the rest of the network after its start reads (held-out inputs)."""
    reads = {i: _feature_names(gm, trunk, c) for i, c in enumerate(choices)
             if estimator == "local" and c.kind == "merged"}
    wanted = set().union(*reads.values())
    order = [n.name for n in gm.graph.nodes if n.name in wanted]
    features = _original_values(gm, order, calib.train.inputs[0], calib.batch_size)
    suffix_inputs = _suffix_inputs(gm, trunk) if estimator != "finetune" else {}
    cached = _original_values(gm, sorted(set().union(*suffix_inputs.values())), calib.held_out.inputs[0],
                              calib.batch_size)
    return [(c, {n: features[n] for n in reads.get(i, ())},
             {n: cached[n] for n in suffix_inputs.get(trunk.positions[c.start].node, ())})
            for i, c in enumerate(choices)]


def _score_candidate(shared: _Shared, choice: SegmentChoice, features: dict[str, torch.Tensor],
                     cached: dict[str, torch.Tensor]) -> dict[str, Any]:
    """One importance job: the candidate's metric and accuracy, whether it trained, and where it ran."""
    gm, trunk, held_out, bs = shared.graph.graph_module, shared.trunk, shared.held_out, shared.batch_size
    trained = False
    if shared.estimator == "finetune":
        student, _ = apply_plan(gm, trunk, [choice])
        recover(student, gm, shared.train_inputs, steps=shared.steps, lr=shared.lr, batch_size=bs, eval_batches=0)
        trained = True
        logits = metrics.batched_outputs(student, held_out, bs)
    else:
        student, segments = apply_plan(gm, trunk, [choice], share_params=True)
        if shared.estimator == "local" and segments:
            _train_locally(student, segments[0], trunk, choice, features, shared.steps, shared.lr,
                           min(bs, _LOCAL_BATCH))
            trained = True
        logits = _suffix_logits(student, trunk.positions[choice.start].node, cached, held_out, bs)
    return {"metric": -metrics.kl_divergence(shared.teacher, logits, held_out),
            "accuracy": metrics.accuracy(shared.teacher, logits, held_out), "trained": trained,
            "ran_on": job_location()}


def _descendants(gm: GraphModule, start: str) -> list[Node]:
    """Nodes downstream of ``start`` (exclusive), in graph order: all a segment starting there can change."""
    seen: set[Node] = set()
    first = next(n for n in gm.graph.nodes if n.name == start)
    stack = list(first.users)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.users)
    return [n for n in gm.graph.nodes if n in seen]


def _suffix_inputs(gm: GraphModule, trunk: Trunk) -> dict[str, set[str]]:
    """Per segment start node: the unchanged values the rest of the network reads (itself, shortcuts)."""
    out: dict[str, set[str]] = {}
    for position in trunk.positions[:-1]:
        inside = set(_descendants(gm, position.node))
        out[position.node] = {a.name for n in inside for a in n.all_input_nodes
                              if a not in inside and a.op not in ("get_attr", "placeholder")
                              and not ops.is_shape_query(a)}  # a batch size is read again in the suffix
    return out


def _original_values(gm: GraphModule, names: list[str], x: torch.Tensor, batch_size: int) -> dict[str, torch.Tensor]:
    if not names:
        return {}
    tapped = share_graph(gm)
    nodes = {n.name: n for n in tapped.graph.nodes}
    output = next(n for n in tapped.graph.nodes if n.op == "output")
    output.args = (tuple(nodes[n] for n in names),)
    tapped.graph.set_codegen(CodeGen())
    tapped.recompile()
    with torch.no_grad():
        chunks = [tapped(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return {name: torch.cat([c[k] for c in chunks]) for k, name in enumerate(names)}


def _extract(gm: GraphModule, members: list[Node], output: Any) -> tuple[GraphModule, list[str]]:
    """``members`` (in graph order) as their own module sharing ``gm``'s tensors and returning ``output`` (a
    node or a structure of nodes); every other value they read becomes a placeholder, named in order."""
    graph = Graph()
    env: dict[Node, Node] = {}
    feeds: list[str] = []
    placeholders: list[Node] = []

    def arg(node: Node) -> Node:
        if node not in env:
            if node.op == "get_attr":
                env[node] = graph.get_attr(node.target)  # type: ignore[arg-type]
            elif ops.is_shape_query(node) and node.args[1:] == (0,) and placeholders:
                # The batch size, read from the input before the members: every feed has it in dim 0.
                env[node] = graph.call_function(node.target, (placeholders[0], 0))
            else:
                env[node] = graph.placeholder(node.name)
                placeholders.append(env[node])
                feeds.append(node.name)
        return env[node]

    for node in members:
        env[node] = graph.node_copy(node, arg)
    graph.output(torch.fx.map_arg(output, arg))
    return GraphModule(gm, graph), feeds


def _suffix_logits(student: GraphModule, start: str, cached: dict[str, torch.Tensor], samples: Samples,
                   batch_size: int) -> torch.Tensor:
    """The student's output computed from the original's values at ``start`` (everything before is the
    original's, unchanged), running only the part of the network after it; the full network if a needed
    value was not cached."""
    after = _descendants(student, start)
    out_node = next((n for n in after if n.op == "output"), None)
    if out_node is None:
        return metrics.batched_outputs(student, samples, batch_size)
    suffix, feeds = _extract(student, [n for n in after if n is not out_node], out_node.args[0])
    if any(name not in cached for name in feeds):
        return metrics.batched_outputs(student, samples, batch_size)
    with torch.no_grad():
        return torch.cat([flatten_outputs(suffix(*(cached[f][i:i + batch_size] for f in feeds)))[0]
                          for i in range(0, len(samples), batch_size)])


def _region(student: GraphModule, segment: AppliedSegment) -> tuple[GraphModule, list[str]]:
    """The segment's nodes as their own module (sharing ``student``'s tensors) and its input node names."""
    names = set(segment.nodes)
    members = [n for n in student.graph.nodes if n.name in names]
    return _extract(student, members, next(n for n in members if n.name == segment.output))


def _feature_names(gm: GraphModule, trunk: Trunk, choice: SegmentChoice) -> list[str]:
    """The original values a merged segment's local training reads or must reproduce."""
    return [trunk.positions[choice.start].node, trunk.positions[choice.end].node, *_outside_inputs(gm, trunk, choice)]


def _outside_inputs(gm: GraphModule, trunk: Trunk, choice: SegmentChoice) -> list[str]:
    """Shortcut values a segment adds that come from before it (an outside residual join)."""
    from .trunk import Join

    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for item in trunk.between(choice.start, choice.end):
        if isinstance(item, Join) and item.entry < choice.start:
            other = nodes[item.node].args[1 - item.body_arg]
            if isinstance(other, Node):
                out.append(other.name)
    return out


def _train_locally(student: GraphModule, segment: AppliedSegment, trunk: Trunk, choice: SegmentChoice,
                   features: dict[str, torch.Tensor], steps: int, lr: float, batch_size: int) -> None:
    """Fit the merged segment to the original segment's output (MSE, scaled by the target's variance).

    Its parameters are first replaced by private copies on ``student``, so the original stays untouched.
    """
    region, inputs = _region(student, segment)
    params: list[nn.Parameter] = []
    for node in region.graph.nodes:
        if node.op == "get_attr":
            owner_path, _, attr = node.target.rpartition(".")
            value = getattr(student.get_submodule(owner_path), attr)
            if isinstance(value, nn.Parameter) and all(p is not value for p in params):
                copy = nn.Parameter(value.detach().clone())
                setattr(student.get_submodule(owner_path), attr, copy)
                owner = region.get_submodule(owner_path) if owner_path else region
                setattr(owner, attr, copy)
                params.append(copy)
    if not params:
        return
    target = features[trunk.positions[choice.end].node]
    start_name = trunk.positions[choice.start].node
    feeds = [features[start_name if name == segment.input else name] for name in inputs]
    scale = float(target.var()) or 1.0
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(target), (batch_size,), generator=generator)
        loss = F.mse_loss(region(*(f[idx] for f in feeds)), target[idx]) / scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
