"""What a person saw in the report, fixed: plot aspect in the flex rows, whole-number count
ticks, "—" with a reason for a layer that has no latency, and "no caption layer yet"."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.audit import open_audit
from engine.audit.page import CSS
from engine.audit.plots import _style, bars, hist
from engine.audit.report import write_report
from engine.audit.stats import Counts
from tests.engine.test_audit import make_dataset


def _css_rule(selector: str) -> str:
    m = re.search(re.escape(selector) + r"\s*\{([^}]*)\}", CSS)
    assert m, selector
    return m.group(1).replace(" ", "")


def test_plots_keep_their_aspect_in_a_flex_row():
    # plots of different heights share a row (a bar chart is taller): a stretched <img> is distorted
    assert "align-items:flex-start" in _css_rule(".plots")
    assert "height:auto" in _css_rule(".plots img")


@pytest.mark.parametrize("counts", [[1, 2], [1], [2, 1, 2], [0, 3]])
def test_count_axes_tick_only_whole_numbers(counts):
    fig, ax = plt.subplots()
    ax.bar(range(len(counts)), counts)
    _style(ax, "t", "x")
    fig.canvas.draw()
    ticks = [t for t in ax.get_yticks() if ax.get_ylim()[0] <= t <= ax.get_ylim()[1]]
    plt.close(fig)
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_small_histograms_and_bars_render(tmp_path):
    assert hist(str(tmp_path / "h.png"), Counts([1.0, 2.0], [1, 2]), "t", "x")
    assert bars(str(tmp_path / "b.png"), [("a", 1), ("b", 2)], "t")


def _rewrite_layer(root, layer: str, **columns) -> None:
    for f in sorted((root / "layers" / layer).glob("*.parquet")):
        t = pq.read_table(f)
        for name, value in columns.items():
            i = t.schema.get_field_index(name)
            t = t.set_column(i, t.schema.field(i), pa.array([value] * t.num_rows, t.schema.field(i).type))
        pq.write_table(t, f)


def _row(md: str, layer: str, name: str) -> str:
    section = md[md.index(f"caption layer {layer}") :]
    return next(line for line in section.splitlines() if line.startswith(f"| {name} "))


def test_latency_without_requests_is_a_dash_with_the_reason(tmp_path):
    root = tmp_path / "ds"
    make_dataset(str(root))
    _rewrite_layer(root, "recap-v2", latency_ms=0.0, n_tokens=None)  # how ground truth is written
    a = open_audit(str(root))
    try:
        files = write_report(a, str(tmp_path / "rep"), n_samples=2)
    finally:
        a.close()
    md = Path(files.markdown).read_text(encoding="utf-8")
    cells = [c.strip() for c in _row(md, "recap", "latency").strip("|").split("|")]
    assert cells[7] == "ms" and all(re.fullmatch(r"10\d(\.\d+)?", c) for c in cells[1:7]), cells  # p10..max
    for name, why in (("latency", "not measured"), ("tokens", "not recorded")):
        row = _row(md, "recap-v2", name)
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:7] == ["—"] * 6 and why in cells[7], row
    html = Path(files.html).read_text(encoding="utf-8")
    row = re.search(r"<td>latency</td>.*?</tr>", html[html.index("caption layer recap-v2") :], re.S)
    assert row and "not measured" in row.group(0) and ">0<" not in row.group(0), row


def test_no_caption_layer_yet_is_said_as_such(tmp_path):
    root = tmp_path / "ds"
    make_dataset(str(root))
    shutil.rmtree(root / "layers")
    a = open_audit(str(root))
    try:
        files = write_report(a, str(tmp_path / "rep"), n_samples=2)
    finally:
        a.close()
    html = Path(files.html).read_text(encoding="utf-8")
    assert "No caption layer yet" in html and "No region layer yet" in html
    assert "valid schema" not in html, "no layer at all is not a schema problem"
