"""report.html and report.md from the collected numbers, the plots and the thumbnails.

One list of blocks (:class:`Doc`) is rendered twice, as HTML and as Markdown, so the two
files always say the same thing.
"""

from __future__ import annotations

import datetime as _dt
import html
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from engine.audit.stats import CaptionStats, Counts, Dups, FilterStats, RegionStats, ReportData
from engine.audit.thumbs import MAX_SIDE, Sample

SECTIONS = [
    ("overview", "Overview"),
    ("failures", "Failures"),
    ("sizes", "Image sizes"),
    ("captions", "Caption layers"),
    ("regions", "Region layers"),
    ("duplicates", "Duplicates"),
    ("filters", "Filter layers"),
    ("samples", "Random samples"),
]


class Plot(NamedTuple):
    path: str  # relative to the report folder
    alt: str


@dataclass
class ReportPlots:
    """The drawn plots the page shows, by section; one list per layer, in ``ReportData``'s order."""

    failures: list[Plot] = field(default_factory=list)
    sizes: list[Plot] = field(default_factory=list)
    captions: list[list[Plot]] = field(default_factory=list)
    regions: list[list[Plot]] = field(default_factory=list)
    filters: list[list[Plot]] = field(default_factory=list)


# ---------------------------------------------------------------------------- formatting


def num(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        if v != v:  # NaN
            return "—"
        if abs(v) >= 100 or v == int(v):
            return f"{v:,.0f}"
        return f"{v:,.3g}"
    return f"{v:,}"


def pct(n: int, total: int) -> str:
    if not total:
        return "—"
    p = 100.0 * n / total
    return f"{p:.1f} %" if p >= 0.1 or n == 0 else "< 0.1 %"


def short(s: Any, n: int = 160) -> str:
    s = " ".join(str(s).split()) if s is not None else ""
    return s if len(s) <= n else s[: n - 1] + "…"


# ---------------------------------------------------------------------------- the document


@dataclass
class Table:
    head: list[str]
    rows: list[list[Any]]
    numeric: set[int] = field(default_factory=set)  # right-aligned columns
    caption: str | None = None


@dataclass
class Para:
    text: str
    kind: str = "p"  # p | note | warn | ok


@dataclass
class Images:
    paths: list[Plot]


@dataclass
class Heading:
    text: str
    sub: str | None = None


@dataclass
class Gallery:
    samples: list[Sample]


@dataclass
class Section:
    id: str
    title: str
    blocks: list[Any] = field(default_factory=list)

    def add(self, *blocks: Any) -> None:
        self.blocks.extend(blocks)


@dataclass
class Doc:
    title: str
    root: str
    generated: str
    cards: list[tuple[str, str]]
    warnings: list[str]
    sections: list[Section]
    footer: list[str]


# ---------------------------------------------------------------------------- building


def build(data: ReportData, samples: list[Sample], plots: ReportPlots) -> Doc:
    """Lay the report out: the numbers, the plots already drawn (``plots``) and the samples."""
    secs = {sid: Section(sid, title) for sid, title in SECTIONS}
    _overview(secs["overview"], data)
    _failures(secs["failures"], data, plots.failures)
    _sizes(secs["sizes"], data, plots.sizes)
    _per_layer(
        secs["captions"],
        data.captions,
        plots.captions,
        _no_layer(data, "caption", "run finevit recaption DATASET to write one"),
        lambda s, c, drawn: _caption_section(s, c, data, drawn),
    )
    _per_layer(
        secs["regions"],
        data.regions,
        plots.regions,
        _no_layer(data, "regions", "run finevit recaption DATASET --task regions to write one"),
        _region_section,
    )
    _duplicates(secs["duplicates"], data)
    _per_layer(
        secs["filters"],
        data.filters,
        plots.filters,
        "No filter layer yet: filters write layers beside the data and never delete.",
        _filter_section,
    )
    _samples(secs["samples"], samples)

    cards = [
        ("samples", num(data.samples)),
        ("success", pct(data.success, data.samples)),
        ("committed shards", num(data.shards)),
        ("caption layers", num(len(data.captions))),
        ("region boxes", num(sum(r.boxes for r in data.regions))),
        ("filter layers", num(len(data.filters))),
    ]
    footer = [
        "Views: " + ", ".join(data.views) + ".",
        f'Query them: finevit audit {data.root} --sql "SELECT status, count(*) FROM samples GROUP BY ALL"',
        "Report queries took " + _dur(sum(data.timings.values())) + ".",
    ]
    gen = _dt.datetime.fromtimestamp(data.generated_at).strftime("%Y-%m-%d %H:%M")
    return Doc(
        "FineViT audit", data.root, gen, cards, data.warnings, [secs[sid] for sid, _ in SECTIONS], footer
    )


def _no_layer(data: ReportData, kind: str, how: str) -> str:
    """Why a section has no layer: none of that kind yet, or only ones whose schema is wrong."""
    noun = "region" if kind == "regions" else kind
    bad = [
        f"{row.name} ({row.problem})" if row.problem else row.name for row in data.layers if row.kind == kind
    ]
    if bad:
        return f"No {noun} layer with a valid schema: {', '.join(bad)}."
    return f"No {noun} layer yet: {how}."


def _per_layer(
    s: Section, layers: Sequence[Any], drawn: list[list[Plot]], none: str, section: Callable[..., None]
) -> None:
    """One sub-section per layer (with its drawn plots), or a note saying there is none."""
    if not layers:
        s.add(Para(none, "note"))
    for layer, plots in zip(layers, drawn, strict=True):
        section(s, layer, plots)


def _overview(s: Section, data: ReportData) -> None:
    s.add(
        Table(
            ["status", "samples", "share"],
            [[st, num(n), pct(n, data.samples)] for st, n in data.by_status],
            {1, 2},
            "samples by status",
        )
    )
    s.add(
        Table(
            ["source", "status", "samples", "share"],
            [[r.source, r.status, num(r.samples), pct(r.samples, data.samples)] for r in data.by_source[:20]],
            {2, 3},
            "samples by source and status",
        )
    )
    parts = {p.part: p for p in data.stats_parts}
    layer_rows = []
    for lr in data.layers:
        p = parts.get(lr.name)
        layer_rows.append(
            [
                lr.name,
                lr.kind,
                lr.view,
                f"{lr.shards} / {data.shards}",
                num(p.count) if p else "—",
                num(p.failed) if p else "—",
                "ok" if lr.schema_ok else f"⚠ {lr.problem}",
            ]
        )
    if layer_rows:
        s.add(
            Table(
                ["layer", "kind", "view", "shards", "rows", "failed", "schema"],
                layer_rows,
                {3, 4, 5},
                "layers (committed parts only)",
            )
        )
    else:
        s.add(Para("This dataset has no layer yet.", "note"))
    if data.stats_parts:
        s.add(
            Table(
                ["part", "committed shards", "rows", "ok", "failed", "work time"],
                [
                    [p.part, num(p.shards), num(p.count), num(p.ok), num(p.failed), _dur(p.seconds)]
                    for p in data.stats_parts
                ],
                {1, 2, 3, 4, 5},
                "commit markers (_stats.json)",
            )
        )


def _failures(s: Section, data: ReportData, drawn: list[Plot]) -> None:
    if not data.reasons:
        s.add(Para(f"No failed sample among {num(data.samples)}.", "ok"))
        return
    failed = data.samples - data.success
    s.add(
        Para(
            f"{num(failed)} of {num(data.samples)} samples failed ({pct(failed, data.samples)}). Top reasons:"
        )
    )
    s.add(
        Table(
            ["status", "reason", "samples", "share of failures"],
            [
                [r.status, short(r.reason, 140), num(r.samples), pct(r.samples, failed)]
                for r in data.reasons[:10]
            ],
            {2, 3},
        )
    )
    s.add(Images(drawn))


def _sizes(s: Section, data: ReportData, drawn: list[Plot]) -> None:
    if not data.width.total:
        s.add(Para("No successful sample: no size to show.", "note"))
        return
    s.add(
        Para(
            f"Over {num(data.width.total)} successful samples: median {num(data.width.quantile(0.5))} × "
            f"{num(data.height.quantile(0.5))} px, aspect ratio (w/h) from {num(data.aspect.values[0])} "
            f"to {num(data.aspect.values[-1])}."
        )
    )
    s.add(Images(drawn))


def _duplicates(s: Section, data: ReportData) -> None:
    rows: list[tuple[str, int, Dups]] = [
        ("image bytes (sha256)", data.success, data.sha_dups),
        ("alt-text (shard caption)", data.success, data.alt_dups),
    ]
    rows += [(f"caption layer {c.layer.name}", c.ok, c.dups) for c in data.captions]
    s.add(
        Table(
            ["what", "values repeated", "rows holding a repeated value", "share of rows"],
            [[w, num(d.groups), num(d.rows), pct(d.rows, tot)] for w, tot, d in rows],
            {1, 2, 3},
            "exact duplicates",
        )
    )
    for what, _tot, d in rows:
        if d.top:
            s.add(
                Table(
                    [f"most repeated: {what}", "times", "example key"],
                    [[short(g.value, 120), num(g.count), g.example] for g in d.top[:5]],
                    {1},
                )
            )


def _samples(s: Section, samples: list[Sample]) -> None:
    if not samples:
        s.add(Para("No successful sample to show.", "note"))
        return
    how = (
        f"boxes from region layer {samples[0].region_layer}"
        if any(x.region_layer for x in samples)
        else "no region layer to draw"
    )
    s.add(
        Para(
            f"{len(samples)} successful samples in a random order fixed by the seed; thumbnails read "
            f"from the shard tars, long side {MAX_SIDE} px; {how}."
        )
    )
    s.add(Gallery(samples))


def _dur(s: Any) -> str:
    if s is None:
        return "—"
    s = float(s)
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _layer_sub(info: dict | None) -> str | None:
    if not info:
        return None
    bits = [f"{k} {info[k]}" for k in ("stage", "backend", "model", "prompt_id") if info.get(k)]
    return " · ".join(bits) or None


def _dist_row(name: str, c: Counts, unit: str = "") -> list[Any]:
    return [
        name,
        num(c.quantile(0.1)),
        num(c.quantile(0.5)),
        num(c.mean()),
        num(c.quantile(0.9)),
        num(c.quantile(0.99)),
        num(c.values[-1] if c.values else None),
        unit,
    ]


def _measured_row(name: str, q: dict[str, float | None], unit: str, why_missing: str) -> list[Any]:
    """A row of per-request numbers (latency, tokens); "—" and the reason where a layer has none.

    A layer written without requests (a ground-truth layer, an import) has no latency: null or
    0 everywhere, which would otherwise read as "0 ms"."""
    cols = ("p10", "p50", "mean", "p90", "p99", "max")
    if not q.get("max"):
        return [name, *("—" for _ in cols), why_missing]
    return [name, *(num(q.get(k)) for k in cols), unit]


def _caption_section(s: Section, c: CaptionStats, data: ReportData, drawn: list[Plot]) -> None:
    s.add(Heading(f"caption layer {c.layer.name}", _layer_sub(c.layer.info)))
    missing = data.samples - c.rows
    line = f"{num(c.rows)} rows: {num(c.ok)} ok, {num(c.failed)} failed ({pct(c.failed, c.rows)})"
    if missing > 0:
        line += f"; {num(missing)} samples have no row yet (their layer part is not committed)"
    s.add(Para(line + "."))
    lat, tok = c.latency, c.tokens
    s.add(
        Table(
            ["length", "p10", "median", "mean", "p90", "p99", "max", ""],
            [
                _dist_row("characters", c.chars),
                _dist_row("words", c.words),
                _measured_row(
                    "latency", lat, "ms", "not measured: no request made this layer (e.g. ground truth)"
                ),
                _measured_row(
                    "tokens", tok, f"total {num(tok.get('total'))}", "not recorded by what made this layer"
                ),
            ],
            {1, 2, 3, 4, 5, 6},
            "ok rows",
        )
    )
    s.add(Images(drawn))
    s.add(
        Table(
            ["finish reason", "rows", "share"], [[r, num(n), pct(n, c.ok)] for r, n in c.finish[:8]], {1, 2}
        )
    )
    if c.errors:
        s.add(
            Table(
                ["failure reason", "rows", "share of failures"],
                [[short(r, 140), num(n), pct(n, c.failed)] for r, n in c.errors[:10]],
                {1, 2},
            )
        )
    else:
        s.add(Para("No failed row in this layer.", "ok"))


def _region_section(s: Section, r: RegionStats, drawn: list[Plot]) -> None:
    s.add(Heading(f"region layer {r.layer.name}", _layer_sub(r.layer.info)))
    mean = r.per_image.mean()
    line = (
        f"{num(r.rows)} images: {num(r.ok)} ok, {num(r.failed)} failed; {num(r.boxes)} boxes "
        f"({num(mean)} per ok image), {num(r.n_labels)} labels"
    )
    s.add(Para(line + "."))
    if r.invalid:
        s.add(
            Para(
                f"{num(r.invalid)} boxes ({pct(r.invalid, r.boxes)}) are outside [0,1] or empty "
                "(x0 ≥ x1 or y0 ≥ y1).",
                "warn",
            )
        )
    s.add(Images(drawn))
    s.add(
        Table(
            ["label", "boxes", "captions", "mean area", "example caption"],
            [
                [lb.label, num(lb.boxes), num(lb.captions), f"{lb.mean_area:.3f}", short(lb.example, 90)]
                for lb in r.labels[:12]
            ],
            {1, 2, 3},
            f"captions per label (top {min(12, len(r.labels))} of {num(r.n_labels)})",
        )
    )
    if r.errors:
        s.add(
            Table(
                ["failure reason", "images", "share of failures"],
                [[short(e, 140), num(n), pct(n, r.failed)] for e, n in r.errors[:10]],
                {1, 2},
            )
        )


def _filter_section(s: Section, f: FilterStats, drawn: list[Plot]) -> None:
    s.add(Heading(f"filter layer {f.layer.name}", _layer_sub(f.layer.info)))
    dropped = f.rows - f.kept
    s.add(Para(f"keeps {num(f.kept)} of {num(f.rows)} rows ({pct(f.kept, f.rows)}); drops {num(dropped)}."))
    if f.reasons:
        s.add(
            Table(
                ["drop reason", "rows", "share of drops"],
                [[short(r, 140), num(n), pct(n, dropped)] for r, n in f.reasons],
                {1, 2},
            )
        )
    for col, sc in f.scores.items():
        k, d = sc["kept"] or [None] * 3, sc["dropped"] or [None] * 3
        s.add(
            Table(
                [f"score {col}", "p10", "median", "p90"],
                [["kept", *(num(x) for x in k)], ["dropped", *(num(x) for x in d)]],
                {1, 2, 3},
            )
        )
    if drawn:
        s.add(Images(drawn))


# ---------------------------------------------------------------------------- HTML

CSS = """
:root { --ink:#1d2430; --muted:#5b6574; --line:#e3e7ee; --bg:#f6f7f9; --accent:#3b6ea8; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:#fff; border-bottom:1px solid var(--line); padding:18px 32px 12px; }
header h1 { margin:0; font-size:20px; }
header .root { font-family:ui-monospace,Menlo,Consolas,monospace; color:var(--muted); font-size:13px;
               word-break:break-all; }
.cards { display:flex; flex-wrap:wrap; gap:10px; margin-top:12px; }
.card { background:var(--bg); border:1px solid var(--line); border-radius:8px; padding:6px 14px; min-width:120px; }
.card b { display:block; font-size:18px; }
.card span { color:var(--muted); font-size:12px; }
nav { position:sticky; top:0; z-index:2; background:#fff; border-bottom:1px solid var(--line); padding:8px 32px; }
nav a { color:var(--accent); text-decoration:none; margin-right:16px; font-size:13px; white-space:nowrap; }
main { padding:8px 32px 32px; max-width:1400px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:14px 20px 18px;
          margin:16px 0; }
section h2 { margin:0 0 10px; font-size:17px; }
h3 { margin:18px 0 4px; font-size:15px; }
h3 small { color:var(--muted); font-weight:normal; font-size:12px; margin-left:8px; }
table { border-collapse:collapse; margin:8px 0 12px; font-size:13px; }
caption { text-align:left; color:var(--muted); font-size:12px; padding-bottom:2px; }
th, td { border-bottom:1px solid var(--line); padding:4px 12px 4px 0; text-align:left; vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:12px; }
td.n, th.n { text-align:right; font-variant-numeric:tabular-nums; padding-left:12px; }
.note { color:var(--muted); } .ok { color:#24703a; }
.warn, .warnings { background:#fff7e0; border:1px solid #f0d58a; border-radius:8px; padding:8px 12px; }
.warnings { margin:16px 0 0; } .warnings ul { margin:4px 0 0 18px; padding:0; }
.plots { display:flex; flex-wrap:wrap; gap:12px; margin:8px 0; align-items:flex-start; }
.plots img { border:1px solid var(--line); border-radius:6px; background:#fff; max-width:100%; height:auto; }
.gallery { display:grid; grid-template-columns:repeat(auto-fill,minmax(250px,1fr)); gap:12px; }
.sample { border:1px solid var(--line); border-radius:8px; padding:8px; background:#fff; font-size:12px; }
.sample .img { height:168px; display:flex; align-items:center; justify-content:center;
               background:repeating-conic-gradient(#f0f2f5 0% 25%,#fff 0% 50%) 50%/16px 16px; border-radius:4px; }
.sample .img img { max-width:100%; max-height:164px; }
.sample .key { font-family:ui-monospace,Menlo,Consolas,monospace; color:var(--muted); margin-top:4px; }
.sample .lbl { color:var(--muted); font-size:11px; text-transform:uppercase; letter-spacing:.03em; margin-top:5px; }
.sample p { margin:1px 0; }
.sample ul { list-style:none; margin:2px 0 0; padding:0; }
.sample li { margin:1px 0; }
.sw { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:5px; vertical-align:-1px;
      border:1px solid #0003; }
details summary { cursor:pointer; } details summary::marker { color:var(--accent); }
footer { color:var(--muted); font-size:12px; padding:0 32px 24px; }
footer code { font-size:12px; }
"""


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def to_html(doc: Doc) -> str:
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_esc(doc.title)}: {_esc(doc.root)}</title><style>{CSS}</style></head><body>",
        f'<header><h1>{_esc(doc.title)}</h1><div class="root">{_esc(doc.root)} · generated {_esc(doc.generated)}'
        "</div>",
        '<div class="cards">',
    ]
    out += [f'<div class="card"><b>{_esc(v)}</b><span>{_esc(k)}</span></div>' for k, v in doc.cards]
    out.append("</div>")
    if doc.warnings:
        out.append('<div class="warnings"><b>Warnings</b><ul>')
        out += [f"<li>{_esc(w)}</li>" for w in doc.warnings]
        out.append("</ul></div>")
    out.append(
        "</header><nav>" + "".join(f'<a href="#{s.id}">{_esc(s.title)}</a>' for s in doc.sections) + "</nav>"
    )
    out.append("<main>")
    for s in doc.sections:
        out.append(f'<section id="{s.id}"><h2>{_esc(s.title)}</h2>')
        out += [_html_block(b) for b in s.blocks]
        out.append("</section>")
    out.append(
        "</main><footer>"
        + "".join(
            f"<p><code>{_esc(x)}</code></p>" if x.startswith("Query") else f"<p>{_esc(x)}</p>"
            for x in doc.footer
        )
        + "</footer></body></html>"
    )
    return "\n".join(out) + "\n"


def _html_block(b: Any) -> str:
    if isinstance(b, Heading):
        sub = f"<small>{_esc(b.sub)}</small>" if b.sub else ""
        return f"<h3>{_esc(b.text)}{sub}</h3>"
    if isinstance(b, Para):
        cls = "" if b.kind == "p" else f' class="{b.kind}"'
        return f"<p{cls}>{_esc(b.text)}</p>"
    if isinstance(b, Table):
        cap = f"<caption>{_esc(b.caption)}</caption>" if b.caption else ""
        head = "".join(
            f"<th{' class=n' if i in b.numeric else ''}>{_esc(h)}</th>" for i, h in enumerate(b.head)
        )
        body = "".join(
            "<tr>"
            + "".join(f"<td{' class=n' if i in b.numeric else ''}>{_esc(v)}</td>" for i, v in enumerate(r))
            + "</tr>"
            for r in b.rows
        )
        if not b.rows:
            body = f'<tr><td colspan="{len(b.head)}" class="note">none</td></tr>'
        return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(b, Images):
        return (
            '<div class="plots">'
            + "".join(f'<img src="{_esc(p)}" alt="{_esc(a)}" loading="lazy">' for p, a in b.paths)
            + "</div>"
        )
    if isinstance(b, Gallery):
        return '<div class="gallery">' + "".join(_html_sample(x) for x in b.samples) + "</div>"
    raise TypeError(f"unknown block {b!r}")


def _clip(text: str | None, n: int = 220) -> str:
    text = " ".join((text or "").split())
    if len(text) <= n:
        return f"<p>{_esc(text) or '<i>(empty)</i>'}</p>"
    return f"<details><summary>{_esc(text[:n])}…</summary><p>{_esc(text)}</p></details>"


def _html_sample(s: Sample) -> str:
    img = (
        f'<img src="{_esc(s.thumb)}" alt="sample {_esc(s.key)}">'
        if s.thumb
        else f'<span class="note">{_esc(s.problem or "no image")}</span>'
    )
    size = f" · {s.width}×{s.height}" if s.width and s.height else ""
    parts = [
        f'<div class="sample"><div class="img">{img}</div><div class="key">{_esc(s.key)}{_esc(size)}</div>',
        '<div class="lbl">alt-text</div>',
        _clip(s.alt_text, 120),
    ]
    for layer, cap, status in s.captions:
        parts.append(f'<div class="lbl">{_esc(layer)}</div>')
        parts.append(_clip(cap) if status == "ok" else f'<p class="note">({_esc(status)})</p>')
    if s.boxes:
        parts.append(f'<div class="lbl">{_esc(s.region_layer)}: {len(s.boxes)} boxes</div><ul>')
        parts += [
            f'<li><span class="sw" style="background:{b.colour}"></span>{_esc(short(b.caption or b.label, 80))}'
            "</li>"
            for b in s.boxes[:8]
        ]
        if len(s.boxes) > 8:
            parts.append(f'<li class="note">and {len(s.boxes) - 8} more</li>')
        parts.append("</ul>")
    parts.append("</div>")
    return "".join(parts)


# ---------------------------------------------------------------------------- Markdown


def _md(s: Any) -> str:
    return " ".join(str(s).split()).replace("|", "\\|")


def to_markdown(doc: Doc) -> str:
    out = [f"# {doc.title}: `{doc.root}`", "", f"Generated {doc.generated}.", ""]
    out += [
        "| " + " | ".join(k for k, _ in doc.cards) + " |",
        "|" + "---|" * len(doc.cards),
        "| " + " | ".join(v for _, v in doc.cards) + " |",
        "",
    ]
    if doc.warnings:
        out += ["> **Warnings**", ">"] + [f"> - {_md(w)}" for w in doc.warnings] + [""]
    out += ["Sections: " + " · ".join(f"[{s.title}](#{s.id})" for s in doc.sections), ""]
    for s in doc.sections:
        out += [f'<a id="{s.id}"></a>', "", f"## {s.title}", ""]
        for b in s.blocks:
            out += _md_block(b) + [""]
    out += [f"_{_md(x)}_" if not x.startswith("Query") else f"`{x}`" for x in doc.footer]
    return "\n".join(out) + "\n"


def _md_table(head: Sequence[str], rows: Sequence[Sequence[Any]], numeric: set[int]) -> list[str]:
    align = ["---:" if i in numeric else "---" for i in range(len(head))]
    lines = ["| " + " | ".join(_md(h) or " " for h in head) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md(v) for v in r) + " |" for r in rows]
    return lines


def _md_block(b: Any) -> list[str]:
    if isinstance(b, Heading):
        return [f"### {b.text}" + (f" ({b.sub})" if b.sub else "")]
    if isinstance(b, Para):
        prefix = {"warn": "> ⚠ ", "note": "_", "ok": ""}.get(b.kind, "")
        suffix = "_" if b.kind == "note" else ""
        return [f"{prefix}{b.text}{suffix}"]
    if isinstance(b, Table):
        cap = [f"**{b.caption}**", ""] if b.caption else []
        return cap + _md_table(b.head, b.rows or [["none"] + [""] * (len(b.head) - 1)], b.numeric)
    if isinstance(b, Images):
        return [" ".join(f"![{a}]({p})" for p, a in b.paths)]
    if isinstance(b, Gallery):
        rows = []
        for x in b.samples:
            img = f"![{x.key}]({x.thumb})" if x.thumb else _md(x.problem or "no image")
            caps = "<br>".join(
                f"**{_md(layer)}**: {_md(short(c, 300)) if st == 'ok' else '(' + str(st) + ')'}"
                for layer, c, st in x.captions
            )
            boxes = ", ".join(_md(b.label or "?") for b in x.boxes)
            rows.append([img, f"`{x.key}`", _md(short(x.alt_text, 120)), caps, boxes])
        return _md_table(["image", "key", "alt-text", "captions", "boxes"], rows, set())
    raise TypeError(f"unknown block {b!r}")


def write(doc: Doc, out_dir: str) -> tuple[str, str]:
    html_path = os.path.join(out_dir, "report.html")
    md_path = os.path.join(out_dir, "report.md")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(to_html(doc))
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(to_markdown(doc))
    return html_path, md_path


__all__ = ["Doc", "Dups", "build", "to_html", "to_markdown", "write"]
