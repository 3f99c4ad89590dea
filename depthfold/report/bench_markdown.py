"""Render a bench report (JSON only) as markdown: the device, a headline table, per-model tables of every
pipeline on every lane with speedups against the baselines, and what failed."""

from __future__ import annotations

from typing import Any

__all__ = ["render_bench_markdown", "headline_rows", "render_headline"]

QUALITY_TOLERANCE = {"accuracy": 0.01, "perplexity": 0.05}
"""What the headline allows a pipeline to lose: accuracy points (absolute), perplexity (relative)."""


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "–" if value is None else format(value, spec)


def _speedup(timing: dict[str, Any], variant: str, baseline: str) -> dict[str, float] | None:
    return timing["speedups"].get(variant, {}).get(baseline)


def _x(s: dict[str, float] | None) -> str:
    return "–" if s is None else f"{s['median']:.2f}× ({s['p10']:.2f}–{s['p90']:.2f})"


def _within(cell: dict[str, Any], higher_is_better: bool) -> bool:
    q = cell.get("quality")
    if cell["status"] != "ok" or not q:
        return False
    tol = QUALITY_TOLERANCE.get(q["metric"], 0.0)
    if higher_is_better:
        return q["original"] - q["value"] <= tol + 1e-12
    return q["value"] <= q["original"] * (1 + tol) + 1e-12


def headline_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model, the pipeline with the best median ONNX Runtime speedup whose quality stays within
    :data:`QUALITY_TOLERANCE` of the original (``None`` pipeline when none does)."""
    rows = []
    timings = {t["model"]: t for t in report["timings"]}
    for model in report["models"]:
        timing = timings.get(model["name"])
        best, best_speedup = None, None
        for cell in report["cells"]:
            if cell["model"] != model["name"] or cell["pipeline"] == "original" or timing is None:
                continue
            s = _speedup(timing, f"onnxruntime/{cell['pipeline']}", "onnxruntime/original")
            if s and _within(cell, model["metric"]["higher_is_better"]) and \
                    (best_speedup is None or s["median"] > best_speedup["median"]):
                best, best_speedup = cell, s
        rows.append({"model": model, "cell": best, "speedup": best_speedup,
                     "tvm": _speedup(timing, f"tvm/{best['pipeline']}", "onnxruntime/original")
                     if best and timing else None})
    return rows


def render_headline(report: dict[str, Any]) -> str:
    """The headline table (the README shows it for the latest committed report)."""
    dev = report["device"]
    lines = [f"Device `{dev['id']}` ({dev['cpu']['model']}, {dev['threads']} thread(s)"
             + (f", {dev['gpu']['name']}" if dev.get("gpu") else "") + f"), depthfold {report['depthfold']}"
             + (f" at `{dev['git']}`" if dev.get("git") else "") + f", {report['created']}.", "",
             "| model | best pipeline | ONNX Runtime speedup | its TVM build vs the ONNX Runtime original | quality before → after |",
             "|---|---|---|---|---|"]
    for row in headline_rows(report):
        model, cell = row["model"], row["cell"]
        if cell is None:
            lines.append(f"| {model['name']} | none within tolerance | – | – | – |")
            continue
        q = cell["quality"]
        lines.append(f"| {model['name']} | `{cell['pipeline']}` | **{_x(row['speedup'])}** | {_x(row['tvm'])} | "
                     f"{q['metric']} {q['original']:.4g} → {q['value']:.4g} |")
    tol = ", ".join(f"{k} {'-' if k == 'accuracy' else '+'}{v:g}{'' if k == 'accuracy' else ' (relative)'}"
                    for k, v in QUALITY_TOLERANCE.items())
    lines += ["", f"Best = fastest on ONNX Runtime within tolerance ({tol}); speedups are medians of per-round "
              "ratios in one interleaved run, p10–p90 in brackets."]
    return "\n".join(lines) + "\n"


def _device(report: dict[str, Any]) -> list[str]:
    d = report["device"]
    cpu = d["cpu"]
    gib = (d["memory_bytes"] or 0) / (1 << 30)
    llc = f"{cpu['llc_bytes'] / (1 << 20):.0f} MiB" if cpu["llc_bytes"] else "unknown"
    rows = [("CPU", f"{cpu['model']} ({cpu['arch']}), {cpu['physical_cores'] or '?'} cores / "
                    f"{cpu['logical_cpus']} logical, last-level cache {llc}"),
            ("vector ISA", ", ".join(cpu["flags"]) or "–"),
            ("memory", f"{gib:.1f} GiB" if d["memory_bytes"] else "unknown"),
            ("GPU", f"{d['gpu']['name']} (driver {d['gpu']['driver'] or '?'})" if d["gpu"] else "none"),
            ("OS / Python", f"{d['os']} / {d['python']}"),
            ("threads", str(d["threads"])),
            ("float32 peak", f"{d['peak_gflops']:.1f} GFLOP/s (matmul microbenchmark)" if d["peak_gflops"] else "–"),
            ("versions", ", ".join(f"{k} {v}" for k, v in d["versions"].items() if v)),
            ("git", d["git"] or "–")]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def _model_section(report: dict[str, Any], model: dict[str, Any], timing: dict[str, Any] | None) -> list[str]:
    settings = report["settings"]
    lines = [f"## {model['name']}", "",
             f"{model['kind']} model, input {tuple(model['input_shape'])}, {model['params']:,} parameters, "
             f"{model['flops'] / 1e6:.1f} MFLOP; quality: {model['metric']['name']} on {model['dataset']}.", ""]
    if timing is not None:
        lines += [f"### Baselines ({timing['rounds']} interleaved rounds, {timing['inner']} call(s) per sample, "
                  f"{timing['threads']} thread(s))", "",
                  "| runtime | median ms | p10–p90 ms | speedup vs ONNX Runtime | GFLOP/s (of peak) |",
                  "|---|---|---|---|---|"]
        for v in timing["variants"]:
            if v["pipeline"] != "original":
                continue
            if v["status"] != "ok":
                lines.append(f"| {v['runtime']} | failed | – | – | – |")
                continue
            lines.append(f"| {v['runtime']} | {v['median_ms']:.3f} | {v['p10_ms']:.3f}–{v['p90_ms']:.3f} | "
                         f"{_x(_speedup(timing, v['name'], 'onnxruntime/original'))} | {_fmt(v['gflops'], '.1f')}"
                         f" ({_fmt(v['fraction_of_peak'] and 100 * v['fraction_of_peak'], '.1f')}%) |")
        lines.append("")
    lanes = settings["lanes"]
    head = ["pipeline", "quality", "max rel. error", "top-1 agreement", "nodes", "MFLOP"]
    for lane in lanes:
        head += [f"{lane} ms", f"{lane} vs its original"]
    head += ["vs torch eager (ORT)", "optimize s"]
    lines += ["### Pipelines", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    variants = {v["name"]: v for v in timing["variants"]} if timing else {}
    for cell in report["cells"]:
        if cell["model"] != model["name"]:
            continue
        if cell["status"] != "ok":
            lines.append(f"| `{cell['pipeline']}` | failed | " + " | ".join(["–"] * (len(head) - 2)) + " |")
            continue
        q, f, g = cell["quality"], cell["fidelity"] or {}, cell["graph"] or {}
        row = [f"`{cell['pipeline']}`", f"{q['value']:.4g}" if q else "–", _fmt(f.get("max_rel"), ".2e"),
               _fmt(f.get("agreement"), ".3f"), str(g.get("nodes", "–")), _fmt(g.get("flops", 0) / 1e6, ".1f")]
        for lane in lanes:
            name = f"{lane}/{cell['pipeline']}"
            v = variants.get(name)
            ok = v is not None and v["status"] == "ok"
            row += [f"{v['median_ms']:.3f}" if ok else ("failed" if v else "–"),
                    _x(_speedup(timing, name, f"{lane}/original")) if ok and timing else "–"]
        row += [_x(_speedup(timing, f"onnxruntime/{cell['pipeline']}", "torch_eager/original")) if timing else "–",
                f"{cell['optimize_s']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    return [*lines, ""]


def _aarch64(report: dict[str, Any]) -> list[str]:
    a64 = report["settings"].get("aarch64")
    if not a64:
        return []
    lines = ["## aarch64 (TVM cross-compiled, run under qemu)", "",
             f"Every pipeline's ONNX artifact built for {a64['target']} ({a64['mcpu']}) and run in an emulated arm64 "
             "Python against ONNX Runtime on this machine: a correctness check, not a timing.", "",
             "| model | pipeline | max relative error vs ONNX Runtime |", "|---|---|---|"]
    lines += [f"| {c['model']} | `{c['pipeline']}` | "
              + (_fmt(c["max_rel_error"], ".2e") if c["status"] == "ok" else f"failed: {c['error']}") + " |"
              for c in a64["checks"]]
    lines += [f"\nNot run: {e}" for e in a64["errors"]]
    return [*lines, ""]


def _failures(report: dict[str, Any]) -> list[str]:
    items = [f"- `{c['model']}` / `{c['pipeline']}`: {c['error']}" for c in report["cells"] if c["status"] != "ok"]
    items += [f"- `{t['model']}` / `{v['name']}`: {v['error']}" for t in report["timings"] for v in t["variants"]
              if v["status"] != "ok"]
    return ["## What failed", "", *items, ""] if items else []


def render_bench_markdown(report: dict[str, Any]) -> str:
    """The whole report as markdown; a function of the JSON alone, so any report re-renders identically."""
    s = report["settings"]
    lines = [f"# depthfold benchmark: {report['device']['id']}", "",
             f"Created {report['created']} by depthfold {report['depthfold']} (schema {report['schema_version']})"
             + (f": `{report['command']}`" if report.get("command") else "") + ".",
             f"{'Quick plan. ' if s['quick'] else ''}Lanes: {', '.join(s['lanes'])} on {s.get('device', 'cpu')}; "
             f"baselines: {', '.join(b.split('/')[0] for b in s['baselines'])}; {s['rounds']} rounds after "
             f"{s['warmup']} warm-up, {s['threads']} thread(s).", "",
             "## Headline", "", render_headline(report), "## Device", "", *_device(report), ""]
    timings = {t["model"]: t for t in report["timings"]}
    for model in report["models"]:
        lines += _model_section(report, model, timings.get(model["name"]))
    lines += _aarch64(report)
    lines += _failures(report)
    return "\n".join(lines).rstrip("\n") + "\n"
