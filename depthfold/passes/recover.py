"""Recovery fine-tune: distil the original (teacher) network into its depth-compressed copy (student).

Idea: after layers are pruned or merged, a short fine-tune of the compressed network towards the
original's outputs recovers most of the lost accuracy. The loss is

    T^2 * KL(softmax(teacher / T) || softmax(student / T))
    + label_weight * CE(student, y) + feature_weight * sum MSE(student feature, teacher feature)

optimised with AdamW and a cosine learning-rate decay to zero. Source: the recovery fine-tune of
"LayerMerge: Neural Network Depth Compression through Layer Pruning and Merging" (Kim et al.,
ICML 2024, arXiv:2406.12837), with knowledge distillation as in Hinton et al. 2015.

Not a registered graph pass: it trains ``student`` in place (the caller's compressed copy) and
returns a :class:`RecoverReport`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import Graph, GraphModule
from torch.utils.data import TensorDataset

from .. import ir
from ..errors import ConfigError, suggest
from ..ir import ops

__all__ = ["RecoverReport", "recalibrate_batch_norm", "recover"]

logger = logging.getLogger(__name__)

_LOSS_WINDOW = 10


@dataclass(frozen=True)
class RecoverReport:
    """What a :func:`recover` run did. The KL values are measured on the first batches of the training data."""

    steps: int
    seconds: float
    loss_first: float
    """Mean of the first ``min(10, steps)`` step losses."""
    loss_last: float
    """Mean of the last ``min(10, steps)`` step losses."""
    kl_before: float
    """Mean KL(teacher || student) (at temperature 1) on the eval batches before training; NaN if none."""
    kl_after: float
    """The same after training."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recover(
    student: nn.Module,
    teacher: nn.Module,
    data: Any,
    *,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 64,
    temperature: float = 1.0,
    label_weight: float = 0.0,
    feature_weight: float = 0.0,
    features: Sequence[tuple[str, str]] = (),
    weight_decay: float = 0.0,
    eval_batches: int = 2,
    seed: int = 0,
    progress: bool = False,
) -> RecoverReport:
    """Fine-tune ``student`` in place to reproduce ``teacher`` by knowledge distillation (LayerMerge recovery).

    The student trains in train mode (dropout on; a captured GraphModule keeps its batch norms in
    inference form) and gets its previous mode back afterwards; so does the teacher.

    Args:
        student: the compressed network (a GraphModule from :func:`depthfold.ir.capture` or any
            ``nn.Module``); its trainable parameters are updated in place.
        teacher: the original network; run under ``torch.no_grad`` in eval mode, never modified.
        data: a ``TensorDataset`` of ``(x,)`` or ``(x, y)``, a tensor ``x``, or a tuple ``(x, y)``.
            Minibatches of ``batch_size`` are drawn from seeded random permutations, one per epoch.
        steps, lr, weight_decay: AdamW steps, peak learning rate (cosine decay to 0) and weight decay.
        temperature: distillation temperature ``T`` (the KL term is scaled by ``T**2``).
        label_weight: weight of the cross-entropy with the labels ``y`` (needs labels in ``data``).
        feature_weight: weight of the MSE between intermediate values named in ``features``.
        features: ``(student_name, teacher_name)`` pairs: fx node names for GraphModules, submodule
            names (forward hooks) for other modules.
        eval_batches: ``kl_before`` / ``kl_after`` are measured on the first ``eval_batches`` full
            batches of ``data`` in its stored order, i.e. on training data; measure held-out accuracy
            yourself. 0 skips the measurement (NaN in the report).
        seed: seeds the minibatch order.
        progress: show a tqdm progress bar.

    Raises:
        ConfigError: a bad option, empty or malformed ``data``, inputs the student rejects, labels
            missing for ``label_weight > 0``, teacher and student output shapes that differ, an
            unknown feature name, or a loss that turns NaN/inf (``student`` keeps the steps before it).
    """
    _check_options(steps, lr, batch_size, temperature, label_weight, feature_weight, weight_decay,
                   eval_batches, features)
    x, y = _split_data(data)
    if label_weight > 0 and y is None:
        raise ConfigError(f"label_weight={label_weight} needs labels, but data holds inputs only; pass "
                          "TensorDataset(x, y) or (x, y), or set label_weight=0")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("student has no parameters that require grad, so recover has nothing to train")
    use_features = feature_weight > 0
    student_run = _Runner(student, [s for s, _ in features], "student")
    teacher_run = _Runner(teacher, [t for _, t in features], "teacher")
    n = x.shape[0]
    bs = min(batch_size, n)
    n_eval = min(eval_batches, n // bs)
    eval_set = [(x[i * bs:(i + 1) * bs], None if y is None else y[i * bs:(i + 1) * bs]) for i in range(n_eval)]

    start = time.perf_counter()
    student_was_training, teacher_was_training = student.training, teacher.training
    teacher.eval()
    losses: list[float] = []
    try:
        with student_run, teacher_run:
            student.eval()
            _probe(student_run, teacher_run, x[:bs], use_features, features)
            kl_before = _mean_kl(student_run, teacher_run, eval_set)
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0)
            batches = _batches(n, bs, seed)
            student.train()
            with _progress_bar(steps, progress) as bar:
                for step in range(steps):
                    idx = next(batches)
                    xb = x[idx]
                    yb = None if y is None else y[idx]
                    loss = _loss(student_run, teacher_run, xb, yb, temperature, label_weight,
                                 feature_weight if use_features else 0.0)
                    losses.append(float(loss.detach()))
                    if not math.isfinite(losses[-1]):
                        raise ConfigError(f"the recovery loss became {losses[-1]} at step {step}; lower lr "
                                          f"(now {lr}) or check the data for NaN/inf")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
                    bar.update(1)
                    if step % 10 == 0 or step == steps - 1:
                        bar.set_postfix(loss=f"{losses[-1]:.4f}")
            student.eval()
            kl_after = _mean_kl(student_run, teacher_run, eval_set)
    finally:
        student.train(student_was_training)
        teacher.train(teacher_was_training)
    window = min(_LOSS_WINDOW, steps)
    report = RecoverReport(
        steps=steps,
        seconds=time.perf_counter() - start,
        loss_first=sum(losses[:window]) / window,
        loss_last=sum(losses[-window:]) / window,
        kl_before=kl_before,
        kl_after=kl_after,
    )
    logger.info("recover: %d steps in %.1f s, loss %.4g -> %.4g, KL %.4g -> %.4g", report.steps,
                report.seconds, report.loss_first, report.loss_last, report.kl_before, report.kl_after)
    return report


def recalibrate_batch_norm(model: GraphModule, x: torch.Tensor, *, batch_size: int = 64) -> int:
    """Re-estimate the running mean and variance of every inference batch norm of ``model`` on inputs ``x``
    (in place); returns how many were updated.

    Removing activations and convs changes what the batch norms after them see, so their stored statistics
    no longer normalise; re-estimating them on a few hundred inputs recovers much of the accuracy before any
    training (AdaBN, Li et al. 2016; adaptive BN in EagleEye, Li et al. ECCV 2020). One pass: each batch norm
    normalises with its batch's statistics while they are summed, so every batch norm sees its predecessors
    already recalibrated. ``model`` must own its statistics (a copy, not tensors shared with the original).
    """
    norms = {n.name: n for n in model.graph.nodes if ops.is_batch_norm(n) and _stored_stats(n)}
    if not norms:
        return 0
    stats: dict[str, list[Any]] = {name: [0.0, 0.0, 0] for name in norms}  # sum, sum of squares, count

    class Recalibrating(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            if n.name not in norms:
                return super().run_node(n)
            args, _ = self.fetch_args_kwargs_from_env(n)
            inp, weight, bias = args[0], args[1], args[2]
            eps = float(args[7] if n.target is torch.ops.aten.batch_norm.default else args[6])
            dims = [d for d in range(inp.dim()) if d != 1]
            mean, var = inp.mean(dims), inp.var(dims, unbiased=False)
            count = inp.numel() // inp.shape[1]
            acc = stats[n.name]
            acc[0] = acc[0] + mean.double() * count
            acc[1] = acc[1] + (var.double() + mean.double() ** 2) * count
            acc[2] += count
            shape = [1, -1] + [1] * (inp.dim() - 2)
            out = (inp - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
            if weight is not None:
                out = out * weight.reshape(shape)
            if bias is not None:
                out = out + bias.reshape(shape)
            if n.target is torch.ops.aten.batch_norm.default:
                return out
            return out, mean.new_empty(0), mean.new_empty(0)

    interpreter = Recalibrating(model)
    device = _device_of(model)
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            interpreter.run(x[i:i + batch_size].to(device))
        for name, node in norms.items():
            total, squares, count = stats[name]
            mean = total / count
            var = (squares / count - mean**2).clamp_min(0.0)
            ir.get_param(model, node.args[3]).copy_(mean)
            ir.get_param(model, node.args[4]).copy_(var)
    return len(norms)


def _stored_stats(node: torch.fx.Node) -> bool:
    return all(isinstance(a, torch.fx.Node) and a.op == "get_attr" for a in node.args[3:5])


def _check_options(steps: int, lr: float, batch_size: int, temperature: float, label_weight: float,
                   feature_weight: float, weight_decay: float, eval_batches: int,
                   features: Sequence[tuple[str, str]]) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if not lr > 0:
        raise ConfigError(f"lr must be positive, got {lr!r} (e.g. lr=1e-3)")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature!r} (1.0 distils the plain softmax)")
    for name, value in (("label_weight", label_weight), ("feature_weight", feature_weight),
                        ("weight_decay", weight_decay)):
        if not value >= 0:
            raise ConfigError(f"{name} must be >= 0, got {value!r}")
    if not isinstance(eval_batches, int) or eval_batches < 0:
        raise ConfigError(f"eval_batches must be a non-negative integer, got {eval_batches!r}")
    for pair in features:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(s, str) for s in pair)):
            raise ConfigError(f"features must be (student_name, teacher_name) pairs of strings, got {pair!r}")
    if feature_weight > 0 and not features:
        raise ConfigError(f"feature_weight={feature_weight} needs features=[(student_name, teacher_name), ...]")


def _split_data(data: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return ``(x, y or None)`` from a TensorDataset, a tensor or an ``(x, y)`` tuple."""
    accepted = "a TensorDataset of (x,) or (x, y), a tensor x, or a tuple (x, y) of tensors"
    if isinstance(data, TensorDataset):
        tensors = tuple(data.tensors)
    elif isinstance(data, torch.Tensor):
        tensors = (data,)
    elif isinstance(data, (tuple, list)):
        tensors = tuple(data)
    else:
        raise ConfigError(f"data must be {accepted}; got {type(data).__name__}")
    if not 1 <= len(tensors) <= 2 or not all(isinstance(t, torch.Tensor) for t in tensors):
        kinds = ", ".join(type(t).__name__ for t in tensors)
        raise ConfigError(f"data must be {accepted}; got {len(tensors)} items ({kinds})")
    x = tensors[0]
    y = tensors[1] if len(tensors) == 2 else None
    if x.dim() == 0 or x.shape[0] == 0:
        raise ConfigError(f"data is empty (inputs of shape {tuple(x.shape)}); pass at least one sample")
    if y is not None and (y.dim() == 0 or y.shape[0] != x.shape[0]):
        raise ConfigError(f"data has {x.shape[0]} inputs but labels of shape {tuple(y.shape)}; "
                          "x and y need the same first (sample) dimension")
    return x, y


def _batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless minibatch indices: each epoch a fresh seeded permutation, its tail carried into the next."""
    gen = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while pending.numel() < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=gen)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The logits of a model output: the tensor itself, ``.logits``, or the first tensor in a tuple/list."""
    if isinstance(value, torch.Tensor):
        return value
    logits = value.get("logits") if isinstance(value, dict) else getattr(value, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


class _Runner:
    """Calls a model and returns ``(logits, [feature tensors])``.

    GraphModules: a GraphModule over a copy of the graph that also outputs the named nodes; it is built
    on the model as root, so it holds the very same parameter objects. Other modules: forward hooks on
    the named submodules, registered while the runner is entered.
    """

    def __init__(self, model: nn.Module, names: list[str], role: str) -> None:
        self.model = model
        self.names = names
        self.role = role
        self.device = _device_of(model)
        self._hooks: list[Any] = []
        self._captured: dict[str, Any] = {}
        self._tapped: GraphModule | None = None
        if not names:
            return
        if isinstance(model, GraphModule):
            self._tapped = _tap_graph(model, names, role)
        else:
            modules = dict(model.named_modules())
            for name in names:
                if name not in modules:
                    valid = [k for k in modules if k][:8]
                    raise ConfigError(f"{role} has no submodule {name!r} to take a feature from"
                                      f"{_hint(name, modules)} Valid names include {valid}")

    def __enter__(self) -> _Runner:
        if self.names and self._tapped is None:
            modules = dict(self.model.named_modules())
            for name in dict.fromkeys(self.names):
                self._hooks.append(modules[name].register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._captured.clear()

    def _hook(self, name: str) -> Any:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            self._captured[name] = output

        return record

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = x.to(self.device)
        if self._tapped is not None:
            out, values = self._tapped(x)
        else:
            self._captured.clear()
            out = self.model(x)
            values = [self._captured.get(name) for name in self.names]
        logits = _first_tensor(out)
        if logits is None:
            raise ConfigError(f"{self.role} returned {type(out).__name__} with no tensor in it; "
                              "recover needs the model to return logits (a tensor or a tuple starting with one)")
        feats = []
        for name, value in zip(self.names, values):
            tensor = _first_tensor(value)
            if tensor is None:
                raise ConfigError(f"{self.role} feature {name!r} produced {type(value).__name__}, not a tensor"
                                  " (a submodule that never ran, or a non-tensor node); pick another name")
            feats.append(tensor)
        return logits, feats


def _hint(name: str, known: Any) -> str:
    return suggest(name, known) or "."


def _tap_graph(gm: GraphModule, names: list[str], role: str) -> GraphModule:
    """A GraphModule sharing ``gm``'s parameters whose output is ``(original output, [named node values])``."""
    nodes = {node.name: node for node in gm.graph.nodes if node.op != "output"}
    for name in names:
        if name not in nodes:
            compute = [k for k, v in nodes.items() if v.op in ("call_function", "call_module", "call_method")]
            raise ConfigError(f"{role} graph has no node {name!r} to take a feature from"
                              f"{_hint(name, nodes)} Valid node names include {compute[:8]} "
                              "(print the graph for all)")
    graph = Graph()
    value_map: dict[Any, Any] = {}
    output = graph.graph_copy(gm.graph, value_map)
    graph.output((output, [value_map[nodes[name]] for name in names]))
    return GraphModule(gm, graph, class_name=f"{type(gm).__name__}WithFeatures")


def _expected_inputs(model: nn.Module) -> str:
    """A hint of what inputs ``model`` expects: capture shapes for GraphModules, else its first layer."""
    if isinstance(model, GraphModule):
        shapes = []
        for node in model.graph.nodes:
            if node.op == "placeholder":
                val = node.meta.get("val")
                shape = node.meta.get("depthfold.shape", tuple(val.shape) if hasattr(val, "shape") else None)
                if shape is not None:
                    shapes.append(str(tuple(shape)))
        if shapes:
            return (f"; the graph was captured with inputs of shape {', '.join(shapes)} and captured graphs "
                    "may have static shapes, so set batch_size to the capture batch size or re-capture "
                    "with dynamic_shapes")
        return ""
    for name, module in model.named_modules():
        for attr in ("in_channels", "in_features", "num_embeddings"):
            if hasattr(module, attr):
                return f"; its first layer {name!r} ({type(module).__name__}) has {attr}={getattr(module, attr)}"
    return ""


def _probe(student: _Runner, teacher: _Runner, x: torch.Tensor, use_features: bool,
           features: Sequence[tuple[str, str]]) -> None:
    """One no-grad forward of both models, turning the usual mistakes into ConfigErrors."""
    given = f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
    with torch.no_grad():
        outputs = []
        for runner in (student, teacher):
            try:
                outputs.append(runner(x))
            except ConfigError:
                raise
            except Exception as err:
                text = str(err).strip().splitlines()
                raise ConfigError(
                    f"the {runner.role} rejected a batch of inputs of shape {given}: {type(err).__name__}: "
                    f"{text[0] if text else ''}{_expected_inputs(runner.model)}. Fix: pass data whose "
                    "samples have the shape and dtype the model was built for (first dimension = samples)"
                ) from err
    (s_logits, s_feats), (t_logits, t_feats) = outputs
    if s_logits.shape != t_logits.shape:
        raise ConfigError(f"student outputs shape {tuple(s_logits.shape)} but the teacher {tuple(t_logits.shape)}"
                          "; recover distils logits, so both must produce the same shape")
    if use_features:
        for (s_name, t_name), s, t in zip(features, s_feats, t_feats):
            if s.shape != t.shape:
                raise ConfigError(f"feature pair ({s_name!r}, {t_name!r}) has shapes {tuple(s.shape)} (student) "
                                  f"and {tuple(t.shape)} (teacher); pair values of the same shape")


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t / T) || softmax(s / T)) over the last dimension, averaged over all other positions."""
    classes = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, classes).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, classes).float() / temperature, dim=-1)
    return F.kl_div(s, t.to(s.device), reduction="batchmean", log_target=True) * temperature**2


def _loss(student: _Runner, teacher: _Runner, x: torch.Tensor, y: torch.Tensor | None, temperature: float,
          label_weight: float, feature_weight: float) -> torch.Tensor:
    with torch.no_grad():
        t_logits, t_feats = teacher(x)
    s_logits, s_feats = student(x)
    loss = _kl(s_logits, t_logits, temperature)
    if label_weight > 0 and y is not None:
        classes = s_logits.shape[-1]
        loss = loss + label_weight * F.cross_entropy(s_logits.reshape(-1, classes).float(),
                                                     y.reshape(-1).to(s_logits.device))
    if feature_weight > 0:
        mse = sum(F.mse_loss(s.float(), t.to(s.device).float()) for s, t in zip(s_feats, t_feats))
        loss = loss + feature_weight * mse
    return loss


def _mean_kl(student: _Runner, teacher: _Runner, batches: list[tuple[torch.Tensor, Any]]) -> float:
    if not batches:
        return math.nan
    with torch.no_grad():
        values = [float(_kl(student(x)[0], teacher(x)[0], 1.0)) for x, _ in batches]
    return sum(values) / len(values)


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="recover", unit="step", disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()
