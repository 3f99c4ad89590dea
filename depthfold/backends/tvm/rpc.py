"""Timing on a device over TVM RPC: the ``host:port`` address, the connection, the remote measurement."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from typing import Any

from ...errors import BackendUnavailableError, ConfigError
from ..latency import Measurement
from ._common import _tvm
from .artifact import TvmArtifact, _check_inputs

_RPC_CONNECT_TIMEOUT_S = 10.0


def parse_remote(remote: str) -> tuple[str, int]:
    """Split ``"host:port"`` (``"[::1]:9090"`` for IPv6).

    Raises:
        ConfigError: not of the form host:port with a port in 1..65535.
    """
    m = re.fullmatch(r"\[?([^\]\s]+?)\]?:(\d+)", str(remote).strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ConfigError(f"remote must be 'host:port' (e.g. '192.168.1.20:9090'), got {remote!r}")
    return m.group(1), int(m.group(2))


def _connect(remote: str, timeout_s: float) -> Any:
    from tvm import rpc

    host, port = parse_remote(remote)
    # TVM's own connect blocks (and retries) for long on an unreachable host; probe first with a bounded
    # timeout so the error names the address.
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        why = "timed out" if isinstance(err, TimeoutError) or "timed out" in str(err) else (err.strerror or str(err))
        raise BackendUnavailableError(
            f"cannot reach the TVM RPC server at {host}:{port} ({why} after at most {timeout_s:g} s); start one "
            f"on the device with `python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}` and check the "
            "address and firewall") from err
    try:
        return rpc.connect(host, port, session_timeout=0)
    except Exception as err:
        raise BackendUnavailableError(f"TVM RPC handshake with {host}:{port} failed: {err}; is a TVM RPC server "
                                      "(python -m tvm.exec.rpc_server) of a matching TVM version listening "
                                      "there?") from err


def _measure_remote(art: TvmArtifact, inputs: Any, *, warmup: int, repeat: int, threads: int | None,
                    remote: str, timeout_s: float) -> Measurement:
    from tvm import relax

    from ..latency import _check_counts

    tvm = _tvm()
    _check_counts(warmup, repeat)
    arrays = _check_inputs(art.inputs, inputs, f"artifact {str(art.path)!r}")
    sess = _connect(remote, timeout_s)
    name = f"depthfold-{art.meta.get('source_sha256', 'model')[:12]}-{os.getpid()}.so"
    sess.upload(str(art.library), target=name)
    rlib = sess.load_module(name)
    dev = sess.cuda(0) if art.target == "cuda" else sess.cpu(0)
    if threads is not None and art.target != "cuda":
        f = sess.get_function("runtime.config_threadpool")
        f(1, int(threads))
    vm = relax.VirtualMachine(rlib, dev)
    args = [tvm.runtime.tensor(a, dev) for a in arrays]
    if warmup:
        vm.time_evaluator("main", dev, number=warmup, repeat=1)(*args)
    res = vm.time_evaluator("main", dev, number=1, repeat=repeat)(*args)
    samples = tuple(float(s) * 1e3 for s in res.results)
    with contextlib.suppress(Exception):  # leave no library behind on the device
        sess.remove(name)
    return Measurement(samples_ms=samples, warmup=warmup, threads=threads or 0, backend="tvm",
                       device="cuda" if art.target == "cuda" else "cpu")
