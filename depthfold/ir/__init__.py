"""depthfold's IR: an ATen-level ``torch.fx.GraphModule`` from ``torch.export`` plus a networkx view."""

from __future__ import annotations

from . import ops
from .blocks import (
    AttentionSite,
    Sublayer,
    TransformerBlock,
    TransformerStack,
    attention_site,
    find_stack,
    remove_dead,
)
from .capture import (
    CapturedModel,
    capture,
    describe_inputs,
    dynamic_dims,
    free_dims,
    input_names,
    normalize_inputs,
    split_inputs,
)
from .digest import digest_graph, digest_tensors
from .graph import (
    META_DTYPE,
    META_DYNAMIC_DIMS,
    META_FROM,
    META_MODULE_PATH,
    META_MODULE_TYPE,
    META_SHAPE,
    annotate,
    clone,
    compute_nodes,
    get_param,
    is_shared,
    module_path,
    new_param,
    ownership_problem,
    prune_unused_attributes,
    record_origin,
    set_param,
    shape_of,
    tap,
    to_module,
)
from .serialize import PortableGraph, graph_from_bytes, graph_to_bytes
from .stats import graph_stats, op_histogram
from .verify import (
    TOLERANCE,
    ErrorStats,
    check_equivalent,
    compare_outputs,
    flatten_outputs,
    locate_divergence,
    random_inputs_like,
    structural_check,
)
from .view import (
    RepeatedBlocks,
    ResidualBlock,
    attention_sites,
    immediate_dominators,
    linear_chains,
    repeated_blocks,
    residual_blocks,
    to_networkx,
)

__all__ = [
    "AttentionSite", "CapturedModel", "ErrorStats", "Sublayer", "TransformerBlock", "TransformerStack",
    "attention_site", "find_stack", "remove_dead", "META_DTYPE", "META_DYNAMIC_DIMS", "META_FROM", "META_MODULE_PATH", "META_MODULE_TYPE",
    "META_SHAPE", "PortableGraph", "RepeatedBlocks", "ResidualBlock", "TOLERANCE", "annotate", "attention_sites",
    "capture", "check_equivalent", "clone", "compare_outputs", "compute_nodes", "describe_inputs", "digest_graph", "digest_tensors", "dynamic_dims", "free_dims", "input_names",
    "split_inputs",
    "flatten_outputs", "get_param", "graph_from_bytes", "graph_stats", "graph_to_bytes", "is_shared", "ownership_problem", "set_param", "immediate_dominators", "linear_chains",
    "locate_divergence", "module_path", "new_param", "normalize_inputs", "op_histogram", "ops",
    "prune_unused_attributes", "random_inputs_like", "record_origin", "repeated_blocks",
    "residual_blocks", "shape_of", "structural_check", "tap", "to_module", "to_networkx",
]
