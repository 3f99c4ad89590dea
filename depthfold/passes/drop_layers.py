"""Static skip insertion: remove whole transformer blocks, or only their attention or MLP sublayers.

Idea: in a residual network ``h_{l+1} = h_l + f_l(h_l)`` a block whose output stays close to its input adds
little; removing it keeps the residual stream (``h_{l+1} = h_l``), deletes the block's compute and its
parameters. Which blocks, by ``strategy``:

* ``greedy`` — ShortGPT's Block Influence, ``BI_l = 1 - E[cos(h_l, h_{l+1})]`` over calibration tokens; the
  ``n`` lowest go (Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You
  Expect", arXiv:2403.03853).
* ``contiguous`` — Gromov et al.'s angular distance ``arccos(cos(h_l, h_{l+n})) / pi`` of every run of ``n``
  consecutive blocks; the closest run goes ("The Unreasonable Ineffectiveness of the Deeper Layers",
  arXiv:2403.17887).
* ``spread`` — ``n`` blocks evenly spaced between the first and the last (no data needed).

``sublayer=attention`` (or ``mlp``) scores and removes only that residual sublayer of each chosen block;
dropping a block's attention keeps its MLP. Exactness: APPROXIMATE (error and task metrics reported; follow
with ``recover`` to distil the original back in).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from torch.fx import GraphModule

from .. import ir
from ..errors import ConfigError
from .base import Change, Exactness, PassContext, PassResult
from .common.calibration import calibration_split
from .common.metrics import batched_outputs, check_metrics, evaluate, token_cosine
from .common.stream import angular_distance, bypass, stream_states
from .registry import register_pass

__all__ = ["DropLayersConfig", "drop_layers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DropLayersConfig:
    n: int = 1
    """How many blocks (or sublayers, with ``sublayer``) to remove."""
    strategy: Literal["greedy", "contiguous", "spread"] = "greedy"
    """``greedy``: lowest Block Influence (ShortGPT); ``contiguous``: the run of ``n`` blocks with the smallest
    angular distance (Gromov et al.); ``spread``: evenly spaced."""
    sublayer: Literal["block", "attention", "mlp"] = "block"
    """What to remove of each chosen block: all of it, its attention sublayer or its MLP sublayer."""
    layers: tuple[int, ...] = ()
    """Remove exactly these block indices (``layers=3+5``) instead of choosing; ``n`` and ``strategy`` unused."""
    eval_samples: int = 64
    """Calibration samples held out to report the task metrics on."""
    train_samples: int = 64
    """Calibration samples the scores are measured on."""
    batch_size: int = 8
    metrics: tuple[str, ...] = ("token_cosine", "cosine", "kl", "perplexity")
    """Reported on the held-out samples, original vs result (see ``passes.common.metrics``)."""

    def __post_init__(self) -> None:
        if not self.layers and self.n < 1:
            raise ConfigError(f"drop_layers: n must be at least 1, got {self.n} (or give layers=...)")
        if any(i < 0 for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"drop_layers: layers must be distinct block indices >= 0, got {list(self.layers)}")
        if self.eval_samples < 1 or self.train_samples < 1 or self.batch_size < 1:
            raise ConfigError("drop_layers: eval_samples, train_samples and batch_size must be at least 1")
        check_metrics(self.metrics)


@register_pass("drop_layers", exactness=Exactness.APPROXIMATE, config=DropLayersConfig, uses_context=True)
def drop_layers(gm: GraphModule, config: DropLayersConfig, context: PassContext) -> PassResult:
    """Remove transformer blocks or their attention/MLP sublayers, keeping the residual stream (ShortGPT,
    Gromov et al.)."""
    stack = ir.find_stack(gm)
    units = _units(stack, config.sublayer)
    count = len(config.layers) if config.layers else config.n
    if config.layers and max(config.layers) >= len(stack):
        raise ConfigError(f"drop_layers: layers={list(config.layers)} but the model has {len(stack)} blocks "
                          f"(indices 0..{len(stack) - 1})")
    if count > len(units):
        raise ConfigError(f"drop_layers: cannot remove {count} {config.sublayer} unit(s); the model has "
                          f"{len(units)} ({stack.prefix})")
    if config.sublayer == "block" and count >= len(stack):
        raise ConfigError(f"drop_layers: removing all {len(stack)} blocks of {stack.prefix!r} leaves no "
                          "transformer; drop fewer")
    calib = calibration_split(context.data, tuple(context.example_inputs), names=ir.input_names(gm),
                              free_dims=ir.free_dims(gm), eval_samples=config.eval_samples,
                              train_samples=config.train_samples, batch_size=config.batch_size, seed=context.seed)
    scores: dict[int, float] = {}
    if config.layers:
        chosen = sorted(config.layers)
        chosen = [i for i in chosen if i in units]
        missing = sorted(set(config.layers) - set(chosen))
        if missing:
            raise ConfigError(f"drop_layers: blocks {missing} have no {config.sublayer} sublayer to remove")
    elif config.strategy == "spread":
        chosen = _spread(sorted(units), count)
    else:
        names = sorted({name for span in units.values() for name in span})
        states = stream_states(gm, calib.train, names, calib.batch_size)
        if config.strategy == "greedy":
            scores = {i: 1.0 - token_cosine(states[a], states[b], calib.train) for i, (a, b) in units.items()}
            chosen = sorted(sorted(scores, key=lambda i: (scores[i], i))[:count])
        else:
            order = sorted(units)
            runs = {order[k]: angular_distance(states[units[order[k]][0]], states[units[order[k + count - 1]][1]],
                                               calib.train)
                    for k in range(len(order) - count + 1)}
            scores = runs
            start = min(runs, key=lambda i: (runs[i], i))
            chosen = order[order.index(start):order.index(start) + count]
    out = ir.clone(gm)
    before = {n.name for n in out.graph.nodes}
    # Later units first, so an earlier unit's output is still the node later units were bypassed onto.
    for index in sorted(chosen, reverse=True):
        start, end = units[index]
        bypass(out, end, start)
    ir.remove_dead(out)
    removed = before - {n.name for n in out.graph.nodes}
    changes = [Change(kind=f"drop_{config.sublayer}", removed=tuple(sorted(n for n in removed
                                                                          if n in stack.blocks[i].nodes)),
                      added=(), detail={"block": stack.blocks[i].path, "index": i,
                                        **({"score": scores[i]} if i in scores else {})})
               for i in chosen]
    teacher = batched_outputs(gm, calib.held_out, calib.batch_size)
    student = batched_outputs(out, calib.held_out, calib.batch_size)
    quality = {k: v for k, v in evaluate(teacher, student, calib.held_out, config.metrics).items() if v is not None}
    logger.info("drop_layers: removed %s %s of %d blocks (%s); held-out %s", config.sublayer, chosen, len(stack),
                config.strategy if not config.layers else "given", quality)
    report = {"blocks": len(stack), "stack": stack.prefix, "unit": config.sublayer,
              "strategy": "given" if config.layers else config.strategy, "removed": chosen,
              "scores": {str(k): v for k, v in scores.items()},
              "score": {"greedy": "block influence 1 - cos(h_in, h_out)",
                        "contiguous": "angular distance of the run starting here"}.get(config.strategy, None)
              if not config.layers else None,
              "quality": quality, "calibration": {"samples": len(calib.train), "held_out": len(calib.held_out),
                                                  "synthetic": calib.synthetic}}
    return PassResult(out, changes=changes, report=report)


def _units(stack: ir.TransformerStack, sublayer: str) -> dict[int, tuple[str, str]]:
    """Block index -> (input node, output node) of what would be removed."""
    units: dict[int, tuple[str, str]] = {}
    for block in stack.blocks:
        if sublayer == "block":
            units[block.index] = (block.input, block.output)
        elif (sub := block.sublayer(sublayer)) is not None:
            units[block.index] = (sub.input, sub.output)
    return units


def _spread(indices: list[int], count: int) -> list[int]:
    """``count`` of ``indices`` evenly spaced, keeping the first and last where there is room."""
    inner = indices[1:-1] if len(indices) - 2 >= count else indices
    if count == 1:
        return [inner[len(inner) // 2]]
    step = (len(inner) - 1) / (count - 1)
    return sorted({inner[round(k * step)] for k in range(count)})
