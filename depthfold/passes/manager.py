"""Run a pipeline of passes with checks after each one: lint, structure, and numerics for exact passes.

After every pass the manager lints the fx graph and checks its attributes, re-annotates shapes, and
for an EXACT pass compares the new graph with the one before it on the example inputs plus random
inputs of the same shapes (``VerificationError`` naming the first diverging node if it drifts).
It records wall time and node/parameter/FLOP counts before and after each pass.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from .. import ir
from ..errors import DepthfoldError, PassError, PreconditionError, VerificationError
from .base import Exactness, PassContext, PassResult
from .registry import PassSpec, parse_pass

__all__ = ["PassManager", "PassRecord", "PipelineResult"]

logger = logging.getLogger(__name__)


@dataclass
class PassRecord:
    """What one pass run did, for reports."""

    name: str
    config: dict[str, Any]
    exact: bool
    changed: bool
    changes: list[dict[str, Any]]
    skipped: list[dict[str, str]]
    error: dict[str, float] | None
    seconds: float
    before: dict[str, int]
    after: dict[str, int]
    details: dict[str, Any] = field(default_factory=dict)
    """The pass's own report (``PassResult.report``), e.g. LayerMerge's plan and tables."""

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["max_abs_error"] = self.error["max_abs"] if self.error else None
        return out


@dataclass
class PipelineResult:
    graph_module: GraphModule
    records: list[PassRecord] = field(default_factory=list)


@dataclass
class _GraphState:
    """What is already known about the current graph, so the next pass does not recompute it."""

    stats: dict[str, int]
    outputs: list[Any] | None
    """Outputs on the check inputs, when the last pass was verified."""


class PassManager:
    """Runs passes in order; ``max_steps > 1`` repeats the pipeline until no pass changes anything.

    Args:
        passes: names, ``"name:key=value"`` specs, ``(name, config)`` tuples or ``PassSpec`` objects.
        max_steps: pipeline repetitions at most; idempotent passes run once.
        verify: check exact passes numerically (on by default; turning it off is for benchmarking).
        random_inputs: random input tuples used in addition to the example inputs.
        dump_dir: if set, ``<step>_<pass>.before.py`` / ``.after.py`` graph code is written there.
    """

    def __init__(self, passes: Sequence[Any], *, max_steps: int = 1, verify: bool = True,
                 random_inputs: int = 2, dump_dir: str | Path | None = None, progress: bool = False,
                 context: PassContext | None = None):
        self.specs: list[PassSpec] = [parse_pass(p) for p in passes]
        self.max_steps = max_steps
        self.verify = verify
        self.random_inputs = random_inputs
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.progress = progress
        self.context = context
        self._check_order()

    def _check_order(self) -> None:
        seen: set[str] = set()
        for spec in self.specs:
            missing = [r for r in spec.info.requires if r not in seen]
            if missing:
                raise PreconditionError(f"pass {spec.name!r} requires {', '.join(map(repr, missing))} "
                                        f"earlier in the pipeline; add it before {spec.name!r}")
            seen.add(spec.name)
        names = [s.name for s in self.specs]
        if "early_exit" in names and names.index("early_exit") < len(names) - 1:
            later = names[names.index("early_exit") + 1]
            raise PreconditionError(f"early_exit must be the last pass: passes do not rewrite inside its torch.cond "
                                    f"branches; run {later!r} before early_exit")

    def run(self, gm: GraphModule, example_inputs: Sequence[torch.Tensor]) -> PipelineResult:
        """Run the pipeline on ``gm`` (which is not modified) and return the final graph and records."""
        inputs = tuple(example_inputs)
        context = self.context or PassContext()
        context = dataclasses.replace(context, example_inputs=context.example_inputs or inputs,
                                      original=gm if context.original is None else context.original)
        check_inputs = [inputs, *ir.random_inputs_like(inputs, self.random_inputs, seed=0)]
        current = gm
        state = _GraphState(ir.graph_stats(gm, inputs), None)
        records: list[PassRecord] = []
        done_once: set[str] = set()
        steps = []
        for step in range(self.max_steps):
            steps.extend((step, spec) for spec in self.specs)
        bar = _progress(len(steps), self.progress)
        changed_in_step: dict[int, bool] = {}
        for index, (step, spec) in enumerate(steps):
            if step > 0 and not changed_in_step.get(step - 1, False):
                break
            bar.update(1)
            if spec.info.idempotent and spec.name in done_once:
                continue
            record, current, state = self._run_one(index, spec, current, state, inputs, check_inputs,
                                                   [r.name for r in records], context)
            records.append(record)
            done_once.add(spec.name)
            changed_in_step[step] = changed_in_step.get(step, False) or record.changed
        bar.close()
        return PipelineResult(current, records)

    def _run_one(self, index: int, spec: PassSpec, gm: GraphModule, state: _GraphState,
                  inputs: tuple[torch.Tensor, ...], check_inputs: list[tuple[torch.Tensor, ...]],
                  previous: list[str], context: PassContext) -> tuple[PassRecord, GraphModule, _GraphState]:
        before = state.stats
        self._dump(index, spec.name, "before", gm)
        start = time.perf_counter()
        try:
            if spec.info.uses_context:
                result = spec.info.fn(gm, spec.config, context)
            else:
                result = spec.info.fn(gm, spec.config)
        except DepthfoldError:
            raise
        except Exception as err:
            after_what = f" (after {', '.join(previous)})" if previous else ""
            raise PassError(f"pass {spec.name!r}{after_what} raised {type(err).__name__}: {err}") from err
        if not isinstance(result, PassResult) or result.graph_module is gm:
            raise PassError(f"pass {spec.name!r} must return a PassResult holding a new graph module "
                            "(passes are pure: clone, edit the clone, return it)")
        out = result.graph_module
        out.recompile()
        ir.structural_check(out)
        try:
            ir.annotate(out, inputs)
        except Exception as err:  # the new graph does not run: the pass is at fault, say which
            text = str(err).strip()
            raise PassError(f"pass {spec.name!r} produced a graph that fails on the example inputs: "
                            f"{type(err).__name__}: {text.splitlines()[0] if text else ''}") from err
        exact = spec.info.exactness is Exactness.EXACT
        error = result.error
        outputs = None
        if self.verify or not exact:
            try:
                if exact:
                    error, outputs = ir.check_equivalent(gm, out, check_inputs, reference=state.outputs,
                                                         what=f"the output of {spec.name!r}")
                elif error is None:
                    with torch.no_grad():
                        error = ir.compare_outputs(gm(*inputs), out(*inputs))
            except VerificationError as err:
                raise VerificationError(f"pass {spec.name!r} broke numerical equivalence: {err}") from err
        seconds = time.perf_counter() - start
        self._dump(index, spec.name, "after", out)
        after = ir.graph_stats(out, inputs)
        logger.info("%s: %d changed, %d skipped, %.2f s, nodes %d -> %d", spec.name, len(result.changes),
                    len(result.skipped), seconds, before["nodes"], after["nodes"])
        for skip in result.skipped:
            logger.debug("%s: skipped %s: %s", spec.name, skip.site, skip.reason)
        record = PassRecord(
            name=spec.name, config=dataclasses.asdict(spec.config), exact=exact, changed=result.modified,
            changes=[c.to_dict() for c in result.changes], skipped=[s.to_dict() for s in result.skipped],
            error=error.to_dict() if error else None, seconds=seconds, before=before, after=after,
            details=result.report)
        return record, out, _GraphState(after, outputs)

    def _dump(self, index: int, name: str, when: str, gm: GraphModule) -> None:
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{index:02d}_{name}.{when}.py").write_text(gm.code)


def _progress(total: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="passes", unit="pass", disable=not enabled, leave=False)
