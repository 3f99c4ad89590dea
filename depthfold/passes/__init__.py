"""depthfold's passes: a registry of named graph transforms and a manager that runs and verifies them."""

from __future__ import annotations

from . import fold_bn, fuse_qkv, layermerge, merge_linear_chains, recover  # noqa: F401  (registers the built-in passes)
from .base import Change, Exactness, PassContext, PassResult, Skip
from .manager import PassManager, PassRecord, PipelineResult
from .registry import PassInfo, PassSpec, get_pass, list_passes, parse_pass, register_pass

__all__ = [
    "Change", "Exactness", "PassContext", "PassInfo", "PassManager", "PassRecord", "PassResult", "PassSpec",
    "PipelineResult", "Skip", "get_pass", "list_passes", "parse_pass", "register_pass",
]
