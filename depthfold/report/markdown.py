"""Render a report dict as markdown: a pass table, sizes before and after, verification, latency."""

from __future__ import annotations

from typing import Any

__all__ = ["render_markdown"]


def _num(value: float | int | None) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.3g}"


def _delta(before: int, after: int) -> str:
    if before == 0:
        return f"{_num(before)} → {_num(after)}"
    return f"{_num(before)} → {_num(after)} ({(after - before) / before:+.1%})"


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page."""
    model = report["model"]
    inputs = ", ".join(f"{tuple(i['shape'])} {i['dtype']}" for i in model["inputs"])
    lines = [f"# depthfold report: {model['name']}", "",
             f"Inputs: {inputs}. depthfold {report['depthfold']}, torch {report['environment']['torch']}, "
             f"created {report['created']}.", ""]
    summary = report["summary"]
    lines += ["## Summary", "", "| | before → after |", "|---|---|"]
    for key in ("nodes", "params", "flops"):
        lines.append(f"| {key} | {_delta(summary['before'][key], summary['after'][key])} |")
    ver = summary.get("verification") or {}
    if ver:
        lines.append(f"| max relative error vs original | {_num(ver.get('max_rel'))} "
                     f"({ver.get('inputs', '?')} input sets) |")
    lines += ["", "## Passes", "",
              "| pass | kind | changed | rewrites | skipped | max abs error | seconds | nodes |",
              "|---|---|---|---|---|---|---|---|"]
    for rec in report["passes"]:
        err = rec["error"]["max_abs"] if rec.get("error") else None
        lines.append(f"| `{rec['name']}` | {'exact' if rec['exact'] else 'approximate'} | "
                     f"{'yes' if rec['changed'] else 'no'} | {len(rec['changes'])} | {len(rec['skipped'])} | "
                     f"{_num(err)} | {rec['seconds']:.2f} | {rec['before']['nodes']} → {rec['after']['nodes']} |")
    skips = [(rec["name"], s) for rec in report["passes"] for s in rec["skipped"]]
    if skips:
        lines += ["", "### Sites left alone", ""]
        shown = skips[:30]
        lines += [f"- `{name}` at `{s['site']}`: {s['reason']}" for name, s in shown]
        if len(skips) > len(shown):
            lines.append(f"- … and {len(skips) - len(shown)} more (see report.json)")
    for rec in report["passes"]:
        if rec["name"] == "layermerge" and rec.get("details"):
            lines += _layermerge_section(rec["details"])
    accuracy = report.get("accuracy")
    if accuracy:
        lines += ["", "## Accuracy", "", f"{accuracy['dataset']}: original {accuracy['original']:.4f}, "
                  f"optimized {accuracy['optimized']:.4f}."]
    onnx_info = report.get("onnx")
    if onnx_info:
        lines += ["", "## ONNX artifact", "",
                  f"`{onnx_info['file']}`: opset {onnx_info['opset']}, "
                  f"ONNX Runtime vs torch max abs error {_num(onnx_info.get('max_abs_error'))} "
                  f"(relative {_num(onnx_info.get('max_rel_error'))})."]
    latency = report.get("latency")
    if latency:
        lines += ["", f"## Latency ({latency['backend']}, {latency.get('target', latency['device'])}, "
                  f"{latency['threads']} thread(s), {latency['rounds']} interleaved rounds of {latency.get('calls_per_sample', 1)} call(s))", "",
                  "| model | median ms | p90 ms | n |", "|---|---|---|---|"]
        for name, m in latency["measurements"].items():
            lines.append(f"| {name} | {m['median_ms']:.3f} | {m['p90_ms']:.3f} | {m['n']} |")
        sp = latency["speedup"]
        lines += ["", f"Speed-up (median of per-round ratios): **{sp['median']:.3f}×** "
                  f"(p10 {sp['p10']:.3f}, p90 {sp['p90']:.3f})."]
    return "\n".join(lines) + "\n"


def _layermerge_section(d: dict[str, Any]) -> list[str]:
    lat, acc, tables = d["latency"], d["accuracy"], d["tables"]
    lines = ["", f"## LayerMerge ({d['mode']} mode, {tables['importance']['estimator']} importance)", "",
             f"Latency on {tables['latency']['probe'].get('backend')}/{tables['latency']['probe'].get('target')}: "
             f"original {lat['original_ms']:.3f} ms, predicted {lat['predicted_ms']:.3f} ms "
             f"({lat['predicted_speedup']:.2f}×), measured {lat['measured_ms']:.3f} ms "
             f"({lat['measured_speedup']:.2f}×).",
             f"Calibration accuracy: original {_num(acc['original'])}, compressed {_num(acc.get('compressed'))}, "
             f"with {acc.get('batch_norms_recalibrated', 0)} batch norms recalibrated "
             f"{_num(acc['compressed_before_recovery'])}, after recovery {_num(acc['after_recovery'])} "
             f"(output KL {acc['output_kl']:.4f}, {acc['samples']} held-out samples"
             f"{', synthetic inputs' if acc['synthetic_data'] else ''}).",
             f"Tables: {tables['latency']['distinct_layers']} distinct layers ({tables['latency']['cache_hits']} "
             f"cached, {tables['latency']['measured']} measured) in {tables['latency']['seconds']:.1f} s; importance "
             f"of {tables['importance']['candidates']} candidates in {tables['importance']['seconds']:.1f} s; "
             f"planning (DP solves, replanning measurements) {d['timings']['plan_s']:.1f} s.", "",
             "| segment | replacement | kernel | latency ms | importance |", "|---|---|---|---|---|"]
    for p in d["plan"]:
        if p["kind"] in ("original", "barrier"):
            continue
        kernel = "×".join(map(str, p["kernel"])) if p.get("kernel") else ""
        lines.append(f"| ({p['start']}, {p['end']}] | {p['label']} | {kernel} | {p['latency_ms']:.3f} | "
                     f"{p['importance']:.4f} |")
    return lines
