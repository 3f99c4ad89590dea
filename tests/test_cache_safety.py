"""Caches shared by processes and runs that are stopped: two processes building the same latency table at once
get one table (each entry measured once), and a table build killed by SIGINT or SIGTERM leaves only whole,
valid entries and resumes from them. The builds run as separate Python processes on a real ONNX Runtime probe
(timings differ from run to run, so equal tables mean one process read the other's entries)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from depthfold.passes.common.table_cache import load_entry

WORKER = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    import torch
    from depthfold import ir, zoo
    from depthfold.backends import LatencyProbe
    from depthfold.passes.layermerge.candidates import enumerate_choices
    from depthfold.passes.layermerge.latency_table import build_latency_table
    from depthfold.passes.layermerge.trunk import analyze_trunk

    name, repeat, barrier, parties = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gm = ir.capture(zoo.create(name, num_classes=10), (x,)).graph_module
    trunk = analyze_trunk(gm)
    choices = enumerate_choices(trunk)
    if parties > 1:  # start building together
        Path(barrier, str(os.getpid())).touch()
        deadline = time.monotonic() + 120
        while len(os.listdir(barrier)) < parties and time.monotonic() < deadline:
            time.sleep(0.01)
    table = build_latency_table(gm, trunk, choices, LatencyProbe(repeat=repeat, warmup=1), executor="serial")
    print(json.dumps({"median_ms": table.median_ms, "measured": table.measured, "hits": table.cache_hits,
                      "distinct": table.distinct_layers, "rejected": table.rejected_entries}))
''')


def start(cache: Path, *, model: str = "resnet18", repeat: int = 3, barrier: Path | None = None,
          parties: int = 1) -> subprocess.Popen[str]:
    env = {**os.environ, "DEPTHFOLD_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", WORKER, model, str(repeat), str(barrier or cache), str(parties)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "layermerge" / "latency").glob("*.json"))


def leftovers(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.tmp"))


def assert_entries_whole(cache: Path) -> None:
    for path in entries(cache):
        key = json.loads(path.read_text())["key"]
        assert isinstance(load_entry(path, key), dict), f"{path.name} is not a valid entry"


@pytest.mark.slow
def test_two_processes_building_the_same_table_measure_each_entry_once(tmp_path: Path) -> None:
    cache, barrier = tmp_path / "cache", tmp_path / "barrier"
    barrier.mkdir()
    procs = [start(cache, barrier=barrier, parties=2) for _ in range(2)]
    first, second = (finish(p) for p in procs)
    assert first["median_ms"] == second["median_ms"]
    assert first["distinct"] == second["distinct"] > 20
    # one process measured everything while the other waited for the lock, then read every entry
    assert sorted([first["measured"], second["measured"]]) == [0, first["distinct"]]
    assert first["measured"] + first["hits"] == second["measured"] + second["hits"] == first["distinct"]
    assert len(entries(cache)) == first["distinct"] and not leftovers(cache)
    assert_entries_whole(cache)
    # and a third, alone, gets the same table from the cache
    third = finish(start(cache))
    assert third["median_ms"] == first["median_ms"] and third["measured"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_killed_table_build_resumes_from_its_finished_entries(tmp_path: Path, signum: int) -> None:
    cache = tmp_path / "cache"
    proc = start(cache, repeat=20)
    deadline = time.monotonic() + 300
    while len(entries(cache)) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the build finished before it could be stopped: " + proc.communicate()[1][-2000:]
    proc.send_signal(signum)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert_entries_whole(cache)  # every entry on disk is whole (written atomically) and valid
    done = len(entries(cache))
    if signum == signal.SIGINT:  # Ctrl-C unwinds: the entry being written is removed with its temporary file
        assert not leftovers(cache)

    resumed = finish(start(cache, repeat=20))
    assert 5 <= done < resumed["distinct"]
    assert (resumed["hits"], resumed["measured"], resumed["rejected"]) == (done, resumed["distinct"] - done, 0)
    assert not leftovers(cache)  # a temporary file of a hard kill is cleared by the next build
    assert len(entries(cache)) == resumed["distinct"]


@pytest.mark.slow
def test_the_cli_stopped_by_sigterm_says_so_and_leaves_no_artifact(tmp_path: Path) -> None:
    cache, out = tmp_path / "cache", tmp_path / "out"
    env = {**os.environ, "DEPTHFOLD_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "depthfold.cli", "optimize", "zoo:resnet18", "--resolution", "32",
                             "--passes", "layermerge:speedup=1.5", "--executor", "serial", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not entries(cache) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err and "resumes" in err
    assert not leftovers(cache)
    assert_entries_whole(cache)
    assert not out.exists() or not any(out.iterdir())
