"""The one layer writer: caption, region and filter layers are all written through it.

A layer shard is one Parquet file with one row per sample of the image shard, keyed by
``key``, committed by its ``<shard>_stats.json`` (see :mod:`engine.layout`).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.layout import LayerDir, commit_parts
from engine.schemas import LAYER_OK


def layer_stats(rows: pa.Table, started: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stats (commit marker) of a layer shard: counts by status and by error reason."""
    status = (
        rows.column("status").to_pylist() if "status" in rows.column_names else [LAYER_OK] * rows.num_rows
    )
    errors = rows.column("error").to_pylist() if "error" in rows.column_names else [None] * rows.num_rows
    ok = sum(1 for s in status if s == LAYER_OK)
    reasons = Counter(e for s, e in zip(status, errors, strict=True) if s != LAYER_OK)
    now = time.time()
    return {
        "count": rows.num_rows,
        "ok": ok,
        "failed": rows.num_rows - ok,
        "error_reasons": dict(reasons.most_common(50)),
        "start_time": started,
        "end_time": now,
        "duration": now - started,
        **(extra or {}),
    }


def write_layer_shard(
    layer: LayerDir,
    shard: str,
    rows: pa.Table | Sequence[dict[str, Any]],
    schema: pa.Schema,
    staging_dir: str,
    started: float | None = None,
    extra_stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``rows`` as ``layers/<layer>/<shard>.parquet`` and commit it. Returns the stats."""
    started = time.time() if started is None else started
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), schema=schema)
    if isinstance(rows, pa.Table) and not table.schema.equals(schema):
        table = table.select(schema.names).cast(schema)
    local = os.path.join(staging_dir, f"layer-{layer.name}-{shard}.parquet")
    pq.write_table(table, local, compression="zstd")
    stats = layer_stats(table, started, {"shard": shard, "layer": layer.name, **(extra_stats or {})})
    commit_parts(layer.store, {layer.parquet(shard): local}, layer.stats(shard), stats)
    return stats
