"""ONNX Runtime sessions on the CPU and CUDA execution providers, with fixed threading for stable timings.

Sessions use ``intra_op_num_threads=threads``, ``inter_op_num_threads=1`` and sequential execution, so a
latency number is tied to a known thread count (recorded in every :class:`Measurement`).
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import onnx
import torch

from .._atomic import ensure_writable_dir
from ..errors import ArtifactError, BackendUnavailableError, ConfigError, suggest
from .base import DEVICES, Backend, Inputs, LayerScope, Target, host_arch
from .latency import Measurement, _check_counts, quantile, time_callable
from .onnx import OnnxArtifact, export_onnx, to_numpy, to_onnx_model

if TYPE_CHECKING:
    import onnxruntime
    from torch.fx import GraphModule

__all__ = ["available_providers", "default_device", "create_session", "feeds", "run", "measure", "session_device",
           "session_threads", "check_session_args", "measure_kernels", "profile_nodes", "last_level_cache_bytes",
           "OrtBackend", "GRAPH_OPTIMIZATIONS", "LAYOUT_OPS"]

logger = logging.getLogger(__name__)

GRAPH_OPTIMIZATIONS: tuple[str, ...] = ("disable", "basic", "extended", "all")
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
LAYOUT_OPS: tuple[str, ...] = ("ReorderInput", "ReorderOutput")
"""The NCHWc layout conversions ORT's CPU provider inserts where blocked-layout ops meet plain tensors: at a
model's boundary, so a layer timed alone pays them and the same layer inside a network does not."""

# ONNX Runtime's input type strings -> NumPy dtypes (the ones models here use).
_ORT_DTYPES = {
    "tensor(float)": np.dtype(np.float32), "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16), "tensor(int64)": np.dtype(np.int64),
    "tensor(int32)": np.dtype(np.int32), "tensor(int16)": np.dtype(np.int16),
    "tensor(int8)": np.dtype(np.int8), "tensor(uint8)": np.dtype(np.uint8),
    "tensor(bool)": np.dtype(np.bool_),
}


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as err:
        raise BackendUnavailableError("onnxruntime is not installed; pip install onnxruntime "
                                      "(or onnxruntime-gpu for CUDA)") from err
    return onnxruntime


def available_providers() -> list[str]:
    """Execution providers this onnxruntime build offers, e.g. ``["CPUExecutionProvider"]``."""
    return list(_ort().get_available_providers())


def default_device() -> str:
    """``"cuda"`` if the CUDA execution provider is available, else ``"cpu"``."""
    return "cuda" if _PROVIDERS["cuda"] in available_providers() else "cpu"


def check_session_args(*, device: str, threads: int, graph_optimization: str) -> None:
    """Validate :func:`create_session` settings without building anything (cheap; call before an export).

    Raises:
        ConfigError: unknown device or optimization level, ``threads < 1``.
        BackendUnavailableError: ``device="cuda"`` but this onnxruntime has no CUDA execution provider.
    """
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; known: {', '.join(DEVICES)}{suggest(str(device), DEVICES)}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {threads!r}; fix it so timings are comparable")
    if graph_optimization not in GRAPH_OPTIMIZATIONS:
        raise ConfigError(f"unknown graph_optimization {graph_optimization!r}; known: "
                          f"{', '.join(GRAPH_OPTIMIZATIONS)}{suggest(str(graph_optimization), GRAPH_OPTIMIZATIONS)}")
    available = available_providers()
    if device == "cuda" and _PROVIDERS["cuda"] not in available:
        raise BackendUnavailableError(
            f"device='cuda' needs ONNX Runtime's CUDAExecutionProvider, but this onnxruntime offers only "
            f"{available}; install the onnxruntime-gpu package (instead of onnxruntime) on a machine with "
            "a CUDA GPU, or use device='cpu'")


def create_session(
    model: str | Path | bytes | onnx.ModelProto,
    *,
    device: str = "cpu",
    threads: int = 1,
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all",
    profile_dir: Path | None = None,
) -> onnxruntime.InferenceSession:
    """Create an ONNX Runtime session with fixed threading on ``device``.

    Args:
        model: A file path, serialized bytes or a ``ModelProto``.
        device: ``"cpu"`` or ``"cuda"`` (CUDA EP first, CPU EP for ops it lacks).
        threads: ``intra_op_num_threads``; ``inter_op_num_threads`` is 1 and execution sequential.
        graph_optimization: ORT graph optimization level.
        profile_dir: If set, ORT profiling is on and ``session.end_profiling()`` writes a JSON trace there.

    Raises:
        ConfigError: unknown device or optimization level, ``threads < 1``.
        BackendUnavailableError: ``device="cuda"`` but the CUDA EP is missing or failed to load.
        ArtifactError: the model file is missing or ONNX Runtime cannot load the model.
    """
    ort = _ort()
    check_session_args(device=device, threads=threads, graph_optimization=graph_optimization)
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    providers = [_PROVIDERS["cuda"], _PROVIDERS["cpu"]] if device == "cuda" else [_PROVIDERS["cpu"]]

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = levels[graph_optimization]
    opts.log_severity_level = 3  # errors only: ORT's warnings go to stderr, and library code stays quiet
    if profile_dir is not None:
        out = ensure_writable_dir(profile_dir)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(out / "ort_profile")

    source: str | bytes
    if isinstance(model, onnx.ModelProto):
        source = model.SerializeToString()
    elif isinstance(model, (bytes, bytearray)):
        source = bytes(model)
    elif isinstance(model, (str, Path)):
        if not Path(model).is_file():
            raise ArtifactError(f"ONNX model file {str(model)!r} does not exist; export one with "
                                "depthfold.backends.export_onnx")
        source = str(model)
    else:
        raise ConfigError(f"model must be a path, bytes or onnx.ModelProto, got {type(model).__name__}")
    try:
        session = ort.InferenceSession(source, sess_options=opts, providers=providers)
    except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types, all meaning "cannot load"
        where = repr(str(model)) if isinstance(model, (str, Path)) else "the model"
        text = str(err).strip().splitlines()[0]
        hint = ("; ONNX Runtime has kernels for fewer dtypes than torch (its CPU Conv has none for float64): "
                "cast the model and inputs with .float(), or time it on backend='torch'"
                if "NOT_IMPLEMENTED" in text else "")
        raise ArtifactError(f"ONNX Runtime cannot load {where}: {text}{hint}") from err
    if device == "cuda" and session.get_providers()[0] != _PROVIDERS["cuda"]:
        # ORT silently falls back to CPU when the CUDA/cuDNN libraries fail to load.
        raise BackendUnavailableError(
            "CUDAExecutionProvider is installed but failed to initialise (session fell back to "
            f"{session.get_providers()}); check that the CUDA and cuDNN versions match onnxruntime-gpu")
    logger.debug("ORT session on %s: providers=%s threads=%d inter_op=1 sequential graph_optimization=%s",
                 device, session.get_providers(), threads, graph_optimization)
    return session


def session_device(session: onnxruntime.InferenceSession) -> str:
    """``"cuda"`` if the session's first provider is the CUDA EP, else ``"cpu"``."""
    return "cuda" if session.get_providers()[0] == _PROVIDERS["cuda"] else "cpu"


def session_threads(session: onnxruntime.InferenceSession) -> int:
    """The session's intra-op thread count (0: ORT's default, not fixed)."""
    return int(session.get_session_options().intra_op_num_threads)


def _shape_str(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) if d is not None else "?" for d in shape) + "]"


def feeds(session: onnxruntime.InferenceSession, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    """Map positional inputs to the session's inputs, checking count, shape and dtype."""
    expected = session.get_inputs()
    if isinstance(inputs, (torch.Tensor, np.ndarray)):
        inputs = [inputs]
    if len(inputs) != len(expected):
        names = [i.name for i in expected]
        raise ConfigError(f"the model takes {len(expected)} input(s) {names}, got {len(inputs)}; "
                          "pass them positionally in that order")
    feed: dict[str, np.ndarray] = {}
    for spec, value in zip(expected, inputs, strict=True):
        arr = to_numpy(value, name=f"input {spec.name!r}")
        want_shape = list(spec.shape)
        shape_ok = len(want_shape) == arr.ndim and all(
            not isinstance(w, int) or w == g for w, g in zip(want_shape, arr.shape, strict=True))
        want_dtype = _ORT_DTYPES.get(spec.type)
        if not shape_ok or (want_dtype is not None and arr.dtype != want_dtype):
            want = f"{_shape_str(want_shape)} {want_dtype or spec.type}"
            raise ConfigError(f"input {spec.name!r}: expected shape {want}, got {_shape_str(list(arr.shape))} "
                              f"{arr.dtype}")
        feed[spec.name] = arr
    return feed


def run(session: onnxruntime.InferenceSession, inputs: Sequence[torch.Tensor | np.ndarray]) -> list[np.ndarray]:
    """Run ``session`` on positional ``inputs`` and return all outputs as NumPy arrays.

    Raises:
        ConfigError: wrong number of inputs, or an input whose shape or dtype differs from the model's.
    """
    return list(session.run(None, feeds(session, inputs)))


def measure(session: onnxruntime.InferenceSession, inputs: Sequence[torch.Tensor | np.ndarray], *,
            warmup: int = 5, repeat: int = 20) -> Measurement:
    """Time ``session.run`` on ``inputs`` with the shared latency helper (feeds are prepared once, untimed)."""
    feed = feeds(session, inputs)
    return time_callable(lambda: session.run(None, feed), warmup=warmup, repeat=repeat,
                         threads=session_threads(session), backend="onnxruntime",
                         device=session_device(session))


def measure_kernels(model: onnx.ModelProto | bytes | str | Path, inputs: Sequence[torch.Tensor | np.ndarray], *,
                    device: str = "cpu", threads: int = 1, warmup: int = 5, repeat: int = 20,
                    exclude: Sequence[str] = LAYOUT_OPS, flush_bytes: int = 0) -> Measurement:
    """Time the model's own kernels with ORT's profiler: each sample is one run's summed node kernel time,
    leaving out ``exclude`` op types (by default the layout reorders) and the per-call session overhead.

    This is what a layer costs inside a larger model, where its inputs arrive already in ORT's internal
    layout; end-to-end timing of the layer alone adds the reorders at its boundary (on ORT CPU, ~25% of a
    MobileNetV2 layer's time at 224x224). Whole models are timed end to end (:func:`measure`).

    ``flush_bytes``: before every run, write a buffer this large (~2x :func:`last_level_cache_bytes`), so
    the layer's weights come from memory as they do inside a network whose weights do not fit in cache; its input is read again by the (untimed) layout reorder and is warm, as
    it is in a network. Without it, a 512-channel conv of 64x64 ResNet-34 times at half its in-network cost.
    """
    _check_counts(warmup, repeat)
    events, device = _profile_events(model, inputs, device=device, threads=threads, runs=warmup + repeat,
                                     flush_bytes=flush_bytes)
    runs = _runs(events, warmup + repeat)
    starts = [start for start, _ in runs]
    kernels = [0.0] * len(runs)
    skip = set(exclude)
    for e in _kernel_events(events):
        if e.get("args", {}).get("op_name") in skip:
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and e["ts"] <= runs[i][1]:
            kernels[i] += e["dur"] / 1000.0  # microseconds -> ms
    return Measurement(samples_ms=tuple(kernels[warmup:]), warmup=warmup, threads=threads, backend="onnxruntime",
                       device=device)


def profile_nodes(model: onnx.ModelProto | bytes | str | Path, inputs: Sequence[torch.Tensor | np.ndarray], *,
                  device: str = "cpu", threads: int = 1, warmup: int = 3, repeat: int = 10) -> list[dict[str, Any]]:
    """Per-node kernel time from ORT's profiler: ``[{"name", "op_type", "ms"}]`` in execution order, ``ms`` the
    median over ``repeat`` runs (after ``warmup``) of the node's kernel time in one run."""
    _check_counts(warmup, repeat)
    events, _ = _profile_events(model, inputs, device=device, threads=threads, runs=warmup + repeat)
    runs = _runs(events, warmup + repeat)[warmup:]
    starts = [start for start, _ in runs]
    per_node: dict[str, list[float]] = {}
    op_types: dict[str, str] = {}
    for e in _kernel_events(events):
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] > runs[i][1]:
            continue  # a warm-up run
        name = str(e["name"]).removesuffix("_kernel_time")
        op_types.setdefault(name, str(e.get("args", {}).get("op_name", "?")))
        per_node.setdefault(name, [0.0] * len(runs))[i] += e["dur"] / 1000.0
    return [{"name": name, "op_type": op_types[name], "ms": quantile(times, 0.5)} for name, times in per_node.items()]


def _profile_events(model: onnx.ModelProto | bytes | str | Path, inputs: Sequence[Any], *, device: str,
                    threads: int, runs: int, flush_bytes: int = 0) -> tuple[list[dict[str, Any]], str]:
    """Run ``model`` ``runs`` times with ORT's profiler on; its trace events and the session's device."""
    with tempfile.TemporaryDirectory(prefix="depthfold-ort-profile-") as tmp:
        session = create_session(model, device=device, threads=threads, profile_dir=Path(tmp))
        feed = feeds(session, inputs)
        scratch = np.zeros(max(flush_bytes, 0) // 8, dtype=np.float64)
        for _ in range(runs):
            if scratch.size:
                scratch += 1.0  # reads and writes every cache line: evicts the weights
            session.run(None, feed)
        with open(session.end_profiling(), encoding="utf-8") as f:
            return json.load(f), session_device(session)


def _runs(events: list[dict[str, Any]], expected: int) -> list[tuple[int, int]]:
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
    if len(runs) != expected:
        raise BackendUnavailableError(f"ONNX Runtime's profile recorded {len(runs)} runs, expected {expected}"
                                      "; this onnxruntime's profiler output is not understood, time end to end")
    return runs


def _kernel_events(events: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"))


@functools.cache
def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache this machine reports (Linux sysfs), or ``default`` if unknown."""
    largest = 0
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = units.get(text[-1:].upper(), 1)
        digits = text[:-1] if text[-1:].upper() in units else text
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return largest or default


class OrtBackend(Backend):
    """ONNX Runtime on this machine's CPU or CUDA execution provider: ``nn.Module`` -> ONNX -> session.

    ``compile`` takes an ``nn.Module`` (exported in memory, cached by graph digest), an ONNX file, bytes or
    ``ModelProto``, or an :class:`~depthfold.backends.onnx.OnnxArtifact`. Options: ``graph_optimization``
    (the session's level, default ``"all"``), ``opset`` and ``rtol`` (of :meth:`export`'s verification).
    On the CPU, layers are timed by their own kernels from ORT's profiler (``layer_scope == "kernels"``).
    """

    name = "onnxruntime"
    OPTIONS = ("graph_optimization", "opset", "rtol")
    VERSIONED = ("onnxruntime",)

    def check_target(self, target: Target) -> None:
        if target.arch != host_arch():
            raise BackendUnavailableError(
                f"onnxruntime runs models on this {host_arch()} machine only, not {target.arch}; "
                "use the tvm backend to cross-compile for another architecture")
        level = self.options.get("graph_optimization", "all")
        if level not in GRAPH_OPTIMIZATIONS:
            raise ConfigError(f"unknown graph_optimization {level!r}; known: {', '.join(GRAPH_OPTIMIZATIONS)}"
                              f"{suggest(str(level), GRAPH_OPTIMIZATIONS)}")

    @property
    def layer_scope(self) -> LayerScope:
        return "kernels" if self.target.device == "cpu" else "end_to_end"

    def _source(self, model: Any, inputs: Inputs) -> Any:
        # Before an export: a missing CUDA execution provider fails at once.
        check_session_args(device=self.target.device, threads=self.threads,
                           graph_optimization=self.options.get("graph_optimization", "all"))
        if isinstance(model, torch.nn.Module):
            return to_onnx_model(model, tuple(inputs), opset=self.options.get("opset"))
        return model.path if isinstance(model, OnnxArtifact) else model

    def compile(self, model: Any, example_inputs: Inputs) -> onnxruntime.InferenceSession:
        return create_session(self._source(model, example_inputs), device=self.target.device, threads=self.threads,
                              graph_optimization=self.options.get("graph_optimization", "all"))

    def run(self, compiled: onnxruntime.InferenceSession, inputs: Inputs) -> list[np.ndarray]:
        return run(compiled, list(inputs))

    def prepare(self, compiled: onnxruntime.InferenceSession, inputs: Inputs
                ) -> tuple[Callable[[], object], Callable[[], None] | None]:
        feed = feeds(compiled, list(inputs))
        return (lambda: compiled.run(None, feed)), None

    def export(self, model: Any, example_inputs: Inputs, out_dir: str | Path) -> OnnxArtifact:
        return export_onnx(model, tuple(example_inputs), Path(out_dir) / "model.onnx",
                           opset=self.options.get("opset"), rtol=self.options.get("rtol", 1e-4))

    def measure_layer(self, layer: GraphModule, inputs: Inputs, *, cold: bool = False) -> Measurement:
        check_session_args(device=self.target.device, threads=self.threads,
                           graph_optimization=self.options.get("graph_optimization", "all"))
        try:
            model = to_onnx_model(layer, tuple(inputs), opset=self.options.get("opset"), exporter="torchscript")
        except ArtifactError:  # an op the tracing exporter lacks (it is deprecated upstream): the dynamo exporter
            model = to_onnx_model(layer, tuple(inputs), opset=self.options.get("opset"))
        if self.layer_scope == "kernels":
            return measure_kernels(model, list(inputs), device=self.target.device,
                                   threads=self.threads, warmup=self.warmup, repeat=self.repeat,
                                   flush_bytes=2 * last_level_cache_bytes() if cold else 0)
        return self.measure(model, inputs)
