"""Parquet files holding image bytes: a binary column, or the ``{bytes, path}`` struct that
Hugging Face ``datasets`` writes for its ``Image`` feature. Local or ``s3://``; a glob for many.

Only row counts are read to plan; a worker reads just the row groups its shard needs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import FineVitConfig
from engine.sources.base import RawSample, Source, SourceError, register, segment_plan
from engine.sources.urllist import CAPTION_COLUMNS, URL_COLUMNS, _list_files, first_line, parquet_schema
from engine.store import filesystem_for

IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_bytes", "bytes")


def image_column(schema: pa.Schema) -> tuple[str, bool] | None:
    """``(column, is_struct)`` of the image bytes, preferring well-known names."""

    def is_img(t: pa.DataType) -> tuple[bool, bool]:
        if pa.types.is_binary(t) or pa.types.is_large_binary(t):
            return True, False
        if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
            return True, True
        return False, False

    candidates = [n for n in IMAGE_COLUMNS if n in schema.names] + list(schema.names)
    for name in candidates:
        ok, struct = is_img(schema.field(name).type)
        if ok:
            return name, struct
    return None


@register
class ImageParquetSource(Source):
    kind = "parquet"
    priority = 30

    @classmethod
    def matches(cls, uri: str, cfg: FineVitConfig) -> bool:
        if not uri.lower().split("?", 1)[0].endswith(".parquet"):
            return False
        files = _list_files(uri, cfg)
        if not files:
            return False
        return image_column(parquet_schema(files[0], cfg)) is not None

    def plan(self, samples_per_shard: int) -> Iterator[Any]:
        files = _list_files(self.uri, self.cfg)
        if not files:
            raise SourceError(f"no Parquet file matches {self.uri}")

        def counts() -> Iterator[tuple[str, int]]:
            for uri in files:
                fs, path = filesystem_for(uri, self.cfg.storage)
                try:
                    with fs.open(path, "rb") as f:
                        yield uri, pq.ParquetFile(f).metadata.num_rows
                except pa.ArrowInvalid as e:
                    raise SourceError(f"{uri} is not a Parquet file: {first_line(e)}") from None

        yield from segment_plan(counts(), samples_per_shard)

    def read(self, payload: list[tuple[str, int, int]]) -> Iterator[RawSample]:
        for uri, start, count in payload:
            fs, path = filesystem_for(uri, self.cfg.storage)
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                schema = pf.schema_arrow
                found = image_column(schema)
                if found is None:
                    raise SourceError(f"{uri}: no image column")
                img_col, is_struct = found
                url_col = next((c for c in URL_COLUMNS if c in schema.names), None)
                cap_col = next((c for c in CAPTION_COLUMNS if c in schema.names), None)
                cols = [c for c in (img_col, url_col, cap_col) if c]
                # only the row groups overlapping [start, start + count)
                first_row = 0
                wanted: list[int] = []
                skip = 0
                for g in range(pf.metadata.num_row_groups):
                    n = pf.metadata.row_group(g).num_rows
                    if first_row + n > start and first_row < start + count:
                        if not wanted:
                            skip = start - first_row
                        wanted.append(g)
                    first_row += n
                table = pf.read_row_groups(wanted, columns=cols).slice(skip, count)
            images = table.column(img_col).to_pylist()
            urls = table.column(url_col).to_pylist() if url_col else [None] * table.num_rows
            caps = table.column(cap_col).to_pylist() if cap_col else [None] * table.num_rows
            for i, (img, url, cap) in enumerate(zip(images, urls, caps, strict=True)):
                row = start + i
                meta: dict[str, Any] = {"file": uri, "row": row}
                if is_struct and isinstance(img, dict):
                    if img.get("path"):
                        meta["path"] = img["path"]
                    img = img.get("bytes")
                sample_url = str(url) if url else f"{uri}#row={row}"
                if not img:
                    yield RawSample(url=sample_url, caption=cap, meta=meta, error="no image bytes in row")
                else:
                    yield RawSample(url=sample_url, data=bytes(img), caption=cap, meta=meta)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "files": json.dumps(_list_files(self.uri, self.cfg)[:5])}
