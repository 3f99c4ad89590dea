"""Content digests of graphs and tensors: the keys of every cache (tables, ONNX exports)."""

from __future__ import annotations

import hashlib

import torch
from torch.fx import GraphModule

__all__ = ["digest_graph", "digest_tensors"]


def digest_tensors(*tensors: torch.Tensor | None) -> str:
    """A SHA-256 of the tensors' shapes, dtypes and values (``None`` entries are skipped)."""
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            # Raw bytes through uint8: the same as numpy's for every dtype, and works for bfloat16 too.
            h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def digest_graph(gm: GraphModule) -> str:
    """The graph's code (with that of nested graphs, such as ``torch.cond`` branches) and every parameter and
    buffer: two graphs with equal digests compute the same."""
    h = hashlib.sha256(gm.code.encode())
    for name, module in sorted(gm.named_modules()):
        if name and isinstance(module, GraphModule):
            h.update(name.encode())
            h.update(module.code.encode())
    for name, value in sorted(gm.state_dict().items()):
        h.update(name.encode())
        h.update(digest_tensors(value).encode())
    return h.hexdigest()
