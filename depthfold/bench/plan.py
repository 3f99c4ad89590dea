"""What ``depthfold bench`` measures: zoo models x pipelines x backend lanes, as a :class:`Plan`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from ..report.validate import RUNTIMES

__all__ = ["Pipeline", "BenchModel", "Plan", "default_plan", "quick_plan", "demo_plan", "RUNTIMES", "LANES"]

LANES = ("onnxruntime", "tvm")
"""Deployment backends every pipeline's ONNX artifact is timed on."""


@dataclass(frozen=True)
class Pipeline:
    """A named pass list, e.g. ``layermerge@1.6`` = ``layermerge:speedup=1.6`` then the exact passes."""

    name: str
    passes: tuple[str, ...] = ()


@dataclass(frozen=True)
class BenchModel:
    """A zoo model with trained weights (digits for CNNs, the standard-library corpus for the decoder)."""

    name: str
    kind: Literal["vision", "decoder"]
    pipelines: tuple[Pipeline, ...]
    resolution: int = 32
    seq_len: int = 64


@dataclass(frozen=True)
class Plan:
    """Models x pipelines x lanes, with the timing settings every interleaved group uses."""

    models: tuple[BenchModel, ...]
    lanes: tuple[str, ...] = LANES
    baselines: tuple[str, ...] = RUNTIMES
    rounds: int = 20
    warmup: int = 3
    threads: int = 1
    device: Literal["cpu", "cuda"] = "cpu"
    quick: bool = False
    aarch64: bool = False
    """Also cross-compile each model's original and fastest pipeline for aarch64 and check them under emulation."""
    min_sample_ms: float = 10.0
    """Each timing sample repeats a call until it covers this long (short models jitter by a few percent)."""

    def __post_init__(self) -> None:
        for lane in self.lanes:
            if lane not in LANES:
                raise ConfigError(f"unknown lane {lane!r}; lanes are {', '.join(LANES)}")
        for runtime in self.baselines:
            if runtime not in RUNTIMES:
                raise ConfigError(f"unknown baseline {runtime!r}; baselines are {', '.join(RUNTIMES)}")
        if "onnxruntime" not in self.baselines:
            raise ConfigError("the baselines must include onnxruntime: every speedup is reported against it")
        if self.rounds < 1 or self.warmup < 0 or self.threads < 1:
            raise ConfigError(f"rounds >= 1, warmup >= 0 and threads >= 1, got {self.rounds}, {self.warmup}, "
                              f"{self.threads}")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ConfigError(f"a model appears twice in the plan: {names}")

    def select(self, models: tuple[str, ...] = (), pipelines: tuple[str, ...] = ()) -> Plan:
        """The plan restricted to ``models`` and ``pipelines`` (by name; empty: all). ``original`` is always
        kept: every speedup is taken against it."""
        known_models = {m.name for m in self.models}
        known_pipes = {p.name for m in self.models for p in m.pipelines}
        for name in models:
            if name not in known_models:
                raise ConfigError(f"--models: {name!r} is not in the plan ({', '.join(sorted(known_models))})")
        for name in pipelines:
            if name not in known_pipes:
                raise ConfigError(f"--pipelines: {name!r} is not in the plan ({', '.join(sorted(known_pipes))})")
        chosen = []
        for m in self.models:
            if models and m.name not in models:
                continue
            pipes = tuple(p for p in m.pipelines if not pipelines or p.name in pipelines or p.name == "original")
            chosen.append(BenchModel(m.name, m.kind, pipes, m.resolution, m.seq_len))
        return Plan(tuple(chosen), self.lanes, self.baselines, self.rounds, self.warmup, self.threads, self.device,
                    self.quick, self.aarch64, self.min_sample_ms)


EXACT = ("fold_bn", "merge_linear_chains")
ORIGINAL = Pipeline("original")
RECOVER_LM = "recover:steps=200,lr=1e-3,lm_weight=0.5,batch_size=32,train_samples=1024,eval_samples=64"
"""Distillation (next-token KL + LM loss) after a decoder pass, on the bench's calibration windows."""


def _layermerge(speedup: float, **options: object) -> Pipeline:
    extra = "".join(f",{k}={v}" for k, v in options.items())
    return Pipeline(f"layermerge@{speedup:g}", (f"layermerge:speedup={speedup:g}{extra}", *EXACT))


def default_plan(*, threads: int = 1, device: str = "cpu", rounds: int = 20) -> Plan:
    """Digits-trained ResNet-18 and MobileNetV2 at 32x32 (original, exact, LayerMerge at three budgets, early
    exits) and the zoo's text-trained Llama decoder (original, exact, KV sharing with and without recovery,
    layer dropping, LaCo)."""
    vision = (ORIGINAL, Pipeline("exact", EXACT), *(_layermerge(s, recover_steps=400) for s in (1.3, 1.6, 1.8)),
              Pipeline("early_exit", (*EXACT, "early_exit:auto=2")))
    decoder = (ORIGINAL, Pipeline("exact", (*EXACT, "fuse_qkv")),
               Pipeline("kv_share@cla2", ("kv_share:preset=cla2",)),
               Pipeline("kv_share@cla2+recover", ("kv_share:preset=cla2", RECOVER_LM)),
               Pipeline("kv_share@cla3", ("kv_share:preset=cla3",)),
               Pipeline("drop_layers@1", ("drop_layers:n=1",)),
               Pipeline("collapse_blocks@3", ("collapse_blocks:layers=3,max_merges=1,threshold=0",)))
    return Plan((BenchModel("resnet18", "vision", vision), BenchModel("mobilenetv2_100", "vision", vision),
                 BenchModel("llama_tiny", "decoder", decoder)),
                threads=threads, device=device, rounds=rounds, aarch64=device == "cpu")  # type: ignore[arg-type]


def quick_plan(*, threads: int = 1, device: str = "cpu") -> Plan:
    """About a minute: digits ResNet-18 (original, exact, a cheap LayerMerge) on ONNX Runtime against torch
    eager, onnxslim and ONNX Runtime, 10 rounds."""
    pipes = (ORIGINAL, Pipeline("exact", EXACT),
             _layermerge(1.6, importance="zero_shot", recover_steps=50, replan=1, eval_samples=64))
    return Plan((BenchModel("resnet18", "vision", pipes),), lanes=("onnxruntime",),
                baselines=("torch_eager", "onnxruntime", "onnxslim"), rounds=10, warmup=2, threads=threads,
                device=device, quick=True)  # type: ignore[arg-type]


def demo_plan(*, threads: int = 1) -> Plan:
    """``make demo``: digits ResNet-18 at 32x32 compressed by LayerMerge (a 1.8x budget, 400 recovery steps)
    and by the exact passes, on ONNX Runtime against torch eager and onnxslim."""
    pipes = (ORIGINAL, Pipeline("exact", EXACT), _layermerge(1.8, recover_steps=400))
    return Plan((BenchModel("resnet18", "vision", pipes),), lanes=("onnxruntime",),
                baselines=("torch_eager", "onnxruntime", "onnxslim"), threads=threads)
