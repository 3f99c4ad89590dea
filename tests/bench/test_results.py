"""The committed benchmark reports (docs/results/<device>/): valid, their markdown re-renders identically,
and the README's headline table is the latest one's."""

from __future__ import annotations

from pathlib import Path

from depthfold.cli import HEADLINE_BEGIN, HEADLINE_END
from depthfold.report import read_report, render_bench_markdown, render_headline

ROOT = Path(__file__).resolve().parents[2]
REPORTS = sorted((ROOT / "docs" / "results").glob("*/report.json"))


def test_committed_reports_validate_and_re_render_identically():
    assert REPORTS, "docs/results/ has no committed report; run `make bench` and copy report.{json,md,html}"
    for path in REPORTS:
        report = read_report(path)
        assert path.parent.name == report["device"]["id"]
        assert (path.parent / "report.md").read_text() == render_bench_markdown(report), path
        assert (path.parent / "report.html").is_file()


def test_readme_headline_is_the_latest_committed_report():
    latest = max((read_report(p) for p in REPORTS), key=lambda r: r["created"])
    text = (ROOT / "README.md").read_text()
    block = text.split(HEADLINE_BEGIN, 1)[1].split(HEADLINE_END, 1)[0]
    assert block == "\n" + render_headline(latest), "run `depthfold report headline <latest report.json> --readme README.md`"
