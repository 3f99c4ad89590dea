"""Importance jobs run wherever the executor puts them (process pools, Ray) and give the serial build's table."""

from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.fx import GraphModule

from depthfold.passes.common.calibration import Calibration, calibration_split
from depthfold.passes.layermerge.candidates import SegmentChoice, enumerate_choices
from depthfold.passes.layermerge.importance import ImportanceTable, build_importance_table
from depthfold.passes.layermerge.trunk import Trunk
from depthfold.zoo.data import digits_datasets

METRIC_TOL = {"rtol": 1e-5, "atol": 1e-6}
"""Jobs in worker processes run one torch thread: sums in another order, ~1e-13 apart on these models."""
HERE = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Setup:
    gm: GraphModule
    trunk: Trunk
    choices: list[SegmentChoice]
    calib: Calibration


@pytest.fixture(scope="module")
def setup(cnn_case) -> Setup:
    """UnseenCNN at 32x32, its candidates up to 4 positions long, and 48 digits (16 held out)."""
    case = cnn_case("unseen")
    train, _ = digits_datasets(resolution=32, channels=3)
    calib = calibration_split(train, (case.x,), eval_samples=16, train_samples=32, batch_size=16)
    return Setup(case.gm, case.trunk, enumerate_choices(case.trunk, max_span=4), calib)


def build(setup: Setup, choices: list[SegmentChoice] | None = None, **kwargs) -> ImportanceTable:
    kwargs.setdefault("use_cache", False)
    return build_importance_table(setup.gm, setup.trunk, setup.choices if choices is None else choices, setup.calib,
                                  steps=5, **kwargs)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def serial(setup: Setup, tmp_path_factory) -> ImportanceTable:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEPTHFOLD_CACHE", str(tmp_path_factory.mktemp("serial")))
        return build(setup, executor="serial")


def assert_same_table(got: ImportanceTable, want: ImportanceTable) -> None:
    torch.testing.assert_close(torch.tensor(got.metric, dtype=torch.float64),
                               torch.tensor(want.metric, dtype=torch.float64), **METRIC_TOL)
    assert got.accuracy == want.accuracy
    assert (got.trained, got.original_accuracy, got.estimator) == (want.trained, want.original_accuracy, want.estimator)


def scored(table: ImportanceTable) -> int:
    return sum(table.ran_on.values())


def fork_pool() -> cf.ProcessPoolExecutor:
    return cf.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"))


def test_importance_serial_build_runs_in_this_process(setup: Setup, serial: ImportanceTable) -> None:
    assert serial.executor == "serial"
    assert serial.ran_on == {HERE: scored(serial)}
    assert scored(serial) == sum(c.kind not in ("original", "barrier") for c in setup.choices) > serial.trained > 0
    assert serial.summary()["ran_on"] == serial.ran_on


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_importance_jobs_on_a_given_process_pool_give_the_serial_table(setup: Setup, serial: ImportanceTable) -> None:
    with fork_pool() as pool:  # jobs and the portable graph are pickled to the workers
        table = build(setup, executor=pool)
    assert_same_table(table, serial)
    assert table.executor == "ProcessPoolExecutor"
    assert HERE not in table.ran_on and scored(table) == scored(serial)


def test_importance_jobs_on_the_own_process_pool_give_the_serial_table(setup: Setup, serial: ImportanceTable,
                                                                       monkeypatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # two workers, whatever this machine has
    table = build(setup, executor="process")
    assert_same_table(table, serial)
    assert table.executor == "process"
    assert HERE not in table.ran_on and len(table.ran_on) <= 2 and scored(table) == scored(serial)


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_importance_cache_is_the_same_whichever_executor_wrote_it(setup: Setup, cache: Path, monkeypatch) -> None:
    with fork_pool() as pool:
        pooled = build(setup, executor=pool, use_cache=True)
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(cache / "serial"))
    build(setup, executor="serial", use_cache=True)
    files = sorted((cache / "layermerge" / "importance").glob("*.json"))
    serial_files = sorted((cache / "serial" / "layermerge" / "importance").glob("*.json"))
    assert [p.name for p in files] == [p.name for p in serial_files] and len(files) == scored(pooled)
    for a, b in zip(files, serial_files):
        entry, want = json.loads(a.read_text()), json.loads(b.read_text())
        assert entry["key"] == want["key"]
        assert entry["result"]["metric"] == pytest.approx(want["result"]["metric"], **{"rel": 1e-5, "abs": 1e-6})
    monkeypatch.setenv("DEPTHFOLD_CACHE", str(cache))
    again = build(setup, executor="serial", use_cache=True)  # all read back: no job runs
    assert again.metric == pooled.metric
    assert (again.cache_hits, again.executor, again.ran_on) == (scored(pooled), None, {})


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method")
def test_importance_finetune_jobs_on_a_process_pool_give_the_serial_table(setup: Setup) -> None:
    choices = [c for c in setup.choices if c.kind in ("merged", "pruned")][:4]
    want = build(setup, choices, estimator="finetune", executor="serial")
    with fork_pool() as pool:
        got = build(setup, choices, estimator="finetune", executor=pool)
    assert_same_table(got, want)
    assert got.trained == len(choices) and HERE not in got.ran_on


@pytest.mark.slow
def test_importance_jobs_on_ray_give_the_serial_table(setup: Setup, serial: ImportanceTable) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        table = build(setup, executor="ray")
    finally:
        ray.shutdown()
    assert_same_table(table, serial)
    assert table.executor == "ray"
    assert HERE not in table.ran_on and scored(table) == scored(serial)
    assert table.summary()["executor"] == "ray"
