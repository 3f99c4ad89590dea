"""What the transformer depth passes share: residual-stream states on calibration data, and block surgery.

``stream_states`` runs the graph on calibration samples and returns the values of chosen nodes (block inputs
and outputs); ``angular_distance`` and the ``token_cosine`` metric compare them, as ShortGPT's Block Influence
(1 - cos(h_in, h_out); Men et al. 2024, arXiv:2403.03853) and Gromov et al.'s angular distance
(arccos(cos) / pi; "The Unreasonable Ineffectiveness of the Deeper Layers", arXiv:2403.17887) do.
``bypass`` removes a block or sublayer by sending its input on as its output (the residual stream keeps
flowing); ``remove_dead`` then deletes the compute and parameters nothing reads.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch.fx import GraphModule

from ... import ir
from ...data import Samples
from .metrics import batched_outputs, token_cosine, token_mask

__all__ = ["angular_distance", "bypass", "narrow_split_projections", "output_similarity", "stream_states"]


def stream_states(gm: GraphModule, samples: Samples, names: Sequence[str], batch_size: int) -> dict[str, torch.Tensor]:
    """The value of each named node on every sample (concatenated over batches)."""
    tapped = ir.tap(gm, list(names))
    chunks: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.no_grad():
        for batch in samples.batches(batch_size):
            _, values = tapped(*batch)
            for name, value in zip(names, values):
                chunks[name].append(value.detach())
    return {n: torch.cat(c) for n, c in chunks.items()}


def angular_distance(a: torch.Tensor, b: torch.Tensor, samples: Samples) -> float:
    """Mean ``arccos(cos(a_t, b_t)) / pi`` over unpadded positions of ``[N, S, H]`` states."""
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).clamp(-1.0, 1.0)
    mask = token_mask(samples, cos.shape)
    dist = torch.arccos(cos) / torch.pi
    return float(dist[mask].mean() if mask is not None else dist.mean())


def output_similarity(teacher_out: torch.Tensor, gm: GraphModule, samples: Samples, batch_size: int) -> float:
    """``token_cosine`` of ``gm``'s main output against the teacher's outputs on the same samples."""
    return token_cosine(teacher_out, batched_outputs(gm, samples, batch_size), samples)


def bypass(gm: GraphModule, output: str, input: str) -> None:
    """Make every reader of node ``output`` read node ``input`` instead (the span between them goes dead)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    nodes[output].replace_all_uses_with(nodes[input])


def narrow_split_projections(gm: GraphModule) -> list[str]:
    """Cut the dead outputs off fused projections: a ``linear`` (or GPT-2's ``addmm`` + ``view``) whose output is
    split on its last dimension with some pieces unread loses those pieces' weight rows and bias entries.

    Returns the names of the narrowed projections. A weight read elsewhere is left alone.
    """
    narrowed = []
    for split in list(gm.graph.nodes):
        found = _split_projection(split)
        if found is None:
            continue
        proj, view, sizes = found
        pieces = {u.args[1]: u for u in split.users}
        keep = sorted(i for i, u in pieces.items() if u.users)
        if len(keep) == len(sizes) or not keep:
            continue
        offsets = [sum(sizes[:k]) for k in range(len(sizes))]
        cols = torch.cat([torch.arange(offsets[k], offsets[k] + sizes[k]) for k in keep])
        weight_node, bias_node, weight_dim = _projection_params(proj)
        if weight_node is None or ir.is_shared(gm, weight_node, allowed_users=[proj]) or (
                bias_node is not None and ir.is_shared(gm, bias_node, allowed_users=[proj])):
            continue
        ir.set_param(gm, weight_node, ir.get_param(gm, weight_node).detach().index_select(weight_dim, cols))
        if bias_node is not None:
            ir.set_param(gm, bias_node, ir.get_param(gm, bias_node).detach().index_select(0, cols))
        if view is not None:
            shape = list(view.args[1])
            shape[-1] = int(cols.numel())
            view.args = (view.args[0], shape, *view.args[2:])
        for node in pieces.values():
            if not node.users:
                gm.graph.erase_node(node)
        split.target = torch.ops.aten.split_with_sizes.default
        split.args = (split.args[0], [sizes[k] for k in keep], -1)
        split.kwargs = {}
        for new_index, k in enumerate(keep):
            pieces[k].args = (split, new_index)
        narrowed.append(proj.name)
    return narrowed


def _split_projection(split) -> tuple | None:  # type: ignore[no-untyped-def, type-arg]
    """``(projection, view or None, piece sizes)`` if ``split`` cuts a projection's last dimension into pieces
    read only through ``getitem``."""
    aten = torch.ops.aten
    if split.op != "call_function" or split.target not in (aten.split.Tensor, aten.split_with_sizes.default):
        return None
    source, size = split.args[0], split.args[1]
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    shape = ir.shape_of(source)
    if shape is None or dim not in (-1, len(shape) - 1) or len(source.users) != 1:
        return None
    if not all(u.target is operator.getitem for u in split.users):
        return None
    total = shape[-1]
    if isinstance(size, int):
        if size <= 0 or total % size:
            return None
        sizes = [size] * (total // size)
    else:
        sizes = list(size)
    view = None
    proj = source
    if source.target in (aten.view.default, aten.reshape.default) and isinstance(source.args[0], torch.fx.Node):
        if not isinstance(source.args[1][-1], int) or source.args[1][-1] != total or len(source.args[0].users) != 1:
            return None
        view, proj = source, source.args[0]
    if proj.target not in (aten.linear.default, aten.addmm.default):
        return None
    return proj, view, sizes


def _projection_params(proj) -> tuple:  # type: ignore[no-untyped-def, type-arg]
    """(weight node, bias node, the weight's output dimension) of a ``linear`` or ``addmm`` projection."""
    aten = torch.ops.aten
    if proj.target is aten.linear.default:
        weight = proj.args[1]
        bias = proj.args[2] if len(proj.args) > 2 else None
        return (weight if weight.op == "get_attr" else None), (bias if bias is not None and bias.op == "get_attr"
                                                               else None), 0
    bias, _, weight = proj.args[:3]
    if proj.kwargs.get("beta", 1) != 1 or proj.kwargs.get("alpha", 1) != 1:
        return None, None, 1
    return (weight if weight.op == "get_attr" else None), (bias if bias.op == "get_attr" else None), 1
