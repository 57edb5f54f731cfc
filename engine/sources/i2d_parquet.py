"""img2dataset's Parquet output format (``output_format="parquet"``), adopted as it is.

Such an output holds ``<shard>.parquet`` files with one row per input (failures included),
img2dataset's columns (``key``, ``status``, ``error_message``, ``url``, ``caption``, sizes,
``sha256``, ``exif``, ...) and the image bytes in a binary column named after the encode
format (``jpg``, ``png`` or ``webp``), plus ``<shard>_stats.json``. Recognised as the output
folder or as a path / glob of its Parquet files.

Each of its shards becomes the FineViT shard of the same number: the image bytes are put in
the tar as they are (no decode, no re-encode), and every row keeps its ``key``, ``status``
and ``error_message``; columns outside our shard schema go to ``meta``. A missing shard
number (img2dataset lost that shard) becomes an empty shard, so shard names and key
prefixes stay aligned. Our readers (trainer, recaption, audit thumbnails) read tars, which
is why the bytes are moved into one rather than served from the Parquet.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import FineVitConfig, IngestConfig
from engine.layout import MANIFEST, SHARD_DIGITS, STATS_SUFFIX
from engine.sources.base import RawSample, Source, SourceError, register
from engine.sources.urllist import _list_files, parquet_schema
from engine.store import Store, filesystem_for, is_s3

I2D_IMAGE_COLUMNS = ("jpg", "png", "webp")
I2D_ROW_COLUMNS = ("key", "status", "error_message")


def i2d_image_column(schema: pa.Schema) -> str | None:
    """The image column of an img2dataset-format Parquet schema, or None if it is not one."""
    if not all(c in schema.names for c in I2D_ROW_COLUMNS):
        return None
    for name in I2D_IMAGE_COLUMNS:
        if name in schema.names:
            t = schema.field(name).type
            if pa.types.is_binary(t) or pa.types.is_large_binary(t):
                return name
    return None


def _shard_files_in_folder(uri: str, cfg: FineVitConfig) -> list[str]:
    """``<digits>.parquet`` files of an img2dataset output folder (top level), sorted."""
    store = Store(uri, cfg.storage)
    names = store.listdir()
    if MANIFEST in names or any(n.endswith(".tar") for n in names):
        return []  # a FineViT dataset, or img2dataset's webdataset form (registered, not this)
    stems = {n[: -len(".parquet")] for n in names if n.endswith(".parquet")}
    marked = {n[: -len(STATS_SUFFIX)] for n in names if n.endswith(STATS_SUFFIX)}
    return [store.uri(f"{s}.parquet") for s in sorted(stems) if s.isdigit() and s in marked]


@register
class Img2datasetParquetSource(Source):
    kind = "img2dataset-parquet"
    priority = 15  # before the generic Parquet and folder sources, after the webdataset form
    keeps_keys = True

    def __init__(self, uri: str, cfg: FineVitConfig) -> None:
        super().__init__(uri, cfg)
        self._files: list[str] | None = None

    @classmethod
    def _find(cls, uri: str, cfg: FineVitConfig) -> list[str]:
        if uri.startswith("synthetic://"):
            return []
        if uri.lower().split("?", 1)[0].endswith(".parquet"):
            return _list_files(uri, cfg)
        if not is_s3(uri) and not Store(uri).isdir():
            return []
        return _shard_files_in_folder(uri, cfg)

    @classmethod
    def matches(cls, uri: str, cfg: FineVitConfig) -> bool:
        try:
            files = cls._find(uri, cfg)
            return bool(files) and i2d_image_column(parquet_schema(files[0], cfg)) is not None
        except (SourceError, FileNotFoundError, NotADirectoryError, PermissionError):
            return False  # not readable as this format: another source (or the error) says why

    def files(self) -> list[str]:
        if self._files is None:
            self._files = self._find(self.uri, self.cfg)
        return self._files

    def plan(self, samples_per_shard: int) -> Iterator[Any]:
        files = self.files()
        if not files:
            raise SourceError(f"no img2dataset Parquet shard under {self.uri}")
        stems = [posixpath.basename(f)[: -len(".parquet")] for f in files]
        if all(s.isdigit() for s in stems):
            by_number = {int(s): f for s, f in zip(stems, files, strict=True)}
            for n in range(max(by_number) + 1):
                yield by_number.get(n)  # None: img2dataset lost that shard; an empty one keeps keys aligned
        else:
            yield from files

    def read(self, payload: str | None) -> Iterator[RawSample]:
        # rows with their keys and statuses are what this source is about: see build_shard
        raise SourceError("img2dataset Parquet shards are adopted whole (build_shard), not read per sample")

    def build_shard(
        self,
        payload: str | None,
        shard_index: int,
        staging_dir: str,
        cfg: IngestConfig,
        on_sample: Callable[[str, RawSample], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Write the shard's tar (image bytes as they are) and Parquet (img2dataset's rows kept)."""
        from img2dataset.writer import WebDatasetSampleWriter

        from engine.schemas import SHARD_SCHEMA

        table = self._read_table(payload) if payload is not None else None
        img_col = i2d_image_column(table.schema) if table is not None else "jpg"
        writer = WebDatasetSampleWriter(shard_index, staging_dir, True, SHARD_DIGITS, SHARD_SCHEMA, img_col)
        ours = set(SHARD_SCHEMA.names)
        rows: list[dict[str, Any]] = []
        try:
            for r in table.to_pylist() if table is not None else []:
                image = r.pop(img_col)
                extra = {k: v for k, v in r.items() if k not in ours and v is not None}
                row = {name: r.get(name) for name in SHARD_SCHEMA.names}
                row["source"] = self.kind
                row["meta"] = json.dumps({"file": payload, **extra}, sort_keys=True, default=str)
                if row["status"] == "success" and not image:
                    row["status"], row["error_message"] = "failed_to_download", "no image bytes in row"
                writer.write(image if row["status"] == "success" else None, row["key"], r.get("caption"), row)
                rows.append(row)
        finally:
            writer.close()
        return rows

    def _read_table(self, uri: str) -> pa.Table:
        fs, path = filesystem_for(uri, self.cfg.storage)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        if i2d_image_column(table.schema) is None:
            raise SourceError(f"{uri} is not in img2dataset's Parquet format (key, status, jpg/png/webp)")
        return table

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "files": len(self.files())}
