"""Segments of the trunk and the replacements LayerMerge may choose for each.

A segment ``(s, e]`` keeps the activation at position ``e`` and removes every activation strictly inside.
Its convolutions are *kept* or *pruned* (replaced by the identity; only a conv that keeps every shape may
be). What the kept convs become depends on whether an activation was removed:

* ``original`` — nothing removed or pruned: the layers as they are (latency reference, importance 0);
* ``pruned`` — no activation removed, some convs pruned: the rest keep their own padding;
* ``merged`` — activations removed: the kept convs (and any residual block lying wholly inside, its
  shortcut included) compose into one conv. To make that composition exact the segment is *re-padded*:
  its total padding is applied once at the segment input and the inner convs are unpadded.
* ``barrier`` — the single forced choice for an item no segment may cross.

Geometry of the merged conv, per spatial dimension, tracked as the window ``[S*i - P, S*i - P + K)`` of
segment-input pixels that output ``i`` reads: a conv ``(k, s, p)`` maps ``(S, P, K)`` to
``(S*s, P + S*p, K + S*(k-1))``; a residual add takes the union of both branches' windows (equal
strides required). Per (kernel, groups) only one subset of pruned convs is kept: the one keeping the
most convs (then the most kernel area), so the table has one entry per distinct merged layer as in
LayerMerge, and its importance is measured for exactly that subset.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from ..merge_linear_chains import merged_groups
from .trunk import Act, Barrier, Join, Layer, Trunk

__all__ = ["Geometry", "SegmentChoice", "enumerate_choices", "segment_geometry", "Mode"]

Mode = Literal["layermerge", "depth", "layer"]
ChoiceKind = Literal["original", "pruned", "merged", "barrier"]

_MAX_SUBSET_BITS = 10
"""Enumerate every prune subset up to this many prunable convs per segment; beyond, prune at most two."""


@dataclass(frozen=True)
class Geometry:
    """The single conv a merged segment becomes (its padding is the segment's total padding)."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    groups: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    padding_end: tuple[int, int] | None = None
    """Bottom and right padding when they differ from ``padding`` (top, left)."""
    linear: bool = False
    """A linear on the last dim (the segment's layers are channels-last linears)."""

    @property
    def end_padding(self) -> tuple[int, int]:
        return self.padding_end if self.padding_end is not None else self.padding


@dataclass(frozen=True)
class SegmentChoice:
    """One candidate replacement of trunk segment ``(start, end]``."""

    start: int
    end: int
    kind: ChoiceKind
    kept: tuple[str, ...] = ()
    """Conv nodes kept, in trunk order (trunk convs only; shortcut convs are always kept)."""
    pruned: tuple[str, ...] = ()
    removed_acts: tuple[str, ...] = ()
    absorbed: tuple[str, ...] = ()
    """Residual adds folded into the merged conv (their shortcut becomes part of its kernel)."""
    geometry: Geometry | None = None
    """For ``merged`` choices: the conv the segment becomes."""

    @property
    def label(self) -> str:
        if self.kind == "merged" and self.geometry is not None:
            g = self.geometry
            k = "linear" if g.linear else "x".join(map(str, g.kernel))
            dw = " dw" if g.groups > 1 and g.groups == g.in_channels == g.out_channels else ""
            return f"merged {k}{dw} ({len(self.kept)} kept, {len(self.pruned)} pruned)"
        return f"{self.kind} ({len(self.kept)} kept, {len(self.pruned)} pruned)"

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"start": self.start, "end": self.end, "kind": self.kind, "kept": list(self.kept),
                                  "pruned": list(self.pruned), "removed_acts": list(self.removed_acts),
                                  "absorbed": list(self.absorbed)}
        if self.geometry is not None:
            out.update(kernel=list(self.geometry.kernel), stride=list(self.geometry.stride),
                       padding=[*self.geometry.padding, *self.geometry.end_padding], groups=self.geometry.groups)
        return out


@dataclass
class _Window:
    stride: list[int]
    pad: list[int]
    kernel: list[int]
    channels: int
    groups: int
    """Group count of the composed map so far (an identity map is block-diagonal for any divisor)."""

    def conv(self, layer: Layer, cin: int) -> _Window:
        s, p, k = self.stride, self.pad, self.kernel
        return _Window([a * b for a, b in zip(s, layer.stride)],
                       [pp + a * b for pp, a, b in zip(p, s, layer.padding)],
                       [kk + a * (b - 1) for kk, a, b in zip(k, s, layer.kernel)],
                       layer.out_channels,
                       merged_groups(layer.in_channels, self.groups, layer.groups, layer.out_channels, cin))

    def copy(self) -> _Window:
        return _Window(list(self.stride), list(self.pad), list(self.kernel), self.channels, self.groups)


def segment_geometry(trunk: Trunk, start: int, end: int, kept: set[str]) -> Geometry | str:
    """Compose the kept convs of segment ``(start, end]`` into one conv, or say why that is impossible.

    Checks that the merged conv reproduces the segment's output size and that the re-padded segment
    can be built (every intermediate map's extra border is a whole number of pixels).
    """
    items = trunk.between(start, end)
    in_shape = _shape_at(trunk, start)
    if any(isinstance(i, Layer) and i.linear for i in items):
        return _linear_geometry(items, in_shape, _shape_at(trunk, end))
    cin = int(in_shape[1])
    window = _Window([1, 1], [0, 0], [1, 1], cin, cin)
    checkpoints: list[_Window] = []
    states = {trunk.positions[start].boundary: window.copy()}
    boundary = trunk.positions[start].boundary
    for item in items:
        boundary += 1
        if isinstance(item, Layer) and item.conv in kept:
            window = window.conv(item, cin)
            checkpoints.append(window)
        elif isinstance(item, Join):
            entry_boundary = trunk.positions[item.entry].boundary
            if entry_boundary not in states:
                return f"residual add {item.node} has its shortcut outside the segment"
            side = states[entry_boundary].copy()
            for layer in item.side:
                side = side.conv(layer, cin)
            checkpoints.append(side)
            if side.stride != window.stride or side.channels != window.channels:
                return f"residual add {item.node}: branches have different strides or widths once merged"
            pad = [max(a, b) for a, b in zip(window.pad, side.pad)]
            kernel = [max(kb - pb, ks - ps) + p
                      for kb, pb, ks, ps, p in zip(window.kernel, window.pad, side.kernel, side.pad, pad)]
            groups = math.gcd(window.groups, side.groups)
            window = _Window(list(window.stride), pad, kernel, window.channels, groups)
            checkpoints.append(window)
        elif isinstance(item, Barrier):
            return f"barrier {item.nodes[0]} inside the segment"
        states[boundary] = window.copy()
    out_shape = _shape_at(trunk, end)
    for cp in checkpoints:
        if any((pt - px) % sx for pt, px, sx in zip(window.pad, cp.pad, cp.stride)) or any(
                pt < px for pt, px in zip(window.pad, cp.pad)):
            return "re-padding would need a fractional border (strided conv before a wider one)"
    if window.channels != out_shape[1]:
        return f"merged conv would produce {window.channels} channels instead of {out_shape[1]}"
    # The end padding that makes the last output's window [S*(o-1) - P, S*(o-1) - P + K) fit the padded
    # input; up to S-1 pixels more still yield exactly o outputs, so symmetric padding is kept when it fits.
    needed = [s * (o - 1) - p + k - n
              for n, o, p, k, s in zip(in_shape[2:], out_shape[2:], window.pad, window.kernel, window.stride)]
    if any(e <= -s for e, s in zip(needed, window.stride)):
        expected = tuple((n + p - k) // s + 1
                         for n, p, k, s in zip(in_shape[2:], window.pad, window.kernel, window.stride))
        return f"merged conv would produce {expected} instead of {tuple(out_shape[2:])}"
    end = tuple(p if e <= p < e + s else max(e, 0) for e, p, s in zip(needed, window.pad, window.stride))
    groups = window.groups if cin % window.groups == 0 and window.channels % window.groups == 0 else 1
    return Geometry(cin, window.channels, tuple(window.kernel), tuple(window.stride),  # type: ignore[arg-type]
                    tuple(window.pad), groups, tuple(in_shape), tuple(out_shape),  # type: ignore[arg-type]
                    end if end != tuple(window.pad) else None)  # type: ignore[arg-type]


def _linear_geometry(items: tuple, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Geometry | str:
    """A segment of channels-last linears composes into one linear (a 1x1 conv on the last dim)."""
    for item in items:
        if isinstance(item, Layer) and not item.linear:
            return "mixes convs and channels-last linears"
        if isinstance(item, Join) and item.side:
            return f"residual add {item.node} has a conv shortcut around channels-last linears"
        if isinstance(item, Barrier):
            return f"barrier {item.nodes[0]} inside the segment"
    if tuple(in_shape[:-1]) != tuple(out_shape[:-1]):
        return f"linear segment changes the map from {in_shape} to {out_shape}"
    return Geometry(int(in_shape[-1]), int(out_shape[-1]), (1, 1), (1, 1), (0, 0), 1, tuple(in_shape),
                    tuple(out_shape), linear=True)


def _shape_at(trunk: Trunk, position: int) -> tuple[int, ...]:
    return trunk.positions[position].shape


def _join_spans(trunk: Trunk) -> list[tuple[int, int]]:
    """(entry position, boundary of the join item) per residual join."""
    spans = []
    for b, item in enumerate(trunk.items):
        if isinstance(item, Join):
            spans.append((item.entry, b))
    return spans


def segment_problem(trunk: Trunk, start: int, end: int, mode: Mode) -> str | None:
    """Why ``(start, end]`` cannot be one segment, or ``None`` if it can."""
    items = trunk.between(start, end)
    if any(isinstance(i, Barrier) for i in items):
        return None if len(items) == 1 else "crosses a barrier"
    first, last = trunk.positions[start].boundary, trunk.positions[end].boundary
    for entry, b in _join_spans(trunk):
        inside = first <= b < last
        if not inside and start < entry < end:
            return "removes the fork of a residual block that ends outside the segment"
        if inside and entry < start:
            tail = items[b - first + 1:]
            if tail and not (len(tail) == 1 and isinstance(tail[0], Act)):
                return "a residual add with an outside shortcut must end the segment"
    interior_acts = [i for i in items[:-1] if isinstance(i, Act)]
    if mode == "layer" and interior_acts:
        return "layer mode keeps every activation"
    return None


def enumerate_choices(trunk: Trunk, *, mode: Mode = "layermerge", max_span: int = 8,
                      max_kernel: int = 9, rejected: Counter[str] | None = None) -> list[SegmentChoice]:
    """Every candidate of every valid segment with at most ``max_span`` positions.

    ``max_kernel`` bounds merged kernels (LayerMerge's candidates grow with the kernel, and large
    merged kernels are rarely faster). ``rejected``, if given, counts the merges left out, by reason.
    """
    choices: list[SegmentChoice] = []
    L = trunk.num_positions
    for start in range(L):
        for end in range(start + 1, min(L, start + max_span) + 1):
            if segment_problem(trunk, start, end, mode) is not None:
                continue
            choices.extend(_segment_choices(trunk, start, end, mode, max_kernel,
                                            rejected if rejected is not None else Counter()))
    return choices


def _segment_choices(trunk: Trunk, start: int, end: int, mode: Mode, max_kernel: int, rejected: Counter[str]
                     ) -> list[SegmentChoice]:
    items = trunk.between(start, end)
    if len(items) == 1 and isinstance(items[0], Barrier):
        return [SegmentChoice(start, end, "barrier")]
    layers = [i for i in items if isinstance(i, Layer)]
    removed = tuple(i.node for i in items[:-1] if isinstance(i, Act))
    inner_joins = [i for i in items if isinstance(i, Join) and i.entry >= start]
    absorbed = tuple(j.node for j in inner_joins)
    prunable = [layer for layer in layers if layer.prunable] if mode != "depth" else []
    out: list[SegmentChoice] = []
    if not removed and end == start + 1:
        # Only one position wide: a wider unchanged segment is the chain of these, and timing it as one
        # model would price the same layers differently from the single-position pieces. A residual block
        # with no activation in its body lies inside one position, its add included.
        out.append(SegmentChoice(start, end, "original", kept=tuple(lay.conv for lay in layers)))
    best: dict[tuple[object, ...], tuple[tuple[int, int], SegmentChoice]] = {}
    for pruned in _prune_subsets(prunable):
        if not pruned and not removed:
            continue  # the original
        pruned_names = {lay.conv for lay in pruned}
        kept = tuple(lay.conv for lay in layers if lay.conv not in pruned_names)
        pruned_t = tuple(lay.conv for lay in layers if lay.conv in pruned_names)
        if not removed and not inner_joins:
            key: tuple[object, ...] = ("pruned", pruned_t)
            choice = SegmentChoice(start, end, "pruned", kept=kept, pruned=pruned_t)
        else:
            geometry = segment_geometry(trunk, start, end, set(kept))
            if isinstance(geometry, str):
                rejected[geometry] += 1
                continue
            if max(geometry.kernel) > max_kernel:
                rejected[f"merged kernel larger than max_kernel={max_kernel}"] += 1
                continue
            key = ("merged", geometry.kernel, geometry.groups)
            choice = SegmentChoice(start, end, "merged", kept=kept, pruned=pruned_t, removed_acts=removed,
                                   absorbed=absorbed, geometry=geometry)
        area = sum(math.prod(lay.kernel) for lay in layers if lay.conv in set(kept))
        score = (len(kept), area)
        if key not in best or score > best[key][0]:
            best[key] = (score, choice)
    out.extend(choice for _, choice in best.values())
    return out


def _prune_subsets(prunable: list[Layer]) -> list[tuple[Layer, ...]]:
    if len(prunable) <= _MAX_SUBSET_BITS:
        return [c for r in range(len(prunable) + 1) for c in itertools.combinations(prunable, r)]
    return [c for r in range(3) for c in itertools.combinations(prunable, r)]
