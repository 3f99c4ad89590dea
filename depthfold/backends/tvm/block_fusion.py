"""Block fusion: a whole inverted residual (1x1 expand -> depthwise KxK -> 1x1 project [+ residual]) in one kernel.

"On the Efficiency of Convolutional Neural Networks" (Lavin, 2024) implements "all the layers of a residual
block in a single kernel, creating temporal locality, avoiding communication, and reducing workspace size".
Unfused, MobileNetV2's blocks write the expanded feature map (6x the block's width) to memory twice and read
it back twice; here it never leaves the cache. The kernel walks the output rows once, a few rows per step: the
expand stage fills a ring buffer of padded input rows (each row expanded exactly once), the depthwise stage
turns the ring into the step's output rows, and the projection reduces those straight into the output (with the
residual add). Every stage is register-tiled like :mod:`.schedules` (pixels x channel vectors accumulated over
the reduction); the epilogues (bias, BatchNorm, ReLU/ReLU6) are folded into the stage's write-back, BatchNorm's
scale into the weights. Weights are relaid at compile time in the tile order.

The rewrite runs on channels-last Relax (after :func:`.schedules.channels_last_passes`) and matches by
structure, not by model: any NHWC chain conv1x1 -> affine/clip -> depthwise conv -> affine/clip -> conv1x1 ->
affine [-> + block input] with constant weights and single-use intermediates (the expand is optional).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._common import logger
from .schedules import VectorUnit, _vector_piece, choose_tile

_AFFINE = ("relax.multiply", "relax.add")
_STEP = " " * 20  # the indentation of statements inside one step of the kernel's row loop
_CLIP = ("relax.maximum", "relax.minimum")
#: The ring of expanded rows and the depthwise output rows of one step stay within this many bytes (a typical
#: per-core L2).
WORKSPACE_BYTES = 512 * 1024


@dataclass
class _Stage:
    """A conv's constants after folding its epilogue: weight (HWIO), per-channel shift, clip bounds."""

    weight: np.ndarray
    shift: np.ndarray
    low: float | None
    high: float | None


@dataclass
class InvertedResidual:
    """One matched block: shapes, the folded stages, and the Relax vars it reads and replaces."""

    x: Any
    out: Any
    shape: tuple[int, int, int, int]
    out_shape: tuple[int, int, int, int]
    kernel: int
    stride: int
    padding: tuple[int, int]
    """The depthwise conv's top and left zero padding (bottom and right follow from the output size)."""
    expand: _Stage | None
    depthwise: _Stage
    project: _Stage
    residual: bool


def _const(expr: Any) -> np.ndarray | None:
    import tvm

    return expr.value.numpy().astype(np.float64) if isinstance(expr, tvm.ir.expr.Constant) else None


def _op(call: Any) -> str:
    from tvm import relax

    return call.op.name if isinstance(call, relax.Call) and hasattr(call.op, "name") else ""


class _Graph:
    """The bindings of a Relax function's dataflow blocks: var -> value, how often each var is read, and by
    which bindings."""

    def __init__(self, func: Any) -> None:
        from tvm import relax
        from tvm.relax.analysis import post_order_visit

        self.value: dict[Any, Any] = {}
        self.uses: dict[Any, int] = {}
        self.readers: dict[Any, list[tuple[Any, Any]]] = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    self.value[b.var] = b.value
                    if isinstance(b.value, relax.Call):
                        for a in b.value.args:
                            if isinstance(a, relax.Var):
                                self.readers.setdefault(a, []).append((b.var, b.value))

        def count(e: Any) -> None:
            if isinstance(e, relax.Var):
                self.uses[e] = self.uses.get(e, 0) + 1

        for value in self.value.values():
            post_order_visit(value, count)
        post_order_visit(func.body.body, count)

    def single(self, var: Any) -> bool:
        return self.uses.get(var, 0) == 1 and var in self.value


def _conv(call: Any) -> dict[str, Any] | None:
    """A channels-last float32 conv2d with a constant HWIO weight: its attributes and weight shape (the weight
    itself is read with :func:`_const` only for a matched block), or None."""
    import tvm

    if _op(call) != "relax.nn.conv2d":
        return None
    a = call.attrs
    if a.data_layout != "NHWC" or a.kernel_layout != "HWIO" or a.out_layout != "NHWC" \
            or any(int(d) != 1 for d in a.dilation) or str(call.ty.dtype) != "float32" \
            or not isinstance(call.args[1], tvm.ir.expr.Constant):
        return None
    pad = [int(p) for p in a.padding]
    strides = [int(s) for s in a.strides]
    if strides[0] != strides[1]:
        return None
    return {"weight": call.args[1], "kernel": tuple(int(d) for d in call.args[1].ty.shape), "groups": int(a.groups), "padding": tuple(pad), "stride": strides[0],
            "shape": tuple(int(d) for d in call.args[0].ty.shape),
            "out": tuple(int(d) for d in call.ty.shape)}


def _epilogue(graph: _Graph, var: Any, channels: int) -> tuple[Any, np.ndarray, np.ndarray, float | None,
                                                                float | None]:
    """Follow single-use per-channel multiplies/adds by constants (bias, BatchNorm), then an activation (ReLU,
    or maximum/minimum by scalar constants: ReLU6, hardtanh) from ``var``; returns the last var, the folded
    scale and shift, and the clip bounds (None: unbounded)."""
    scale, shift = np.ones(channels), np.zeros(channels)
    low = high = None
    while graph.single(var) and (user := _user(graph, var)) is not None:
        out, call = user
        name = _op(call)
        if name == "relax.nn.relu" and low is None and high is None:
            low, var = 0.0, out
            continue
        if name not in _AFFINE + _CLIP or len(call.args) != 2:
            break
        c = _const(call.args[1] if call.args[0].same_as(var) else call.args[0])
        if c is None or c.size not in (1, channels) or (c.size == channels and c.shape[-1] != channels):
            break
        c = np.broadcast_to(c.reshape(-1), (channels,))
        if name in _AFFINE and low is None and high is None:
            if name == "relax.multiply":
                scale, shift = scale * c, shift * c
            else:
                shift = shift + c
        elif name == "relax.maximum" and low is None and high is None and np.all(c == c[0]):
            low = float(c[0])
        elif name == "relax.minimum" and high is None and np.all(c == c[0]):
            high = float(c[0])
        else:
            break
        var = out
    return var, scale, shift, low, high


def _user(graph: _Graph, var: Any) -> tuple[Any, Any] | None:
    """The one binding that reads ``var`` as a call argument (``var`` must be single-use)."""
    readers = graph.readers.get(var, [])
    return readers[0] if len(readers) == 1 else None


def _producer_of(graph: _Graph, var: Any) -> tuple[Any, list[Any]]:
    """Walk back from ``var`` over single-use affine/clip ops; the var they start from, and the ops in order."""
    chain: list[Any] = []
    while var in graph.value and _op(graph.value[var]) in (*_AFFINE, *_CLIP, "relax.nn.relu"):
        call = graph.value[var]
        args = [a for a in call.args if _const(a) is None]
        if len(args) != 1:
            break
        chain.append(var)
        var = args[0]
    return var, chain[::-1]


def match(func: Any) -> list[InvertedResidual]:
    """Every inverted residual in a channels-last Relax function."""
    graph = _Graph(func)
    blocks = []
    for dw_var, call in graph.value.items():
        dw = _conv(call)
        if dw is None or dw["groups"] == 1 or dw["groups"] != dw["shape"][3] or dw["kernel"][2] != 1 \
                or dw["kernel"][0] != dw["kernel"][1]:
            continue
        kernel, hidden = dw["kernel"][0], dw["shape"][3]
        if max(dw["padding"]) > kernel - 1 or dw["stride"] > kernel:
            continue
        expand = None
        x = call.args[0]
        start, chain = _producer_of(graph, x)
        pre = _conv(graph.value.get(start)) if start in graph.value else None
        if pre is not None and pre["groups"] == 1 and pre["kernel"][:2] == (1, 1) and pre["stride"] == 1 \
                and not any(pre["padding"]) and graph.single(start) and all(graph.single(v) for v in chain):
            end, scale, shift, low, high = _epilogue(graph, start, hidden)
            if end.same_as(x):
                w = _const(pre["weight"])[0, 0] * scale  # [C, M], BN scale folded
                expand = _Stage(w, shift, low, high)
                x = graph.value[start].args[0]
        end, scale, shift, low, high = _epilogue(graph, dw_var, hidden)
        user = _user(graph, end) if graph.single(end) else None
        proj = _conv(user[1]) if user is not None else None
        if user is None or proj is None or proj["groups"] != 1 or proj["kernel"][:2] != (1, 1) \
                or proj["stride"] != 1 or any(proj["padding"]) or not user[1].args[0].same_as(end):
            continue
        depthwise = _Stage(_const(dw["weight"])[:, :, 0, :] * scale, shift, low, high)
        proj_var = user[0]
        out_ch = proj["out"][3]
        last, pscale, pshift, plow, phigh = _epilogue(graph, proj_var, out_ch)
        project = _Stage(_const(proj["weight"])[0, 0] * pscale, pshift, plow, phigh)
        residual = False
        if graph.single(last) and _user(graph, last) is not None:
            out, add = _user(graph, last)
            if _op(add) == "relax.add" and any(a.same_as(x) for a in add.args) \
                    and tuple(int(d) for d in x.ty.shape) == proj["out"]:
                residual, last = True, out
        shape = tuple(int(d) for d in x.ty.shape)
        if str(x.ty.dtype) != "float32" or len(shape) != 4:
            continue
        blocks.append(InvertedResidual(x=x, out=last, shape=shape, out_shape=proj["out"], kernel=kernel,
                                       stride=dw["stride"], padding=dw["padding"][:2], expand=expand,
                                       depthwise=depthwise, project=project, residual=residual))
    return blocks


def _act(value: str, low: float | None, high: float | None) -> str:
    if low is not None:
        value = f"T.max({value}, T.float32({low!r}))"
    if high is not None:
        value = f"T.min({value}, T.float32({high!r}))"
    return value


def kernel_source(block: InvertedResidual, unit: VectorUnit, cores: int = 1) -> tuple[str, list[np.ndarray]]:
    """TVMScript of the fused kernel and its constant arguments (weights relaid in tile order, shifts).

    Each step produces ``R`` output rows: the largest count whose ring and depthwise rows fit in
    :data:`WORKSPACE_BYTES`, so blocks whose weights outweigh their feature maps (late, narrow maps) read their
    weights once per step, not once per row. With ``cores`` > 1 the output rows are cut into up to that many
    bands of at least 4 rows, run in parallel, each with its own ring (a band recomputes the K - stride
    expanded rows it shares with the one before)."""
    n, h, w, c = block.shape
    _, ho, wo, co = block.out_shape
    k, s, (p, pl) = block.kernel, block.stride, block.padding
    m = block.depthwise.weight.shape[-1]
    wp = max(w + pl, (wo - 1) * s + k)  # padded columns: left padding, the row, then right padding
    pd, cd = choose_tile(m, wo, unit)
    tail = co % unit.lanes if co > unit.lanes else 0  # channels past the last whole vector: a narrower tile
    pp, cp = choose_tile(co - tail, wo, unit)
    bands = max(d for d in range(1, ho + 1) if ho % d == 0 and d <= max(1, min(cores, ho // 4)))
    band_rows = ho // bands
    step = max([d for d in range(1, band_rows + 1) if band_rows % d == 0
                and 4 * m * (((d - 1) * s + k) * wp + d * wo) <= WORKSPACE_BYTES] or [1])
    ring = (step - 1) * s + k
    consts: list[np.ndarray] = []
    params = [f"X: T.Buffer(({n}, {h}, {w}, {c}), 'float32')"]
    fill: str
    if block.expand is not None:
        pe, ce = choose_tile(m, w, unit)
        w1 = block.expand.weight.reshape(c, m // ce, ce).transpose(1, 0, 2)
        consts += [w1, block.expand.shift]
        params += [f"W1: T.Buffer(({m // ce}, {c}, {ce}), 'float32')", f"B1: T.Buffer(({m},), 'float32')"]
        act1 = _act(f"acc1[q, v] + B1[mt * {ce} + v]", block.expand.low, block.expand.high)
        fill = f"\n{_STEP}for mt, r, wt in T.grid({m // ce}, hi - lo, {w // pe}):\n" + _register_tile(
            "acc1", pe, ce, [f"for kk in range({c}):"], f"X[b, lo + r, wt * {pe} + q, kk] * W1[mt, kk, v]",
            f"E[(lo + r) % {ring}, {pl} + wt * {pe} + q, mt * {ce} + v]", act1)
    else:
        piece = _vector_piece(m, unit.lanes)
        fill = f"""
                    for r, j, mt in T.grid(hi - lo, {w}, {m // piece}):
                        for v in T.vectorized({piece}):
                            E[(lo + r) % {ring}, {pl} + j, mt * {piece} + v] = X[b, lo + r, j, mt * {piece} + v]"""
    w2 = block.depthwise.weight.reshape(k, k, m // cd, cd).transpose(2, 0, 1, 3)
    w3 = block.project.weight[:, :co - tail].reshape(m, (co - tail) // cp, cp).transpose(1, 0, 2)
    consts += [w2, block.depthwise.shift, w3, block.project.shift]
    consts = [np.ascontiguousarray(a, dtype=np.float32) for a in consts]
    params += [f"W2: T.Buffer(({m // cd}, {k}, {k}, {cd}), 'float32')", f"B2: T.Buffer(({m},), 'float32')",
               f"W3: T.Buffer(({(co - tail) // cp}, {m}, {cp}), 'float32')", f"B3: T.Buffer(({co},), 'float32')"]
    if tail:
        consts.append(np.ascontiguousarray(block.project.weight[:, co - tail:], dtype=np.float32))
        params.append(f"W3t: T.Buffer(({m}, {tail}), 'float32')")
    params.append(f"Y: T.Buffer(({n}, {ho}, {wo}, {co}), 'float32')")
    act2 = _act(f"acc2[q, v] + B2[mt * {cd} + v]", block.depthwise.low, block.depthwise.high)
    row = f"(o + ro) * {s} - {p} + ry"  # the input row a depthwise tap reads
    depthwise = _register_tile(
        "acc2", pd, cd, [f"for ry in range({k}):", f"if {row} >= 0 and {row} < {h}:", f"for rx in range({k}):"],
        f"E[({row}) % {ring}, (wt * {pd} + q) * {s} + rx, mt * {cd} + v] * W2[mt, ry, rx, v]",
        f"D[ro, wt * {pd} + q, mt * {cd} + v]", act2)
    names = ["X", *(["W1", "B1"] if block.expand is not None else []), "W2", "B2", "W3", "B3", *(["W3t"] if tail else [])]
    reads = ", ".join(f"{name}[{', '.join(f'0:{d}' for d in shape)}]"
                      for name, shape in zip(names, [block.shape, *[a.shape for a in consts]]))
    project = _project_loop(block, "W3", 0, co - tail, pp, cp, m, step, wo)
    if tail:
        project += _project_loop(block, "W3t", co - tail, tail, *choose_tile(tail, wo, unit), m, step, wo)
    source = f"""
@T.prim_func(private=True, s_tir=True)
def main({", ".join(params)}):
    T.func_attr({{"tirx.noalias": True, "tirx.is_scheduled": True}})
    with T.sblock("root"):
        with T.sblock("inverted_residual"):
            T.reads({reads})
            T.writes(Y[0:{n}, 0:{ho}, 0:{wo}, 0:{co}])
            for bb in T.parallel({n * bands}):
                b = bb // {bands}
                E = T.decl_buffer(({ring}, {wp}, {m}), "float32")
                D = T.decl_buffer(({step}, {wo}, {m}), "float32")
                for r0, j, v in T.grid({ring}, {wp}, {m}):
                    E[r0, j, v] = T.float32(0)
                for i in range({band_rows // step}):
                    o = bb % {bands} * {band_rows} + i * {step}
                    lo = T.if_then_else(i == 0, T.max(0, o * {s} - {p}), T.min({h}, (o - 1) * {s} + {k - p}))
                    hi = T.min({h}, (o + {step - 1}) * {s} + {k - p}){fill}
                    for ro, wt, mt in T.grid({step}, {wo // pd}, {m // cd}):
{depthwise}{project}"""
    return source, consts


def _project_loop(block: InvertedResidual, weight: str, first: int, count: int, pp: int, cp: int, m: int,
                  step: int, wo: int) -> str:
    """The projection of output channels ``[first, first + count)`` for one step's rows, in (pp x cp) tiles;
    ``weight`` is ``[tiles, m, cp]`` (or ``[m, cp]`` for the one narrow tail tile)."""
    w = f"{weight}[ot, kk, v]" if weight == "W3" else f"{weight}[kk, v]"
    channel = f"{first} + ot * {cp} + v"
    act = _act(f"acc3[q, v] + B3[{channel}]", block.project.low, block.project.high)
    if block.residual:
        act = f"{act} + X[b, o + ro, wt * {pp} + q, {channel}]"
    return f"\n{_STEP}for ot, ro, wt in T.grid({count // cp}, {step}, {wo // pp}):\n" + _register_tile(
        "acc3", pp, cp, [f"for kk in range({m}):"], f"D[ro, wt * {pp} + q, kk] * {w}",
        f"Y[b, o + ro, wt * {pp} + q, {channel}]", act)


def _register_tile(acc: str, pixels: int, lanes: int, reduction: Sequence[str], term: str, store: str,
                   value: str) -> str:
    """TVMScript of one register tile inside a step's tile loop: ``pixels x lanes`` accumulators zeroed,
    ``term`` added over the nested ``reduction`` loop (or ``if``) headers, then ``store = value`` per element
    (``q`` the pixel, ``v`` the vector lane)."""
    tile = [f"for q in T.unroll({pixels}):", f"    for v in T.vectorized({lanes}):"]
    body = [f'{acc} = T.decl_buffer(({pixels}, {lanes}), "float32", scope="local")',
            *tile, f"        {acc}[q, v] = T.float32(0)"]
    depth = ""
    for header in reduction:
        body.append(depth + header)
        depth += "    "
    body += [depth + line for line in tile] + [f"{depth}        {acc}[q, v] = {acc}[q, v] + {term}"]
    body += [*tile, f"        {store} = {value}"]
    return "\n".join(_STEP + "    " + line for line in body)


def kernel(block: InvertedResidual, unit: VectorUnit, cores: int = 1) -> tuple[Any, list[np.ndarray]]:
    """The fused kernel as a PrimFunc, and its constant arguments."""
    from tvm.script import from_source

    source, consts = kernel_source(block, unit, cores)
    return from_source(source), consts


def fuse_inverted_residuals(target: Any) -> Any:
    """A Relax module pass replacing every matched inverted residual by one call to its fused kernel."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    unit = VectorUnit.of(target)
    cores = int(target.attrs["num-cores"]) if "num-cores" in target.attrs else 1

    @mutator
    class _Rewriter(PyExprMutator):  # type: ignore[misc]
        def __init__(self, mod: Any, replace: dict[Any, Any]) -> None:
            super().__init__(mod)
            self.replace = replace

        def visit_var_binding_(self, binding: Any) -> None:
            block = self.replace.get(binding.var)
            if block is None:
                super().visit_var_binding_(binding)
                return
            func, consts = kernel(block, unit, cores)
            gv = self.builder_.add_func(func, "fused_inverted_residual")
            args = [self.visit_expr(block.x)] + [relax.const(c) for c in consts]
            call = relax.call_tir(gv, relax.Tuple(args), relax.TensorType(list(block.out_shape), "float32"))
            emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
            self.set_var_remap(binding.var, emit(call))

    @tvm.transform.module_pass(opt_level=0, name="FuseInvertedResiduals")
    def _pass(mod: Any, _ctx: Any) -> Any:
        replace: dict[Any, Any] = {}
        for _gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                for block in match(func):
                    replace[block.out] = block
        if not replace:
            return mod
        logger.info("tvm: block fusion: %d inverted residual(s) in one kernel each", len(replace))
        rewriter = _Rewriter(mod, replace)
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function):
                rewriter.builder_.update_func(gv, rewriter.visit_expr(func))
        return relax.transform.DeadCodeElimination()(rewriter.builder_.get())

    return _pass
