"""Numerical verification: does a transformed graph reproduce the original's outputs?

Errors are measured relative to the output scale: ``max|new - ref| / max(1, max|ref|)``. On failure
the first diverging node is located by running both graphs node by node and comparing the values of
nodes they share (by name, or through the ``depthfold.from`` lineage of a rewritten node).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Interpreter, Node

from ..errors import VerificationError
from .graph import META_FROM

__all__ = [
    "ErrorStats",
    "TOLERANCE",
    "compare_outputs",
    "check_equivalent",
    "flatten_outputs",
    "locate_divergence",
    "random_inputs_like",
    "random_like",
    "structural_check",
]

TOLERANCE = {
    # Exact rewrites reorder float32 sums (a merged conv adds k1*k2 products in another order):
    # observed error stays below 1e-5 of the output scale on the zoo; 1e-4 leaves headroom.
    torch.float32: 1e-4,
    # float64 reorderings are ~1e-12; 1e-9 still catches any real rewrite bug.
    torch.float64: 1e-9,
    # Half precision keeps ~3 significant digits.
    torch.float16: 1e-2,
    torch.bfloat16: 2e-2,
}


@dataclass(frozen=True)
class ErrorStats:
    """How far outputs are from the reference (the ``ErrorReport`` fields of STYLE.md §2)."""

    max_abs: float
    max_rel: float
    """max abs error divided by max(1, max |reference|)."""
    frac_over_1e2: float
    """Share of output elements whose abs error exceeds 1e-2."""
    frac_over_1e1: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @staticmethod
    def worst(stats: Iterable[ErrorStats]) -> ErrorStats:
        items = list(stats)
        return ErrorStats(max(s.max_abs for s in items), max(s.max_rel for s in items),
                          max(s.frac_over_1e2 for s in items), max(s.frac_over_1e1 for s in items))


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """Tensors of a (nested) output structure, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flatten_outputs(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in flatten_outputs(v)]
    if hasattr(value, "to_tuple"):  # Hugging Face ModelOutput
        return flatten_outputs(value.to_tuple())
    return []


def compare_outputs(reference: Any, candidate: Any) -> ErrorStats:
    """Error of ``candidate`` against ``reference`` (tensors or nested structures of tensors)."""
    refs, cands = flatten_outputs(reference), flatten_outputs(candidate)
    if len(refs) != len(cands):
        raise VerificationError(f"output count changed: {len(refs)} before, {len(cands)} after")
    stats = []
    for i, (r, c) in enumerate(zip(refs, cands)):
        if tuple(r.shape) != tuple(c.shape):
            raise VerificationError(f"output #{i} shape changed: {tuple(r.shape)} -> {tuple(c.shape)}")
        r64, c64 = r.detach().double(), c.detach().double()
        # A NaN or inf the reference does not have is an infinite error (NaN compares False with any
        # tolerance, so it would pass); equal values, including matching infs and NaNs, are no error.
        same = (c64 == r64) | (c64.isnan() & r64.isnan())
        diff = torch.where(same, 0.0, (c64 - r64).abs().nan_to_num(nan=math.inf, posinf=math.inf))
        finite = r64[r64.isfinite()]
        scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
        max_abs = float(diff.max()) if diff.numel() else 0.0
        frac2 = float((diff > 1e-2).double().mean()) if diff.numel() else 0.0
        frac1 = float((diff > 1e-1).double().mean()) if diff.numel() else 0.0
        stats.append(ErrorStats(max_abs, max_abs / scale, frac2, frac1))
    return ErrorStats.worst(stats) if stats else ErrorStats(0.0, 0.0, 0.0, 0.0)


def random_inputs_like(example_inputs: Sequence[torch.Tensor], count: int, *, seed: int = 0
                       ) -> list[tuple[torch.Tensor, ...]]:
    """``count`` random input tuples with the shapes, dtypes and value ranges of the examples.

    Floats: normal with the example's mean and std; integers (token ids): uniform over the example's
    observed range; booleans: coin flips.
    """
    gen = torch.Generator().manual_seed(seed)
    return [tuple(random_like(t, t.shape, gen, moments=True) for t in example_inputs) for _ in range(count)]


def random_like(example: torch.Tensor, shape: Sequence[int], generator: torch.Generator, *,
                moments: bool = False) -> torch.Tensor:
    """A random tensor of ``shape`` with the dtype of ``example``: floats standard normal (with ``moments``,
    scaled to the example's mean and std), integers (token ids) uniform over the example's observed range,
    booleans coin flips."""
    t = example
    if t.dtype.is_floating_point:
        noise = torch.randn(tuple(shape), generator=generator)
        if moments:
            std = float(t.float().std()) if t.numel() > 1 else 1.0
            noise = noise * (std or 1.0) + float(t.float().mean())
        return noise.to(t.dtype)
    if t.dtype == torch.bool:
        return torch.rand(tuple(shape), generator=generator) > 0.5
    lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 0)  # min() of nothing raises
    return torch.randint(lo, hi + 1, tuple(shape), generator=generator, dtype=t.dtype)


def _tolerance(inputs: Sequence[Sequence[torch.Tensor]]) -> float:
    dtypes = {t.dtype for batch in inputs for t in batch if t.dtype.is_floating_point}
    return max((TOLERANCE.get(d, 1e-4) for d in dtypes), default=TOLERANCE[torch.float32])


def check_equivalent(before: GraphModule, after: GraphModule, inputs: Sequence[Sequence[torch.Tensor]],
                     *, rtol: float | None = None, what: str = "transformed graph",
                     reference: Sequence[Any] | None = None) -> tuple[ErrorStats, list[Any]]:
    """Compare both graphs on every input tuple; raise ``VerificationError`` naming the diverging node.

    Args:
        reference: ``before``'s outputs on ``inputs`` if already known (saves one forward per input).

    Returns:
        The worst error over all inputs, and ``after``'s outputs (the next check's ``reference``).
    """
    tol = _tolerance(inputs) if rtol is None else rtol
    worst: list[ErrorStats] = []
    outputs: list[Any] = []
    with torch.no_grad():
        for i, batch in enumerate(inputs):
            expected = reference[i] if reference is not None else before(*batch)
            got = after(*batch)
            outputs.append(got)
            stats = compare_outputs(expected, got)
            worst.append(stats)
            if stats.max_rel > tol:
                node, node_err = locate_divergence(before, after, batch, tol)
                where = (f"; first diverging node: {node!r} (relative error {node_err:.2e})"
                         if node else "")
                raise VerificationError(
                    f"{what} is not equivalent to the original: output relative error "
                    f"{stats.max_rel:.2e} > tolerance {tol:.0e} (max abs {stats.max_abs:.3e}){where}")
    return ErrorStats.worst(worst), outputs


class _Recorder(Interpreter):
    def __init__(self, gm: GraphModule):
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor) and n.op == "call_function":
            self.values[n.name] = result.detach()
        return result


def locate_divergence(before: GraphModule, after: GraphModule, inputs: Sequence[torch.Tensor],
                      tol: float) -> tuple[str | None, float]:
    """The first node (graph order of ``after``) whose value differs from its counterpart in ``before``.

    A node's counterpart has the same name, or is the last source named in its ``depthfold.from``.
    """
    rec_before, rec_after = _Recorder(before), _Recorder(after)
    with torch.no_grad():
        rec_before.run(*inputs)
        rec_after.run(*inputs)
    for node in after.graph.nodes:
        value = rec_after.values.get(node.name)
        if value is None:
            continue
        counterpart = node.name
        if counterpart not in rec_before.values and META_FROM in node.meta:
            counterpart = node.meta[META_FROM][1][-1]
        ref = rec_before.values.get(counterpart)
        if ref is None or ref.shape != value.shape or not ref.dtype.is_floating_point:
            continue
        err = compare_outputs(ref, value).max_rel
        if err > tol:
            return node.name, err
    return None, 0.0


def structural_check(gm: GraphModule) -> None:
    """Lint the fx graph and check every ``get_attr`` resolves; raise ``VerificationError`` if not."""
    try:
        gm.graph.lint()
    except Exception as err:
        raise VerificationError(f"graph is malformed: {err}") from err
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            try:
                module = gm.get_submodule(owner) if owner else gm
            except AttributeError:
                module = None
            if module is None or not hasattr(module, attr):
                raise VerificationError(f"node {node.name!r} reads missing attribute {node.target!r}")
