"""Early exits: classifier heads inside the network and confidence gates that skip the rest for easy inputs.

Idea (cascaded softmax-confidence inference, Berestizshevsky & Even 2019; BranchyNet; CALM, Schuster et al.
2022; Apparate, Dai et al. 2024): a network whose intermediate features already answer an input confidently
need not run its deeper layers on it. At each exit point (a clean cut of the graph, :mod:`depthfold.ir.cut`)
a head (global average pool + linear) predicts the classes; a sample whose confidence (max softmax
probability, or one minus the normalised entropy) reaches the exit's threshold leaves with the head's answer.

* Heads are trained with the backbone frozen, by self-distillation from the model's own output (KL at
  ``temperature``) on the calibration data's train split.
* Thresholds are calibrated on the held-out split: the gated model's loss against the original (accuracy
  points with labels, else disagreement with the original's top-1) stays within ``tolerance`` while the
  expected latency, from the measured latency of each prefix and head on the pipeline's backend, is minimised
  (greedy threshold lowering, the move with the best latency saved per loss added first).
* ``auto=K`` picks the K exit points itself among the block ends: a head is trained at every one, and exits are
  added greedily, each time the one whose calibrated cascade lowers the expected latency most.
* The gated model is expressed with ``torch.cond``: ``torch.onnx.export`` turns it into ONNX ``If`` nodes, so
  ONNX Runtime really skips the suffix. ``policy=split`` (default): confident samples of a batch leave, the
  rest continue as a smaller batch; ``policy=all``: the suffix is skipped only when every sample of the batch
  is confident (a static batch shape inside the suffix). Per-sample outputs are the same under both policies.

Exactness: APPROXIMATE (the report gives the calibrated loss, the exit-rate histogram and the expected compute).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule

from .. import ir
from ..errors import ConfigError
from ..ir.cut import Cut, block_cuts, resolve_cut, split_graph
from .base import Change, Exactness, PassContext, PassResult
from .common.calibration import calibration_split
from .registry import register_pass

__all__ = ["EXIT_META", "EarlyExitConfig", "EarlyExitModel", "ExitHead", "confidence", "early_exit", "pool"]

logger = logging.getLogger(__name__)

EXIT_META = "depthfold.early_exit"
"""``gm.meta`` key of the gated graph: the :class:`EarlyExitModel` it was built from (segments, heads, gates),
for runners that execute segments separately (TVM: gates on the host)."""

_LEVELS = 32
"""Candidate thresholds per exit in the calibration search (quantiles of the held-out confidences)."""


@dataclass(frozen=True)
class EarlyExitConfig:
    after: tuple[str, ...] = ()
    """Exit points: module paths (``layer2``), node names or block indices (``2``: the third block end)."""
    auto: int = 0
    """Choose this many exit points by measured latency and calibrated exit rates (instead of ``after``)."""
    confidence: Literal["max_prob", "entropy"] = "max_prob"
    """The gate's score: max softmax probability, or ``1 - H(p) / log(classes)``."""
    tolerance: float = 0.01
    """Allowed loss against the original on held-out calibration data: accuracy points with labels, else the
    fraction of samples whose top-1 differs from the original's."""
    thresholds: tuple[float, ...] = ()
    """Fixed thresholds, one per exit (skips calibration)."""
    policy: Literal["split", "all"] = "split"
    """Batches: ``split`` lets confident samples leave and runs the rest as a smaller batch; ``all`` skips the
    suffix only when every sample is confident."""
    steps: int = 300
    """Head training steps (Adam, self-distillation, backbone frozen)."""
    lr: float = 1e-2
    temperature: float = 2.0
    """Distillation temperature."""
    rounds: int = 10
    """Interleaved latency rounds when measuring prefixes."""
    eval_samples: int = 512
    """Held-out calibration samples (thresholds); the rest of the data (up to ``train_samples``) trains heads."""
    train_samples: int = 2048
    batch_size: int = 64


class ExitHead(nn.Module):
    """Global average pool over every axis but batch and channels, then a linear classifier."""

    def __init__(self, channels: int, classes: int, channel_dim: int):
        super().__init__()
        self.channel_dim = channel_dim
        self.linear = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(pool(x, self.channel_dim))


def pool(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Mean over every axis except batch and ``channel_dim``."""
    axes = [d for d in range(1, x.dim()) if d != channel_dim]
    return x.mean(dim=axes) if axes else x


def confidence(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The gate's score per sample: max softmax probability, or ``1 - H(p) / log(classes)`` (``entropy``)."""
    probs = torch.softmax(logits, dim=-1)
    if kind == "entropy":
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        return 1.0 - entropy / math.log(logits.shape[-1])
    return probs.amax(-1)


class EarlyExitModel(nn.Module):
    """Segments of the original graph with an exit head and a confidence gate after every segment but the last,
    expressed with ``torch.cond`` (nested: exit k's continuation holds exit k+1)."""

    def __init__(self, segments: Sequence[GraphModule], heads: Sequence[ExitHead], thresholds: Sequence[float],
                 confidence: str, policy: str):
        super().__init__()
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.confidence = confidence
        self.policy = policy

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self._level(0, self.segments[0](*inputs))

    def _level(self, k: int, feature: torch.Tensor) -> torch.Tensor:
        if k == len(self.heads):
            return feature
        logits = self.heads[k](feature)
        confident = confidence(logits, self.confidence) >= self.thresholds[k]

        def done(feature: torch.Tensor, logits: torch.Tensor, confident: torch.Tensor) -> torch.Tensor:
            return logits.clone()

        if self.policy == "all":
            def rest(feature: torch.Tensor, logits: torch.Tensor, confident: torch.Tensor) -> torch.Tensor:
                deeper = self._level(k + 1, self.segments[k + 1](feature))
                return torch.where(confident[:, None], logits, deeper)
        else:
            def rest(feature: torch.Tensor, logits: torch.Tensor, confident: torch.Tensor) -> torch.Tensor:
                index = torch.nonzero(~confident).squeeze(1)
                torch._check(index.shape[0] > 0)  # this branch runs only when a sample continues
                deeper = self._level(k + 1, self.segments[k + 1](feature.index_select(0, index)))
                return logits.index_copy(0, index, deeper.to(logits.dtype))

        return torch.cond((~confident).any(), rest, done, (feature, logits, confident))

    def exits(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Per sample, the exit it leaves at (``len(heads)``: the end of the network), in eager mode."""
        with torch.no_grad():
            feature = self.segments[0](*inputs)
            taken = torch.full((feature.shape[0],), len(self.heads), dtype=torch.long)
            pending = torch.ones_like(taken, dtype=torch.bool)
            for k, head in enumerate(self.heads):
                confident = (confidence(head(feature), self.confidence) >= self.thresholds[k]) & pending
                taken[confident] = k
                pending &= ~confident
                feature = self.segments[k + 1](feature)
        return taken


@register_pass("early_exit", exactness=Exactness.APPROXIMATE, config=EarlyExitConfig, uses_context=True,
               idempotent=True)
def early_exit(gm: GraphModule, config: EarlyExitConfig, context: PassContext) -> PassResult:
    """Add exit heads and confidence gates lowered to ``torch.cond`` / ONNX ``If`` (cascaded softmax-confidence
    inference, CALM)."""
    _check_config(config)
    classes = _classifier_output(gm)
    if config.after:
        cuts = sorted({c.node: c for c in (resolve_cut(gm, p) for p in config.after)}.values(),
                      key=lambda c: c.position)
        if config.thresholds and len(config.thresholds) != len(cuts):
            raise ConfigError(f"early_exit: {len(config.thresholds)} thresholds for {len(cuts)} exit points "
                              f"({', '.join(c.name for c in cuts)}); give one per exit")
    else:
        # Block ends whose features still have positions to pool: after a global pool only the classifier is left.
        cuts = [c for c in block_cuts(gm) if len(c.shape) >= 3 and math.prod(c.shape[2:] if len(c.shape) == 4
                                                                              else c.shape[1:2]) > 1]
        if len(cuts) < config.auto:
            raise ConfigError(f"early_exit: auto={config.auto} but the network has {len(cuts)} block ends that cut "
                              "it cleanly; ask for fewer or name exit points with after=...")
    for cut in cuts:
        _channel_dim(cut)
    if context.data is None:
        raise ConfigError("early_exit trains its exit heads by self-distillation and calibrates their thresholds on "
                          "data: pass data=... (inputs, or (inputs, labels)) to depthfold.optimize")
    calib = calibration_split(context.data, tuple(context.example_inputs), names=ir.input_names(gm),
                              free_dims=ir.free_dims(gm), eval_samples=config.eval_samples,
                              train_samples=config.train_samples, batch_size=config.batch_size, seed=context.seed)
    base = ir.clone(gm)
    train_feats, train_out = _pooled_features(base, cuts, calib.train, calib.batch_size)
    held_feats, held_out = _pooled_features(base, cuts, calib.held_out, calib.batch_size)
    # Seeded by the cut, not its position in the list: the head at a point is the same whichever exits are asked.
    heads = [_train_head(train_feats[i], train_out, _channel_dim(c), classes, config,
                         context.seed + zlib.crc32(c.node.encode()))
             for i, c in enumerate(cuts)]
    with torch.no_grad():
        head_logits = [h.linear(f) for h, f in zip(heads, held_feats)]
    scores = np.stack([confidence(z, config.confidence).numpy() for z in head_logits])
    reference = held_out.argmax(-1).numpy()
    labels = None if calib.held_out.labels is None else calib.held_out.labels.numpy()
    truth = labels if labels is not None else reference
    right = np.stack([(z.argmax(-1).numpy() == truth) for z in head_logits])
    final_right = reference == truth
    costs = _measure_costs(base, cuts, heads, context, config)
    problem = _Cascade(scores, right, final_right, costs["exit_ms"], costs["head_ms"], costs["full_ms"],
                       config.tolerance)
    if config.thresholds:
        chosen, thresholds = list(range(len(cuts))), list(config.thresholds)
    elif config.auto:
        chosen, thresholds = problem.select(config.auto)
    else:
        chosen = list(range(len(cuts)))
        thresholds = problem.calibrate(chosen)
    outcome = problem.evaluate(chosen, thresholds)
    if not config.thresholds and all(rate == 0.0 for rate in outcome["rates"][:-1]):
        best = problem.best_reachable(chosen if config.after else list(range(len(cuts))))
        raise ConfigError(
            f"early_exit: no exit threshold keeps the loss within tolerance={config.tolerance} on the "
            f"{len(truth)} held-out samples: the best reachable is exit {cuts[best['exit']].name} taking "
            f"{best['rate']:.1%} of the samples at a loss of {best['loss']:.4f}; raise tolerance to at least "
            f"{best['loss']:.4f}, or move the exits deeper")
    picked = [cuts[i] for i in chosen]
    model = EarlyExitModel(split_graph(base, picked), [heads[i] for i in chosen], thresholds, config.confidence,
                           config.policy).eval()
    out = ir.capture(model, tuple(context.example_inputs)).graph_module
    out.meta[EXIT_META] = model
    report = _report(cuts, chosen, thresholds, outcome, costs, problem, config, calib, labels is not None,
                     head_logits, reference)
    changes = [Change(kind="early_exit", removed=(), added=(f"exit_{k}",),
                      detail={"after": cut.name, "node": cut.node, "threshold": thresholds[k],
                              "exit_rate": outcome["rates"][k]})
               for k, cut in enumerate(picked)]
    if outcome["expected_ms"] >= costs["full_ms"]:
        logger.warning("early_exit: on %s the calibrated exits do not pay for their heads (expected compute "
                       "%.3f of the original); the exits stay as asked, try later exit points or a larger model",
                       costs["backend"], outcome["expected_ms"] / costs["full_ms"])
    logger.info("early_exit: exits after %s, thresholds %s, rates %s, expected compute %.3f",
                [c.name for c in picked], [round(t, 4) for t in thresholds], outcome["rates"],
                outcome["expected_ms"] / costs["full_ms"])
    return PassResult(out, changes=changes, report=report)


def _check_config(config: EarlyExitConfig) -> None:
    if bool(config.after) == bool(config.auto):
        raise ConfigError("early_exit needs exit points: after=layer2,layer3 (module paths or block indices) or "
                          "auto=K (K points chosen by measured latency), not both and not neither")
    if config.auto < 0:
        raise ConfigError(f"early_exit: auto must be a positive number of exits, got {config.auto}")
    if config.thresholds and config.auto:
        raise ConfigError("early_exit: thresholds=... fixes the gates of the exits named by after=...; with auto the "
                          "thresholds are calibrated")
    if not 0.0 <= config.tolerance < 1.0:
        raise ConfigError(f"early_exit: tolerance is a fraction in [0, 1) (0.01 = one point), got {config.tolerance}")
    if any(not 0.0 <= t <= 1.0 for t in config.thresholds):
        raise ConfigError(f"early_exit: thresholds are confidences in [0, 1], got {list(config.thresholds)}")
    if config.confidence not in ("max_prob", "entropy"):
        raise ConfigError(f"early_exit: confidence is max_prob or entropy, got {config.confidence!r}")
    if config.policy not in ("split", "all"):
        raise ConfigError(f"early_exit: policy is split or all, got {config.policy!r}")
    if config.steps < 0 or config.lr <= 0 or config.temperature <= 0:
        raise ConfigError("early_exit: steps must be >= 0, lr and temperature > 0")


def _classifier_output(gm: GraphModule) -> int:
    """The number of classes of a model whose output is one ``(batch, classes)`` logits tensor."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    values = [v for v in torch.utils._pytree.tree_leaves(output.args[0]) if isinstance(v, torch.fx.Node)]
    val = values[0].meta.get("val") if len(values) == 1 else None
    shape = ir.shape_of(values[0]) if len(values) == 1 else None
    if not isinstance(val, torch.Tensor) or val.dim() != 2 or not val.is_floating_point() or shape is None:
        got = (f"{len(values)} outputs" if len(values) != 1 else
               f"an output of shape {shape}" if isinstance(val, torch.Tensor) else "a non-tensor output")
        raise ConfigError(f"early_exit gates classifiers: the model must return one (batch, classes) logits tensor, "
                          f"got {got}. (A decoder's per-token outputs are not gated per sample.)")
    return int(shape[1])


def _channel_dim(cut: Cut) -> int:
    """Where the channels of the feature at ``cut`` are: dim 1 of NCHW maps, the last dim of token sequences."""
    if len(cut.shape) == 4:
        return 1
    if len(cut.shape) in (2, 3):
        return len(cut.shape) - 1
    raise ConfigError(f"early_exit: the feature after {cut.name} has shape {cut.shape}; a head pools (batch, "
                      "channels, height, width), (batch, tokens, features) or (batch, features) to (batch, classes); "
                      "choose another exit point")


def _pooled_features(gm: GraphModule, cuts: Sequence[Cut], samples: Any, batch_size: int
                     ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Pooled features at every cut and the model's output, on every sample."""
    tapped = ir.tap(gm, [c.node for c in cuts])
    feats: list[list[torch.Tensor]] = [[] for _ in cuts]
    outs = []
    with torch.no_grad():
        for batch in samples.batches(batch_size):
            output, values = tapped(*batch)
            outs.append(ir.flatten_outputs(output)[0])
            for i, (cut, value) in enumerate(zip(cuts, values)):
                feats[i].append(pool(value, _channel_dim(cut)))
    return [torch.cat(f) for f in feats], torch.cat(outs)


def _train_head(features: torch.Tensor, teacher: torch.Tensor, channel_dim: int, classes: int,
                config: EarlyExitConfig, seed: int) -> ExitHead:
    """A linear head on pooled features distilled from the teacher's logits; trained on standardised features,
    then the standardisation is folded into its weights. It trains in float32 at least and is stored in the
    network's dtype."""
    dtype = torch.promote_types(features.dtype, torch.float32)
    head = ExitHead(features.shape[1], classes, channel_dim).to(features.dtype)
    features, teacher = features.to(dtype), teacher.to(dtype)
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    target = F.softmax(teacher / config.temperature, dim=-1)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        linear = nn.Linear(features.shape[1], classes, dtype=dtype)
    optimizer = torch.optim.Adam(linear.parameters(), lr=config.lr)
    batch = min(256, len(x))
    for _ in range(config.steps):
        index = torch.randint(0, len(x), (batch,), generator=generator)
        loss = F.kl_div(F.log_softmax(linear(x[index]) / config.temperature, dim=-1), target[index],
                        reduction="batchmean") * config.temperature ** 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        head.linear.weight.copy_(linear.weight / std)
        head.linear.bias.copy_(linear.bias - (linear.weight * (mean / std)).sum(1))
    return head.eval()


class _PrefixHead(nn.Module):
    def __init__(self, prefix: GraphModule, head: ExitHead | None):
        super().__init__()
        self.prefix = prefix
        self.head = head

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feature = self.prefix(*inputs)
        return feature if self.head is None else self.head(feature)


def _measure_costs(gm: GraphModule, cuts: Sequence[Cut], heads: Sequence[ExitHead], context: PassContext,
                   config: EarlyExitConfig) -> dict[str, Any]:
    """Measured latency of the whole model and of every prefix with and without its head, interleaved."""
    probe = context.latency_probe
    if probe is None:
        raise ConfigError("early_exit needs a latency probe (the backend to plan for); run it through "
                          "depthfold.optimize(..., backend=...)")
    inputs = tuple(context.example_inputs)
    models: dict[str, nn.Module] = {"original": gm}
    for i, cut in enumerate(cuts):
        prefix = split_graph(gm, [cut])[0]
        models[f"prefix{i}"] = _PrefixHead(prefix, None).eval()
        models[f"exit{i}"] = _PrefixHead(prefix, heads[i]).eval()
    timing = probe.open().compare(models, inputs, rounds=config.rounds, baseline="original", min_sample_ms=20.0)
    full = float(timing["measurements"]["original"].median_ms)
    ratio = {k: float(np.median(v["samples"])) for k, v in timing["ratios"].items()}
    exit_ms = [full * ratio[f"exit{i}"] for i in range(len(cuts))]
    head_ms = [max(0.0, full * (ratio[f"exit{i}"] - ratio[f"prefix{i}"])) for i in range(len(cuts))]
    return {"full_ms": full, "exit_ms": exit_ms, "head_ms": head_ms, "backend": probe.backend}


class _Cascade:
    """Held-out confidences and correctness of each candidate exit, and the measured costs: evaluates and
    calibrates cascades of exits (a sample leaves at the first exit whose confidence reaches its threshold)."""

    def __init__(self, scores: np.ndarray, right: np.ndarray, final_right: np.ndarray, exit_ms: Sequence[float],
                 head_ms: Sequence[float], full_ms: float, tolerance: float):
        self.scores, self.right, self.final_right = scores, right, final_right
        self.exit_ms, self.head_ms, self.full_ms = list(exit_ms), list(head_ms), full_ms
        self.tolerance = tolerance
        self.n = scores.shape[1]

    def evaluate(self, chosen: Sequence[int], thresholds: Sequence[float]) -> dict[str, Any]:
        """Exit rates (the last entry: the end of the network), loss vs the original and expected latency."""
        pending = np.ones(self.n, dtype=bool)
        right = np.zeros(self.n, dtype=bool)
        rates, expected, heads_so_far = [], 0.0, 0.0
        for exit_index, t in zip(chosen, thresholds):
            leave = pending & (self.scores[exit_index] >= t)
            right[leave] = self.right[exit_index][leave]
            rates.append(float(leave.mean()))
            expected += leave.mean() * (self.exit_ms[exit_index] + heads_so_far)
            heads_so_far += self.head_ms[exit_index]
            pending &= ~leave
        right[pending] = self.final_right[pending]
        rates.append(float(pending.mean()))
        expected += pending.mean() * (self.full_ms + heads_so_far)
        loss = float(self.final_right.mean() - right.mean())
        return {"rates": rates, "loss": loss, "expected_ms": float(expected),
                "accuracy": float(right.mean()), "original_accuracy": float(self.final_right.mean())}

    def calibrate(self, chosen: Sequence[int]) -> list[float]:
        """Thresholds for the exits ``chosen`` (in network order): start with every gate closed, then lower one
        gate at a time, each time the move saving the most expected latency per unit of loss added, while the
        loss stays within the tolerance."""
        levels = [np.unique(np.quantile(self.scores[i], np.linspace(0.0, 1.0, _LEVELS + 1)[:-1])) for i in chosen]
        closed = [math.inf] * len(chosen)
        current = list(closed)
        state = self.evaluate(chosen, current)
        while True:
            best, best_gain = None, 0.0
            for k, options in enumerate(levels):
                for t in options[options < current[k]]:
                    trial = current[:k] + [float(t)] + current[k + 1:]
                    result = self.evaluate(chosen, trial)
                    if result["loss"] > self.tolerance + 1e-12:
                        continue
                    saved = state["expected_ms"] - result["expected_ms"]
                    if saved <= 0:
                        continue
                    gain = saved / max(result["loss"] - state["loss"], 1e-9)
                    if gain > best_gain:
                        best, best_gain = (k, float(t), result), gain
            if best is None:
                return [min(t, 1.0 + 1e-6) for t in current]
            k, t, state = best
            current[k] = t

    def select(self, count: int) -> tuple[list[int], list[float]]:
        """Greedy forward selection of ``count`` exits: each round adds the candidate whose calibrated cascade
        has the lowest expected latency."""
        chosen: list[int] = []
        thresholds: list[float] = []
        for _ in range(count):
            best = None
            for i in range(len(self.exit_ms)):
                if i in chosen:
                    continue
                trial = sorted([*chosen, i])
                t = self.calibrate(trial)
                cost = self.evaluate(trial, t)["expected_ms"]
                if best is None or cost < best[0]:
                    best = (cost, trial, t)
            if best is None:
                break
            _, chosen, thresholds = best
        return chosen, thresholds

    def best_reachable(self, candidates: Sequence[int]) -> dict[str, Any]:
        """The exit and threshold with the smallest loss at which at least one held-out sample leaves."""
        best: dict[str, Any] | None = None
        for i in candidates:
            order = np.argsort(-self.scores[i])
            top = order[: max(1, self.n // 100)]
            loss = float((self.final_right[top].sum() - self.right[i][top].sum()) / self.n)
            if best is None or loss < best["loss"]:
                best = {"exit": i, "rate": len(top) / self.n, "loss": loss}
        assert best is not None
        return best


def _report(cuts: Sequence[Cut], chosen: Sequence[int], thresholds: Sequence[float], outcome: dict[str, Any],
            costs: dict[str, Any], problem: _Cascade, config: EarlyExitConfig, calib: Any, labelled: bool,
            head_logits: Sequence[torch.Tensor], reference: np.ndarray) -> dict[str, Any]:
    full = costs["full_ms"]
    agreement = [float((z.argmax(-1).numpy() == reference).mean()) for z in head_logits]
    exits = [{"after": cuts[i].name, "node": cuts[i].node, "shape": list(cuts[i].shape), "threshold": t,
              "exit_rate": outcome["rates"][k], "latency_fraction": costs["exit_ms"][i] / full,
              "head_agreement": agreement[i]}
             for k, (i, t) in enumerate(zip(chosen, thresholds))]
    candidates = [{"after": c.name, "latency_fraction": costs["exit_ms"][i] / full, "head_agreement": agreement[i]}
                  for i, c in enumerate(cuts)]
    return {
        "exits": exits, "histogram": {**{e["after"]: e["exit_rate"] for e in exits}, "final": outcome["rates"][-1]},
        "expected_compute": outcome["expected_ms"] / full, "original_ms": full, "expected_ms": outcome["expected_ms"],
        "loss": outcome["loss"], "loss_metric": "accuracy" if labelled else "agreement",
        "tolerance": config.tolerance, "accuracy": outcome["accuracy"] if labelled else None,
        "original_accuracy": outcome["original_accuracy"] if labelled else None,
        "agreement": None if labelled else outcome["accuracy"], "policy": config.policy,
        "confidence": config.confidence, "candidates": candidates if config.auto else None,
        "calibration": {"samples": len(calib.train), "held_out": len(calib.held_out), "source": calib.train.source},
        "backend": costs["backend"],
    }
