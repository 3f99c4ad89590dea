"""Hostile and malformed input: each case is driven through the public API or the CLI, must fail with a
depthfold error that says what was wrong (or be accepted where the input is legitimate), and must leave no
partial artifact. The cases and what the user sees are the table in docs/reliability.md, which this test
checks is current (``DEPTHFOLD_REGENERATE=1 pytest tests/test_reliability.py`` rewrites it)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import depthfold
from depthfold import _atomic
from depthfold.cli import main
from depthfold.errors import DepthfoldError

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "reliability.md"


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)).mean((2, 3))


class Branchy(Small):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y * 2 if y.sum() > 0 else y  # data-dependent Python control flow


def _small(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return Small().eval().to(dtype)


X = torch.randn(1, 3, 8, 8)


@dataclass(frozen=True)
class Case:
    group: str
    input: str
    run: Callable[[Path], object]
    """Gets an empty output directory; raises, or returns normally for legitimate input."""
    expect: type[BaseException] | None


def _cli(*argv: str) -> Callable[[Path], object]:
    def run(out: Path) -> object:
        code = main([a.replace("{out}", str(out)) for a in argv])
        if code != 0:
            raise SystemExit(code)
        return code
    return run


def _nan_weights(out: Path) -> object:
    model = _small()
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("nan")
    return depthfold.optimize(model, (X,)).save(out)


def _full_disk(out: Path) -> object:
    res = depthfold.optimize(_small(), (X,))

    def no_space(path: Path) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return _atomic.atomic_write(out / "report.json", no_space) and res


def _read_only(out: Path) -> object:
    res = depthfold.optimize(_small(), (X,))

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    real = _atomic.tempfile.mkstemp
    _atomic.tempfile.mkstemp = read_only  # type: ignore[assignment]
    try:
        return res.save(out)
    finally:
        _atomic.tempfile.mkstemp = real  # type: ignore[assignment]


def _truncated_onnx(out: Path) -> object:
    path = out.parent / "truncated.onnx"
    depthfold.optimize(_small(), (X,)).export_onnx(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return _cli("bench", str(path), "--repeat", "2")(out)


def _newer_report(out: Path) -> object:
    path = out.parent / "report.json"
    path.write_text(json.dumps({"schema": "depthfold.bench", "schema_version": "2.0"}))
    return _cli("report", "validate", str(path))(out)


def _costly_merge(out: Path) -> str:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Conv2d(2, 16, 3)).eval()  # a bottleneck: merging costs more
    (rec,) = depthfold.optimize(model, (X,), ["merge_linear_chains:max_cost_ratio=1.5"]).records
    (skip,) = rec.skipped
    return f"the merge is skipped and reported: {skip['reason']}"


class Relus(nn.Module):
    """Two conv-ReLU layers and a pooled head: something for LayerMerge to compress."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.b(torch.relu(self.a(x)))).mean((2, 3))


@contextlib.contextmanager
def _own_cache(out: Path) -> Iterator[Path]:
    """A private $DEPTHFOLD_CACHE beside the output directory."""
    before = os.environ.get("DEPTHFOLD_CACHE")
    os.environ["DEPTHFOLD_CACHE"] = str(out.parent / "cache")
    try:
        yield out.parent / "cache"
    finally:
        if before is None:
            del os.environ["DEPTHFOLD_CACHE"]
        else:
            os.environ["DEPTHFOLD_CACHE"] = before


def _relus(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return Relus().eval().to(dtype)


def _float64_layermerge(out: Path) -> object:
    with _own_cache(out):
        return depthfold.optimize(_relus(torch.float64), (X.double(),), ["layermerge:speedup=1.2"]).save(out)


def _time_budget(out: Path) -> object:
    with _own_cache(out):
        return depthfold.optimize(_relus(), (X,), ["layermerge:speedup=1.2,time_budget_s=1e-9"]).save(out)


def _corrupt_cache_entry(out: Path) -> str:
    from depthfold.backends import LatencyProbe
    from depthfold.passes.layermerge.candidates import enumerate_choices
    from depthfold.passes.layermerge.latency_table import build_latency_table
    from depthfold.passes.layermerge.trunk import analyze_trunk

    gm = depthfold.ir.capture(_relus(), (X,)).graph_module
    trunk = analyze_trunk(gm)
    choices = enumerate_choices(trunk)
    probe = LatencyProbe(repeat=2, warmup=1)
    with _own_cache(out) as cache:
        build_latency_table(gm, trunk, choices, probe, executor="serial")
        entry = sorted((cache / "layermerge" / "latency").glob("*.json"))[0]
        entry.write_bytes(entry.read_bytes()[:20])
        again = build_latency_table(gm, trunk, choices, probe, executor="serial")
    return (f"the entry is detected ({again.rejected_entries} rejected), deleted and measured again "
            f"({again.measured} measured, {again.cache_hits} read from the cache)")


def _cuda_model(out: Path) -> object:
    return depthfold.optimize(_small(), (X,), device="cuda").measure()


CASES = [
    Case("model", "a string instead of an nn.Module", lambda out: depthfold.optimize("resnet18", (X,)), DepthfoldError),
    Case("model", "data-dependent Python control flow (`if y.sum() > 0`)",
         lambda out: depthfold.optimize(Branchy().eval(), (X,)), DepthfoldError),
    Case("model", "NaN in a weight", _nan_weights, DepthfoldError),
    Case("model", "float16 model and inputs",
         lambda out: depthfold.optimize(_small(torch.float16), (X.half(),)).save(out), None),
    Case("model", "bfloat16 model and inputs",
         lambda out: depthfold.optimize(_small(torch.bfloat16), (X.bfloat16(),)), None),
    Case("model", "a float64 CNN for LayerMerge, timed on ONNX Runtime (no float64 Conv kernel)", _float64_layermerge,
         DepthfoldError),
    Case("model", "timing on this machine's GPU (`device=\"cuda\"`) where there is none", _cuda_model, DepthfoldError),
    Case("inputs", "an empty batch (shape 0x3x8x8)",
         lambda out: depthfold.optimize(_small(), (torch.randn(0, 3, 8, 8),)), DepthfoldError),
    Case("inputs", "Inf in the example input",
         lambda out: depthfold.optimize(_small(), (torch.full((1, 3, 8, 8), float("inf")),)), DepthfoldError),
    Case("inputs", "integer inputs to a float model",
         lambda out: depthfold.optimize(_small(), (torch.ones(1, 3, 8, 8, dtype=torch.long),)), DepthfoldError),
    Case("inputs", "a list of numbers instead of tensors",
         lambda out: depthfold.optimize(_small(), ([1.0, 2.0],)), DepthfoldError),
    Case("inputs", "a different batch size at run time than at capture (dynamic batch)",
         lambda out: depthfold.optimize(_small(), (X,)).module(torch.randn(5, 3, 8, 8)), None),
    Case("data", "empty calibration data",
         lambda out: depthfold.optimize(_small(), (X,), ["recover:steps=1"], data=torch.empty(0, 3, 8, 8)),
         DepthfoldError),
    Case("data", "calibration data of one sample (LayerMerge)",
         lambda out: depthfold.optimize(_relus(), (X,), ["layermerge:speedup=1.2"], data=torch.randn(1, 3, 8, 8)),
         DepthfoldError),
    Case("data", "calibration data of the wrong shape",
         lambda out: depthfold.optimize(_small(), (X,), ["recover:steps=1"], data=torch.randn(8, 5)),
         DepthfoldError),
    Case("passes", "an unknown pass name (`fold_batchnorm`)",
         lambda out: depthfold.optimize(_small(), (X,), ["fold_batchnorm"]), DepthfoldError),
    Case("passes", "a malformed spec (`layermerge:speedup`)",
         lambda out: depthfold.optimize(_small(), (X,), ["layermerge:speedup"]), DepthfoldError),
    Case("passes", "an option the pass does not have (`fold_bn:epsilon=1`)",
         lambda out: depthfold.optimize(_small(), (X,), ["fold_bn:epsilon=1"]), DepthfoldError),
    Case("passes", "a merge whose merged kernel costs more than the bound allows (`max_cost_ratio=1.5`)",
         _costly_merge, None),
    Case("passes", "LayerMerge tables that outlast their time budget (`time_budget_s=1e-9`)", _time_budget,
         DepthfoldError),
    Case("cli", "`depthfold optimize zoo:resnet99`", _cli("optimize", "zoo:resnet99", "--out", "{out}"), SystemExit),
    Case("cli", "`depthfold optimize model.txt`", _cli("optimize", "model.txt", "--out", "{out}"), SystemExit),
    Case("cli", "`depthfold optimize zoo:resnet18 --input-shape 1,3,-2` (a zoo model has its own inputs)",
         _cli("optimize", "zoo:resnet18", "--input-shape", "1,3,-2", "--out", "{out}"), SystemExit),
    Case("files", "a truncated ONNX file to `depthfold bench`", _truncated_onnx, SystemExit),
    Case("files", "a truncated latency-table cache entry", _corrupt_cache_entry, None),
    Case("files", "a bench report from a newer schema major version", _newer_report, SystemExit),
    Case("files", "an output path that is an existing file",
         lambda out: depthfold.optimize(_small(), (X,)).save(out.parent / "taken.txt"), DepthfoldError),
    Case("files", "the disk fills while a report is written", _full_disk, DepthfoldError),
    Case("files", "a read-only output file system (the write fails with EROFS)", _read_only, DepthfoldError),
]


def _outcome(case: Case, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    (out.parent / "taken.txt").write_text("not a directory")
    try:
        result = case.run(out)
    except SystemExit as err:
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("depthfold: error")]
        assert case.expect is SystemExit and err.code == 2 and lines, f"{case.input}: exit {err.code}, {lines}"
        return lines[-1].removeprefix("depthfold: error: ")
    except Exception as err:
        assert case.expect is not None and isinstance(err, case.expect), f"{case.input}: {type(err).__name__}: {err}"
        return f"{type(err).__name__}: {err}"
    assert case.expect is None, f"{case.input}: accepted, expected {case.expect.__name__}"
    return f"accepted; {result}" if isinstance(result, str) else "accepted"


def _table(rows: list[tuple[Case, str, bool]]) -> str:
    lines = ["# Reliability: hostile and malformed input", "",
             "Generated by `tests/test_reliability.py` (`DEPTHFOLD_REGENERATE=1` rewrites it); every row is run by "
             "`make test`. *What the user sees* is the exception or the CLI's error line; *leftovers* counts files "
             "left in the output directory by a failed call (none may be).", "",
             "Checked elsewhere in `make test`:", "",
             "- **Differential fuzzing** (`tests/fuzz`): random CNNs from a grammar through every exact pass, alone, "
             "in random orders and all together, against torch and ONNX Runtime; random CNN trunks and transformer "
             "stacks through the approximate passes, which must rewrite (runnable graph, output shape kept, error "
             "reported, ONNX verified) or refuse with a depthfold error. `make fuzz` runs 2,000 models.",
             "- **Shared caches and stopped runs** (`tests/test_cache_safety.py`): two processes building the same "
             "latency table at once measure each entry once and get the same table; a table build killed by SIGINT "
             "or SIGTERM leaves only whole, checksummed entries and resumes from them; the CLI stopped by SIGTERM "
             "says so (exit 143) and leaves no artifact.",
             "- **No mutation** (`tests/test_no_mutation.py`): every pass, recovery, export, latency measurement, "
             "TVM compile and the decoder export leave the user's model, parameters, buffers and modes untouched.",
             "",
             "| area | input | what the user sees | leftovers |", "|---|---|---|---|"]
    for case, seen, clean in rows:
        text = re.sub(r"\s+", " ", seen.replace("|", "\\|"))
        lines.append(f"| {case.group} | {case.input} | {text[:400]}{'…' if len(text) > 400 else ''} | "
                     f"{'none' if clean else 'LEFT FILES'} |")
    return "\n".join(lines) + "\n"


def test_hostile_inputs_fail_clearly_and_leave_nothing(tmp_path_factory, capsys):
    rows = []
    for i, case in enumerate(CASES):
        out = tmp_path_factory.mktemp(f"case{i}") / "out"
        seen = _outcome(case, out, capsys).replace(str(out.parent), "DIR").replace(f"{ROOT}/", "")
        left = sorted(p.name for p in out.rglob("*")) if out.exists() else []
        failed = not seen.startswith("accepted")
        assert not (failed and left), f"{case.input}: left {left}"
        rows.append((case, seen, not (failed and left)))
    table = _table(rows)
    if os.environ.get("DEPTHFOLD_REGENERATE") == "1":
        DOC.write_text(table)
    assert DOC.is_file() and DOC.read_text() == table, \
        "docs/reliability.md is stale: DEPTHFOLD_REGENERATE=1 pytest tests/test_reliability.py"
