"""The shared machinery of approximate passes: calibration splits, the metric registry and table jobs."""

from __future__ import annotations

import concurrent.futures as cf
import math
import multiprocessing
import os
import sys

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from depthfold.data import Samples
from depthfold.errors import ConfigError, InfeasibleBudgetError
from depthfold.passes.common import METRICS, batched_outputs, calibration_split, evaluate, run_jobs

X = torch.randn(60, 3, 4, 4, generator=torch.Generator().manual_seed(0))
Y = torch.arange(60) % 5
EXAMPLE = (torch.zeros(1, 3, 4, 4),)


def _split(data):
    return calibration_split(data, EXAMPLE, names=("x",), eval_samples=10, train_samples=30, batch_size=8, seed=3)


@pytest.mark.parametrize("form", ["dataset", "tuple", "loader", "batches"])
def test_calibration_split_is_the_same_for_every_form_of_the_same_samples(form) -> None:
    """A loader and a list of batches read in order; a TensorDataset of no more samples than needed keeps all."""
    data = {"dataset": TensorDataset(X[:40], Y[:40]), "tuple": (X[:40], Y[:40]),
            "loader": DataLoader(TensorDataset(X, Y), batch_size=7),
            "batches": [(X[i:i + 8], Y[i:i + 8]) for i in range(0, 60, 8)]}[form]
    calib = _split(data)
    reference = _split((X[:40], Y[:40]))
    assert len(calib.train) == 30 and len(calib.held_out) == 10 and calib.batch_size == 8
    for a, b in ((calib.train, reference.train), (calib.held_out, reference.held_out)):
        assert torch.equal(a.inputs[0], b.inputs[0]) and torch.equal(a.labels, b.labels)
    train_rows = {tuple(r.flatten().tolist()) for r in calib.train.inputs[0]}
    held_rows = {tuple(r.flatten().tolist()) for r in calib.held_out.inputs[0]}
    assert not train_rows & held_rows, "held-out samples must not be trained on"


def test_calibration_split_without_data_is_synthetic_and_seeded() -> None:
    a, b = _split(None), _split(None)
    assert a.synthetic and torch.equal(a.train.inputs[0], b.train.inputs[0])
    assert a.train.inputs[0].shape[1:] == (3, 4, 4) and a.train.labels is None


def test_calibration_split_refuses_a_single_sample() -> None:
    with pytest.raises(ConfigError, match="1 sample"):
        _split(X[:1])


def _samples(labels=None, **inputs) -> Samples:
    return Samples(tuple(inputs.values()), labels, tuple(inputs))


def test_metric_accuracy_and_kl() -> None:
    teacher = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    student = torch.tensor([[4.0, 0.0], [4.0, 0.0], [4.0, 0.0]])
    s = _samples(torch.tensor([0, 1, 1]), x=torch.zeros(3, 1))
    out = evaluate(teacher, student, s, ("accuracy", "kl"))
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert evaluate(teacher, teacher, s, ("kl",))["kl"] == pytest.approx(0.0, abs=1e-12)
    assert out["kl"] > 1.0
    assert evaluate(teacher, student, _samples(x=torch.zeros(3, 1)), ("accuracy",))["accuracy"] is None


def test_metric_perplexity_of_a_causal_lm_ignores_padding() -> None:
    ids = torch.tensor([[1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    logits = torch.full((1, 4, 5), -30.0)
    logits[0, 0, 2] = logits[0, 1, 3] = 30.0  # predicts the next token exactly where it counts
    logits[0, 2, 4] = 30.0  # wrong about the padded position, which must be ignored
    s = _samples(input_ids=ids, attention_mask=mask)
    assert evaluate(logits, logits, s, ("perplexity",))["perplexity"] == pytest.approx(1.0, abs=1e-6)
    uniform = torch.zeros(1, 4, 5)
    assert METRICS["perplexity"].fn(uniform, uniform, s) == pytest.approx(5.0)
    assert not METRICS["perplexity"].higher_is_better


def test_metric_cosine_pools_token_outputs_over_the_mask() -> None:
    hidden = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    other = hidden.clone()
    other[0, 2] = 100.0  # a padded position: must not change the pooled embedding
    s = _samples(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=mask)
    assert evaluate(hidden, other, s, ("cosine",))["cosine"] == pytest.approx(1.0)
    assert evaluate(hidden, -hidden, s, ("cosine",))["cosine"] == pytest.approx(-1.0)


def test_unknown_metric_suggests_a_name() -> None:
    with pytest.raises(ConfigError, match="did you mean 'accuracy'"):
        evaluate(torch.zeros(1, 2), torch.zeros(1, 2), _samples(x=torch.zeros(1, 1)), ("acuracy",))


def test_batched_outputs_feeds_every_input_and_takes_logits() -> None:
    class TwoIn(torch.nn.Module):
        def forward(self, a, b):
            return {"logits": a + b}

    s = _samples(a=torch.arange(10.0).reshape(10, 1), b=torch.ones(10, 1))
    out = batched_outputs(TwoIn(), s, batch_size=3)
    assert torch.equal(out, torch.arange(10.0).reshape(10, 1) + 1)
    assert not math.isnan(float(out.sum()))


# ---------------------------------------------------------------------------------- measured replanning


def _stepped_solver(step: float = 1.0):  # type: ignore[no-untyped-def]
    """Plans are latencies on a grid (the largest grid point within budget); a plan's score grows with its
    latency (a slower plan keeps more of the network)."""
    def solve(budget: float) -> float:
        if budget < step:
            raise InfeasibleBudgetError(f"nothing fits {budget}", min_latency=step, budget=budget)
        return step * int(budget / step)
    return solve


def test_replanning_corrects_a_biased_prediction() -> None:
    from depthfold.passes.common import plan_with_feedback

    measured: list[float] = []

    def measure(plan: float) -> float:  # the network runs 25% slower than its table predicts
        measured.append(plan)
        return 1.25 * plan

    result = plan_with_feedback(_stepped_solver(), measure, budget=40.0, target_ms=40.0, tolerance=0.02, rounds=5,
                                predicted_ms=lambda p: p, score=lambda p: p)
    assert result.plan == 32.0 and 1.25 * result.plan == 40.0
    assert [a["budget_ms"] for a in result.attempts] == [40.0, 30.0, 32.0]  # shifted, then interpolated
    assert [a["measured_ms"] for a in result.attempts] == [50.0, 37.5, 40.0]
    assert result.attempts[0]["predicted_ms"] == 40.0 and result.attempts[2]["score"] == 32.0


def test_replanning_keeps_the_best_scoring_plan_within_tolerance_and_stops_on_a_repeat() -> None:
    from depthfold.passes.common import next_budget, plan_with_feedback

    # A coarse grid: the plan at budget 40 measures too slow, the one at 30 too fast but within the target;
    # the slow one scores higher but misses the target, so the fast one is kept, and the interpolated
    # budget gives plan 40 again, which ends the search.
    times = {30.0: 25.0, 40.0: 42.0}
    result = plan_with_feedback(_stepped_solver(10.0), times.__getitem__, budget=35.0, target_ms=35.0,
                                tolerance=0.05, rounds=6, predicted_ms=lambda p: p, score=lambda p: p)
    assert result.plan == 30.0
    assert [(a["budget_ms"], a["measured_ms"]) for a in result.attempts] == [(35.0, 25.0), (45.0, 42.0)]
    # Interpolation between the closest plans measured on either side of the target.
    assert next_budget([(30.0, 39.0), (20.0, 26.0)], 35.0) == pytest.approx(20.0 + 9.0 * 10.0 / 13.0)
    assert next_budget([(30.0, 39.0)], 35.0) == 26.0


def test_replanning_without_rounds_and_an_infeasible_first_solve() -> None:
    from depthfold.passes.common import plan_with_feedback

    calls: list[float] = []
    result = plan_with_feedback(_stepped_solver(), lambda p: calls.append(p) or p, budget=7.5, target_ms=7.5,
                                tolerance=0.05, rounds=0, predicted_ms=lambda p: p, score=lambda p: p)
    assert result.plan == 7.0 and result.attempts == [] and calls == []
    with pytest.raises(InfeasibleBudgetError):
        plan_with_feedback(_stepped_solver(), lambda p: p, budget=0.5, target_ms=0.5, tolerance=0.05, rounds=3,
                           predicted_ms=lambda p: p, score=lambda p: p)


def _offset_job(shared: dict, x: int) -> tuple[int, int, int]:
    return shared["offset"] + x, id(shared), os.getpid()


def test_run_jobs_hands_shared_data_as_it_is_to_jobs_in_this_process() -> None:
    shared = {"offset": 10}
    want = {0: (11, id(shared), os.getpid()), 1: (12, id(shared), os.getpid())}
    got: dict = {}
    assert run_jobs(_offset_job, [(1,), (2,)], got.__setitem__, shared=shared, executor="serial") == "serial"
    assert got == want
    got.clear()
    with cf.ThreadPoolExecutor(2) as pool:
        assert run_jobs(_offset_job, [(1,), (2,)], got.__setitem__, shared=shared, executor=pool) == "ThreadPoolExecutor"
    assert got == want


class _Unpicklable:
    offset = 100

    def __getitem__(self, key: str) -> int:
        return getattr(self, key)

    def __reduce__(self):
        raise TypeError("shared data was pickled")


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_run_jobs_gives_forked_pool_workers_the_shared_data_without_pickling_it(monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # two workers, whatever this machine has
    got: dict = {}
    assert run_jobs(_offset_job, [(i,) for i in range(6)], got.__setitem__, shared=_Unpicklable()) == "process"
    assert [got[i][0] for i in range(6)] == [100 + i for i in range(6)]
    assert os.getpid() not in {pid for _, _, pid in got.values()}


class _LoggedShared:
    """Shared data that notes, in a file, each process it is unpickled in."""

    def __init__(self, log: str) -> None:
        self.log = log
        self.offset = 10

    def __getitem__(self, key: str) -> int:
        return getattr(self, key)

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()}\n")


@pytest.mark.slow
def test_run_jobs_on_ray_reads_shared_data_once_per_worker(tmp_path) -> None:
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # tests/ is not on the workers' path
    log = tmp_path / "unpickled"
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        got: dict = {}
        assert run_jobs(_offset_job, [(i,) for i in range(8)], got.__setitem__, shared=_LoggedShared(str(log)),
                        executor="ray") == "ray"
    finally:
        ray.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert [got[i][0] for i in range(8)] == [10 + i for i in range(8)]
    workers = {pid for _, _, pid in got.values()}
    assert os.getpid() not in workers
    unpickled = log.read_text().split()
    assert sorted(unpickled) == sorted(str(pid) for pid in workers)  # once per worker, not once per job
