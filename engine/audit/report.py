"""The standard audit report as files: plots, thumbnails, ``report.html`` and ``report.md``.

One way through, no circles: :func:`engine.audit.stats.collect` runs the queries,
:mod:`engine.audit.plots` draws them (``plots/*.png``), :mod:`engine.audit.thumbs` reads the
random samples out of the tars (``thumbs/*.png``, long side capped) and
:func:`engine.audit.page.build` lays it all out, given the paths of the plots.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

from engine.audit import page, plots, thumbs
from engine.audit.page import Plot, ReportPlots
from engine.audit.stats import ReportData, collect
from engine.audit.views import Audit


@dataclass
class ReportFiles:
    html: str
    markdown: str
    plots: list[str]
    thumbs: list[str]
    warnings: list[str]
    data: ReportData


def write_report(audit: Audit, out_dir: str, n_samples: int = 20, seed: int = 0) -> ReportFiles:
    """Run :func:`collect`, draw the plots and thumbnails, write ``report.html`` and ``report.md``.

    ``out_dir`` is a local folder (created if needed); the plots go to ``plots/``, the
    thumbnails to ``thumbs/``. Stale PNGs from an earlier report in the same folder are removed.
    """
    data = collect(audit)
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for sub in ("plots", "thumbs"):
        shutil.rmtree(os.path.join(out_dir, sub), ignore_errors=True)
    samples = thumbs.pick(audit, n_samples, seed)
    thumbs.render(audit, samples, out_dir)
    doc = page.build(data, samples, draw_plots(data, out_dir))
    html_path, md_path = page.write(doc, out_dir)

    def pngs(sub: str) -> list[str]:
        d = os.path.join(out_dir, sub)
        return sorted(os.path.join(d, n) for n in os.listdir(d)) if os.path.isdir(d) else []

    return ReportFiles(html_path, md_path, pngs("plots"), pngs("thumbs"), data.warnings, data)


def draw_plots(data: ReportData, out_dir: str) -> ReportPlots:
    """Draw every plot of the report into ``out_dir/plots``; paths in the result are relative."""
    P = os.path.join(out_dir, "plots")

    def rel(path: str, alt: str) -> Plot:
        return Plot(os.path.relpath(path, out_dir).replace(os.sep, "/"), alt)

    out = ReportPlots()
    if data.reasons:
        path = plots.bars(
            f"{P}/failure_reasons.png",
            [(r.reason, r.samples) for r in data.reasons],
            "top failure reasons",
            "samples",
            label_chars=34,
        )
        out.failures.append(rel(path, "top failure reasons"))
    if data.width.total:
        out.sizes += [
            rel(plots.hist(f"{P}/width.png", data.width, "width", "pixels"), "width histogram"),
            rel(plots.hist(f"{P}/height.png", data.height, "height", "pixels"), "height histogram"),
            rel(
                plots.hist(f"{P}/aspect.png", data.aspect, "aspect ratio", "width / height"),
                "aspect ratio histogram",
            ),
        ]
    for i, c in enumerate(data.captions):
        base, name = f"{P}/caption{i}", c.layer.name
        chars = plots.hist(
            f"{base}_chars.png", c.chars, "caption length (characters)", "characters", integer=True
        )
        words = plots.hist(f"{base}_words.png", c.words, "caption length (words)", "words", integer=True)
        out.captions.append(
            [
                rel(chars, f"{name}: caption length in characters"),
                rel(words, f"{name}: caption length in words"),
            ]
        )
    for i, r in enumerate(data.regions):
        base, name = f"{P}/regions{i}", r.layer.name
        per_image = plots.hist(f"{base}_per_image.png", r.per_image, "boxes per image", "boxes", integer=True)
        area = plots.hist(
            f"{base}_area.png", r.area, "box area", "fraction of the image", bins=25, clip_quantile=1.0
        )
        labels = plots.bars(
            f"{base}_labels.png", [(lb.label, lb.boxes) for lb in r.labels], "boxes per label", "boxes"
        )
        out.regions.append(
            [
                rel(per_image, f"{name}: boxes per image"),
                rel(area, f"{name}: box area"),
                rel(labels, f"{name}: boxes per label"),
            ]
        )
    for i, f in enumerate(data.filters):
        base, name = f"{P}/filter{i}", f.layer.name
        drawn = []
        if f.reasons:
            path = plots.bars(f"{base}_reasons.png", f.reasons, "top drop reasons", "rows")
            drawn.append(rel(path, f"{name}: drop reasons"))
        for col, sc in f.scores.items():
            safe = "".join(ch if ch.isalnum() else "_" for ch in col)
            path = plots.keep_drop_hist(f"{base}_{safe}.png", sc["hist"], f"score {col}", col)
            drawn.append(rel(path, f"{name}: {col}"))
        out.filters.append(drawn)
    return out
