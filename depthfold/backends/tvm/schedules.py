"""Default CPU schedules for TVM's Relax pipeline: channels-last layout and register-tiled kernels.

TVM 0.27 legalizes every operator into unscheduled TIR loops on CPU. This pipeline converts convolutions to
NHWC activations / HWIO weights (transposes left at the model's edges), then schedules every reduction kernel
the way hand-written direct convolutions are written (Goto-style register blocking, as in "Anatomy of
High-Performance Many-Threaded Matrix Multiplication", and the NHWC direct convolution of "High Performance
Zero-Memory Overhead Direct Convolutions", Zhang et al., ICML 2018): an output tile of a few pixels x a few
vector registers of channels accumulates in registers over the whole reduction, the elementwise epilogue
(bias, BatchNorm, activation, residual add) runs on the tile at write-back, the channel loop is vectorised,
and constant weights are relaid at compile time into the tile order. Elementwise kernels are vectorised and
parallelised. Tile sizes come from the target's vector width and register count, so x86 (AVX2, AVX-512) and
aarch64 (NEON) share one code path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._common import logger

#: Relax operators converted to channels-last (activations NHWC, conv weights HWIO); pools, elementwise ops and
#: reductions follow their input's layout (asking for one on a pool trips an assertion in TVM 0.27).
CHANNELS_LAST = {"relax.nn.conv2d": ["NHWC", "HWIO"]}


#: Convs whose weights outweigh their activations (late, small maps) reduce in blocks of input channels whose
#: weights for one channel tile fit this many bytes (an L1 data cache), each block applied to every pixel
#: before the next; only while the channel tile's accumulators for all pixels fit ACCUMULATOR_BYTES.
L1_WEIGHT_BYTES = 32 * 1024
ACCUMULATOR_BYTES = 64 * 1024


@dataclass(frozen=True)
class VectorUnit:
    """What the tiles are sized from: float32 lanes per vector register, the register count, and how many
    channel vectors one output tile holds (x86 broadcasts an input from memory inside the FMA, so narrow
    channel tiles with many pixels; NEON multiplies by a register lane, so square tiles)."""

    lanes: int
    registers: int
    channel_vectors: int

    @property
    def accumulators(self) -> int:
        """Vector registers one output tile may hold (the rest: weights, inputs, addresses)."""
        return 16 if self.registers >= 32 else 12

    @classmethod
    def of(cls, target: Any) -> VectorUnit:
        from tvm.target.codegen import target_has_features

        def has(feature: str) -> bool:
            try:
                return bool(target_has_features(feature, target))
            except Exception:  # a target without LLVM features
                return False

        triple = str(target.attrs.get("mtriple", "")) if hasattr(target, "attrs") else ""
        if triple.startswith("aarch64") or has("neon"):
            return cls(lanes=4, registers=32, channel_vectors=4)
        if has("avx512f"):
            return cls(lanes=16, registers=32, channel_vectors=2)
        if has("avx2") or has("avx"):
            return cls(lanes=8, registers=16, channel_vectors=2)
        return cls(lanes=4, registers=16, channel_vectors=2)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose_tile(channels: int, pixels: int, unit: VectorUnit) -> tuple[int, int]:
    """(pixel tile, channel tile) of a register-tiled output.

    Channel tile: whole vector registers (up to ``channel_vectors`` of them) when they divide ``channels``;
    otherwise the largest power-of-two piece of a vector that divides it (24 channels on AVX-512: 8 lanes; a
    24-lane vector runs ~4x slower, LLVM splitting it into awkward pieces). Pixel tile:
    the largest divisor of ``pixels`` that keeps the accumulators in registers. A kernel with one row (a
    matrix-vector product) widens the channel tile instead."""
    v = unit.lanes
    widest = unit.channel_vectors * v if pixels > 1 else unit.accumulators * v // 4
    piece = v
    while channels % piece:
        piece //= 2
    channel_tile = piece if piece < v else max(k * v for k in range(1, widest // v + 1) if channels % (k * v) == 0)
    registers = -(-channel_tile // v)
    rows = max(1, unit.accumulators // registers)
    pixel_tile = max(d for d in _divisors(pixels) if d <= rows)
    return pixel_tile, channel_tile


def _int(expr: Any) -> int | None:
    from tvm import tirx

    return int(expr.value) if isinstance(expr, tirx.IntImm) else None


def _is_reduction(sch: Any, block: Any) -> bool:
    from tvm import tirx

    return any(iv.iter_type == tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)


def _vars_in(region: Any) -> set[Any]:
    from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr

    used: set[Any] = set()
    for r in region:
        used |= collect_vars_used_in_prim_expr(r.min)
    return used


def _vector_piece(extent: int, lanes: int) -> int:
    """The widest power-of-two piece of a vector (at least 4 lanes) that divides ``extent``; 1 for none."""
    piece = lanes
    while piece >= 4 and extent % piece:
        piece //= 2
    return piece if piece >= 4 else 1


def _vectorize_elementwise(sch: Any, block: Any, unit: VectorUnit, *, under: int = 0) -> None:
    """Vectorise a spatial block along its innermost axis (channels, in channels-last) and parallelise the
    fused outer loops. Vectors never straddle rows: a vector over a flattened index turns every lane's
    address and padding test into a division (a transpose or a padded copy then runs several times slower
    than a scalar loop); an innermost axis no vector piece divides (3 image channels) stays scalar, unrolled."""
    loops = sch.get_loops(block)[under:]
    extents = [_int(sch.get(lp).extent) for lp in loops]
    if not loops or None in extents:
        return
    inner_extent = extents[-1]
    piece = _vector_piece(inner_extent, unit.lanes)
    outer = list(loops[:-1])
    if piece > 1:
        rest, inner = sch.split(loops[-1], [None, piece])
        sch.vectorize(inner)
        if inner_extent // piece > 1:
            outer.append(rest)
    elif inner_extent <= 8:
        sch.unroll(loops[-1])
    else:
        outer.append(loops[-1])
    if not outer or under:
        return
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    if math.prod(extents) >= 64 * unit.lanes and _int(sch.get(fused).extent) not in (None, 1):
        sch.parallel(fused)


def _open(func: Any) -> tuple[Any, list[Any]] | None:
    """A schedule of a PrimFunc and its top-level blocks (None for anything else)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.analysis import get_root_block

    if not isinstance(func, tirx.PrimFunc):
        return None
    sch = s_tir.Schedule(func)
    return sch, list(sch.get_child_blocks(get_root_block(sch)))


class Guarded:
    """A dlight schedule rule whose own exceptions mean "not applicable", so the next rule gets the kernel
    (TVM 0.27's CUDA GEMV rule asserts on depthwise convolutions instead of declining them)."""

    def __new__(cls, rule: Any) -> Any:
        from tvm.s_tir import dlight as dl

        class _Guarded(dl.ScheduleRule):
            def apply(self, func: Any, target: Any, tunable: bool) -> Any:
                try:
                    return rule.apply(func, target, tunable)
                except Exception as err:  # the rule's own bug or an unexpected kernel shape
                    logger.debug("tvm: schedule rule %s declined a kernel after raising %r", type(rule).__name__,
                                 err)
                    return None

            def is_target_available(self, target: Any) -> bool:
                return bool(rule.is_target_available(target))

        return _Guarded()


def register_tiled(unit: VectorUnit) -> Any:
    """The rule for kernels with one reduction (conv, depthwise/grouped conv, dense, matmul, pooling): tile the
    last two output axes (pixels x channels) into a register tile, reduce over the whole window into it, write
    the tile back through the fused epilogue."""
    from tvm import tirx
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class RegisterTiled(CPUScheduleRule):  # type: ignore[misc]
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            opened = _open(func)
            if opened is None:
                return None
            sch, blocks = opened
            reductions = [k for k, b in enumerate(blocks) if _is_reduction(sch, b)]
            if len(reductions) != 1:
                return None
            index = reductions[0]
            main, before, after = blocks[index], blocks[:index], blocks[index + 1:]
            stmt = sch.get(main)
            loops = sch.get_loops(main)
            kinds = ["R" if iv.iter_type == tirx.IterVar.CommReduce else "S" for iv in stmt.iter_vars]
            if len(loops) != len(kinds) or "".join(kinds) != "S" * kinds.count("S") + "R" * kinds.count("R"):
                return None
            extents = [_int(sch.get(loop).extent) for loop in loops]
            spatial_vars = [iv.var for iv, k in zip(stmt.iter_vars, kinds) if k == "S"]
            if None in extents or not spatial_vars or len(stmt.writes) != 1:
                return None
            written = [r.min for r in stmt.writes[0].region]
            if len(written) != len(spatial_vars) or not all(
                    isinstance(w, tirx.Var) and w.same_as(v) for w, v in zip(written, spatial_vars)):
                return None
            spatial, reduce = loops[:len(spatial_vars)], loops[len(spatial_vars):]
            channels = extents[len(spatial_vars) - 1]
            pixels = extents[len(spatial_vars) - 2] if len(spatial_vars) >= 2 else 1
            pixel_tile, channel_tile = choose_tile(channels, pixels, unit)

            for b in after[:-1]:  # the epilogue: one block computing bias/BN/activation/residual at write-back
                sch.compute_inline(b)
            c_outer, c_inner = sch.split(spatial[-1], [None, channel_tile])
            outer = list(spatial[:-2]) if len(spatial) >= 2 else []
            p_inner = None
            if len(spatial) >= 2:
                p_outer, p_inner = sch.split(spatial[-2], [None, pixel_tile])
                outer.append(p_outer)
            dominate = self._weights_dominate(sch, stmt, spatial_vars[:-1])
            order = [c_outer, *outer] if dominate else [*outer, c_outer]
            inner = [p_inner] if p_inner is not None else []
            block = self._weight_block(extents, len(spatial_vars), channel_tile) if dominate else None
            if block is not None:
                # K-blocked: per channel tile, a block of the reduction whose weights stay in L1 is applied to
                # every pixel before the next block; the tile's accumulators for all pixels live in cache
                k_outer, k_inner = sch.split(reduce[-1], [None, block])
                sch.reorder(c_outer, k_outer, *outer, *reduce[:-1], k_inner, *inner, c_inner)
                reduce = [k_outer, *reduce[:-1], k_inner]
                tile = c_outer
            else:
                sch.reorder(*order, *reduce, *inner, c_inner)
                tile = sch.fuse(*order) if len(order) > 1 else order[0]
            write_back = after[-1] if after else sch.cache_write(main, 0, "global")
            sch.reverse_compute_at(write_back, tile)
            sch.set_scope(main, 0, "local")
            sch.vectorize(c_inner)
            if p_inner is not None and pixel_tile > 1:
                sch.unroll(p_inner)
            self._vector_tile(sch, sch.get_loops(write_back)[1:], unroll=block is None)
            if _int(sch.get(tile).extent) not in (None, 1):
                sch.parallel(tile)
            if reduce:  # last: loop annotations need the block with its init
                init = sch.decompose_reduction(main, reduce[0])
                self._vector_tile(sch, sch.get_loops(init)[1:], unroll=block is None)
            self._prepack_weights(sch, func, main, stmt, spatial_vars, channel_tile)
            per_tile = self._per_channel_input(stmt, spatial_vars)
            for b in before:
                if _is_reduction(sch, b):
                    continue
                if per_tile:  # a padded copy per tile, in cache, instead of one of the whole map
                    sch.compute_at(b, tile)
                    _vectorize_elementwise(sch, b, unit, under=1)
                else:
                    _vectorize_elementwise(sch, b, unit)
            return sch

        @staticmethod
        def _prepack_weights(sch: Any, func: Any, main: Any, stmt: Any, spatial_vars: Sequence[Any],
                             channel_tile: int) -> None:
            """Relay each constant weight read by the kernel as ``[channel tiles, ..., channel_tile]`` so the
            reduction streams it contiguously (HWIO rows are a whole output-channel row apart). The relayout
            is a ``layout_rewrite_preproc`` block that ``SplitLayoutRewritePreproc`` lifts out and
            ``FoldConstant`` then runs at compile time."""
            free = {int(i) for i in func.attrs["layout_free_buffers"]} if "layout_free_buffers" in func.attrs \
                else set()
            params = [p.name for k, p in enumerate(func.params) if k in free]
            channel = spatial_vars[-1].name
            pixels = {v.name for v in spatial_vars[:-1]}
            for index, read in enumerate(sch.get(main).reads):  # the block as scheduled: the accumulator first
                region = [r.min for r in read.region]
                if read.source.name not in params or len(region) < 2 \
                        or {v.name for v in _vars_in(read.region)} & pixels:
                    continue
                if not (isinstance(region[-1], tirx.Var) and region[-1].name == channel):
                    continue
                if channel_tile == _int(read.source.shape[-1]):
                    continue  # one tile spans the whole row already
                cached = sch.cache_read(main, index, "global")
                sch.annotate(cached, "meta_schedule.layout_rewrite_preproc", True)
                sch.transform_layout(main, ("read", index),
                                     lambda *i: (i[-1] // channel_tile, *i[:-1], i[-1] % channel_tile))

        @staticmethod
        def _per_channel_input(stmt: Any, spatial_vars: Sequence[Any]) -> bool:
            """Whether the kernel reads its input at the output's own channel (a depthwise conv, a pool): no
            reduction over input channels amortises a copy of the padded input, so the kernel is memory-bound
            and its producers are computed per output tile, in cache."""
            channel, pixels = spatial_vars[-1], set(spatial_vars[:-1])
            out = stmt.writes[0].source
            for read in stmt.reads:
                if read.source.same_as(out) or not _vars_in(read.region) & pixels:
                    continue
                if channel in _vars_in(read.region[-1:]):
                    return True
            return False

        @staticmethod
        def _weight_block(extents: Sequence[int | None], spatial: int, channel_tile: int) -> int | None:
            """The reduction block (a divisor of the innermost reduction axis, the input channels) whose weights
            for one channel tile fill at most :data:`L1_WEIGHT_BYTES`; None when the whole reduction fits
            already or the tile's accumulators over all pixels would not stay in cache."""
            reduce = [e or 1 for e in extents[spatial:]]
            if not reduce or reduce[-1] < 2:
                return None
            window = math.prod(reduce[:-1])
            pixels = math.prod(e or 1 for e in extents[:spatial - 1])
            if 4 * pixels * channel_tile > ACCUMULATOR_BYTES:
                return None
            fits = [d for d in _divisors(reduce[-1]) if 4 * window * d * channel_tile <= L1_WEIGHT_BYTES]
            return max(fits) if fits and max(fits) < reduce[-1] else None

        @staticmethod
        def _vector_tile(sch: Any, loops: Sequence[Any], *, unroll: bool = True) -> None:
            inner = [lp for lp in loops if _int(sch.get(lp).extent) != 1]
            if inner:
                sch.vectorize(inner[-1])
                for lp in inner[:-1] if unroll else []:
                    sch.unroll(lp)

        @staticmethod
        def _weights_dominate(sch: Any, stmt: Any, pixel_vars: Sequence[Any]) -> bool:
            """Whether the operands that do not move with the output pixels (the weights) are the larger
            share; then the channel tile is the outer loop and each weight slice is reused from cache across
            all pixels, else each input tile is reused across all channels."""
            pixel = {v for v in pixel_vars}
            weights = inputs = 0
            for read in stmt.reads:
                size = 1
                for dim in read.source.shape:
                    size *= _int(dim) or 1
                if _vars_in(read.region) & pixel:
                    inputs += size
                else:
                    weights += size
            return weights > inputs

    return RegisterTiled()


def elementwise(unit: VectorUnit) -> Any:
    """The rule for kernels without a reduction: intermediates inlined, the output loop vectorised and
    parallelised."""
    from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

    class Elementwise(CPUScheduleRule):  # type: ignore[misc]
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            opened = _open(func)
            if opened is None:
                return None
            sch, blocks = opened
            if not blocks or any(_is_reduction(sch, b) for b in blocks):
                return None
            kept = []
            for b in blocks[:-1]:
                try:
                    sch.compute_inline(b)
                except Exception:  # a producer read with a different pattern; scheduled on its own
                    kept.append(b)
            for b in [*kept, blocks[-1]]:
                _vectorize_elementwise(sch, b, unit)
            return sch

    return Elementwise()


def cpu_pipeline(target: Any, *, records: Any = None, fused: bool = False, block_fusion: bool = True) -> Any:
    """TVM's CPU pipeline with channels-last layout and the default schedules above (same passes, same order as
    ``relax.backend.cpu_generic.get_default_pipeline``, with the layout conversion first and the schedules
    after fusion).

    Args:
        target: The TVM target (its vector unit sizes the tiles).
        records: A MetaSchedule record directory; kernels with a tuned record get it, the rest the defaults.
        fused: The module is already converted, legalized and fused (the module that was tuned).
        block_fusion: Inverted residuals become one kernel each (:mod:`.block_fusion`).
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.s_tir import dlight as dl

    unit = VectorUnit.of(target)
    rules = [Guarded(register_tiled(unit)), Guarded(dl.cpu.Reduction()), Guarded(elementwise(unit))]
    front = [] if fused else fusion_passes(target, block_fusion=block_fusion)

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            tuned = [] if records is None else [relax.transform.MetaScheduleApplyDatabase(str(records))]
            # weights are marked layout-free, the schedules relay them, the relayout is split out and folded
            prepack = [relax.transform.AttachAttrLayoutFreeBuffers(), dl.ApplyDefaultSchedule(*rules),
                       relax.transform.SplitLayoutRewritePreproc(), relax.transform.FoldConstant()]
            seq = tvm.transform.Sequential(front + tuned + prepack + cpu.dataflow_lower_passes(target)
                                           + cpu.finalize_passes(target))
            return seq(mod)

    return _pipeline


def fusion_passes(target: Any, *, block_fusion: bool = True) -> list[Any]:
    """Relax module to fused, unscheduled kernels: the channels-last rewrites, inverted residuals as one kernel
    each (``block_fusion``), then TVM's CPU library dispatch and legalization/fusion (what the default schedules
    and MetaSchedule tuning both start from)."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from .block_fusion import fuse_inverted_residuals

    blocks = [relax.transform.FoldConstant(), fuse_inverted_residuals(target)] if block_fusion else []
    return channels_last_passes() + blocks + cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)


def channels_last_passes() -> list[Any]:
    """BatchNorm decomposed into elementwise ops (so it fuses into the conv's epilogue and its constants
    fold), ReLU6 as max/min, explicit zero pads folded into the convs they feed, then convolutions converted to
    NHWC/HWIO."""
    from tvm import relax

    # CanonicalizeBindings folds the decomposed BatchNorm's (out, mean, var)[0]; left in, the tuple ends the
    # conv's fusion group before the activation.
    return [_batch_norm_as_affine(), relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(), _clip_as_min_max(), _pad_into_conv(),
            relax.transform.DeadCodeElimination(), relax.transform.ConvertLayout(CHANNELS_LAST)]


def _rewrite_calls(name: str, op_name: str, rewrite: Any) -> Any:
    """A module pass replacing every Relax call to ``op_name`` by ``rewrite(call, lookup)`` (None: keep the call;
    ``lookup(var)`` is the value bound to a var, for rewrites that look at a producer)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    op = tvm.ir.Op.get(op_name)

    @mutator
    class _Rewriter(PyExprMutator):  # type: ignore[misc]
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not call.op.same_as(op):
                return call
            new = rewrite(call, self.lookup_binding)
            return call if new is None else new

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod: Any, _ctx: Any) -> Any:
        rewriter = _Rewriter(mod)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return rewriter.builder_.get()

    return _pass


def _batch_norm_as_affine() -> Any:
    """Inference BatchNorm with constant statistics as ``x * scale + shift`` (scale, shift computed here in
    float64): the conv epilogue then does one multiply-add per output instead of subtract, divide, multiply
    and add (the divide alone costs more than the rest of a 1x1 conv's write-back)."""
    import numpy as np
    import tvm
    from tvm import relax

    def rewrite(call: Any, _lookup: Any) -> Any:
        x, gamma, beta, mean, var = call.args
        if not all(isinstance(a, tvm.ir.expr.Constant) for a in (gamma, beta, mean, var)):
            return None
        rank, axis = len(x.ty.shape), int(call.attrs.axis)
        shape = [1] * rank
        shape[axis % rank] = -1
        g, b, m, v = (a.value.numpy().astype(np.float64) for a in (gamma, beta, mean, var))
        scale = g / np.sqrt(v + float(call.attrs.epsilon))
        dtype = str(x.ty.dtype)
        out = relax.op.add(relax.op.multiply(x, relax.const(scale.reshape(shape).astype(dtype))),
                           relax.const((b - m * scale).reshape(shape).astype(dtype)))
        return relax.Tuple([out, mean, var])

    return _rewrite_calls("BatchNormAsAffine", "relax.nn.batch_norm", rewrite)


def _scalar(value: Any) -> float:
    """A clip bound (a PrimValue holding a float immediate, or already a float) as a Python float."""
    inner = getattr(value, "value", value)
    return float(getattr(inner, "value", inner))


def _clip_as_min_max() -> Any:
    """``clip(x, lo, hi)`` (ReLU6, hardtanh) as ``minimum(maximum(x, lo), hi)``: the same values, and binary
    elementwise ops follow any layout, where TVM 0.27's ``clip`` has no layout rule and so sends every ReLU6
    of a channels-last MobileNet back to NCHW and forth again."""
    from tvm import relax

    def rewrite(call: Any, _lookup: Any) -> Any:
        x, low, high = call.args
        dtype = x.ty.dtype
        return relax.op.minimum(relax.op.maximum(x, relax.const(_scalar(low), dtype)),
                                relax.const(_scalar(high), dtype))

    return _rewrite_calls("ClipAsMinMax", "relax.clip", rewrite)


def _pad_into_conv() -> Any:
    """A constant-zero spatial ``pad`` feeding a conv2d becomes the conv's own (possibly asymmetric) padding: the
    same values (TF "same" padding, as in transformers' MobileNetV2, pads explicitly). Left in, the pad has no
    layout rule, so channels-last conversion wraps every one in two transposes."""
    import tvm
    from tvm import relax

    pad = tvm.ir.Op.get("relax.nn.pad")

    def rewrite(call: Any, lookup: Any) -> Any:
        producer = lookup(call.args[0]) if isinstance(call.args[0], relax.Var) else None
        a = call.attrs
        if not (isinstance(producer, relax.Call) and producer.op.same_as(pad) and a.data_layout == "NCHW"
                and str(producer.attrs.pad_mode) == "constant" and len(producer.args) == 1
                and float(producer.attrs.pad_value) == 0.0):
            return None
        width = [int(w) for w in producer.attrs.pad_width]
        if len(width) != 8 or any(width[:4]):
            return None
        top, left, bottom, right = (int(p) for p in a.padding)
        return relax.op.nn.conv2d(producer.args[0], call.args[1], strides=a.strides,
                                  padding=[top + width[4], left + width[6], bottom + width[5], right + width[7]],
                                  dilation=a.dilation, groups=a.groups, data_layout=a.data_layout,
                                  kernel_layout=a.kernel_layout, out_layout=a.out_layout, out_dtype=a.out_dtype)

    return _rewrite_calls("PadIntoConv", "relax.nn.conv2d", rewrite)
