"""The one latency-measurement helper: warm-up, repeated wall-clock samples, robust statistics.

Every latency number depthfold produces (whole models in reports and benchmarks, single candidate layers in
LayerMerge's latency tables) goes through :func:`time_callable` or :func:`compare_interleaved`, so they all
share one clock (``time.perf_counter_ns``), one warm-up rule and one set of statistics.

Statistics: ``median_ms`` and ``p90_ms`` are the headline numbers; quantiles use linear interpolation between
order statistics (NumPy's default ``percentile`` method), so ``p90`` of ``[1..10]`` is ``9.1``.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, suggest

__all__ = ["Measurement", "time_callable", "compare_interleaved", "quantile", "spread", "peak_gflops", "efficiency"]

# The clock, looked up at call time so tests can substitute a deterministic one.
_now_ns: Callable[[], int] = time.perf_counter_ns


def quantile(values: Sequence[float], q: float) -> float:
    """Return the ``q``-quantile (0 <= q <= 1) of ``values`` with linear interpolation (NumPy's default).

    Raises:
        ConfigError: ``values`` is empty or ``q`` is outside [0, 1].
    """
    if not values:
        raise ConfigError("quantile of an empty sequence is undefined; measure at least one sample")
    if not 0.0 <= q <= 1.0:
        raise ConfigError(f"quantile q={q} is outside [0, 1]")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> dict[str, float]:
    """``{"median", "p10", "p90"}`` of ``values``: how reports state a ratio or a time with its spread."""
    return {"median": quantile(values, 0.5), "p10": quantile(values, 0.1), "p90": quantile(values, 0.9)}


@dataclass(frozen=True)
class Measurement:
    """Raw latency samples of one thing on one backend and device, with the settings they were taken under."""

    samples_ms: tuple[float, ...]
    """Per-run wall times in milliseconds, after warm-up, in the order they were taken."""
    warmup: int
    """Number of untimed runs before the first sample."""
    threads: int
    """Intra-op thread count the runtime was fixed to (0: the runtime's default, not fixed)."""
    backend: str
    """``"onnxruntime"``, ``"torch"``, ``"tvm"``, or a free label for plain callables."""
    device: str
    """``"cpu"`` or ``"cuda"``."""

    def __post_init__(self) -> None:
        samples = tuple(float(s) for s in self.samples_ms)
        if not samples:
            raise ConfigError("a Measurement needs at least one sample; use repeat >= 1")
        object.__setattr__(self, "samples_ms", samples)

    @property
    def n(self) -> int:
        """Number of timed samples."""
        return len(self.samples_ms)

    @property
    def median_ms(self) -> float:
        return quantile(self.samples_ms, 0.5)

    @property
    def p10_ms(self) -> float:
        return quantile(self.samples_ms, 0.1)

    @property
    def p90_ms(self) -> float:
        return quantile(self.samples_ms, 0.9)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def max_ms(self) -> float:
        return max(self.samples_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.samples_ms)

    @property
    def std_ms(self) -> float:
        """Sample standard deviation (0 for a single sample)."""
        return statistics.stdev(self.samples_ms) if self.n > 1 else 0.0

    @property
    def iqr_ms(self) -> float:
        """Inter-quartile range, p75 - p25."""
        return quantile(self.samples_ms, 0.75) - quantile(self.samples_ms, 0.25)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict: settings, statistics and the raw samples."""
        return {
            "backend": self.backend,
            "device": self.device,
            "threads": self.threads,
            "warmup": self.warmup,
            "n": self.n,
            "median_ms": self.median_ms,
            "p10_ms": self.p10_ms,
            "p90_ms": self.p90_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "mean_ms": self.mean_ms,
            "std_ms": self.std_ms,
            "iqr_ms": self.iqr_ms,
            "samples_ms": list(self.samples_ms),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Measurement:
        """Rebuild a Measurement from :meth:`to_dict` output (statistics are recomputed from the samples)."""
        try:
            return cls(
                samples_ms=tuple(data["samples_ms"]),
                warmup=int(data["warmup"]),
                threads=int(data["threads"]),
                backend=str(data["backend"]),
                device=str(data["device"]),
            )
        except KeyError as err:
            raise ConfigError(f"measurement record is missing key {err.args[0]!r}; "
                              "expected the output of Measurement.to_dict()") from err

    def __str__(self) -> str:
        return (f"{self.median_ms:.3f} ms median, p90 {self.p90_ms:.3f} ms (n={self.n}, {self.backend}/"
                f"{self.device}, {self.threads} thread{'s' if self.threads != 1 else ''})")


def _check_counts(warmup: int, repeat: int, repeat_name: str = "repeat") -> None:
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ConfigError(f"{repeat_name} must be an integer >= 1, got {repeat!r}; "
                          f"use {repeat_name}=20 or more for reported numbers")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")


def _timed(fn: Callable[[], object], sync: Callable[[], None] | None, inner: int) -> float:
    """Run ``fn`` ``inner`` times (then ``sync``) and return the mean wall time per call in ms."""
    start = _now_ns()
    for _ in range(inner):
        fn()
    if sync is not None:
        sync()
    return (_now_ns() - start) / 1e6 / inner


def time_callable(
    fn: Callable[[], object],
    *,
    warmup: int = 5,
    repeat: int = 20,
    threads: int,
    backend: str,
    device: str,
    sync: Callable[[], None] | None = None,
) -> Measurement:
    """Time ``fn()``: ``warmup`` untimed calls, then ``repeat`` timed ones.

    Args:
        fn: The work to time, with its inputs already bound (build feeds outside it).
        warmup: Untimed calls first (allocations, lazy initialisation, caches).
        repeat: Timed calls; reports use at least 20.
        threads: Thread count the runtime was fixed to; recorded, not applied here.
        backend: Label recorded in the Measurement (``"onnxruntime"``, ``"torch"``, ...).
        device: ``"cpu"`` or ``"cuda"``; recorded.
        sync: Called after each call inside the timed region, e.g. ``torch.cuda.synchronize`` for
            asynchronous devices.

    Returns:
        A Measurement with ``repeat`` samples in milliseconds.

    Raises:
        ConfigError: ``repeat < 1`` or ``warmup < 0``.
    """
    _check_counts(warmup, repeat)
    for _ in range(warmup):
        fn()
        if sync is not None:
            sync()
    samples = tuple(_timed(fn, sync, 1) for _ in range(repeat))
    return Measurement(samples_ms=samples, warmup=warmup, threads=threads, backend=backend, device=device)


def compare_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int = 20,
    warmup: int = 3,
    inner: int = 1,
    min_sample_ms: float | None = None,
    baseline: str | None = None,
    threads: int = 0,
    backend: str = "callable",
    device: str = "cpu",
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time several variants of the same work interleaved and compare them as medians of per-round ratios.

    Each round runs every variant once (``inner`` calls, averaged), in an order rotated by one each round so no
    variant always runs first or after the same neighbour. Drift in machine speed (thermal, other load) hits
    all variants of a round alike, so the per-round ratio ``t_variant / t_baseline`` cancels it; the median of
    those ratios is the number benchmarks report.

    Args:
        fns: Variant name -> callable, at least one.
        rounds: Timed rounds (samples per variant).
        warmup: Untimed rounds first, also interleaved.
        inner: Calls per variant per round; a sample is their mean (for very short callables).
        min_sample_ms: If set, ``inner`` is raised so that one sample of the baseline covers at least
            this long (probed after warm-up): single runs of a few-millisecond model jitter by ~5%.
        baseline: The variant ratios are taken against; default the first key of ``fns``.
        threads, backend, device: Recorded in each Measurement (``threads=0``: not fixed / unknown).
        sync: Called after each variant's ``inner`` calls inside the timed region (asynchronous devices).

    Returns:
        ``{"baseline": name, "rounds": int, "warmup": int, "inner": int,
        "measurements": {name: Measurement},
        "ratios": {name: {"median": float, "p10": float, "p90": float, "samples": [float, ...]}},
        "speedups": {name: float}}`` where ``ratios[name]`` summarises per-round ``t_name / t_baseline``
        (below 1: faster than the baseline) and ``speedups[name]`` is the median of per-round
        ``t_baseline / t_name`` (above 1: faster).

    Raises:
        ConfigError: no variants, an unknown baseline, ``rounds < 1``, ``warmup < 0`` or ``inner < 1``.
    """
    names = list(fns)
    if not names:
        raise ConfigError("compare_interleaved needs at least one variant in fns")
    _check_counts(warmup, rounds, "rounds")
    if isinstance(inner, bool) or not isinstance(inner, int) or inner < 1:
        raise ConfigError(f"inner must be an integer >= 1, got {inner!r}")
    base = names[0] if baseline is None else baseline
    if base not in fns:
        raise ConfigError(f"baseline {base!r} is not one of the variants {names}{suggest(base, names)}")

    def order(r: int) -> list[str]:
        k = r % len(names)
        return names[k:] + names[:k]

    for r in range(warmup):
        for name in order(r):
            for _ in range(inner):
                fns[name]()
            if sync is not None:
                sync()
    if min_sample_ms is not None:
        probe = quantile([_timed(fns[base], sync, 1) for _ in range(5)], 0.5)
        inner = max(inner, math.ceil(min_sample_ms / probe)) if probe > 0 else inner

    per_round: list[dict[str, float]] = []
    for r in range(rounds):
        # The rotation continues from the warm-up rounds.
        per_round.append({name: _timed(fns[name], sync, inner) for name in order(warmup + r)})

    return summarise_rounds(per_round, names, base, warmup=warmup, inner=inner, threads=threads, backend=backend,
                            device=device)


def summarise_rounds(per_round: Sequence[Mapping[str, float]], names: Sequence[str], baseline: str, *, warmup: int,
                     inner: int, threads: int, backend: str, device: str) -> dict[str, Any]:
    """:func:`compare_interleaved`'s result from per-round times (ms) of the variants ``names``, however they
    were taken: a Measurement per variant and the median (p10, p90) of its per-round ratios to ``baseline``."""
    measurements = {
        name: Measurement(samples_ms=tuple(t[name] for t in per_round), warmup=warmup, threads=threads,
                          backend=backend, device=device)
        for name in names
    }
    ratios: dict[str, dict[str, Any]] = {}
    speedups: dict[str, float] = {}
    for name in names:
        rs = [_ratio(t[name], t[baseline]) for t in per_round]
        ratios[name] = {**spread(rs), "samples": rs}
        speedups[name] = quantile([_ratio(t[baseline], t[name]) for t in per_round], 0.5)
    return {"baseline": baseline, "rounds": len(per_round), "warmup": warmup, "inner": inner,
            "measurements": measurements, "ratios": ratios, "speedups": speedups}


def _ratio(num: float, den: float) -> float:
    # A zero-duration sample only happens with a coarse or fake clock; keep the result finite and ordered.
    if den == 0.0:
        return 1.0 if num == 0.0 else math.inf
    return num / den


_PEAKS: dict[int, float] = {}


def peak_gflops(threads: int = 1) -> float:
    """This machine's measured float32 peak: the best GFLOP/s of square matrix products (256, 384, 512; sizes
    whose operands stay in cache) in ONNX Runtime, whose MLAS kernels run close to the FMA units' limit
    (torch's CPU BLAS reached about half of it here), on ``threads`` threads, best of 5 runs after a warm-up;
    measured once per process and thread count."""
    if threads not in _PEAKS:
        import numpy as np
        import onnxruntime
        from onnx import TensorProto, helper

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        rng = np.random.default_rng(0)
        best = 0.0
        for n in (256, 384, 512):
            graph = helper.make_graph(
                [helper.make_node("MatMul", ["a", "b"], ["c"])], "peak",
                [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("a", "b")],
                [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
            session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                                   providers=["CPUExecutionProvider"])
            feed = {k: rng.standard_normal((n, n), dtype=np.float32) for k in ("a", "b")}
            session.run(None, feed)
            ms = min(_timed(lambda s=session, f=feed: s.run(None, f), None, 5) for _ in range(5))
            best = max(best, 2 * n ** 3 / (ms * 1e-3) / 1e9)
        _PEAKS[threads] = best
    return _PEAKS[threads]


def efficiency(flops: int, median_ms: float, threads: int = 1) -> dict[str, Any]:
    """Achieved GFLOP/s of a model doing ``flops`` in ``median_ms``, against :func:`peak_gflops`."""
    achieved = flops / (median_ms * 1e-3) / 1e9 if median_ms > 0 else math.inf
    peak = peak_gflops(threads)
    return {"gflop": flops / 1e9, "median_ms": median_ms, "threads": threads, "gflops": achieved,
            "peak_gflops": peak, "fraction_of_peak": achieved / peak}
