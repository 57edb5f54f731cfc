"""The one layer writer: caption, region and filter layers are all written through it.

A layer shard is one Parquet file with one row per sample of the image shard, keyed by
``key``, committed by its ``<shard>_stats.json`` (see :mod:`engine.layout`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import StorageConfig
from engine.layout import LayerDir, commit_parts
from engine.stats import LayerStats


def write_layer_shard(
    layer: LayerDir,
    shard: str,
    rows: pa.Table | Sequence[dict[str, Any]],
    schema: pa.Schema,
    staging_dir: str,
    started: float | None = None,
    extra_stats: dict[str, Any] | None = None,
) -> LayerStats:
    """Write ``rows`` as ``layers/<layer>/<shard>.parquet`` and commit it. Returns the stats.

    ``extra_stats``: the stage's own counters, kept in :attr:`LayerStats.extra`.
    """
    started = time.time() if started is None else started
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), schema=schema)
    if isinstance(rows, pa.Table) and not table.schema.equals(schema):
        table = table.select(schema.names).cast(schema)
    local = os.path.join(staging_dir, f"layer-{layer.name}-{shard}.parquet")
    pq.write_table(table, local, compression="zstd")
    stats = LayerStats.from_table(table, started, shard=shard, layer=layer.name, **(extra_stats or {}))
    commit_parts(layer.store, {layer.parquet(shard): local}, layer.stats(shard), stats)
    return stats


def read_layer(dataset_root: str, layer: str, storage: StorageConfig | None = None) -> pa.Table | None:
    """All committed rows of a layer as one Arrow table (union by name across shards); only
    shards with their commit marker, never a bare ``*.parquet`` glob."""
    from engine.layout import Dataset

    lay = Dataset(dataset_root, storage).layer(layer)
    if not lay.store.is_local:
        lay.store.fs.invalidate_cache()
    tables = []
    for s in lay.committed():
        with lay.store.open(lay.parquet(s)) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables, promote_options="default") if tables else None
