"""The shared latency helper: statistics on controlled durations (a fake clock), never wall-clock thresholds."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from depthfold.backends import latency
from depthfold.backends.latency import Measurement, compare_interleaved, quantile, time_callable
from depthfold.errors import ConfigError


class FakeClock:
    """A clock that only moves when the timed work says so: each call 'takes' exactly the time it reports."""

    def __init__(self) -> None:
        self.now_ns = 0

    def __call__(self) -> int:
        return self.now_ns

    def advance_ms(self, ms: float) -> None:
        self.now_ns += round(ms * 1e6)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(latency, "_now_ns", fake)
    return fake


def test_time_callable_statistics_on_controlled_durations(clock: FakeClock) -> None:
    warmup_durations = [100.0, 50.0]  # slow first calls must not reach the samples
    durations = [5.0, 1.0, 3.0, 2.0, 4.0, 10.0, 6.0, 8.0, 7.0, 9.0]
    it = iter(warmup_durations + durations)
    calls = []

    def fn() -> None:
        calls.append(1)
        clock.advance_ms(next(it))

    m = time_callable(fn, warmup=2, repeat=10, threads=3, backend="fake", device="cpu")
    assert len(calls) == 12
    assert m.samples_ms == pytest.approx(tuple(durations))
    assert m.n == 10 and m.warmup == 2 and m.threads == 3 and m.backend == "fake" and m.device == "cpu"
    assert m.median_ms == pytest.approx(5.5)
    assert m.p90_ms == pytest.approx(9.1)  # linear interpolation, as numpy.percentile
    assert m.p90_ms == pytest.approx(float(np.percentile(durations, 90)))
    assert m.p10_ms == pytest.approx(float(np.percentile(durations, 10)))
    assert m.min_ms == pytest.approx(1.0) and m.max_ms == pytest.approx(10.0)
    assert m.mean_ms == pytest.approx(5.5)
    assert m.std_ms == pytest.approx(float(np.std(durations, ddof=1)))
    assert m.iqr_ms == pytest.approx(float(np.percentile(durations, 75) - np.percentile(durations, 25)))


def test_time_callable_sync_is_inside_the_timed_region(clock: FakeClock) -> None:
    m = time_callable(lambda: clock.advance_ms(1.0), warmup=1, repeat=4, threads=1, backend="fake",
                      device="cuda", sync=lambda: clock.advance_ms(2.0))
    assert m.samples_ms == pytest.approx((3.0,) * 4)


@pytest.mark.parametrize(("warmup", "repeat", "match"), [(5, 0, "repeat"), (5, -3, "repeat"), (-1, 20, "warmup"),
                                                           (5, 2.5, "repeat")])
def test_time_callable_rejects_bad_counts(warmup: int, repeat: int, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        time_callable(lambda: None, warmup=warmup, repeat=repeat, threads=1, backend="fake", device="cpu")


def test_measurement_to_dict_is_json_and_round_trips(clock: FakeClock) -> None:
    it = iter([2.0, 4.0, 6.0])
    m = time_callable(lambda: clock.advance_ms(next(it)), warmup=0, repeat=3, threads=2, backend="onnxruntime",
                      device="cpu")
    d = json.loads(json.dumps(m.to_dict()))
    assert d["n"] == 3 and d["median_ms"] == pytest.approx(4.0) and d["threads"] == 2
    assert d["samples_ms"] == pytest.approx([2.0, 4.0, 6.0])
    assert {"p90_ms", "min_ms", "mean_ms", "iqr_ms", "std_ms", "warmup", "backend", "device"} <= d.keys()
    assert Measurement.from_dict(d) == m


def test_measurement_needs_samples() -> None:
    with pytest.raises(ConfigError, match="at least one sample"):
        Measurement(samples_ms=(), warmup=0, threads=1, backend="x", device="cpu")


@given(st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=50), st.floats(0, 1))
def test_quantile_matches_numpy(values: list[float], q: float) -> None:
    assert quantile(values, q) == pytest.approx(float(np.percentile(values, q * 100)), rel=1e-9, abs=1e-9)


def test_compare_interleaved_median_of_ratios_cancels_drift(clock: FakeClock) -> None:
    # The machine slows down every round, but b always takes exactly twice as long as a in the same round:
    # raw medians differ by drift, the per-round ratio is exactly 2.
    calls: list[str] = []

    def variant(name: str, cost: float):
        def fn() -> None:
            calls.append(name)
            rnd = (len(calls) - 1) // 3  # the round this call belongs to
            clock.advance_ms(cost * (1 + rnd))
        return fn

    res = compare_interleaved({"a": variant("a", 1.0), "b": variant("b", 2.0), "c": variant("c", 0.5)},
                              rounds=9, warmup=2)
    assert res["baseline"] == "a"
    assert res["ratios"]["b"]["median"] == pytest.approx(2.0)
    assert res["ratios"]["b"]["p10"] == pytest.approx(2.0) and res["ratios"]["b"]["p90"] == pytest.approx(2.0)
    assert res["ratios"]["c"]["median"] == pytest.approx(0.5)
    assert res["ratios"]["a"]["median"] == pytest.approx(1.0)
    assert res["speedups"]["c"] == pytest.approx(2.0)
    assert len(res["ratios"]["b"]["samples"]) == 9
    for name in "abc":
        m = res["measurements"][name]
        assert isinstance(m, Measurement) and m.n == 9 and m.warmup == 2
    # Round-robin in rotated order: round r starts with variant r % 3 (warm-up rounds included).
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 11
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a", "b"]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)


def test_compare_interleaved_ratio_spread_and_named_baseline(clock: FakeClock) -> None:
    # b/a ratios per round: 1, 2, ..., 10 -> median 5.5, p10 1.9, p90 9.1 (linear interpolation).
    state = {"round": 0}

    def a() -> None:
        clock.advance_ms(1.0)

    def b() -> None:
        state["round"] += 1
        clock.advance_ms(float(state["round"]))

    res = compare_interleaved({"a": a, "b": b}, rounds=10, warmup=0, baseline="a")
    r = res["ratios"]["b"]
    assert r["samples"] == pytest.approx([float(i) for i in range(1, 11)])
    assert r["median"] == pytest.approx(5.5) and r["p10"] == pytest.approx(1.9) and r["p90"] == pytest.approx(9.1)
    res_b = compare_interleaved({"a": a, "b": b}, rounds=4, warmup=0, baseline="b")
    assert res_b["baseline"] == "b" and res_b["ratios"]["b"]["median"] == pytest.approx(1.0)


def test_compare_interleaved_inner_averages_calls(clock: FakeClock) -> None:
    res = compare_interleaved({"a": lambda: clock.advance_ms(2.0)}, rounds=3, warmup=0, inner=4)
    assert res["measurements"]["a"].samples_ms == pytest.approx((2.0, 2.0, 2.0))


def test_compare_interleaved_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="did you mean 'fused'"):
        compare_interleaved({"fused": lambda: None, "orig": lambda: None}, baseline="fuzed")
    with pytest.raises(ConfigError, match="at least one variant"):
        compare_interleaved({})
    with pytest.raises(ConfigError, match="rounds"):
        compare_interleaved({"a": lambda: None}, rounds=0)
    with pytest.raises(ConfigError, match="inner"):
        compare_interleaved({"a": lambda: None}, inner=0)


def test_compare_interleaved_min_sample_ms_raises_inner(clock: FakeClock) -> None:
    res = compare_interleaved({"a": lambda: clock.advance_ms(2.0), "b": lambda: clock.advance_ms(4.0)},
                              rounds=3, warmup=1, min_sample_ms=10.0)
    assert res["inner"] == 5  # 5 calls of the 2 ms baseline cover 10 ms
    assert res["measurements"]["a"].samples_ms == pytest.approx((2.0,) * 3)
    assert res["ratios"]["b"]["median"] == pytest.approx(2.0)
