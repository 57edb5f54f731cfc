"""Write one image shard from raw samples, and rewrite one for ``--retry-failed``.

Shards are written with img2dataset's own ``WebDatasetSampleWriter``, so a shard we make
is byte-for-byte the format of an img2dataset download: ``<key>.<ext>``, ``<key>.txt``,
``<key>.json`` in the tar and one Parquet row per input, failures included.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import ImageConfig
from engine.download import DISALLOWED_HEADER_DIRECTIVES  # noqa: F401  - sets img2dataset's env first
from engine.images import ImageError, process_image
from engine.layout import SHARD_DIGITS, make_key, shard_name
from engine.schemas import SHARD_SCHEMA, STATUS_FAILED_DOWNLOAD, STATUS_FAILED_RESIZE, STATUS_SUCCESS
from engine.sources.base import RawSample
from engine.stats import Reason


def _empty_meta(raw: RawSample, key: str, source_label: str) -> dict[str, Any]:
    return {
        "url": raw.url,
        "caption": raw.caption,
        "source": source_label,
        "meta": raw.meta_json(),
        "key": key,
        "status": None,
        "error_message": None,
        "width": None,
        "height": None,
        "original_width": None,
        "original_height": None,
        "sha256": None,
    }


def process_raw(
    raw: RawSample, key: str, source_label: str, image_cfg: ImageConfig
) -> tuple[bytes | None, dict]:
    """Decode/resize/encode one sample; returns ``(encoded or None, shard row)``. Never raises."""
    meta = _empty_meta(raw, key, source_label)
    if raw.error is not None or raw.data is None:
        meta["status"] = STATUS_FAILED_DOWNLOAD
        meta["error_message"] = raw.error or "no data"
        return None, meta
    meta["sha256"] = hashlib.sha256(raw.data).hexdigest()
    try:
        img = process_image(raw.data, image_cfg)
    except ImageError as e:
        meta["status"] = STATUS_FAILED_RESIZE
        meta["error_message"] = str(e)
        return None, meta
    except Exception as e:
        meta["status"] = STATUS_FAILED_RESIZE
        meta["error_message"] = f"decode error: {type(e).__name__}: {e}"
        return None, meta
    meta.update(
        status=STATUS_SUCCESS,
        width=img.width,
        height=img.height,
        original_width=img.original_width,
        original_height=img.original_height,
    )
    return img.data, meta


def write_shard(
    samples: Iterator[RawSample],
    shard_index: int,
    samples_per_shard: int,
    staging_dir: str,
    source_label: str,
    image_cfg: ImageConfig,
    on_sample: Callable[[str, RawSample], None] | None = None,
) -> list[dict[str, Any]]:
    """Write ``<shard>.tar`` + ``<shard>.parquet`` into ``staging_dir``; returns the rows."""
    from img2dataset.writer import WebDatasetSampleWriter

    writer = WebDatasetSampleWriter(
        shard_index, staging_dir, True, SHARD_DIGITS, SHARD_SCHEMA, image_cfg.encode_format
    )
    rows = []
    try:
        for i, raw in enumerate(samples):
            if i >= samples_per_shard:
                raise RuntimeError(f"source yielded more than {samples_per_shard} samples for one shard")
            key = make_key(shard_index, i, samples_per_shard)
            encoded, meta = process_raw(raw, key, source_label, image_cfg)
            writer.write(encoded, key, raw.caption, dict(meta))
            rows.append(meta)
            if on_sample is not None:
                on_sample(key, raw)
    finally:
        writer.close()
    return rows


def rewrite_failed(
    tar_path: str,
    parquet_path: str,
    out_dir: str,
    shard_index: int,
    fetch: Callable[[str], bytes],
    image_cfg: ImageConfig,
) -> tuple[list[dict[str, Any]], int] | None:
    """Re-attempt the transient failures of a committed shard (``--retry-failed``).

    Reads the shard's tar and Parquet (local copies), re-fetches each row that failed for a
    transient reason, and writes a new tar + Parquet into ``out_dir`` with the same keys and
    row order. Returns ``(rows, n_retried)``, or None when nothing was transient.
    """
    table = pq.read_table(parquet_path)
    rows = table.to_pylist()
    todo = [
        i
        for i, r in enumerate(rows)
        if r["status"] != STATUS_SUCCESS and Reason.of(r.get("error_message")) is Reason.TRANSIENT
    ]
    if not todo:
        return None
    fmt = image_cfg.encode_format
    new_members: dict[str, bytes] = {}
    for i in todo:
        r = rows[i]
        raw = RawSample(url=r["url"], caption=r.get("caption"))
        raw.meta = json.loads(r["meta"]) if r.get("meta") else None
        try:
            raw.data = fetch(r["url"])
        except Exception as e:
            raw.error = str(e)
        encoded, meta = process_raw(raw, r["key"], r.get("source") or "", image_cfg)
        meta = {**r, **{k: v for k, v in meta.items() if k in r}}
        rows[i] = meta
        if encoded is not None:
            new_members[r["key"]] = encoded
    name = shard_name(shard_index)
    out_tar = os.path.join(out_dir, f"{name}.tar")
    with tarfile.open(tar_path, "r") as src, tarfile.open(out_tar, "w") as dst:
        for m in src:
            f = src.extractfile(m) if m.isfile() else None
            dst.addfile(m, f)
        now = int(time.time())
        by_key = {r["key"]: r for r in rows}
        for key, encoded in new_members.items():
            r = by_key[key]
            for ext, data in (
                (fmt, encoded),
                ("txt", (r.get("caption") or "").encode()),
                ("json", json.dumps(r, indent=4).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), now, 0o444
                dst.addfile(info, io.BytesIO(data))
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), os.path.join(out_dir, f"{name}.parquet"))
    return rows, len(todo)
