"""The samples of one image shard as the captioner sees them, streamed.

First the samples without an image (ingest failed; they become failed rows), then the images
of the tar in its order, each prepared (decoded, downscaled, put on the model family's grid,
JPEG; only the JPEG is kept) and, in proposals mode, with the boxes of the proposals layer.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from typing import Any

import pyarrow.parquet as pq

from engine.layout import Dataset
from engine.schemas import LAYER_OK, STATUS_SUCCESS
from recaption.config import RecaptionConfig
from recaption.images import prepare
from recaption.presets import PRESETS
from recaption.tasks import Sample

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def shard_rows(dataset: Dataset, shard: str) -> list[dict[str, Any]]:
    with dataset.shards.open(f"{shard}.parquet") as f:
        table = pq.read_table(f, columns=["key", "status", "error_message"])
    return table.to_pylist()


def shard_keys(dataset: Dataset, shard: str) -> list[str]:
    return [r["key"] for r in shard_rows(dataset, shard)]


def iter_tar_images(dataset: Dataset, shard: str) -> Iterator[tuple[str, bytes]]:
    """``(key, image bytes)`` streamed from the shard's tar (one member in memory at a time)."""
    with dataset.shards.open(f"{shard}.tar") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base, dot, ext = m.name.rpartition(".")
            if dot and f".{ext.lower()}" in IMAGE_EXTS:
                data = tar.extractfile(m)
                if data is not None:
                    yield base.rsplit("/", 1)[-1], data.read()


def proposals(dataset: Dataset, layer_name: str, shard: str) -> dict[str, dict[str, Any]]:
    layer = dataset.layer(layer_name)
    with layer.store.open(layer.parquet(shard)) as f:
        rows = pq.read_table(f).to_pylist()
    return {r["key"]: r for r in rows}


def unavailable(row: dict[str, Any]) -> str:
    msg = row.get("error_message")
    return f"image not available (ingest status {row.get('status')}" + (f": {msg})" if msg else ")")


def shard_samples(
    dataset: Dataset,
    shard: str,
    cfg: RecaptionConfig,
    with_proposals: bool = False,
    only_keys: set[str] | None = None,
) -> Iterator[Sample]:
    """The samples of one shard, streamed (see the module docstring). ``only_keys``: just these."""
    rows = shard_rows(dataset, shard)
    by_key = {r["key"]: r for r in rows if only_keys is None or r["key"] in only_keys}
    props = proposals(dataset, cfg.proposals_layer, shard) if with_proposals else None
    grid = PRESETS[cfg.model_family].grid
    seen: set[str] = set()

    def sample_for(key: str, data: bytes | None) -> Sample:
        row = by_key[key]
        if row["status"] != STATUS_SUCCESS:
            return Sample(key, None, unavailable(row))
        if data is None:
            return Sample(key, None, "image not available (missing from the shard tar)")
        try:
            image = prepare(data, cfg.image_max_side, cfg.jpeg_quality, grid)
        except Exception as e:
            return Sample(key, None, f"image not decodable: {type(e).__name__}: {e}")
        smp = Sample(key, image, sha256=hashlib.sha256(data).hexdigest())
        if props is not None:
            p = props.get(key)
            if p is None:
                smp.proposals_error = f"no row in proposals layer {cfg.proposals_layer!r}"
            elif p.get("status") != LAYER_OK:
                smp.proposals_error = f"proposals failed in layer {cfg.proposals_layer!r}: {p.get('error')}"
            else:
                smp.proposals = list(p.get("regions") or [])
        return smp

    for key, r in by_key.items():
        if r["status"] != STATUS_SUCCESS:
            seen.add(key)
            yield sample_for(key, None)
    if len(seen) < len(by_key):
        for key, data in iter_tar_images(dataset, shard):
            if key in by_key and key not in seen:
                seen.add(key)
                yield sample_for(key, data)
    for key in by_key:
        if key not in seen:
            yield sample_for(key, None)
