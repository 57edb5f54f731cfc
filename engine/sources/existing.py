"""An existing img2dataset (or DataComp) output folder: already a dataset as it stands.

Recognised by ``<shard>_stats.json`` commit markers beside ``<shard>.tar`` at the folder's
top or under ``shards/``. Ingest writes only ``dataset.json`` pointing at those shards;
no image byte is copied.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from engine.config import FineVitConfig
from engine.layout import MANIFEST, STATS_SUFFIX
from engine.sources.base import RawSample, Source, SourceError, register
from engine.stats import ShardStats
from engine.store import Store


def find_shard_root(store: Store) -> str | None:
    for rel in ("", "shards"):
        names = store.listdir(rel)
        stats = [n for n in names if n.endswith(STATS_SUFFIX) and n[: -len(STATS_SUFFIX)].isdigit()]
        if stats and any(n.endswith(".tar") for n in names):
            return rel or "."
    return None


@register
class ExistingShardsSource(Source):
    kind = "img2dataset"
    priority = 10

    def __init__(self, uri: str, cfg: FineVitConfig) -> None:
        super().__init__(uri, cfg)
        self.store = Store(uri, cfg.storage)

    @classmethod
    def matches(cls, uri: str, cfg: FineVitConfig) -> bool:
        if uri.startswith("synthetic://") or uri.lower().endswith(
            (".tar", ".parquet", ".txt", ".csv", ".tsv")
        ):
            return False
        store = Store(uri, cfg.storage)
        try:
            if store.exists(MANIFEST):
                return False  # already a FineViT dataset: not something to ingest
            return find_shard_root(store) is not None
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return False

    def inspect(self) -> dict[str, Any]:
        """What ``dataset.json`` needs: where the shards are, samples per shard, shard count."""
        rel = find_shard_root(self.store)
        if rel is None:
            raise SourceError(f"{self.uri} holds no img2dataset shards")
        shards = self.store if rel == "." else self.store.child(rel)
        stats = sorted(n for n in shards.listdir() if n.endswith(STATS_SUFFIX))
        sps = ShardStats.read(shards, stats[0]).count or 1
        shard_digits = len(stats[0][: -len(STATS_SUFFIX)])
        key_len = None
        pq_rel = stats[0][: -len(STATS_SUFFIX)] + ".parquet"
        if shards.exists(pq_rel):
            with shards.open(pq_rel) as f:
                keys = pq.read_table(f, columns=["key"]).column("key")
                key_len = len(keys[0].as_py()) if len(keys) else None
        return {
            "shard_root": shards.root,
            "samples_per_shard": sps,
            "shard_digits": shard_digits,
            "key_length": key_len,
            "num_shards": len(stats),
        }

    def plan(self, samples_per_shard: int) -> Iterator[Any]:
        raise SourceError("an img2dataset output is registered, not re-ingested")

    def read(self, payload: Any) -> Iterator[RawSample]:
        raise SourceError("an img2dataset output is registered, not re-ingested")
