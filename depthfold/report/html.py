"""Render a benchmark report (`schemas/bench-1.schema.json`) as one self-contained HTML page.

Header, device fingerprint, settings, a headline table, per-model timing tables and the cells table, then the
plots of `plots.PLOT_KINDS` as base64 PNG data URIs. Inline CSS, no JavaScript and no external resources, so
the page can be archived or mailed as it is. Every string from the report goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import math
import struct
from typing import Any

from .bench_markdown import QUALITY_TOLERANCE, headline_rows
from .plots import PLOT_KINDS, Plot

__all__ = ["render_html"]

Report = dict[str, Any]

_SECTIONS = ("device", "settings", "headline", "timings", "cells", "aarch64", "plots")  # h2 ids, in the nav

_CSS = """
body { font: 13px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #222; background: #fff;
       max-width: 1400px; margin: 0 auto; padding: 16px 20px; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid #ddd; }
h3 { font-size: 14px; margin: 18px 0 6px; }
nav a { margin-right: 12px; }
.meta { color: #555; margin: 2px 0; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.err { color: #b00020; }
td.wrap { max-width: 22em; overflow-wrap: anywhere; }  /* pass specs with configs have no spaces */
.faster { color: #0a7d32; }
.slower { color: #b00020; }
.spread { color: #777; font-size: 11px; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; }
figure.plot { margin: 0; padding: 4px; border: 1px solid #ddd; max-width: 100%; box-sizing: border-box; }
figure.plot img { display: block; max-width: 100%; height: auto; }
figcaption { font-size: 12px; color: #444; margin-top: 4px; }
.no-data { color: #777; font-style: italic; }
code { font-size: 12px; }
"""


def _e(value: object) -> str:
    return html.escape(str(value))


def _num(value: float | int | None, fmt: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return format(value, fmt)


def _ms(value: float | None) -> str:
    """Milliseconds to three significant digits, trailing zeros kept (10.0, 6.30, 0.0123)."""
    if value is None:
        return "–"
    decimals = max(0, 2 - math.floor(math.log10(value))) if value > 0 else 2
    return f"{value:.{decimals}f}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "–"
    if n < 1024:
        return f"{n} B"
    size, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.4g} {unit}"


def _td(content: str, cls: str = "", span: int = 1) -> str:
    """A cell of already-escaped HTML."""
    attrs = (f' class="{cls}"' if cls else "") + (f' colspan="{span}"' if span > 1 else "")
    return f"<td{attrs}>{content}</td>"


def _table(head: list[str], rows: list[list[str]]) -> str:
    """A table: `head` is plain text, `rows` lists of `_td` cells."""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "\n".join(f"<tr>{''.join(r)}</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _pairs(rows: list[tuple[str, str]]) -> str:
    """A two-column key/value table; values are already-escaped HTML."""
    body = "\n".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table><tbody>\n{body}\n</tbody></table>"


def _spread(s: dict[str, float] | None) -> str:
    """A speed-up as `median× p10–p90`, coloured where the whole p10–p90 range is one side of 1."""
    if s is None:
        return _td("–", "num")
    cls = "faster" if s["p10"] > 1 else "slower" if s["p90"] < 1 else ""
    return _td(f'<span class="{cls}">{s["median"]:.2f}×</span> '
               f'<span class="spread">{s["p10"]:.2f}–{s["p90"]:.2f}</span>', "num")


def _header(report: Report) -> str:
    device = report["device"]
    command = f'<p class="meta"><code>{_e(report["command"])}</code></p>' if report.get("command") else ""
    nav = "".join(f'<a href="#{s}">{s}</a>' for s in _SECTIONS)
    return (f"<header><h1>depthfold benchmark: {_e(device['id'])}</h1>"
            f'<p class="meta">created {_e(report["created"])} · depthfold {_e(report["depthfold"])} · '
            f"git {_e(device['git'] or 'unknown')} · schema {_e(report['schema'])} "
            f"{_e(report['schema_version'])}</p>{command}"
            f"<nav>{nav}</nav></header>")


def _device(device: dict[str, Any]) -> str:
    cpu, gpu = device["cpu"], device["gpu"]
    gpu_text = ("none" if gpu is None
                else f"{gpu['name']}, driver {gpu['driver'] or 'unknown'}, {_bytes(gpu['memory_bytes'])}")
    rows = [
        ("CPU", _e(cpu["model"])), ("architecture", _e(cpu["arch"])),
        ("vector ISA flags", _e(", ".join(cpu["flags"]) or "none")),
        ("cores", _e(f"{_num(cpu['physical_cores'])} physical, {cpu['logical_cpus']} logical")),
        ("last-level cache", _e(_bytes(cpu["llc_bytes"]))), ("memory", _e(_bytes(device["memory_bytes"]))),
        ("GPU", _e(gpu_text)),
        ("OS", _e(device["os"])), ("Python", _e(device["python"])), ("threads", _e(device["threads"])),
        ("peak float32 GFLOP/s", _e(_num(device["peak_gflops"], ".4g"))),
    ]
    rows += [(name, _e(version or "not installed")) for name, version in device["versions"].items()]
    return f'<h2 id="device">Device</h2>{_pairs(rows)}'


def _settings(settings: dict[str, Any]) -> str:
    rows = [("quick", "yes" if settings["quick"] else "no"), ("rounds", _e(settings["rounds"])),
            ("warm-up", _e(settings["warmup"])), ("threads", _e(settings["threads"])),
            ("device", _e(settings.get("device", "–"))), ("lanes", _e(", ".join(settings["lanes"]))),
            ("baselines", _e(", ".join(settings["baselines"])))]
    return f'<h2 id="settings">Settings</h2>{_pairs(rows)}'


def _aarch64(lane: dict[str, Any] | None) -> str:
    """The cross-compiled aarch64 lane: one row per checked artifact, plus errors outside any check."""
    if lane is None:
        return '<h2 id="aarch64">aarch64 lane</h2><p class="meta">Not run.</p>'
    rows = [[_td(_e(c["model"])), _td(_e(c["pipeline"])),
             _td("ok") if c["status"] == "ok" else _td(_e(f"failed: {c['error']}"), "err"),
             _td(_e(_num(c["max_rel_error"])), "num")] for c in lane["checks"]]
    errors = "".join(f'<p class="err">{_e(err)}</p>' for err in lane["errors"])
    how = ("emulated under qemu (correctness only: emulated time is not device time)" if lane["emulated"]
           else "run natively")
    return ('<h2 id="aarch64">aarch64 lane</h2>'
            f'<p class="meta">TVM artifacts cross-compiled for {_e(lane["target"])} '
            f'(mcpu {_e(lane["mcpu"])}), {how}, compared with ONNX Runtime on this machine.</p>'
            f"{_table(['model', 'pipeline', 'status', 'max rel error'], rows)}{errors}")


def _headline(report: Report) -> str:
    """Per model, the pipeline `bench_markdown.headline_rows` picks: the fastest on ONNX Runtime within the
    quality tolerance, so the page and the markdown headline agree."""
    rows = []
    for row in headline_rows(report):
        model, cell = row["model"], row["cell"]
        better = "higher" if model["metric"]["higher_is_better"] else "lower"
        lead = [_td(_e(model["name"])), _td(_e(model["kind"])),
                _td(_e(f"{model['metric']['name']} ({better} is better)"))]
        if cell is None:
            rows.append(lead + [_td("no pipeline within the quality tolerance", "err", 4)])
            continue
        q = cell["quality"]
        rows.append(lead + [_td(_e(cell["pipeline"])), _spread(row["speedup"]), _spread(row["tvm"]),
                            _td(_e(f"{_num(q['original'], '.4g')} → {_num(q['value'], '.4g')}"), "num")])
    head = ["model", "kind", "metric", "best pipeline", "ONNX Runtime speed-up (vs onnxruntime/original)",
            "TVM speed-up (vs onnxruntime/original)", "quality before → after"]
    tolerance = ", ".join(f"{metric} {value:g}" for metric, value in QUALITY_TOLERANCE.items())
    return (f'<h2 id="headline">Headline</h2>{_table(head, rows)}'
            '<p class="meta">Best: the fastest pipeline on ONNX Runtime whose quality stays within the '
            f"tolerance ({_e(tolerance)}; accuracy absolute, perplexity relative). Speed-ups are the median "
            "(p10–p90) over interleaved rounds of t_baseline / t_variant.</p>")


def _timings(report: Report) -> str:
    baselines = report["settings"]["baselines"]
    parts = ['<h2 id="timings">Timings</h2>']
    for timing in report["timings"]:
        rows = []
        for v in timing["variants"]:
            if v["status"] != "ok":
                rows.append([_td(_e(v["name"])), _td(_e(f"failed: {v['error']}"), "err", 3 + len(baselines))])
                continue
            fraction = f" ({v['fraction_of_peak']:.0%})" if v["fraction_of_peak"] is not None else ""
            speedups = timing["speedups"].get(v["name"], {})
            rows.append([_td(_e(v["name"])), _td(_e(_ms(v["median_ms"])), "num"),
                         _td(_e(f"{_ms(v['p10_ms'])}–{_ms(v['p90_ms'])}"), "num"),
                         _td(_e(_num(v["gflops"], ".1f") + fraction), "num")]
                        + [_spread(speedups.get(b)) for b in baselines])
        head = ["variant", "median ms", "p10–p90 ms", "GFLOP/s (of peak)", *(f"vs {b}" for b in baselines)]
        parts.append(f"<h3>{_e(timing['model'])}</h3>"
                     f'<p class="meta">{timing["rounds"]} interleaved rounds of {timing["inner"]} call(s) '
                     f'after {timing["warmup"]} warm-up, {timing["threads"]} thread(s)</p>'
                     + _table(head, rows))
    return "\n".join(parts)


def _cells(report: Report) -> str:
    rows = []
    for c in report["cells"]:
        lead = [_td(_e(c["model"])), _td(_e(c["pipeline"])), _td(_e(", ".join(c["passes"]) or "–"), "wrap")]
        if c["status"] != "ok":
            rows.append(lead + [_td(_e(f"failed: {c['error']}"), "err", 6),
                                _td(_e(_num(c["optimize_s"])), "num"), _td("–", span=3)])
            continue
        q, fid, graph = c["quality"], c["fidelity"] or {}, c["graph"] or {}
        quality = "–" if q is None else _num(q["value"], ".4g")
        if q is not None and q["value"] != q["original"]:
            quality += f" ({q['value'] - q['original']:+.3g})"
        flops = graph.get("flops")
        numbers = [_num(fid.get("max_abs")), _num(fid.get("max_rel")), _num(fid.get("agreement"), ".4g"),
                   _num(c["optimize_s"]), _num(graph.get("nodes")), _num(graph.get("params")),
                   "–" if flops is None else f"{flops / 1e9:.3g}"]
        rows.append(lead + [_td("ok"), _td(_e(quality), "num"), _td(_e(q["metric"] if q else "–"))]
                    + [_td(_e(n), "num") for n in numbers])
    head = ["model", "pipeline", "passes", "status", "quality (Δ vs original)", "metric", "max abs error",
            "max rel error", "top-1 agreement", "optimize s", "nodes", "params", "GFLOPs"]
    return f'<h2 id="cells">Cells</h2>{_table(head, rows)}'


def _figure(plot: Plot) -> str:
    width, height = struct.unpack(">II", plot.png[16:24])  # the IHDR chunk
    src = "data:image/png;base64," + base64.b64encode(plot.png).decode("ascii")
    return (f'<figure class="plot" data-plot="{_e(plot.key)}" style="width: {width + 10}px">'
            f'<img src="{src}" width="{width}" height="{height}" alt="{_e(plot.title)}">'
            f"<figcaption><b>{_e(plot.title)}.</b> {_e(plot.caption)}</figcaption></figure>")


def _plots(report: Report) -> str:
    parts = ['<h2 id="plots">Plots</h2>']
    for kind, spec in PLOT_KINDS.items():
        plots = spec.make(report)
        body = ("\n".join(_figure(p) for p in plots) if plots
                else f'<p class="no-data" data-plot-kind="{_e(kind)}">No data: {_e(spec.needs)}.</p>')
        parts.append(f'<h3>{_e(spec.title)}</h3><div class="plots">\n{body}\n</div>')
    return "\n".join(parts)


def render_html(report: Report) -> str:
    """The report as one self-contained HTML5 page (inline CSS, plots as embedded PNG, no scripts)."""
    title = f"depthfold benchmark: {report['device']['id']}"
    body = "\n".join([_header(report), _device(report["device"]), _settings(report["settings"]),
                      _headline(report), _timings(report), _cells(report),
                      _aarch64(report["settings"].get("aarch64")), _plots(report)])
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_e(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")
