"""Reports: a JSON-serialisable record of what depthfold did and measured, and its renderings (markdown for
optimize runs; markdown and self-contained HTML with plots for bench reports, validated by a JSON Schema)."""

from __future__ import annotations

from .bench_markdown import headline_rows, render_bench_markdown, render_headline
from .markdown import render_markdown
from .schema import SCHEMA_VERSION, environment, new_report
from .validate import BENCH_SCHEMA_VERSION, RUNTIMES, SCHEMA_PATH, bench_schema, check_report, read_report

__all__ = ["SCHEMA_VERSION", "environment", "new_report", "render_markdown",
           "BENCH_SCHEMA_VERSION", "RUNTIMES", "SCHEMA_PATH", "bench_schema", "check_report", "read_report",
           "headline_rows", "render_bench_markdown", "render_headline", "render_html"]


def __getattr__(name: str) -> object:
    if name == "render_html":  # matplotlib is imported only when a page is rendered
        from .html import render_html

        return render_html
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
