"""Duplicate images within one run, found before any image is read: each distinct request is
sent once and its answer fanned out to every row that asks the same question.

The shards' Parquet index carries each image's ``sha256`` (of its bytes in the tar). Two
samples of one run with the same ``sha256`` get the same prepared image (same bytes, same
settings), so with the same layer settings they are the same request: the response cache's
key (recaption/cache.py) differs only by the image, and here the image is the sha256. In
proposals mode the boxes are part of the question: samples are duplicates only when their
proposals rows are equal too.

:func:`duplicate_groups` asks DuckDB (in process; local paths or ``s3://``) for the groups of
two or more samples sharing an image, so the driver holds only the duplicated keys, never a
set of every image of the dataset. :func:`plan_duplicates` turns them into, per layer and
shard, ``{duplicate key: [primary shard, primary key]}``: the primary is the first sample of
its group (key order, so shard order) among the samples the layer asks for in this run.
"""

from __future__ import annotations

import json
from typing import Any

from engine.layout import Dataset
from engine.schemas import STATUS_SUCCESS


def duplicate_groups(dataset: Dataset, shards: list[str], storage: Any = None) -> list[list[tuple[str, str]]]:
    """``[(shard, key), ...]`` per image that two or more ingested samples of ``shards`` share,
    each group in key order; images seen once are not returned."""
    from engine.audit.views import connect, quote_str

    if not shards:
        return []
    files = ", ".join(quote_str(dataset.shards.uri(f"{s}.parquet")) for s in shards)

    con = connect(storage, s3=not dataset.store.is_local)
    try:
        if "sha256" not in {
            c[0] for c in con.execute(f"DESCRIBE SELECT * FROM read_parquet([{files}])").fetchall()
        }:
            return []  # an index written without hashes (img2dataset's compute_hash off): no plan
        rows = con.execute(
            "SELECT list([regexp_extract(filename, '([^/]+)\\.parquet$', 1), key] ORDER BY key) "
            f"FROM read_parquet([{files}], filename = true) "
            f"WHERE status = {quote_str(STATUS_SUCCESS)} AND sha256 IS NOT NULL "
            "GROUP BY sha256 HAVING count(*) > 1"
        ).fetchall()
    finally:
        con.close()
    return [[(s, k) for s, k in group] for (group,) in rows]


def _box_signature(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    return json.dumps([row.get("status"), row.get("regions")], sort_keys=True, default=str)


def plan_duplicates(
    groups: list[list[tuple[str, str]]],
    wanted: dict[str, set[str] | None],
    boxes: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> dict[str, dict[str, list[str]]]:
    """For one layer: per shard, ``{duplicate key: [primary shard, primary key]}``.
    ``wanted``: the layer's shards in this run and the keys it asks for there (None: all);
    ``boxes``: proposals mode, each involved shard's proposals rows by key (the boxes are part
    of the question)."""
    out: dict[str, dict[str, list[str]]] = {}
    for group in groups:
        members = [
            (s, k)
            for s, k in group
            if s in wanted and (wanted[s] is None or k in wanted[s])  # type: ignore[operator]
        ]
        by_question: dict[str, list[tuple[str, str]]] = {}
        for s, k in members:
            sig = _box_signature((boxes or {}).get(s, {}).get(k)) if boxes is not None else ""
            by_question.setdefault(sig, []).append((s, k))
        for same in by_question.values():
            (ps, pk), rest = same[0], same[1:]
            for s, k in rest:
                out.setdefault(s, {})[k] = [ps, pk]
    return out
