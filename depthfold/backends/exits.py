"""Early exits on backends without control flow: each segment and head compiled on its own, gates on the host.

ONNX Runtime executes the ``If`` nodes of the gated model itself (one session, the skip happens inside it).
TVM's Relax import takes no ``torch.cond``, so for TVM (and any :class:`~depthfold.backends.Backend`) the
gated model is run as a cascade of compiled pieces: segment 0, head 0, the confidence test in NumPy, then
segment 1 on the samples that continue, and so on. Each piece is compiled for the batch size it is called with
(cached), so ``policy=split`` compiles one variant per remaining batch size it meets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.fx import GraphModule

from ..errors import ConfigError
from ..passes.early_exit import EXIT_META, EarlyExitModel, confidence

__all__ = ["HostGatedModel"]


class HostGatedModel:
    """Runs the gated graph ``early_exit`` produced as compiled segments and heads on ``backend``.

    Args:
        backend: any backend (``get_backend("tvm", "x86")``, ``get_backend("onnxruntime")``, ...).
        gated: the graph ``early_exit`` returned (``OptimizeResult.module``), or its :class:`EarlyExitModel`.
    """

    def __init__(self, backend: Any, gated: GraphModule | EarlyExitModel):
        model = gated.meta.get(EXIT_META) if isinstance(gated, GraphModule) else gated
        if not isinstance(model, EarlyExitModel):
            raise ConfigError("HostGatedModel runs a model early_exit produced: pass OptimizeResult.module of a "
                              "pipeline ending in early_exit")
        self.backend, self.model = backend, model
        self._compiled: dict[tuple[str, tuple[int, ...]], Any] = {}

    def _run(self, kind: str, index: int, value: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        module = self.model.segments[index] if kind == "segment" else self.model.heads[index]
        inputs = tuple(torch.from_numpy(np.ascontiguousarray(v)) for v in
                       (value if isinstance(value, (list, tuple)) else (value,)))
        key = (f"{kind}{index}", tuple(int(d) for d in inputs[0].shape))
        if key not in self._compiled:
            self._compiled[key] = self.backend.compile(module, inputs)
        return self.backend.run(self._compiled[key], inputs)[0]

    def __call__(self, *inputs: Any) -> np.ndarray:
        """The gated model's output; per sample, the same as the graph's (under either batch policy)."""
        arrays = [x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in inputs]
        return self._level(0, self._run("segment", 0, arrays))

    def _level(self, k: int, feature: np.ndarray) -> np.ndarray:
        """The answer for ``feature``, the output of segment ``k``: exit ``k``'s where confident, else deeper."""
        if k == len(self.model.heads):
            return feature
        logits = self._run("head", k, feature)
        confident = confidence(torch.from_numpy(logits), self.model.confidence).numpy() >= self.model.thresholds[k]
        if confident.all():
            return logits
        if self.model.policy == "all":  # the whole batch continues; confident samples keep this exit's answer
            deeper = self._level(k + 1, self._run("segment", k + 1, feature))
            return np.where(confident[:, None], logits, deeper)
        out = logits.copy()
        rest = ~confident
        out[rest] = self._level(k + 1, self._run("segment", k + 1, feature[rest]))
        return out
