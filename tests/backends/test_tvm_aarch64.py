"""ARM emulation lane: zoo models cross-compiled for aarch64 run under qemu-user with an arm64 Python.

The arm64 root (Debian arm64 python3.11 + aarch64 wheels of apache-tvm and friends) and the host tools
(qemu-user-static, g++-aarch64-linux-gnu) are prepared by ``scripts/setup_arm_lane.sh``, which ``make test``
runs first; the root is cached under ``$DEPTHFOLD_CACHE`` (``~/.cache/depthfold``). ``DEPTHFOLD_ARM_LANE=0``
skips the lane (and its setup) explicitly. Otherwise a missing toolchain or root is a failure, not a skip: CI
must not go green without running the lane.

Only outputs are compared; emulated timings are not device timings and are never taken.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from depthfold import zoo
from depthfold.backends import tvm as tvm_backend
from depthfold.errors import BackendUnavailableError

# max_abs / max(1, max|ref|), the bar; aarch64 (NEON FMA) and x86 kernels sum in other orders.
RTOL = 1e-4

# Small: emulation runs the whole tvm import (~10-25 s) once, then each model in well under a minute.
LANE: dict[str, tuple[dict[str, object], int]] = {
    "resnet18": ({"num_classes": 10}, 32),
    "mobilenetv2_100": ({"num_classes": 10}, 32),
    "vit_tiny": ({"num_classes": 10, "img_size": 32, "patch_size": 8}, 32),
}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("DEPTHFOLD_ARM_LANE") == "0",
                       reason="DEPTHFOLD_ARM_LANE=0: aarch64 emulation lane switched off"),
]


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - ref.astype(np.float64)).max() / max(1.0, float(np.abs(ref).max())))


def test_arm_lane_aarch64_builds_match_x86_and_torch_under_qemu(tmp_path: Path) -> None:
    jobs, refs, x86_outs = [], [], []
    for name, (kwargs, res) in LANE.items():
        torch.manual_seed(0)
        model = zoo.create(name, **kwargs)
        inputs = zoo.example_inputs(name, batch=1, resolution=res)
        ep = torch.export.export(model, inputs)
        with torch.no_grad():
            refs.append(model(*inputs).numpy())
        x86 = tvm_backend.compile(ep, inputs, "x86", out_dir=tmp_path / name / "x86")
        x86_outs.append(tvm_backend.run(x86, inputs)[0])
        a64 = tvm_backend.compile(ep, inputs, "aarch64", mcpu="cortex-a72", out_dir=tmp_path / name / "a64")
        jobs.append((a64, inputs))
    # A control in the same emulated process (tvm imports once): the lane compares real numbers, so a build
    # of a conv checked against the outputs of other weights must not match. Inputs None: reference.npz's.
    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(3, 4, 3), torch.randn(1, 3, 8, 8)
    control = tvm_backend.compile(conv, (x,), "aarch64", out_dir=tmp_path / "control")
    with torch.no_grad():
        conv.weight.mul_(2.0)
        other = conv(x).numpy()
    jobs.append((control, None))
    try:
        emulated = tvm_backend.run_emulated(jobs)
    except BackendUnavailableError as err:
        pytest.fail(f"the aarch64 emulation lane cannot run: {err}. Run scripts/setup_arm_lane.sh "
                    "(make test does), or set DEPTHFOLD_ARM_LANE=0 to switch the lane off explicitly")
    for name, outs, x86_out, ref in zip(LANE, emulated, x86_outs, refs):
        assert len(outs) == 1, name
        assert outs[0].shape == ref.shape, name
        assert _rel_err(outs[0], x86_out) <= RTOL, f"{name}: aarch64 vs x86 build"
        assert _rel_err(outs[0], ref) <= RTOL, f"{name}: aarch64 vs torch"
    (got,) = emulated[-1]
    with np.load(control.reference) as z:
        assert _rel_err(got, z["out0"]) <= RTOL
    assert _rel_err(got, other) > 1e-2
    shutil.rmtree(tmp_path)  # libraries with embedded weights; pytest would keep them for three runs
