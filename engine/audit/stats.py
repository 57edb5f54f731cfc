"""The numbers of the audit report: its data classes and the SQL that collects them.

:func:`collect` runs every query of the report and returns small Python values (value
counts, top-k lists, percentiles): one scan per view where it can, each a GROUP BY over a few
small columns whose small result holds every marginal (summed in Python). It reads no image
and draws nothing, so ``bench/audit_report.py`` times exactly the report's SQL.

The report is drawn on top of it, one way: stats (this module) -> plots -> page -> report.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from engine.audit.views import Audit, LayerView, quote_ident, quote_str

TOP = 10  # rows in "top" tables
NUMERIC_TYPES = (
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "HUGEINT",
    "FLOAT",
    "DOUBLE",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
)


class DupGroup(NamedTuple):
    """One repeated value: the value, how many rows hold it, one of their keys."""

    value: str | None
    count: int
    example: str


class LabelStat(NamedTuple):
    """A region label: its boxes, how many have a caption, their mean area, one caption."""

    label: str
    boxes: int
    captions: int
    mean_area: float
    example: str


class LayerRow(NamedTuple):
    """A row of the ``layers`` view."""

    name: str
    kind: str
    view: str | None
    shards: int
    schema_ok: bool
    problem: str | None


class StatsPart(NamedTuple):
    """The ``stats`` view summed per part (``shards`` or a layer): what the commit markers say."""

    part: str
    shards: int
    count: int | None
    ok: int | None
    failed: int | None
    seconds: float | None


class SourceCount(NamedTuple):
    source: str
    status: str
    samples: int


class ReasonCount(NamedTuple):
    status: str
    reason: str
    samples: int


@dataclass
class Counts:
    """A distribution as (value, count) pairs, sorted by value."""

    values: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return int(sum(self.counts))

    def quantile(self, q: float) -> float | None:
        if not self.counts:
            return None
        target, acc = q * self.total, 0
        for v, c in zip(self.values, self.counts, strict=True):
            acc += c
            if acc >= target:
                return v
        return self.values[-1]

    def mean(self) -> float | None:
        t = self.total
        return sum(v * c for v, c in zip(self.values, self.counts, strict=True)) / t if t else None


@dataclass
class Dups:
    groups: int = 0  # distinct values seen more than once
    rows: int = 0  # rows holding such a value
    top: list[DupGroup] = field(default_factory=list)


@dataclass
class CaptionStats:
    layer: LayerView
    rows: int = 0
    ok: int = 0
    failed: int = 0
    chars: Counts = field(default_factory=Counts)
    words: Counts = field(default_factory=Counts)
    finish: list[tuple[str, int]] = field(default_factory=list)
    errors: list[tuple[str, int]] = field(default_factory=list)
    latency: dict[str, float | None] = field(default_factory=dict)
    tokens: dict[str, float | None] = field(default_factory=dict)
    dups: Dups = field(default_factory=Dups)


@dataclass
class RegionStats:
    layer: LayerView
    rows: int = 0
    ok: int = 0
    failed: int = 0
    boxes: int = 0
    invalid: int = 0
    per_image: Counts = field(default_factory=Counts)
    area: Counts = field(default_factory=Counts)
    labels: list[LabelStat] = field(default_factory=list)
    n_labels: int = 0
    errors: list[tuple[str, int]] = field(default_factory=list)


@dataclass
class FilterStats:
    layer: LayerView
    rows: int = 0
    kept: int = 0
    reasons: list[tuple[str, int]] = field(default_factory=list)
    scores: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # col -> {kept: [...], dropped: [...], hist}


@dataclass
class ReportData:
    root: str
    generated_at: float
    shards: int
    views: list[str]
    warnings: list[str]
    layers: list[LayerRow]
    samples: int = 0
    success: int = 0
    by_status: list[tuple[str, int]] = field(default_factory=list)
    by_source: list[SourceCount] = field(default_factory=list)
    reasons: list[ReasonCount] = field(default_factory=list)
    width: Counts = field(default_factory=Counts)
    height: Counts = field(default_factory=Counts)
    aspect: Counts = field(default_factory=Counts)
    sha_dups: Dups = field(default_factory=Dups)
    alt_dups: Dups = field(default_factory=Dups)
    stats_parts: list[StatsPart] = field(default_factory=list)
    captions: list[CaptionStats] = field(default_factory=list)
    regions: list[RegionStats] = field(default_factory=list)
    filters: list[FilterStats] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class _Timer:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings

    def __call__(self, name: str):
        timings = self.timings

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timings[name] = timings.get(name, 0.0) + time.perf_counter() - self.t

        return _Ctx()


def _rows(audit: Audit, sql: str) -> list[tuple]:
    return audit.con.execute(sql).fetchall()


def _counts(pairs: list[tuple]) -> Counts:
    pairs = sorted((v, int(n)) for v, n in pairs if v is not None)
    return Counts([float(v) for v, _ in pairs], [n for _, n in pairs])


def _dups(audit: Audit, view: str, col: str, where: str) -> Dups:
    """Exact duplicates of ``col``: grouped by its 64-bit hash (cheaper than the text; a collision
    among a billion distinct values has odds below 3 %), texts fetched for the top groups only."""
    rows = _rows(
        audit,
        f"WITH d AS MATERIALIZED (SELECT hash({col}) AS h, count(*) AS n, min(key) AS ex FROM {view} "
        f"WHERE {col} IS NOT NULL AND {where} GROUP BY h HAVING count(*) > 1) "
        f"SELECT ex, n, count(*) OVER () AS groups, sum(n) OVER () AS rows FROM d ORDER BY n DESC, ex LIMIT {TOP}",
    )
    if not rows:
        return Dups()
    keys = "[" + ", ".join(quote_str(r[0]) for r in rows) + "]"
    text = dict(_rows(audit, f"SELECT key, {col} FROM {view} WHERE list_contains({keys}, key)"))
    groups, n_rows = int(rows[0][2]), int(rows[0][3])
    return Dups(groups, n_rows, [DupGroup(text.get(ex), int(n), ex) for ex, n, *_ in rows])


# Words: runs of non-space characters. ``length - length(no spaces) + 1`` counts single-space
# separated words in one pass with no allocation per word; captions are single-spaced text.
_WORDS = "(strlen(caption) - strlen(replace(caption, ' ', '')) + 1)"


def collect(audit: Audit) -> ReportData:
    """Run every query of the standard report. No image is read, nothing is drawn."""
    timings: dict[str, float] = {}
    timer = _Timer(timings)
    layers = [
        LayerRow(*r)
        for r in _rows(audit, "SELECT name, kind, view, shards, schema_ok, problem FROM layers ORDER BY name")
    ]
    data = ReportData(audit.root, time.time(), len(audit.shards), audit.views(), list(audit.warnings), layers)

    with timer("samples"):
        # one scan, one small GROUP BY; every marginal (status, source, reasons, width, height,
        # aspect ratio) is summed from it in Python
        rows = _rows(
            audit,
            "SELECT status, coalesce(source, '(none)'), "
            "CASE WHEN status <> 'success' THEN coalesce(error_message, '(no message)') END, "
            "CASE WHEN status = 'success' THEN width END, CASE WHEN status = 'success' THEN height END, count(*) "
            "FROM samples GROUP BY ALL",
        )
    by_status: dict[str, int] = {}
    by_source: dict[tuple[str, str], int] = {}
    reasons: dict[tuple[str, str], int] = {}
    wc: dict[int, int] = {}
    hc: dict[int, int] = {}
    ac: dict[float, int] = {}
    for status, source, reason, w, h, n in rows:
        n = int(n)
        by_status[status] = by_status.get(status, 0) + n
        by_source[(source, status)] = by_source.get((source, status), 0) + n
        if reason is not None:
            reasons[(status, reason)] = reasons.get((status, reason), 0) + n
        if w is not None and h is not None and h > 0:
            wc[w] = wc.get(w, 0) + n
            hc[h] = hc.get(h, 0) + n
            ar = round(w / h, 2)
            ac[ar] = ac.get(ar, 0) + n
    data.by_status = sorted(by_status.items(), key=lambda kv: (-kv[1], kv[0] or ""))
    data.by_source = sorted(
        (SourceCount(s, st, n) for (s, st), n in by_source.items()),
        key=lambda r: (-r.samples, r.source, r.status or ""),
    )
    data.reasons = sorted(
        (ReasonCount(st, r, n) for (st, r), n in reasons.items()), key=lambda r: (-r.samples, r.reason)
    )
    data.width, data.height, data.aspect = (
        _counts(list(wc.items())),
        _counts(list(hc.items())),
        _counts(list(ac.items())),
    )
    data.samples = sum(by_status.values())
    data.success = by_status.get("success", 0)

    with timer("sha256 duplicates"):
        data.sha_dups = _dups(audit, "samples", "sha256", "status = 'success'")
    with timer("alt-text duplicates"):
        data.alt_dups = _dups(audit, "samples", "caption", "status = 'success' AND caption <> ''")
    with timer("stats"):
        data.stats_parts = [
            StatsPart(*r)
            for r in _rows(
                audit,
                "SELECT part, count(*), sum(count), sum(ok), sum(failed), sum(duration) FROM stats "
                "GROUP BY part ORDER BY part = 'shards' DESC, part",
            )
        ]

    for lv in audit.layers_of("caption"):
        with timer(f"caption {lv.name}"):
            data.captions.append(_caption_stats(audit, lv))
    for lv in audit.layers_of("regions"):
        with timer(f"regions {lv.name}"):
            data.regions.append(_region_stats(audit, lv))
    for lv in audit.layers_of("filter"):
        with timer(f"filter {lv.name}"):
            data.filters.append(_filter_stats(audit, lv))
    data.timings = timings
    return data


def _caption_stats(audit: Audit, lv: LayerView) -> CaptionStats:
    v = quote_ident(lv.view)
    st = CaptionStats(lv)
    # one scan, one GROUP BY over (status, error, finish reason, chars, words): a small result
    rows = _rows(
        audit,
        f"SELECT status, CASE WHEN status <> 'ok' THEN coalesce(error, '(no message)') END, "
        f"CASE WHEN status = 'ok' THEN coalesce(finish_reason, '(none)') END, "
        f"CASE WHEN status = 'ok' THEN length(caption) END, CASE WHEN status = 'ok' THEN {_WORDS} END, count(*) "
        f"FROM {v} GROUP BY ALL",
    )
    errors: dict[str, int] = {}
    finish: dict[str, int] = {}
    nc: dict[int, int] = {}
    nw: dict[int, int] = {}
    for status, err, fr, c, w, n in rows:
        n = int(n)
        st.rows += n
        if status == "ok":
            st.ok += n
            finish[fr] = finish.get(fr, 0) + n
            nc[c or 0] = nc.get(c or 0, 0) + n
            nw[w or 0] = nw.get(w or 0, 0) + n
        else:
            st.failed += n
            errors[err] = errors.get(err, 0) + n
    st.errors = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))
    st.finish = sorted(finish.items(), key=lambda kv: (-kv[1], kv[0]))
    st.chars, st.words = _counts(list(nc.items())), _counts(list(nw.items()))
    q = _rows(
        audit,
        f"SELECT quantile_cont(latency_ms, [0.1, 0.5, 0.9, 0.99]), max(latency_ms), avg(latency_ms), "
        f"quantile_cont(n_tokens, [0.1, 0.5, 0.9, 0.99]), max(n_tokens), sum(n_tokens), avg(n_tokens) "
        f"FROM {v} WHERE status = 'ok'",
    )[0]
    lat, tok = q[0] or [None] * 4, q[3] or [None] * 4
    st.latency = {"p10": lat[0], "p50": lat[1], "p90": lat[2], "p99": lat[3], "max": q[1], "mean": q[2]}
    st.tokens = {"p10": tok[0], "p50": tok[1], "p90": tok[2], "p99": tok[3], "max": q[4], "mean": q[6]}
    st.tokens["total"] = q[5]
    st.dups = _dups(audit, v, "caption", "status = 'ok' AND caption <> ''")
    return st


AREA_BINS = 50  # box area histogram resolution (fraction of the image, 0..1)


def _region_stats(audit: Audit, lv: LayerView) -> RegionStats:
    v = quote_ident(lv.view)
    st = RegionStats(lv)
    rows = _rows(
        audit,
        f"SELECT status, CASE WHEN status <> 'ok' THEN coalesce(error, '(no message)') END, "
        f"CASE WHEN status = 'ok' THEN coalesce(len(regions), 0) END, count(*) FROM {v} GROUP BY ALL",
    )
    errors: dict[str, int] = {}
    per_image: dict[int, int] = {}
    for status, err, nb, n in rows:
        n = int(n)
        st.rows += n
        if status == "ok":
            st.ok += n
            per_image[nb] = per_image.get(nb, 0) + n
        else:
            st.failed += n
            errors[err] = errors.get(err, 0) + n
    st.errors = sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))
    st.per_image = _counts(list(per_image.items()))
    # one pass over the unnested boxes, grouped by (label, area bin, valid): a small result
    rows = _rows(
        audit,
        f"SELECT label, least(floor(area * {AREA_BINS}), {AREA_BINS - 1}), valid, count(*), count(caption), "
        f"sum(area), any_value(caption) FROM ("
        f"SELECT coalesce(label, '(none)') AS label, nullif(caption, '') AS caption, "
        f"greatest(x1 - x0, 0) * greatest(y1 - y0, 0) AS area, "
        f"(x0 >= 0 AND y0 >= 0 AND x1 <= 1 AND y1 <= 1 AND x0 < x1 AND y0 < y1) AS valid "
        f"FROM (SELECT UNNEST(regions, recursive := true) FROM {v} WHERE status = 'ok')) GROUP BY ALL",
    )
    labels: dict[str, list] = {}
    area: dict[float, int] = {}
    for label, ab, valid, n, ncap, asum, ex in rows:
        n = int(n)
        st.boxes += n
        if not valid:
            st.invalid += n
        if ab is not None:
            mid = (ab + 0.5) / AREA_BINS
            area[mid] = area.get(mid, 0) + n
        e = labels.setdefault(label, [0, 0, 0.0, None])
        e[0], e[1], e[2] = e[0] + n, e[1] + int(ncap), e[2] + float(asum or 0)
        e[3] = e[3] or ex
    st.area = _counts(list(area.items()))
    ranked = sorted(labels.items(), key=lambda kv: (-kv[1][0], kv[0]))
    st.n_labels = len(ranked)
    st.labels = [LabelStat(k, b, c, a / b if b else 0.0, ex or "") for k, (b, c, a, ex) in ranked[:20]]
    return st


def _filter_stats(audit: Audit, lv: LayerView) -> FilterStats:
    v = quote_ident(lv.view)
    st = FilterStats(lv)
    st.rows, st.kept = (
        int(x or 0) for x in _rows(audit, f"SELECT count(*), count(*) FILTER (WHERE keep) FROM {v}")[0]
    )
    st.reasons = [
        (r, int(n))
        for r, n in _rows(
            audit,
            f"SELECT coalesce(reason, '(no reason)'), count(*) FROM (SELECT UNNEST(CASE WHEN len(reasons) > 0 "
            f"THEN reasons ELSE [NULL] END) AS reason FROM {v} WHERE NOT keep) GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT {TOP}",
        )
    ]
    scores = [
        c
        for c, t in lv.columns.items()
        if c not in ("key", "keep", "reasons", "shard") and t.upper() in NUMERIC_TYPES
    ]
    for col in scores[:6]:
        c = quote_ident(col)
        qs = _rows(
            audit,
            f"SELECT keep, quantile_cont({c}, [0.1, 0.5, 0.9]), min({c}), max({c}) FROM {v} "
            f"WHERE {c} IS NOT NULL GROUP BY keep",
        )
        by = {bool(k): (q, lo, hi) for k, q, lo, hi in qs}
        if not by:
            continue
        lo = min(x[1] for x in by.values())
        hi = max(x[2] for x in by.values())
        span = (hi - lo) or 1.0
        hist = _rows(
            audit,
            f"SELECT keep, least(floor(({c} - {lo}) / {span} * 30), 29) AS b, count(*) FROM {v} "
            f"WHERE {c} IS NOT NULL GROUP BY ALL",
        )
        st.scores[col] = {
            "kept": by.get(True, (None,))[0],
            "dropped": by.get(False, (None,))[0],
            "lo": lo,
            "hi": hi,
            "hist": [(bool(k), lo + (b + 0.5) * span / 30, int(n)) for k, b, n in hist],
        }
    return st
