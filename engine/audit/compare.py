"""Side by side of two caption layers over the same keys: what a user wants after regenerating a corpus."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.audit.views import Audit, AuditError, LayerView, quote_ident, quote_str

_WORDS = "(strlen({c}) - strlen(replace({c}, ' ', '')) + 1)"


@dataclass
class Side:
    layer: str
    rows: int = 0
    ok: int = 0
    failed: int = 0
    chars: dict[str, float | None] = field(default_factory=dict)  # p10 p50 p90 mean (ok rows)
    words: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Comparison:
    a: Side
    b: Side
    both: int = 0  # keys present in both layers
    only_a: int = 0
    only_b: int = 0
    both_ok: int = 0  # keys with an ok caption in both
    identical: int = 0  # of both_ok, same text
    longer_b: int = 0  # of both_ok, B has more words
    pairs: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # key, caption A, caption B


def _caption_layer(audit: Audit, name: str) -> LayerView:
    for lv in audit.layers:
        if lv.name == name or lv.view == name:
            if lv.kind != "caption":
                raise AuditError(f"layer {name} is a {lv.kind} layer, not a caption layer")
            if not lv.schema_ok:
                raise AuditError(f"layer {name} cannot be compared: {lv.problem}")
            return lv
    names = ", ".join(lv.name for lv in audit.layers if lv.kind == "caption") or "none"
    raise AuditError(f"no caption layer {name!r} in {audit.root} (caption layers: {names})")


def _side(audit: Audit, lv: LayerView) -> Side:
    v = quote_ident(lv.view)
    w = _WORDS.format(c="caption")
    r = audit.con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE status = 'ok'), "
        f"quantile_cont(length(caption), [0.1, 0.5, 0.9]) FILTER (WHERE status = 'ok'), "
        f"avg(length(caption)) FILTER (WHERE status = 'ok'), "
        f"quantile_cont({w}, [0.1, 0.5, 0.9]) FILTER (WHERE status = 'ok'), "
        f"avg({w}) FILTER (WHERE status = 'ok') FROM {v}"
    ).fetchall()[0]
    n, ok, cq, cm, wq, wm = r
    cq, wq = cq or [None] * 3, wq or [None] * 3
    return Side(
        lv.name,
        int(n),
        int(ok),
        int(n) - int(ok),
        {"p10": cq[0], "p50": cq[1], "p90": cq[2], "mean": cm},
        {"p10": wq[0], "p50": wq[1], "p90": wq[2], "mean": wm},
    )


def compare_layers(audit: Audit, layer_a: str, layer_b: str, n_pairs: int = 5, seed: int = 0) -> Comparison:
    """Counts, length statistics and ``n_pairs`` random caption pairs of two caption layers by key."""
    la, lb = _caption_layer(audit, layer_a), _caption_layer(audit, layer_b)
    va, vb = quote_ident(la.view), quote_ident(lb.view)
    cmp = Comparison(_side(audit, la), _side(audit, lb))
    wa, wb = _WORDS.format(c="a.caption"), _WORDS.format(c="b.caption")
    r = audit.con.execute(
        f"SELECT count(*) FILTER (WHERE a.key IS NOT NULL AND b.key IS NOT NULL), "
        f"count(*) FILTER (WHERE b.key IS NULL), count(*) FILTER (WHERE a.key IS NULL), "
        f"count(*) FILTER (WHERE a.status = 'ok' AND b.status = 'ok'), "
        f"count(*) FILTER (WHERE a.status = 'ok' AND b.status = 'ok' AND a.caption = b.caption), "
        f"count(*) FILTER (WHERE a.status = 'ok' AND b.status = 'ok' AND {wb} > {wa}) "
        f"FROM {va} a FULL OUTER JOIN {vb} b ON a.key = b.key"
    ).fetchall()[0]
    cmp.both, cmp.only_a, cmp.only_b, cmp.both_ok, cmp.identical, cmp.longer_b = (int(x or 0) for x in r)
    cmp.pairs = [
        (k, ca, cb)
        for k, ca, cb in audit.con.execute(
            f"SELECT a.key, a.caption, b.caption FROM {va} a JOIN {vb} b ON a.key = b.key "
            f"WHERE a.status = 'ok' AND b.status = 'ok' "
            f"ORDER BY hash(a.key || {quote_str(str(seed))}), a.key LIMIT {int(n_pairs)}"
        ).fetchall()
    ]
    return cmp
