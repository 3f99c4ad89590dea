"""Recovery fine-tune: distil the original (teacher) network into its depth-compressed copy (student).

Idea: after layers are pruned or merged, a short fine-tune of the compressed network towards the
original's outputs recovers most of the lost accuracy. The loss is

    T^2 * KL(softmax(teacher / T) || softmax(student / T))      (objective="kl", logits)
      or 1 - cos(student, teacher) per position                (objective="cosine", embeddings)
    + label_weight * CE(student, y) + lm_weight * CE(student[:, :-1], input_ids[:, 1:])
    + feature_weight * sum MSE(student feature, teacher feature)

optimised with AdamW and a cosine learning-rate decay to zero. Source: the recovery fine-tune of
"LayerMerge: Neural Network Depth Compression through Layer Pruning and Merging" (Kim et al.,
ICML 2024, arXiv:2406.12837), with knowledge distillation as in Hinton et al. 2015. For language models the KL
is per token (next-token distillation, as in MiniLLM/Sheared-LLaMA's continued training), with an optional
next-token loss on the data's own ``input_ids``; sentence-embedding models distil by cosine.

:func:`recover` trains a given ``student`` in place and returns a :class:`RecoverReport`; the registered
approximate pass ``recover`` (``"recover:steps=200,lr=1e-4"``) does the same to a copy of the pipeline's
current graph, with the pipeline's original (kept by the pass manager) as the teacher.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule
from torch.utils.data import TensorDataset

from .. import ir
from ..data import ACCEPTED_FORMS, Samples, read_samples
from ..errors import ConfigError, suggest
from ..ir import ops
from .base import Change, Exactness, PassContext, PassResult
from .common.calibration import calibration_split
from .common.metrics import batched_outputs, check_metrics, evaluate, logits_of
from .registry import register_pass

__all__ = ["RecoverConfig", "RecoverReport", "recalibrate_batch_norm", "recover"]

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
    lm_weight: float = 0.0,
    objective: str = "kl",
    feature_weight: float = 0.0,
    features: Sequence[tuple[str, str]] = (),
    weight_decay: float = 0.0,
    eval_batches: int = 2,
    seed: int = 0,
    progress: bool = False,
    example_inputs: Sequence[torch.Tensor] | None = None,
) -> RecoverReport:
    """Fine-tune ``student`` in place to reproduce ``teacher`` by knowledge distillation (LayerMerge recovery).

    The student trains in train mode (dropout on; a captured GraphModule keeps its batch norms in
    inference form) and gets its previous mode back afterwards; so does the teacher.

    Args:
        student: the compressed network (a GraphModule from :func:`depthfold.ir.capture` or any
            ``nn.Module``); its trainable parameters are updated in place.
        teacher: the original network; run under ``torch.no_grad`` in eval mode, never modified.
        data: any form :func:`depthfold.data.read_samples` reads (a tensor, ``(x, y)``, a Dataset, a
            DataLoader, an iterable of tuple or dict batches) or :class:`depthfold.data.Samples`.
            Minibatches of ``batch_size`` are drawn from seeded random permutations, one per epoch.
        steps, lr, weight_decay: AdamW steps, peak learning rate (cosine decay to 0) and weight decay.
        temperature: distillation temperature ``T`` (the KL term is scaled by ``T**2``).
        label_weight: weight of the cross-entropy with the labels ``y`` (needs labels in ``data``).
        lm_weight: weight of the next-token cross-entropy of a causal LM's logits on its own ``input_ids``
            (padding, ``attention_mask == 0``, ignored).
        objective: ``"kl"`` (distil the output softmax: classifiers and LM logits) or ``"cosine"`` (distil
            ``1 - cos`` per position: embedding outputs such as a sentence encoder's hidden states).
        feature_weight: weight of the MSE between intermediate values named in ``features``.
        features: ``(student_name, teacher_name)`` pairs: fx node names for GraphModules, submodule
            names (forward hooks) for other modules.
        eval_batches: ``kl_before`` / ``kl_after`` are measured on the first ``eval_batches`` full
            batches of ``data`` in its stored order, i.e. on training data; measure held-out accuracy
            yourself. 0 skips the measurement (NaN in the report).
        seed: seeds the minibatch order.
        progress: show a tqdm progress bar.
        example_inputs: the model's inputs that ``data`` must match; default: the student graph's captured
            input shapes, or for other modules the first sample of ``data`` (a single-input model).

    Raises:
        ConfigError: a bad option, empty or malformed ``data``, inputs the student rejects, labels
            missing for ``label_weight > 0``, teacher and student output shapes that differ, an
            unknown feature name, or a loss that turns NaN/inf (``student`` keeps the steps before it).
    """
    _check_options(steps, lr, batch_size, temperature, label_weight, feature_weight, weight_decay,
                   eval_batches, features)
    if objective not in _OBJECTIVES:
        raise ConfigError(f"objective must be one of {', '.join(_OBJECTIVES)}, got {objective!r}")
    if not lm_weight >= 0:
        raise ConfigError(f"lm_weight must be >= 0, got {lm_weight}")
    samples = _samples(student, data, example_inputs)
    y = samples.labels
    tokens = samples.names.index("input_ids") if "input_ids" in samples.names else (
        0 if not samples.inputs[0].dtype.is_floating_point and samples.inputs[0].dim() == 2 else None)
    if lm_weight > 0 and tokens is None:
        raise ConfigError(f"lm_weight={lm_weight} needs token ids (an 'input_ids' input) in the data")
    mask = samples.names.index("attention_mask") if "attention_mask" in samples.names else None
    objective_fn = _OBJECTIVES[objective]
    if label_weight > 0 and y is None:
        raise ConfigError(f"label_weight={label_weight} needs labels, but data holds inputs only; pass "
                          "TensorDataset(x, y) or (x, y), or set label_weight=0")
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("student has no parameters that require grad, so recover has nothing to train")
    use_features = feature_weight > 0
    student_run = _Runner(student, [s for s, _ in features], "student")
    teacher_run = _Runner(teacher, [t for _, t in features], "teacher")
    n = len(samples)
    bs = min(batch_size, n)
    n_eval = min(eval_batches, n // bs)
    eval_set = [samples.select(slice(i * bs, (i + 1) * bs)) for i in range(n_eval)]

    start = time.perf_counter()
    student_was_training, teacher_was_training = student.training, teacher.training
    teacher.eval()
    losses: list[float] = []
    try:
        with student_run, teacher_run:
            student.eval()
            _probe(student_run, teacher_run, samples.select(slice(0, bs)).inputs, use_features, features)
            kl_before = _mean_kl(student_run, teacher_run, eval_set)
            optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=0.0)
            batches = _batches(n, bs, seed)
            student.train()
            with _progress_bar(steps, progress) as bar:
                for step in range(steps):
                    batch = samples.select(next(batches))
                    loss = _loss(student_run, teacher_run, batch.inputs, batch.labels, temperature, label_weight,
                                 feature_weight if use_features else 0.0, objective_fn,
                                 (lm_weight, tokens, mask))
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


def recalibrate_batch_norm(model: GraphModule, x: torch.Tensor | Samples, *, batch_size: int = 64) -> int:
    """Re-estimate the running mean and variance of every inference batch norm of ``model`` on inputs ``x``
    (a tensor for a single-input model, or :class:`~depthfold.data.Samples`) in place; returns how many were
    updated.

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
        samples = x if isinstance(x, Samples) else Samples((x,), None, ("x",))
        for batch in samples.batches(batch_size):
            interpreter.run(*(t.to(device) for t in batch))
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


def _samples(student: nn.Module, data: Any, example_inputs: Sequence[torch.Tensor] | None) -> Samples:
    """``data`` read as samples matching the student's inputs (its capture shapes when it is a graph)."""
    if isinstance(data, Samples):
        return data
    names: tuple[str, ...] = ()
    free: tuple[tuple[int, ...], ...] = ()
    if example_inputs is None and isinstance(student, GraphModule):
        example_inputs = _graph_examples(student)
        if example_inputs is not None:
            names = ir.input_names(student)
            free = ir.free_dims(student)
    if example_inputs is None:
        first = _first_input(data)
        example_inputs = (first,) if first is not None else None
    if example_inputs is None:
        raise ConfigError(f"recovery data must be {ACCEPTED_FORMS}; got {type(data).__name__} (for batches of a "
                          "module that is not a captured graph, pass example_inputs=(...) too)")
    return read_samples(data, tuple(example_inputs), names=names, free_dims=free, what="recovery data")


def _graph_examples(gm: GraphModule) -> tuple[torch.Tensor, ...] | None:
    """Zero tensors with the graph's captured input shapes and dtypes (None if they are not recorded)."""
    out = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape, dtype = node.meta.get(ir.META_SHAPE), node.meta.get(ir.META_DTYPE)
            if shape is None or not isinstance(dtype, str):
                return None
            out.append(torch.zeros(tuple(shape), dtype=getattr(torch, dtype.removeprefix("torch."))))
    return tuple(out) or None


def _first_input(data: Any) -> torch.Tensor | None:
    """The first sample of single-input ``data`` (a tensor, an ``(x, y)`` tuple or a TensorDataset)."""
    if isinstance(data, TensorDataset):
        data = data.tensors
    if isinstance(data, torch.Tensor):
        return data[:1] if data.dim() else None
    if isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor) and data[0].dim():
        return data[0][:1]
    return None


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

    def __call__(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        inputs = [t.to(self.device) for t in inputs]
        if self._tapped is not None:
            out, values = self._tapped(*inputs)
        else:
            self._captured.clear()
            out = self.model(*inputs)
            values = [self._captured.get(name) for name in self.names]
        logits = logits_of(out)
        if logits is None:
            raise ConfigError(f"{self.role} returned {type(out).__name__} with no tensor in it; "
                              "recover needs the model to return logits (a tensor or a tuple starting with one)")
        feats = []
        for name, value in zip(self.names, values):
            tensor = logits_of(value)
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
    return ir.tap(gm, names)


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


def _probe(student: _Runner, teacher: _Runner, inputs: Sequence[torch.Tensor], use_features: bool,
           features: Sequence[tuple[str, str]]) -> None:
    """One no-grad forward of both models, turning the usual mistakes into ConfigErrors."""
    given = ir.describe_inputs(inputs)
    with torch.no_grad():
        outputs = []
        for runner in (student, teacher):
            try:
                outputs.append(runner(inputs))
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


def _cosine_distance(student_out: torch.Tensor, teacher_out: torch.Tensor, temperature: float) -> torch.Tensor:
    """1 - cos(student, teacher) along the last dimension, averaged over all other positions."""
    return (1.0 - F.cosine_similarity(student_out.float(), teacher_out.to(student_out.device).float(), dim=-1)).mean()


_OBJECTIVES = {"kl": _kl, "cosine": _cosine_distance}


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of ``logits[:, t]`` against ``tokens[:, t + 1]``, padding ignored."""
    target = tokens[:, 1:].clone().long().to(logits.device)
    if mask is not None:
        target[mask[:, 1:] == 0] = -100
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=-100)


def _loss(student: _Runner, teacher: _Runner, inputs: Sequence[torch.Tensor], y: torch.Tensor | None,
          temperature: float, label_weight: float, feature_weight: float, objective: Any = _kl,
          lm: tuple[float, int | None, int | None] = (0.0, None, None)) -> torch.Tensor:
    with torch.no_grad():
        t_logits, t_feats = teacher(inputs)
    s_logits, s_feats = student(inputs)
    loss = objective(s_logits, t_logits, temperature)
    lm_weight, tokens, mask = lm
    if lm_weight > 0 and tokens is not None:
        loss = loss + lm_weight * _next_token_loss(s_logits, inputs[tokens], None if mask is None else inputs[mask])
    if label_weight > 0 and y is not None:
        classes = s_logits.shape[-1]
        loss = loss + label_weight * F.cross_entropy(s_logits.reshape(-1, classes).float(),
                                                     y.reshape(-1).to(s_logits.device))
    if feature_weight > 0:
        mse = sum(F.mse_loss(s.float(), t.to(s.device).float()) for s, t in zip(s_feats, t_feats))
        loss = loss + feature_weight * mse
    return loss


def _mean_kl(student: _Runner, teacher: _Runner, batches: list[Samples]) -> float:
    if not batches:
        return math.nan
    with torch.no_grad():
        values = [float(_kl(student(b.inputs)[0], teacher(b.inputs)[0], 1.0)) for b in batches]
    return sum(values) / len(values)


@contextlib.contextmanager
def _progress_bar(total: int, enabled: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="recover", unit="step", disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()


@dataclass(frozen=True)
class RecoverConfig:
    """Options of the ``recover`` pass (see :func:`recover` for the loss)."""

    steps: int = 200
    """Distillation steps (AdamW, cosine decay to 0)."""
    lr: float = 1e-4
    """Peak learning rate."""
    batch_size: int = 64
    temperature: float = 1.0
    label_weight: float = 0.5
    """Weight of the cross-entropy on the data's labels, when it has labels (KL to the original always)."""
    lm_weight: float = 0.0
    """Weight of a causal LM's next-token cross-entropy on the data's ``input_ids``."""
    objective: Literal["kl", "cosine"] = "kl"
    """Distil the output softmax (``kl``: classifiers, LM logits) or per-position cosine (``cosine``: embeddings)."""
    train_samples: int = 2048
    """Samples of the data read for training."""
    eval_samples: int = 128
    """Held-out samples the report's metrics are measured on (not trained on)."""
    recalibrate_bn: bool = True
    """Re-estimate batch-norm statistics on the training samples before training (AdaBN)."""
    metrics: tuple[str, ...] = ("kl", "accuracy", "perplexity", "token_cosine")
    """Metrics of the report, before and after, where they apply to the outputs (names in
    ``depthfold.passes.common.METRICS``)."""

    def __post_init__(self) -> None:
        _check_options(self.steps, self.lr, self.batch_size, self.temperature, self.label_weight, 0.0, 0.0, 0, ())
        for name in ("train_samples", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"recover {name} must be >= 1, got {getattr(self, name)}")
        check_metrics(self.metrics)


@register_pass("recover", exactness=Exactness.APPROXIMATE, config=RecoverConfig, uses_context=True)
def recover_pass(gm: GraphModule, config: RecoverConfig, context: PassContext) -> PassResult:
    """Distil the pipeline's original into a copy of the current graph on the data (knowledge distillation)."""
    teacher = context.original
    if teacher is None:
        raise ConfigError("recover distils from the pipeline's original, which this pass manager was not given; "
                          "run it through depthfold.optimize or PassManager.run")
    if context.data is None:
        raise ConfigError("recover trains on data: pass data=... (a DataLoader, a Dataset, tensors or batches) "
                          "to optimize()")
    inputs = tuple(context.example_inputs)
    calib = calibration_split(context.data, inputs, names=ir.input_names(gm), free_dims=ir.free_dims(gm),
                              eval_samples=config.eval_samples, train_samples=config.train_samples,
                              batch_size=config.batch_size, seed=context.seed)
    student = ir.to_module(gm)
    teacher_out = batched_outputs(teacher, calib.held_out, calib.batch_size)
    before = evaluate(teacher_out, batched_outputs(student, calib.held_out, calib.batch_size), calib.held_out,
                      config.metrics)
    recalibrated = recalibrate_batch_norm(student, calib.train, batch_size=calib.batch_size) \
        if config.recalibrate_bn else 0
    labelled = calib.train.labels is not None and config.label_weight > 0
    report = recover(student, teacher, calib.train, steps=config.steps, lr=config.lr, batch_size=calib.batch_size,
                     temperature=config.temperature, label_weight=config.label_weight if labelled else 0.0,
                     lm_weight=config.lm_weight, objective=config.objective,
                     seed=context.seed, progress=context.progress)
    after = evaluate(teacher_out, batched_outputs(student, calib.held_out, calib.batch_size), calib.held_out,
                     config.metrics)
    original = evaluate(teacher_out, teacher_out, calib.held_out, config.metrics)
    detail = {"steps": config.steps, "batch_norms_recalibrated": recalibrated, "before": before, "after": after}
    return PassResult(student, [Change("recover", (), (), detail)], report={
        "recovery": report.to_dict(), "metrics": {"original": original, "before": before, "after": after},
        "batch_norms_recalibrated": recalibrated, "samples": {"train": len(calib.train),
                                                              "held_out": len(calib.held_out)},
        "data": calib.train.source, "synthetic_data": calib.synthetic})
