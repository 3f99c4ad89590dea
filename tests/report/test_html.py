"""render_html: a self-contained page with every table and plot of a bench-1 report, as a browser draws it."""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jsonschema import Draft202012Validator
from PIL import Image

import depthfold.report
from depthfold.report import render_html
from depthfold.report.plots import PLOT_KINDS, plot_pareto

from .sample import sample_report

SCHEMA = Path(depthfold.report.__file__).parent / "schemas" / "bench-1.schema.json"
FIGURE = re.compile(r'<figure class="plot" data-plot="([^"]*)"[^>]*><img src="data:image/png;base64,([^"]*)"')
NO_DATA = re.compile(r'<p class="no-data" data-plot-kind="([^"]*)">')
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MIN_STD = 10.0  # grey levels 0-255: a blank page is 0, the sample's plots are 40-70
BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def _validate(report: dict[str, Any]) -> None:
    validator = Draft202012Validator(json.loads(SCHEMA.read_text()))
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(report)]
    assert not errors, "\n".join(errors[:10])


def _figures(page: str) -> dict[str, bytes]:
    return {html.unescape(key): base64.b64decode(data, validate=True) for key, data in FIGURE.findall(page)}


def _image(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def _without(report: dict[str, Any], models: set[str], pipelines: set[str]) -> dict[str, Any]:
    """The report less some models (all their rows) and some pipelines (cells, variants, speed-ups)."""
    out = copy.deepcopy(report)
    out["models"] = [m for m in out["models"] if m["name"] not in models]
    out["cells"] = [c for c in out["cells"] if c["model"] not in models and c["pipeline"] not in pipelines]
    out["timings"] = [t for t in out["timings"] if t["model"] not in models]
    for t in out["timings"]:
        t["variants"] = [v for v in t["variants"] if v["pipeline"] not in pipelines]
        t["speedups"] = {k: s for k, s in t["speedups"].items() if k.partition("/")[2] not in pipelines}
    return out


@pytest.fixture(scope="module")
def report() -> dict[str, Any]:
    return sample_report()


@pytest.fixture(scope="module")
def page(report: dict[str, Any]) -> str:
    return render_html(report)


def test_sample_report_validates(report: dict[str, Any]) -> None:
    _validate(report)


def test_render_html_draws_every_plot_kind(report: dict[str, Any], page: str) -> None:
    figures = _figures(page)
    assert page.count('<figure class="plot"') == len(figures)
    assert {key.partition(":")[0] for key in figures} == set(PLOT_KINDS)
    names = sorted(m["name"] for m in report["models"])
    for kind in ("pareto", "layers", "efficiency"):  # one figure per model
        assert sorted(k.partition(":")[2] for k in figures if k.startswith(f"{kind}:")) == names
    assert not NO_DATA.findall(page)
    for key, png in figures.items():
        assert png.startswith(PNG_SIGNATURE), key
        pixels = _image(png)
        assert pixels.std() > MIN_STD, f"{key}: blank image (pixel std {pixels.std():.1f})"
        assert (pixels.min(axis=2) < 128).mean() > 0.01, f"{key}: almost no ink"
    assert len(page) < 600_000  # small figures: the page stays a few hundred KB


def test_plot_pareto_front(report: dict[str, Any]) -> None:
    # dominated: resnet18 original (exact is as accurate and faster), early_exit (layermerge@1.3 beats it);
    # perplexity is lower-is-better, so there the front runs downhill
    fronts = {p.key: p.caption.rpartition("on the Pareto front: ")[2] for p in plot_pareto(report)}
    assert fronts == {"pareto:resnet18": "layermerge@1.6, layermerge@1.3, exact.",
                      "pareto:mobilenetv2_100": "layermerge@1.3, early_exit, exact.",
                      "pareto:llama_tiny": "collapse_blocks@2, drop_layers@1.3, kv_share@cla2, original."}


def test_render_html_is_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "<link" not in page
    sources = re.findall(r'\bsrc="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page


def test_render_html_tables(report: dict[str, Any], page: str) -> None:
    failed = [c for c in report["cells"] if c["status"] == "failed"]
    failed += [v for t in report["timings"] for v in t["variants"] if v["status"] == "failed"]
    assert failed
    for row in failed:
        assert html.escape(row["error"]) in page
    for t in report["timings"]:
        for v in t["variants"]:
            assert f"<td>{html.escape(v['name'])}</td>" in page
    # the headline: per model, the fastest pipeline on ONNX Runtime within the quality tolerance
    headline = page[page.index('id="headline"'):page.index('id="timings"')]
    best = dict(re.findall(r"<tr><td>([^<]*)</td>(?:<td>[^<]*</td>){2}<td>([^<]*)</td>", headline))
    assert best == {"resnet18": "layermerge@1.3", "mobilenetv2_100": "early_exit",
                    "llama_tiny": "kv_share@cla2"}
    for key in ("id", "git"):
        assert html.escape(report["device"][key]) in page


@pytest.mark.parametrize(("models", "pipelines", "missing"), [
    ({"llama_tiny"}, {"early_exit"}, {"kv", "early_exit"}),
    ({"resnet18", "mobilenetv2_100", "llama_tiny"}, set(), set(PLOT_KINDS)),
])
def test_render_html_notes_missing_data(report: dict[str, Any], models: set[str], pipelines: set[str],
                                        missing: set[str]) -> None:
    smaller = _without(report, models, pipelines)
    _validate(smaller)
    page = render_html(smaller)
    assert set(NO_DATA.findall(page)) == missing
    assert {key.partition(":")[0] for key in _figures(page)} == set(PLOT_KINDS) - missing
    assert page.count("<img") == len(_figures(page))  # no image without a plot


def test_render_html_escapes_strings(report: dict[str, Any]) -> None:
    # `$x^$` would be mathtext in a matplotlib label: it must come out literal, not fail to parse
    evil = '<script>alert("$x^$")</script>'
    hostile = copy.deepcopy(report)
    for row in [*hostile["models"], *hostile["cells"], *hostile["timings"]]:
        key = "name" if "kind" in row else "model"
        if row[key] == "resnet18":
            row[key] = evil
    hostile["cells"][1]["pipeline"] = "exact<b>"
    _validate(hostile)
    page = render_html(hostile)
    assert "<script" not in page and "exact<b>" not in page
    assert html.escape(evil) in page and "exact&lt;b&gt;" in page
    assert f'data-plot="pareto:{html.escape(evil)}"' in page


def _screenshot(browser: str, page: str, out: Path, size: tuple[int, int]) -> np.ndarray:
    src = out.with_suffix(".html")
    src.write_text(page, encoding="utf-8")
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--force-device-scale-factor=1", f"--user-data-dir={out.parent / 'profile'}",
         "--virtual-time-budget=5000", f"--screenshot={out}",
         f"--window-size={size[0]},{size[1]}", src.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert out.exists(), f"{browser} wrote no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    return np.asarray(Image.open(out).convert("RGB"), dtype=np.float64)


@pytest.mark.slow
def test_chromium_draws_every_plot(page: str, tmp_path: Path) -> None:
    """Every embedded plot, laid out by the page's own CSS, shows in a headless browser pixel for pixel."""
    browser = next((path for path in map(shutil.which, BROWSERS) if path), None)
    if browser is None:
        pytest.skip("no chromium, chromium-browser or google-chrome on PATH: apt-get install chromium")
    figures = re.findall(r'<figure class="plot".*?</figure>', page, flags=re.S)
    # negative control: the first figure again, its data no longer a PNG, which the comparison must reject
    broken = figures[0].replace("base64,iVBORw0KGgo", "base64,AAAAAAAAAAA", 1)
    assert broken != figures[0]
    expected = [_image(png) for png in _figures(page).values()]
    expected.append(expected[0])
    # The page's own <head> (CSS), each figure in a box at a known place: two columns, 640 px apart.
    boxes, tops = [], [0, 0]
    for i, img in enumerate(expected):
        col = i % 2
        boxes.append((col * 640, tops[col], img))
        tops[col] += img.shape[0] + 120  # room for the caption
    body = "\n".join(f'<div style="position: absolute; left: {x}px; top: {y}px; width: 630px">{f}</div>'
                     for (x, y, _), f in zip(boxes, [*figures, broken]))
    test_page = (page[:page.index("</head>")]
                 + "<style>figure.plot { margin: 0; padding: 0; border: 0; }</style></head>"
                 + f"<body>{body}</body></html>")
    shot = _screenshot(browser, test_page, tmp_path / "plots.png", (1280, max(tops)))
    misses = []
    for x, y, img in boxes:
        h, w = img.shape[:2]
        ink = img.min(axis=2) < 200  # lines, bars, text: white background would match a blank page
        off = np.abs(shot[y:y + h, x:x + w] - img).max(axis=2) > 40
        misses.append(float(off[ink].mean()))
    *drawn, control = misses
    assert max(drawn) < 0.02, f"plots not drawn as embedded (share of ink pixels off, per plot): {drawn}"
    assert control > 0.5, f"a broken image matched its plot ({control:.0%} of ink off): the check is blind"
