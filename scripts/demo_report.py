"""The demo's last step: summary.json, report.md, report.html, the printed table, and the claim.

    python scripts/demo_report.py demo_out --corpus demo_out/data/corpus

Reads what the earlier steps wrote under DEMO_DIR (eval results, training logs, step times, the
corpus's layers) and nothing else; exits 1 when a claimed margin is not met:
  * stage 1 on recaptions beats stage 1 on alt-text by >= 10 points of fine-grained R@1 (text->image);
  * stage 2 improves box-classification top-1 over its stage-1 starting point.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import html
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

FG_MARGIN = 10.0  # points of fine-grained R@1
ENCODERS = ("alt-text", "recaption", "stage2")
RUNS = {"alt-text": "stage1-alt-text", "recaption": "stage1-recaption", "stage2": "stage2"}
# the layers the recaption step writes (scripts/demo.sh): one pass over the corpus each
RECAP_LAYERS = ("recap-global", "recap-global-t05", "recap-global-t07", "recap-regions")


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def eval_metric(d: str, task: str, name: str, key: str) -> float | None:
    """A metric (in %) of ``finevit eval --out DIR`` results, None when that eval did not run."""
    path = os.path.join(d, "eval", f"{task}-{name}", "results.json")
    if not os.path.exists(path):
        return None
    rows = [r for r in _read_json(path) if r["task"] == task]
    v = rows[0]["metrics"].get(key) if rows else None
    return None if v is None else round(100.0 * float(v), 2)


def per_attribute(d: str, name: str) -> dict[str, float]:
    path = os.path.join(d, "eval", f"finegrained-{name}", "results.json")
    if not os.path.exists(path):
        return {}
    m = _read_json(path)[0]["metrics"]
    return {k: round(100.0 * v["t2i"], 1) for k, v in m.items() if isinstance(v, dict) and "t2i" in v}


def step_times(d: str) -> dict[str, tuple[float, float | None, float | None]]:
    """(seconds, start, end) of each finished step, as scripts/demo.sh writes ``.done/<step>``
    (an older marker holds the seconds only)."""
    out: dict[str, tuple[float, float | None, float | None]] = {}
    done = os.path.join(d, ".done")
    for name in sorted(os.listdir(done)) if os.path.isdir(done) else []:
        fields = Path(done, name).read_text().split()
        try:
            nums = [float(x) for x in fields]
        except ValueError:
            nums = []
        secs = nums[0] if nums else 0.0
        out[name] = (secs, nums[1], nums[2]) if len(nums) >= 3 else (secs, None, None)
    return out


def step_seconds(d: str) -> dict[str, float]:
    """Wall seconds of each finished step."""
    return {name: t[0] for name, t in step_times(d).items()}


def demo_wall_seconds(d: str) -> float:
    """Seconds during which at least one step ran: the union of the steps' [start, end] spans, so
    steps run side by side count once and the pause between a killed run and its rerun not at all
    (a step without its span counts its own seconds)."""
    spans, loose = [], 0.0
    for secs, start, end in step_times(d).values():
        if start is None or end is None:
            loose += secs
        else:
            spans.append((start, end))
    total, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(spans):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total + loose


# a run's loss terms drawn apart: stage 2's total jumps when its contrastive terms start
TERMS = {"lm_loss": "LM", "region_loss": "regional term", "global_loss": "global term"}


def curves(d: str) -> dict[str, list[tuple[int, float]]]:
    """``{series: [(step, loss)]}``: each run's ``loss``, or its terms apart when it logs them
    (``stage2``: the LM loss; ``stage2 regional term``, ...)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for name, run in RUNS.items():
        path = os.path.join(d, "runs", run, "metrics.jsonl")
        if not os.path.exists(path):
            continue
        series: dict[str, list[tuple[int, float]]] = {name: []}
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if "loss" not in row or "skipped" in row:
                continue
            step = int(row["step"])
            series[name].append((step, float(row.get("lm_loss", row["loss"]))))
            for key, term in TERMS.items():
                if key != "lm_loss" and key in row:
                    series.setdefault(f"{name} {term}", []).append((step, float(row[key])))
        out.update(series)
    return out


# ---------------------------------------------------------------- recaption: counts and quality vs GT

_ATTR_RE = None


def _attr_pairs(text: str) -> set[tuple[str, str]]:
    """(colour, shape) pairs a caption names: a colour followed within two words by a shape."""
    global _ATTR_RE
    if _ATTR_RE is None:
        from engine.synthetic import COLORS, SHAPES

        shapes = "|".join(SHAPES)
        _ATTR_RE = re.compile(rf"\b({'|'.join(COLORS)})\b(?:\s+\w+){{0,2}}?\s+({shapes})(?:e?s)?\b")
    return set(_ATTR_RE.findall(text.lower()))


_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
_COUNT_RE = re.compile(rf"\b({'|'.join(_NUMBERS)}|single)\s+(?:\w+\s+)?(?:shape|object)s?\b", re.I)


def object_count(text: str) -> int | None:
    """The number of objects a scene caption states ("Four shapes ...", "contains one object"), or None.

    Count is what stage 1 learns from dense captions at the demo's budget (its fine-grained gain
    comes almost all from count), so the recaptions' count accuracy is the captioner figure that
    bounds the demo's first claim."""
    m = _COUNT_RE.search(text)
    if m is None:
        return None
    word = m.group(1).lower()
    return 1 if word == "single" else _NUMBERS.index(word) + 1


def recaption_layers(corpus: str, layers: tuple[str, ...] = RECAP_LAYERS) -> dict[str, int]:
    """Rows (ok + failed) of each recaption layer the corpus has: what the step wrote."""
    from engine.audit.views import open_audit

    audit = open_audit(corpus)
    try:
        have = {lv.name for lv in audit.layers}
        out = {}
        for layer in (x for x in layers if x in have):
            (rows,) = audit.con.execute(
                "SELECT coalesce(sum(ok), 0) + coalesce(sum(failed), 0) FROM stats WHERE part = ?", [layer]
            ).fetchone()
            out[layer] = int(rows)
        return out
    finally:
        audit.close()


def recaption_stats(corpus: str, layer: str, gt_layer: str = "gt-global") -> dict[str, Any]:
    """Rows ok/failed of ``layer`` and how well its captions match the GT: the (colour, shape) pairs
    they name and the object count they state."""
    from engine.audit.views import open_audit

    audit = open_audit(corpus)
    try:
        names = {lv.name: lv for lv in audit.layers}
        if layer not in names:
            return {"ok": 0, "failed": 0, "note": f"no layer {layer!r} in {corpus}"}
        ok, failed = audit.con.execute(
            "SELECT coalesce(sum(ok), 0), coalesce(sum(failed), 0) FROM stats WHERE part = ?", [layer]
        ).fetchone()
        out: dict[str, Any] = {"ok": int(ok), "failed": int(failed)}
        if gt_layer in names:
            rows = audit.con.execute(
                f"SELECT r.caption, g.caption, s.caption FROM {names[layer].view} r "
                f"JOIN {names[gt_layer].view} g USING (key) JOIN samples s USING (key) "
                "WHERE r.status = 'ok' ORDER BY key"
            ).fetchall()
            tp = fp = fn = alt_tp = alt_fn = 0
            counts = [(object_count(cap or ""), object_count(gt or "")) for cap, gt, _ in rows]
            counted = [(got, want) for got, want in counts if want is not None]
            for cap, gt, alt in rows:
                got, want, alt_got = _attr_pairs(cap or ""), _attr_pairs(gt or ""), _attr_pairs(alt or "")
                tp, fp, fn = tp + len(got & want), fp + len(got - want), fn + len(want - got)
                alt_tp, alt_fn = alt_tp + len(alt_got & want), alt_fn + len(want - alt_got)
            out["quality"] = {
                "images": len(rows),
                "pair_recall": round(100 * tp / max(tp + fn, 1), 1),
                "pair_precision": round(100 * tp / max(tp + fp, 1), 1),
                "alt_text_pair_recall": round(100 * alt_tp / max(alt_tp + alt_fn, 1), 1),
                "count_accuracy": round(100 * sum(g == w for g, w in counted) / max(len(counted), 1), 1),
                "examples": [{"alt_text": a, "recaption": c, "ground_truth": g} for c, g, a in rows[:3] if c],
            }
        return out
    finally:
        audit.close()


def _named(text: str, vocab: Any) -> set[str]:
    """The words of ``vocab`` a caption names (whole words: "red" is not in "striped")."""
    return {w for w in vocab if re.search(rf"\b{re.escape(w)}(?:e?s)?\b", text.lower())}


def _boxes_sql(view: str, where: str = "") -> str:
    """One row per box of a region layer's view: key, box corners, caption, label."""
    return (
        "SELECT key, r.x0, r.y0, r.x1, r.y1, r.caption, r.label "
        f"FROM (SELECT key, unnest(regions) AS r FROM {view} {where})"
    )


def region_stats(corpus: str, layer: str, gt_layer: str = "gt-regions") -> dict[str, Any]:
    """How well the region captions of ``layer`` name their box's object: per box of ``gt_layer``
    it captioned (same image, same box), the colour and the shape the caption names against the
    ground truth's. A caption right on the colour names exactly the ground truth's colours; right
    on the shape, exactly its shape (boxes of written words have no shape and count for colour only)."""
    from engine.audit.views import open_audit
    from engine.synthetic import COLORS, SHAPES

    audit = open_audit(corpus)
    try:
        names = {lv.name: lv for lv in audit.layers}
        if layer not in names or gt_layer not in names:
            return {}
        ok = "WHERE status = 'ok'"
        rows = audit.con.execute(
            f"SELECT c.caption, g.caption, g.label FROM ({_boxes_sql(names[layer].view, ok)}) c "
            f"JOIN ({_boxes_sql(names[gt_layer].view)}) g USING (key, x0, y0, x1, y1)"
        ).fetchall()
    finally:
        audit.close()
    colour = shape = shaped = 0
    for got, want, label in rows:
        colour += _named(got or "", COLORS) == _named(want or "", COLORS)
        if label in SHAPES:
            shaped += 1
            shape += _named(got or "", SHAPES) == {label}
    return {
        "regions": len(rows),
        "colour_right": round(100 * colour / max(len(rows), 1), 1),
        "shape_right": round(100 * shape / max(shaped, 1), 1),
    }


def filter_stats(corpus: str, layer: str) -> dict[str, Any]:
    """How many rows the filter layer kept, and its most frequent drop reasons."""
    from engine.audit.views import open_audit

    audit = open_audit(corpus)
    try:
        names = {lv.name: lv for lv in audit.layers}
        if layer not in names:
            return {}
        view = names[layer].view
        kept, total = audit.con.execute(f"SELECT count(*) FILTER (keep), count(*) FROM {view}").fetchone()
        reasons = audit.con.execute(
            f"SELECT r, count(*) AS n FROM (SELECT unnest(reasons) AS r FROM {view}) "
            "GROUP BY r ORDER BY n DESC, r LIMIT 5"
        ).fetchall()
        return {"kept": int(kept), "total": int(total), "reasons": {r: int(n) for r, n in reasons}}
    finally:
        audit.close()


# ---------------------------------------------------------------- plots, page


def plot_curves(data: dict[str, list[tuple[int, float]]], path: str) -> str | None:
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.0), dpi=100)
    labels = {
        "alt-text": "stage 1 on alt-text",
        "recaption": "stage 1 on recaptions",
        "stage2": "stage 2 (LM loss)",
    }
    for name, pts in data.items():
        if pts:
            term = name not in labels  # a stage-2 contrastive term: thin and dashed
            label = labels.get(name) or name.replace("stage2", "stage 2")
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                label=label,
                lw=1.0 if term else 1.6,
                ls="--" if term else "-",
            )
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("training loss", fontsize=8)
    ax.set_title("training curves", fontsize=10, loc="left")
    ax.tick_params(labelsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    # beside the axes: stage 2's terms add series that a legend inside would cover
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def bar_values(summary: dict[str, Any]) -> list[tuple[str, float]]:
    """``(label, fine-grained R@1)`` of each encoder that was evaluated, in the table's order."""
    fg = summary["finegrained_r1"]
    labels = {"alt_text": "alt-text", "recaption": "recaptions", "stage2": "+ stage 2"}
    return [(label, fg[k]) for k, label in labels.items() if fg.get(k) is not None]


def plot_bars(summary: dict[str, Any], path: str) -> str | None:
    values = bar_values(summary)
    if not values:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.0), dpi=100)
    colours = {"alt-text": "#999999", "recaptions": "#3b6ea8", "+ stage 2": "#d9822b"}
    bars = ax.bar([n for n, _ in values], [v for _, v in values], color=[colours[n] for n, _ in values])
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    if summary.get("chance_r1") is not None:
        ax.axhline(summary["chance_r1"], ls="--", lw=1, color="#c33", label="chance")
        ax.legend(fontsize=7, frameon=False)
    ax.set_ylabel("fine-grained R@1 (%)", fontsize=8)
    ax.set_title("held-out fine-grained text->image R@1", fontsize=10, loc="left")
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(v: Any) -> str:
    return "—" if v is None else f"{v:.1f}"


def throughput(s: dict[str, Any]) -> str:
    """The recaption step's speed, with the layers it counts (one line of the report)."""
    rec = s["recaption"]
    layers = rec.get("layers") or {}
    over = f" over {len(layers)} layers ({', '.join(layers)})" if len(layers) > 1 else ""
    return f"{_fmt(rec.get('images_per_s'))} images/s{over}"


def table_md(s: dict[str, Any]) -> str:
    fg, box = s["finegrained_r1"], s["boxcls_top1_all"]
    mpcr = s.get("boxcls_mean_per_class_recall") or {}
    rows = [
        "| encoder | fine-grained R@1 (%) | box cls top-1 (%) | box cls mean per-class recall (%) |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("alt_text", "stage 1 on alt-text"),
        ("recaption", "stage 1 on recaptions"),
        ("stage2", "+ stage 2"),
    ):
        rows.append(f"| {label} | {_fmt(fg[key])} | {_fmt(box.get(key))} | {_fmt(mpcr.get(key))} |")
    return "\n".join(rows)


def checks(s: dict[str, Any]) -> list[tuple[str, bool]]:
    fg, box = s["finegrained_r1"], s["boxcls_top1"]
    margin = None if fg["recaption"] is None or fg["alt_text"] is None else fg["recaption"] - fg["alt_text"]
    gain = None if box["stage1"] is None or box["stage2"] is None else box["stage2"] - box["stage1"]
    return [
        (
            f"recaptions beat alt-text by >= {FG_MARGIN:.0f} points of fine-grained R@1: "
            f"{'missing' if margin is None else f'{margin:+.1f}'}",
            margin is not None and margin >= FG_MARGIN,
        ),
        (
            f"stage 2 improves box-classification top-1 over stage 1: {'missing' if gain is None else f'{gain:+.1f}'}"
            + box_noise(s),
            gain is not None and gain > 0,
        ),
    ]


def box_noise(s: dict[str, Any]) -> str:
    """How far box top-1 moves by chance: the binomial sampling error of the stage-1 score over the
    held-out boxes, and chance level (the claim's margin is 0, so the reader needs the scale)."""
    n, chance, p = s.get("boxcls_boxes"), s.get("boxcls_chance"), s["boxcls_top1"]["stage1"]
    if not n or p is None:
        return ""
    se = 100 * math.sqrt(p / 100 * (1 - p / 100) / n)
    return f" (one score's sampling error ±{se:.1f} over {n} boxes" + (
        f"; chance {chance:.1f})" if chance is not None else ")"
    )


# the audit plots the report shows, by their titles in the audit's report.md (files are numbered
# by layer order): how long the dense captions are, beside the ground truth's, what the filter
# dropped and why, and what the region captions name
AUDIT_PLOTS = (
    "gt-global: caption length in words",
    "recap-global: caption length in words",
    "recap-filter: drop reasons",
    "recap-regions: boxes per label",
)


def pick_audit_plots(audit_dir: str, titles: tuple[str, ...] = AUDIT_PLOTS) -> list[tuple[str, str]]:
    """``(title, path)`` of each of ``titles`` that ``finevit audit --report`` drew."""
    md = os.path.join(audit_dir, "report.md")
    if not os.path.exists(md):
        return []
    drawn = dict(re.findall(r"!\[([^\]]+)\]\((plots/[^)]+\.png)\)", Path(md).read_text()))
    return [(t, os.path.join(audit_dir, drawn[t])) for t in titles if t in drawn]


def _img(path: str | None) -> str:
    if not path or not os.path.exists(path):
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(os.path.basename(path))}" src="data:image/png;base64,{data}">'


def _filter_line(f: dict[str, Any]) -> str:
    why = ", ".join(f"{r} {n}" for r, n in f.get("reasons", {}).items())
    return f"Filter kept {f['kept']} of {f['total']} recaptions" + (f" (dropped: {why})." if why else ".")


def write_pages(
    d: str, s: dict[str, Any], plots: list[str | None], audit_plots: list[tuple[str, str]]
) -> None:
    ok = checks(s)
    rq = s["recaption"].get("quality", {})
    rg = s["recaption"].get("regions_quality", {})
    md = [
        "# FineViT demo",
        "",
        f"{s['date']} · {s['machine']} · whole demo {s['wall_s']:.0f} s",
        "",
        table_md(s),
        "",
        *[f"- {'PASS' if good else 'FAIL'}: {text}" for text, good in ok],
        "",
        "## Recaption",
        "",
        f"{s['recaption']['ok']} ok, {s['recaption']['failed']} failed; {throughput(s)} through serve-captioner.",
    ]
    if rq:
        md += [
            f"Colour+shape pairs of the ground truth named: recaptions {rq['pair_recall']}% "
            f"(precision {rq['pair_precision']}%), alt-text {rq['alt_text_pair_recall']}% "
            f"({rq['images']} images). Object count stated right: {rq.get('count_accuracy')}%.",
        ]
    if rg:
        md += [
            "",
            f"Region captions ({rg['regions']} boxes): the object's colour named right "
            f"{rg['colour_right']}%, its shape {rg['shape_right']}%.",
        ]
    if s["recaption"].get("filter"):
        md += ["", _filter_line(s["recaption"]["filter"])]
        for ex in rq.get("examples", []):
            md += [
                "",
                f"- alt-text: {ex['alt_text']}",
                f"  - recaption: {ex['recaption']}",
                f"  - ground truth: {ex['ground_truth']}",
            ]
    if s.get("finegrained_per_attribute"):
        md += ["", "## Fine-grained R@1 per attribute (%)", ""]
        attrs = sorted({a for v in s["finegrained_per_attribute"].values() for a in v})
        md += ["| encoder | " + " | ".join(attrs) + " |", "|---" * (len(attrs) + 1) + "|"]
        for name, per in s["finegrained_per_attribute"].items():
            md.append(f"| {name} | " + " | ".join(_fmt(per.get(a)) for a in attrs) + " |")
    md += ["", "## Steps (wall seconds)", ""] + [f"- {k}: {v:.0f}" for k, v in s["steps_s"].items()]
    md += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots if p]
    md += ["", "## Audit ([the full audit report](audit/report.md))", ""]
    md += [f"![{t}]({os.path.relpath(p, d)})" for t, p in audit_plots]
    with open(os.path.join(d, "report.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    body = [
        "<h1>FineViT demo</h1>",
        f"<p class=sub>{html.escape(s['date'])} · {html.escape(s['machine'])} · whole demo {s['wall_s']:.0f} s</p>",
        _md_table_html(table_md(s)),
        "<ul>"
        + "".join(
            f"<li class={'pass' if good else 'fail'}>{'PASS' if good else 'FAIL'}: {html.escape(t)}</li>"
            for t, good in ok
        )
        + "</ul>",
        "<div class=row>" + "".join(_img(p) for p in plots) + "</div>",
        "<h2>Recaption quality against the ground truth</h2>",
        f"<p>{s['recaption']['ok']} ok, {s['recaption']['failed']} failed; {html.escape(throughput(s))}.</p>",
    ]
    if rq:
        body.append(
            f"<p>Colour+shape pairs of the ground truth named: recaptions {rq['pair_recall']}% "
            f"(precision {rq['pair_precision']}%), alt-text {rq['alt_text_pair_recall']}%. "
            f"Object count stated right: {rq.get('count_accuracy')}%.</p>"
        )
    if rg:
        body.append(
            f"<p>Region captions ({rg['regions']} boxes): the object's colour named right "
            f"{rg['colour_right']}%, its shape {rg['shape_right']}%.</p>"
        )
    if s["recaption"].get("filter"):
        body.append(f"<p>{html.escape(_filter_line(s['recaption']['filter']))}</p>")
        body.append("<table><tr><th>alt-text</th><th>recaption</th><th>ground truth</th></tr>")
        for ex in rq.get("examples", []):
            body.append("<tr>" + "".join(f"<td>{html.escape(str(ex[k]))}</td>" for k in ex) + "</tr>")
        body.append("</table>")
    body += [
        "<h2>Audit</h2><p><a href='audit/report.html'>the full audit report</a></p>",
        "<div class=row>"
        + "".join(
            f"<figure>{_img(p)}<figcaption>{html.escape(t)}</figcaption></figure>" for t, p in audit_plots
        )
        + "</div>",
    ]
    css = (
        "body{font:14px system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;"
        "text-align:left;vertical-align:top;max-width:420px}.sub{color:#666}.pass{color:#1a7f37}"
        ".fail{color:#c33;font-weight:bold}.row{display:flex;flex-wrap:wrap;gap:12px}img{max-width:560px}"
        "figure{margin:0}figcaption{color:#666;font-size:12px}"
    )
    page = f"<!doctype html><meta charset=utf-8><title>FineViT demo</title><style>{css}</style>" + "".join(
        body
    )
    with open(os.path.join(d, "report.html"), "w") as f:
        f.write(page)


def _md_table_html(md: str) -> str:
    lines = [ln for ln in md.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
    return f"<table><tr>{head}</tr>{rows}</table>"


def machine() -> str:
    cores = os.cpu_count() or 0
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cores} CPU cores ({cpu}), no GPU"


def build_summary(d: str, corpus: str) -> dict[str, Any]:
    steps = step_seconds(d)
    rec = recaption_stats(corpus, "recap-global") if os.path.exists(corpus) or "://" in corpus else {}
    rec.setdefault("ok", 0)
    rec.setdefault("failed", 0)
    if os.path.exists(corpus) or "://" in corpus:
        rec["filter"] = filter_stats(corpus, "recap-filter")
        rec["regions_quality"] = region_stats(corpus, "recap-regions")
        rec["layers"] = recaption_layers(corpus)
    # images captioned per second over the whole step: every layer's images (one layer: its rows)
    secs = steps.get("recaption")
    rows = sum(rec.get("layers", {}).values()) or rec["ok"] + rec["failed"]
    rec["images_per_s"] = round(rows / secs, 2) if secs else None
    chance = None
    fg_path = os.path.join(d, "eval", "finegrained-recaption", "results.json")
    if os.path.exists(fg_path):
        chance = round(100 * _read_json(fg_path)[0]["metrics"]["chance"], 1)
    box_all = {n.replace("-", "_"): eval_metric(d, "boxcls", n, "top1") for n in ENCODERS}
    box_path = os.path.join(d, "eval", "boxcls-recaption", "results.json")
    box_run = _read_json(box_path)[0] if os.path.exists(box_path) else {}
    classes = box_run.get("metrics", {}).get("classes")
    return {
        "finegrained_r1": {
            n.replace("-", "_"): eval_metric(d, "finegrained", n, "t2i_mean") for n in ENCODERS
        },
        "finegrained_i2t": {
            n.replace("-", "_"): eval_metric(d, "finegrained", n, "i2t_mean") for n in ENCODERS
        },
        "finegrained_per_attribute": {n: per_attribute(d, n) for n in ENCODERS if per_attribute(d, n)},
        "chance_r1": chance,
        "boxcls_top1": {"stage1": box_all["recaption"], "stage2": box_all["stage2"]},
        "boxcls_top1_all": box_all,
        # top-1 rises when an encoder reads one large class well; the mean of the classes' recalls
        # rises only when it reads more classes
        "boxcls_mean_per_class_recall": {
            n.replace("-", "_"): eval_metric(d, "boxcls", n, "mean_per_class_recall") for n in ENCODERS
        },
        "boxcls_boxes": box_run.get("n"),
        "boxcls_chance": round(100 / classes, 1) if classes else None,
        "recaption": rec,
        "wall_s": round(demo_wall_seconds(d), 1),  # lanes side by side count once; a rerun's pause not at all
        "steps_s": steps,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("demo_dir")
    ap.add_argument("--corpus", help="the recaptioned corpus (default DEMO_DIR/data/corpus)")
    args = ap.parse_args(argv)
    d = args.demo_dir
    corpus = args.corpus or os.path.join(d, "data", "corpus")
    t0 = time.time()
    s = build_summary(d, corpus)
    plots = [
        plot_bars(s, os.path.join(d, "finegrained.png")),
        plot_curves(curves(d), os.path.join(d, "curves.png")),
    ]
    audit_plots = pick_audit_plots(os.path.join(d, "audit"))
    s["wall_s"] = round(s["wall_s"] + time.time() - t0, 1)
    with open(os.path.join(d, "summary.json"), "w") as f:
        json.dump(s, f, indent=2)
        f.write("\n")
    write_pages(d, s, plots, audit_plots)
    print(table_md(s))
    results = checks(s)
    for text, good in results:
        print(f"{'PASS' if good else 'FAIL'}: {text}")
    print(f"summary: {os.path.join(d, 'summary.json')}  report: {os.path.join(d, 'report.html')}")
    return 0 if all(good for _, good in results) else 1


if __name__ == "__main__":
    sys.exit(main())
