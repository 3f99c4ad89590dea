"""LaCo layer collapse: merge runs of consecutive transformer blocks into one by adding their parameter deltas.

Idea (Yang et al., "LaCo: Large Language Model Pruning via Layer Collapse", arXiv:2402.11187): blocks of one
stack share a structure, and the later ones change the residual stream by small differences of the same
shape. Reserving-Differences-while-Seeking-Common (RDSC) merges ``m`` blocks following block ``l`` into it,

    theta*_l = theta_l + sum_{k=1..m} (theta_{l+k} - theta_l),

over every parameter (norm weights included), and removes blocks ``l+1 .. l+m``. Working down from the top,
a merge is kept only if the output on calibration samples stays similar to the original's (mean per-token
cosine >= ``threshold``); then the next candidate starts ``interval`` blocks lower, else one lower.

Every merge is computed from a snapshot of the weights before it (the public notebooks update ``theta_l`` in
place while summing, which turns the collapse into a replacement by the last block). Exactness: APPROXIMATE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.fx import GraphModule

from .. import ir
from ..errors import ConfigError
from .base import Change, Exactness, PassContext, PassResult, Skip
from .common.calibration import calibration_split
from .common.metrics import batched_outputs, check_metrics, evaluate, token_cosine
from .common.stream import bypass
from .registry import register_pass

__all__ = ["CollapseBlocksConfig", "collapse_blocks"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CollapseBlocksConfig:
    layers: int = 2
    """Blocks each merge collapses into one (LaCo's C): the first of them and the ``layers - 1`` after it."""
    threshold: float = 0.9
    """Keep a merge only if the output's mean per-token cosine to the original stays at least this."""
    interval: int = 2
    """After a kept merge the next candidate starts this many blocks lower (LaCo's I; a run may then include
    the block just merged into)."""
    lowest: int = 1
    """The lowest block a merge may start at (LaCo's L; the first block is usually too important)."""
    highest: int = -1
    """The highest block a merge may reach (LaCo's H; -1: the last block)."""
    max_merges: int = 0
    """Stop after this many kept merges (0: no limit)."""
    eval_samples: int = 64
    train_samples: int = 32
    """Calibration samples each candidate merge is scored on."""
    batch_size: int = 8
    metrics: tuple[str, ...] = ("token_cosine", "cosine", "kl", "perplexity")

    def __post_init__(self) -> None:
        if self.layers < 2:
            raise ConfigError(f"collapse_blocks: layers must be at least 2 (blocks per merge), got {self.layers}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ConfigError(f"collapse_blocks: threshold is a cosine similarity in [-1, 1], got {self.threshold}")
        if self.interval < 1 or self.lowest < 0 or self.max_merges < 0:
            raise ConfigError("collapse_blocks: interval must be >= 1, lowest >= 0 and max_merges >= 0")
        check_metrics(self.metrics)


@register_pass("collapse_blocks", exactness=Exactness.APPROXIMATE, config=CollapseBlocksConfig, uses_context=True)
def collapse_blocks(gm: GraphModule, config: CollapseBlocksConfig, context: PassContext) -> PassResult:
    """Merge runs of consecutive transformer blocks into one by adding their parameter differences (LaCo)."""
    stack = ir.find_stack(gm)
    highest = len(stack) - 1 if config.highest < 0 else min(config.highest, len(stack) - 1)
    if highest - config.lowest + 1 < config.layers:
        raise ConfigError(f"collapse_blocks: blocks {config.lowest}..{highest} of {stack.prefix!r} "
                          f"({len(stack)} blocks) hold fewer than layers={config.layers}; lower 'layers' or widen "
                          "lowest/highest")
    calib = calibration_split(context.data, tuple(context.example_inputs), names=ir.input_names(gm),
                              free_dims=ir.free_dims(gm), eval_samples=config.eval_samples,
                              train_samples=config.train_samples, batch_size=config.batch_size, seed=context.seed)
    teacher_train = batched_outputs(gm, calib.train, calib.batch_size)
    current = gm
    merges: list[dict[str, object]] = []
    tried: list[dict[str, object]] = []
    skipped: list[Skip] = []
    start = highest - config.layers + 1
    while start >= config.lowest and (not config.max_merges or len(merges) < config.max_merges):
        run = [stack.blocks[i] for i in range(start, start + config.layers)]
        problem = _mismatch(run, current)
        if problem is not None:
            skipped.append(Skip(f"blocks {start}..{start + config.layers - 1}", problem))
            start -= 1
            continue
        candidate = _merge(current, run)
        similarity = token_cosine(teacher_train, batched_outputs(candidate, calib.train, calib.batch_size),
                                  calib.train)
        tried.append({"blocks": [b.index for b in run], "similarity": similarity})
        logger.debug("collapse_blocks: blocks %d..%d similarity %.4f", start, start + config.layers - 1, similarity)
        if similarity >= config.threshold:
            current = candidate
            merges.append({"into": run[0].path, "blocks": [b.index for b in run], "similarity": similarity})
            start -= config.interval
        else:
            start -= 1
    report: dict[str, object] = {"blocks": len(stack), "stack": stack.prefix, "merges": merges, "tried": tried,
                                 "threshold": config.threshold,
                                 "calibration": {"samples": len(calib.train), "held_out": len(calib.held_out),
                                                 "synthetic": calib.synthetic}}
    if not merges:
        best = max((t["similarity"] for t in tried), default=None)  # type: ignore[type-var]
        logger.warning("collapse_blocks: no merge reached threshold %.3f (best similarity %s); model unchanged",
                       config.threshold, f"{best:.4f}" if best is not None else "n/a")
        report["best_similarity"] = best
        return PassResult(ir.clone(gm), skipped=skipped, report=report)
    teacher = batched_outputs(gm, calib.held_out, calib.batch_size)
    student = batched_outputs(current, calib.held_out, calib.batch_size)
    report["quality"] = {k: v for k, v in evaluate(teacher, student, calib.held_out, config.metrics).items()
                         if v is not None}
    report["remaining_blocks"] = len(stack) - sum(config.layers - 1 for _ in merges)
    changes = [Change(kind="collapse_blocks", removed=tuple(stack.blocks[i].path for i in m["blocks"][1:]),  # type: ignore[index]
                      added=(), detail=m) for m in merges]
    logger.info("collapse_blocks: %d merge(s) of %d blocks each, %d -> %d blocks", len(merges), config.layers,
                len(stack), report["remaining_blocks"])
    return PassResult(current, changes=changes, skipped=skipped, report=report)


def _tensor(gm: GraphModule, target: str) -> torch.Tensor | None:
    owner, _, attr = target.rpartition(".")
    try:
        return getattr(gm.get_submodule(owner) if owner else gm, attr)
    except AttributeError:
        return None


def _mismatch(run: list[ir.TransformerBlock], current: GraphModule) -> str | None:
    """Why the blocks of ``run`` cannot be merged (different parameters, shapes or shared weights), else None."""
    names = set(run[0].params)
    for block in run[1:]:
        if set(block.params) != names:
            return f"{block.path} has other parameters than {run[0].path}: {sorted(set(block.params) ^ names)[:4]}"
    for block in run:
        for rel, target in block.params.items():
            tensor = _tensor(current, target)
            if tensor is None:
                return f"{target} is no longer in the graph"
            if tensor.shape != _tensor(current, run[0].params[rel]).shape:  # type: ignore[union-attr]
                return f"{target} has shape {tuple(tensor.shape)}, {run[0].params[rel]} another"
    for block in run:
        shared = sorted(str(n.target) for n in current.graph.nodes if n.op == "get_attr"
                        and str(n.target) in block.params.values() and any(u.name not in block.nodes for u in n.users))
        if shared:
            return f"{shared[0]} is also read outside {block.path}"
    return None


def _merge(gm: GraphModule, run: list[ir.TransformerBlock]) -> GraphModule:
    """A copy of ``gm`` with ``run[0]``'s parameters = RDSC merge of the run, and the rest of the run bypassed."""
    out = ir.clone(gm)
    first = run[0]
    snapshot = {rel: _tensor(gm, target).detach().clone() for rel, target in first.params.items()}  # type: ignore[union-attr]
    nodes = {str(n.target): n for n in out.graph.nodes if n.op == "get_attr"}
    for rel, target in first.params.items():
        base = snapshot[rel]
        merged = base + sum(_tensor(gm, b.params[rel]).detach() - base for b in run[1:])  # type: ignore[union-attr]
        ir.set_param(out, nodes[target], merged)
    bypass(out, run[-1].output, first.output)
    ir.remove_dead(out)
    return out
