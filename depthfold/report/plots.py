"""Plots of a benchmark report (`schemas/bench-1.schema.json`), rendered to PNG bytes.

Each `plot_*` function takes the report dict and returns a list of `Plot`, empty when the report holds no data
for it. Figures are `matplotlib.figure.Figure` objects drawn on the Agg canvas, never through pyplot, so no
global state is touched and no display is needed. `PLOT_KINDS` lists the kinds in page order.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .validate import RUNTIMES

__all__ = ["PLOT_KINDS", "Plot", "PlotKind", "plot_early_exit", "plot_efficiency", "plot_kv",
           "plot_layermerge", "plot_layers", "plot_pareto"]

Report = dict[str, Any]
Point = tuple[float, float, str]  # (x, y, label)

_DPI = 100  # 600 px wide figures keep a page of a dozen plots to a few hundred KB
_WIDTH_IN = 6.0
_FONT = 8
_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]  # matplotlib's tab10
_TOP_OPS = 7  # op types shown by name in the layer breakdown; the rest are summed as "other"


@dataclass(frozen=True)
class Plot:
    """One rendered figure: `key` is its kind (`"kv"`), or kind and model (`"pareto:resnet18"`)."""

    key: str
    title: str
    caption: str
    png: bytes


@dataclass(frozen=True)
class PlotKind:
    """A kind of plot: the section title, what it needs (shown when nothing has it), and its function."""

    title: str
    needs: str
    make: Callable[[Report], list[Plot]]


def _figure(height_in: float) -> Figure:
    return Figure(figsize=(_WIDTH_IN, height_in), dpi=_DPI, layout="constrained")


def _png(fig: Figure) -> bytes:
    """The figure as a 256-colour PNG: a third of the RGBA file's size, no visible loss for line art."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    buf = io.BytesIO()
    image.quantize(256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _text(s: str) -> str:
    """A label as literal text: matplotlib reads `$...$` as mathtext."""
    return s.replace("$", r"\$")


def _ok_cells(report: Report, model: str) -> Iterator[dict[str, Any]]:
    return (c for c in report["cells"] if c["model"] == model and c["status"] == "ok")


def _timed(report: Report, model: str) -> dict[str, dict[str, Any]]:
    """The model's ok variants with a median, by name."""
    return {v["name"]: v for t in report["timings"] if t["model"] == model for v in t["variants"]
            if v["status"] == "ok" and v["median_ms"] is not None}


def _latency(report: Report, variants: dict[str, dict[str, Any]], pipeline: str) -> tuple[str, float] | None:
    """(runtime, median ms) of a pipeline: on onnxruntime if timed there, else the first ok lane, else any."""
    lanes = ["onnxruntime", *report["settings"]["lanes"], *RUNTIMES]
    for runtime in lanes:
        v = variants.get(f"{runtime}/{pipeline}")
        if v is not None:
            return runtime, v["median_ms"]
    return None


def _labels(ax: Axes, points: list[Point]) -> None:
    """Name each point, alternately above and below in x order, so neighbours' labels do not run together."""
    for i, (x, y, text) in enumerate(sorted(points)):
        ax.annotate(_text(text), (x, y), xytext=(4, 4 if i % 2 == 0 else -11), textcoords="offset points",
                    fontsize=_FONT - 1)


def _pareto_front(points: list[Point], higher_is_better: bool) -> list[Point]:
    """The points no other point beats on both latency and quality, fastest first."""
    sign = 1 if higher_is_better else -1
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p[0], -sign * p[1])):
        if not front or sign * p[1] > sign * front[-1][1]:
            front.append(p)
    return front


def plot_pareto(report: Report) -> list[Plot]:
    """Per model, latency against quality for every ok pipeline, with the Pareto front as a step line."""
    plots = []
    for model in report["models"]:
        variants = _timed(report, model["name"])
        points: list[Point] = []
        for cell in _ok_cells(report, model["name"]):
            lat = _latency(report, variants, cell["pipeline"])
            if cell["quality"] is None or lat is None:
                continue
            runtime, ms = lat
            label = cell["pipeline"] if runtime == "onnxruntime" else f"{cell['pipeline']} ({runtime})"
            points.append((ms, cell["quality"]["value"], label))
        if not points:
            continue
        metric, higher = model["metric"]["name"], model["metric"]["higher_is_better"]
        front = _pareto_front(points, higher)
        fig = _figure(3.5)
        ax = fig.add_subplot()
        ax.scatter([p[0] for p in points], [p[1] for p in points], color=_COLORS[0], zorder=3)
        _labels(ax, points)
        xs = [p[0] for p in front]
        ys = [p[1] for p in front]
        # extend the last step to the slowest point, so the front spans the whole plot
        ax.step([*xs, max(p[0] for p in points)], [*ys, ys[-1]], where="post", color=_COLORS[3], lw=1.2,
                label="Pareto front")
        ax.set_xlabel("median latency (ms)", fontsize=_FONT)
        ax.set_ylabel(f"{_text(metric)} ({'higher' if higher else 'lower'} is better)", fontsize=_FONT)
        ax.set_title(_text(f"{model['name']}: latency vs {metric}"), fontsize=_FONT + 1)
        ax.tick_params(labelsize=_FONT)
        ax.margins(x=0.15, y=0.15)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=_FONT - 1)
        on_front = ", ".join(p[2] for p in front)
        plots.append(Plot(f"pareto:{model['name']}", f"{model['name']}: latency vs {metric}",
                          "Median latency on ONNX Runtime (another lane where marked) against "
                          f"{metric}; on the Pareto front: {on_front}.", _png(fig)))
    return plots


def _by_op(layers: list[dict[str, Any]]) -> dict[str, float]:
    totals: dict[str, float] = {}
    for row in layers:
        totals[row["op_type"]] = totals.get(row["op_type"], 0.0) + row["ms"]
    return totals


def plot_layers(report: Report) -> list[Plot]:
    """Per model, ONNX Runtime kernel time by op type: a stacked bar per profiled pipeline, original first."""
    plots = []
    for model in report["models"]:
        cells = sorted((c for c in _ok_cells(report, model["name"]) if c["details"].get("layers")),
                       key=lambda c: c["pipeline"] != "original")
        if not cells:
            continue
        rows = [(c["pipeline"], _by_op(c["details"]["layers"])) for c in cells]
        totals: dict[str, float] = {}
        for _, ops in rows:
            for op, ms in ops.items():
                totals[op] = totals.get(op, 0.0) + ms
        named = sorted(totals, key=totals.__getitem__, reverse=True)[:_TOP_OPS]
        fig = _figure(max(2.4, 0.42 * len(rows) + 1.6))
        ax = fig.add_subplot()
        lefts = [0.0] * len(rows)
        for i, op in enumerate([*named, "other"]):
            widths = [sum(v for o, v in ops.items() if o not in named) if op == "other" else ops.get(op, 0.0)
                      for _, ops in rows]
            if not any(widths):
                continue
            ax.barh(range(len(rows)), widths, left=lefts, color=_COLORS[i % len(_COLORS)], label=_text(op))
            lefts = [a + b for a, b in zip(lefts, widths)]
        for y, total in enumerate(lefts):
            ax.text(total, y, f" {total:.2f}", va="center", fontsize=_FONT - 1)
        ax.set_yticks(range(len(rows)), [_text(p) for p, _ in rows], fontsize=_FONT)
        ax.invert_yaxis()
        ax.margins(x=0.12)
        ax.set_xlabel("kernel time per run (ms, ONNX Runtime profiler)", fontsize=_FONT)
        ax.set_title(_text(f"{model['name']}: time by op type"), fontsize=_FONT + 1)
        ax.tick_params(axis="x", labelsize=_FONT)
        fig.legend(loc="outside lower center", ncols=4, fontsize=_FONT - 1, frameon=False)
        plots.append(Plot(f"layers:{model['name']}", f"{model['name']}: time by op type",
                          "Per-node kernel time from the ONNX Runtime profiler (median over runs), summed "
                          "by op type, before (original) and after each pipeline; bar ends give the total in "
                          "ms.",
                          _png(fig)))
    return plots


def plot_layermerge(report: Report) -> list[Plot]:
    """LayerMerge's latency prediction (from its latency table) against the latency measured after merging."""
    models = [m["name"] for m in report["models"]]
    points = [(c["details"]["layermerge"], c["model"], c["pipeline"])
              for m in models for c in _ok_cells(report, m) if "layermerge" in c["details"]]
    if not points:
        return []
    fig = _figure(3.5)
    ax = fig.add_subplot()
    for d, model, _ in points:
        color = _COLORS[models.index(model) % len(_COLORS)]
        ax.scatter(d["predicted_ms"], d["measured_ms"], color=color, zorder=3)
    _labels(ax, [(d["predicted_ms"], d["measured_ms"], f"{model} {pipeline}")
                 for d, model, pipeline in points])
    values = [d[k] for d, _, _ in points for k in ("predicted_ms", "measured_ms")]
    lo, hi = min(values) * 0.85, max(values) * 1.12
    ax.plot([lo, hi], [lo, hi], color="#7f7f7f", lw=1, ls="--", label="measured = predicted")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("predicted latency (ms)", fontsize=_FONT)
    ax.set_ylabel("measured latency (ms)", fontsize=_FONT)
    ax.set_title("LayerMerge: predicted vs measured latency", fontsize=_FONT + 1)
    ax.tick_params(labelsize=_FONT)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=_FONT - 1, loc="upper left")
    return [Plot("layermerge", "LayerMerge: predicted vs measured latency",
                 "Each merged network's latency as LayerMerge's latency table predicted it and as measured "
                 "on its backend; points above the dashed line ran slower than predicted.", _png(fig))]


def plot_kv(report: Report) -> list[Plot]:
    """KV-cache bytes per token against quality: the original and every pipeline that changed the cache."""
    series = []
    for model in report["models"]:
        cells = [c for c in _ok_cells(report, model["name"])
                 if "kv" in c["details"] and c["quality"] and c["pipeline"] != "original"]
        if not cells:
            continue
        original = next((c for c in _ok_cells(report, model["name"]) if c["pipeline"] == "original"), None)
        quality = (original["quality"]["value"] if original and original["quality"]
                   else cells[0]["quality"]["original"])
        points = [(cells[0]["details"]["kv"]["original_bytes_per_token"], quality, "original")]
        points += [(c["details"]["kv"]["bytes_per_token"], c["quality"]["value"], c["pipeline"])
                   for c in cells]
        series.append((model, points))
    if not series:
        return []
    metrics = {m["metric"]["name"] for m, _ in series}
    metric = metrics.pop() if len(metrics) == 1 else "quality"
    fig = _figure(3.5)
    ax = fig.add_subplot()
    for i, (model, points) in enumerate(series):
        ax.scatter([b / 1024 for b, _, _ in points], [q for _, q, _ in points],
                   color=_COLORS[i % len(_COLORS)], label=_text(model["name"]), zorder=3)
        _labels(ax, [(b / 1024, q, label) for b, q, label in points])
    ax.set_xlabel("KV cache per token (KiB)", fontsize=_FONT)
    ax.set_ylabel(_text(metric), fontsize=_FONT)
    ax.set_title(_text(f"KV cache vs {metric}"), fontsize=_FONT + 1)
    ax.tick_params(labelsize=_FONT)
    ax.margins(x=0.2, y=0.15)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=_FONT - 1)
    better = {("lower" if m["metric"]["higher_is_better"] is False else "higher") for m, _ in series}
    note = f" ({better.pop()} is better)" if len(better) == 1 else ""
    return [Plot("kv", f"KV cache vs {metric}",
                 f"Bytes of K and V cached per generated token against {metric}{note}, for the original and "
                 "every pipeline that shares or removes cache.", _png(fig))]


def _exits(histogram: dict[str, float]) -> list[str]:
    return [k for k in histogram if k != "final"] + (["final"] if "final" in histogram else [])


def plot_early_exit(report: Report) -> list[Plot]:
    """Where held-out inputs leave an early-exit network: one bar chart per cell."""
    cells = [c for m in report["models"] for c in _ok_cells(report, m["name"])
             if "early_exit" in c["details"]]
    if not cells:
        return []
    cols = min(len(cells), 3)
    rows = -(-len(cells) // cols)
    fig = _figure(2.8 * rows + 0.4)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(cells):]:
        ax.set_visible(False)
    for ax, cell in zip(axes.flat, cells):
        d = cell["details"]["early_exit"]
        names = _exits(d["histogram"])
        ax.bar(range(len(names)), [100 * d["histogram"][n] for n in names],
               color=[_COLORS[7] if n == "final" else _COLORS[0] for n in names])
        ax.set_xticks(range(len(names)), [_text(n) for n in names], fontsize=_FONT - 1, rotation=30,
                      ha="right")
        title = f"{cell['model']} {cell['pipeline']}\nexpected compute {d['expected_compute']:.2f}"
        ax.set_title(_text(title), fontsize=_FONT)
        ax.tick_params(axis="y", labelsize=_FONT)
        ax.set_ylim(0, 100)
    for ax in axes[:, 0]:
        ax.set_ylabel("inputs exiting (%)", fontsize=_FONT)
    return [Plot("early_exit", "Early exit: where inputs leave",
                 "Share of held-out inputs leaving at each exit ('final': ran the whole network); "
                 "expected compute is the expected latency over the full latency, from measured exit costs.",
                 _png(fig))]


def plot_efficiency(report: Report) -> list[Plot]:
    """Per model, each variant's achieved GFLOP/s against the device's measured float32 peak."""
    peak = report["device"]["peak_gflops"]
    plots = []
    for model in report["models"]:
        variants = [v for v in _timed(report, model["name"]).values() if v["gflops"] is not None]
        if not variants:
            continue
        fig = _figure(0.22 * len(variants) + 1.4)
        ax = fig.add_subplot()
        ys = range(len(variants))
        ax.barh(ys, [v["gflops"] for v in variants],
                color=[_COLORS[RUNTIMES.index(v["runtime"]) % len(_COLORS)] for v in variants])
        for y, v in zip(ys, variants):
            fraction = v["fraction_of_peak"]
            label = f" {v['gflops']:.1f}" + (f" ({fraction:.0%})" if fraction is not None else "")
            ax.text(v["gflops"], y, label, va="center", fontsize=_FONT - 1)
        if peak:
            ax.axvline(peak, color=_COLORS[3], lw=1.2, label=f"peak {peak:.0f} GFLOP/s (float32 matmul)")
            fig.legend(loc="outside lower center", fontsize=_FONT - 1, frameon=False)
        ax.set_xlim(0, max([peak or 0.0, *(v["gflops"] for v in variants)]) * 1.12)
        ax.set_yticks(ys, [_text(v["name"]) for v in variants], fontsize=_FONT - 1)
        ax.invert_yaxis()
        ax.set_xlabel("achieved GFLOP/s (graph FLOPs / median latency)", fontsize=_FONT)
        ax.set_title(_text(f"{model['name']}: achieved vs peak GFLOP/s"), fontsize=_FONT + 1)
        ax.tick_params(axis="x", labelsize=_FONT)
        gap = "" if peak else " The device's peak was not measured."
        plots.append(Plot(f"efficiency:{model['name']}", f"{model['name']}: achieved vs peak GFLOP/s",
                          "Graph FLOPs over median latency for every timed variant; the percentage is the "
                          f"fraction of the device's peak, the gap the kernels leave unused.{gap}",
                          _png(fig)))
    return plots


PLOT_KINDS: dict[str, PlotKind] = {
    "pareto": PlotKind("Latency vs quality", "no pipeline has both a quality and a latency", plot_pareto),
    "layers": PlotKind("Time by op type", "no cell has an ONNX Runtime layer profile", plot_layers),
    "layermerge": PlotKind("LayerMerge: predicted vs measured", "no LayerMerge cell", plot_layermerge),
    "kv": PlotKind("KV cache vs quality", "no decoder pipeline changed the KV cache", plot_kv),
    "early_exit": PlotKind("Early-exit rates", "no early-exit cell", plot_early_exit),
    "efficiency": PlotKind("Efficiency gap", "no variant has a GFLOP/s figure", plot_efficiency),
}
