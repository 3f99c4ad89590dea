"""aarch64 outputs under emulation: qemu-user and the arm64 Python of ``scripts/setup_arm_lane.sh``."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...cache import cache_dir
from ...errors import ArtifactError, BackendUnavailableError, ConfigError
from ._common import _workdir, logger
from .artifact import TvmArtifact, _as_artifact, _check_inputs, _read_reference

_QEMU = "qemu-aarch64-static"
_QEMU_PACKAGE = "qemu-user-static"

_EMU_SCRIPT = r'''
import json, sys
import numpy as np
import tvm
from tvm import relax
jobs = json.load(open(sys.argv[1]))
dev = tvm.cpu(0)
for job in jobs:
    vm = relax.VirtualMachine(tvm.runtime.load_module(job["library"]), dev)
    with np.load(job["inputs"]) as z:
        args = [tvm.runtime.tensor(z["in%d" % i], dev) for i in range(job["n_inputs"])]
    out = vm["main"](*args)
    flat = []
    def walk(o):
        if hasattr(o, "numpy"):
            flat.append(o.numpy())
        else:
            for x in o:
                walk(x)
    walk(out)
    np.savez(job["outputs"], **{"out%d" % i: a for i, a in enumerate(flat)})
    print("done", job["library"], flush=True)
'''


def emulation_root() -> Path:
    """The arm64 root used by :func:`run_emulated`: ``$DEPTHFOLD_CACHE/arm64-root`` (``~/.cache/depthfold``)."""
    return cache_dir() / "arm64-root"


def _check_emulation(root: Path) -> None:
    if shutil.which(_QEMU) is None:
        raise BackendUnavailableError(f"running aarch64 code here needs {_QEMU}, which is not on PATH; install "
                                      f"Debian's {_QEMU_PACKAGE} (apt-get install {_QEMU_PACKAGE}) or run "
                                      "scripts/setup_arm_lane.sh")
    if not (root / "usr" / "bin" / "python3.11").is_file() or not (root / "opt" / "site" / "tvm").is_dir():
        raise BackendUnavailableError(f"no arm64 Python with TVM under {str(root)!r}; prepare it with "
                                      "scripts/setup_arm_lane.sh (Debian arm64 python3.11 .debs + aarch64 wheels)")


def run_emulated(
    jobs: Sequence[tuple[TvmArtifact | str | Path, Any]],
    *,
    root: str | Path | None = None,
    timeout_s: float = 900.0,
) -> list[list[np.ndarray]]:
    """Run aarch64 artifacts under ``qemu-aarch64-static`` with an arm64 Python; return their outputs.

    All jobs run in one emulated Python process (importing tvm there takes ~10-20 s). Emulated timings say
    nothing about a device, so none are taken. onnxruntime is not available under emulation (its aarch64 wheel
    crashes at import under qemu-user).

    Args:
        jobs: (artifact, inputs) pairs; inputs None uses the artifact's ``reference.npz`` inputs.
        root: The arm64 root (default :func:`emulation_root`).
        timeout_s: Wall-clock limit for the whole emulated run.

    Raises:
        BackendUnavailableError: qemu or the arm64 root is missing (naming the package / setup script).
        ConfigError: an artifact is not for aarch64, or bad inputs.
        ArtifactError: the emulated run failed (its stderr tail is included).
    """
    base = Path(root) if root is not None else emulation_root()
    _check_emulation(base)
    with _workdir() as work:
        spec = []
        for k, (artifact, inputs) in enumerate(jobs):
            art = _as_artifact(artifact)
            if art.target != "aarch64":
                raise ConfigError(f"run_emulated runs aarch64 artifacts; {str(art.path)!r} is for {art.target}")
            arrays = _read_reference(art)[0] if inputs is None else _check_inputs(
                art.inputs, inputs, f"artifact {str(art.path)!r}")
            np.savez(work / f"in{k}.npz", **{f"in{i}": a for i, a in enumerate(arrays)})
            spec.append({"library": str(art.library.resolve()), "inputs": str(work / f"in{k}.npz"),
                         "outputs": str(work / f"out{k}.npz"), "n_inputs": len(arrays)})
        (work / "jobs.json").write_text(json.dumps(spec))
        (work / "run.py").write_text(_EMU_SCRIPT)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(base / "opt" / "site"), "PYTHONNOUSERSITE": "1",
               "HOME": str(work), "TVM_NUM_THREADS": "1"}
        cmd = [shutil.which(_QEMU) or _QEMU, "-L", str(base), str(base / "usr" / "bin" / "python3.11"),
               str(work / "run.py"), str(work / "jobs.json")]
        logger.info("tvm: running %d aarch64 librar%s under qemu", len(spec), "y" if len(spec) == 1 else "ies")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired as err:
            raise ArtifactError(f"the emulated aarch64 run did not finish within {timeout_s:g} s") from err
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-8:])
            raise ArtifactError(f"the emulated aarch64 run failed (exit {proc.returncode}):\n{tail}")
        results = []
        for k, job in enumerate(spec):
            with np.load(job["outputs"]) as z:
                results.append([z[f"out{i}"] for i in range(len(z.files))])
            logger.debug("tvm: emulated job %d done", k)
        return results
