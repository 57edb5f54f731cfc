"""A URL list (``.txt``, ``.csv``, ``.tsv``, ``.jsonl``, ``.parquet``; local or ``s3://``; a glob for many).

The list is streamed (pyarrow's CSV/Parquet batch readers, line by line for txt/jsonl): the
driver holds one shard of rows at a time, never the whole list. Downloading is
img2dataset's downloader inside our Ray task (see :mod:`engine.download`).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from engine.config import FineVitConfig
from engine.sources.base import RawSample, Source, SourceError, chunked, register
from engine.store import Store, filesystem_for, is_s3

URL_LIST_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
URL_COLUMNS = ("url", "URL", "image_url", "img_url")
CAPTION_COLUMNS = ("caption", "TEXT", "text", "alt", "alt_text")


def _list_files(uri: str, cfg: FineVitConfig) -> list[str]:
    if any(c in uri for c in "*?["):
        fs, path = filesystem_for(uri, cfg.storage)
        prefix = "s3://" if is_s3(uri) else ""
        return [prefix + p for p in sorted(fs.glob(path))]
    return [uri]


def _pick(names: list[str], wanted: tuple[str, ...]) -> str | None:
    return next((w for w in wanted if w in names), None)


def first_line(err: BaseException | str) -> str:
    """An error's first line (pyarrow's messages run on with context)."""
    return str(err).strip().split("\n", 1)[0]


def parquet_schema(uri: str, cfg: FineVitConfig) -> pa.Schema:
    """A Parquet file's schema; :class:`SourceError` naming the file when it is not Parquet."""
    fs, path = filesystem_for(uri, cfg.storage)
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).schema_arrow
    except FileNotFoundError:
        raise SourceError(f"{uri} does not exist") from None
    except (pa.ArrowInvalid, OSError) as e:
        raise SourceError(f"{uri} is not a Parquet file: {first_line(e)}") from None


def parquet_url_column(uri: str, cfg: FineVitConfig) -> str | None:
    """The URL column of a Parquet file that holds no image bytes, else None."""
    schema = parquet_schema(uri, cfg)
    if any(
        pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_struct(t) for t in schema.types
    ):
        return None
    return _pick(schema.names, URL_COLUMNS)


def _text_lines(fs: Any, path: str, uri: str) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a UTF-8 text file; a line that is not UTF-8 is a SourceError."""
    with fs.open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(f"{uri}, line {n}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _csv_error(uri: str, fs: Any, path: str, row: Any, err: Exception) -> str:
    """One line naming the file, the line and what is wrong, for a CSV/TSV that pyarrow refused."""
    kind = "TSV" if path.lower().endswith(".tsv") else "CSV"
    if row is None:
        return f"{uri}: not a valid {kind} URL list: {first_line(err).removeprefix('CSV ')}"
    text = row.text or ""
    head = text.split("\n", 1)[0]
    where = uri
    try:  # the streaming reader does not number rows: find the line that starts the bad record
        for n, line in _text_lines(fs, path, uri):
            if line.rstrip("\r\n") == head:
                where = f"{uri}, line {n}"
                break
    except SourceError:
        pass
    if text.count('"') % 2:
        what = "a quote that is never closed"
    else:
        what = f"{row.actual_columns} columns where the header has {row.expected_columns}"
    return f"{where}: not a valid {kind} URL list: {what}: {head[:100]!r}"


@register
class UrlListSource(Source):
    kind = "urls"
    priority = 40
    downloads = True

    @classmethod
    def matches(cls, uri: str, cfg: FineVitConfig) -> bool:
        base = uri.split("?", 1)[0].lower()
        if not base.endswith(URL_LIST_SUFFIXES):
            return False
        if base.endswith(".parquet"):
            files = _list_files(uri, cfg)
            return bool(files) and parquet_url_column(files[0], cfg) is not None
        return True

    def _rows(self, uri: str) -> Iterator[tuple[str, str | None]]:
        fs, path = filesystem_for(uri, self.cfg.storage)
        low = path.lower()
        if low.endswith(".txt"):
            for _, line in _text_lines(fs, path, uri):
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line, None
            return
        if low.endswith(".jsonl"):
            for n, line in _text_lines(fs, path, uri):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise SourceError(f"{uri}, line {n}: not valid JSON: {e}") from None
                if not isinstance(obj, dict):
                    raise SourceError(f"{uri}, line {n}: not a JSON object")
                url = next((obj[c] for c in URL_COLUMNS if c in obj), None)
                if url is None:
                    raise SourceError(
                        f"{uri}, line {n}: no url field (expected one of {', '.join(URL_COLUMNS)})"
                    )
                yield (
                    str(url),
                    next((str(obj[c]) for c in CAPTION_COLUMNS if obj.get(c) is not None), None),
                )
            return
        if low.endswith(".parquet"):
            with fs.open(path, "rb") as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                url_col, cap_col = _pick(names, URL_COLUMNS), _pick(names, CAPTION_COLUMNS)
                if url_col is None:
                    raise SourceError(f"{uri}: no url column (expected one of {', '.join(URL_COLUMNS)})")
                cols = [url_col] + ([cap_col] if cap_col else [])
                for batch in pf.iter_batches(batch_size=8192, columns=cols):
                    yield from self._batch_rows(batch, url_col, cap_col)
            return
        delimiter = "\t" if low.endswith(".tsv") else ","
        invalid: list[Any] = []

        def on_invalid(row: Any) -> str:
            invalid.append(row)
            return "error"

        with fs.open(path, "rb") as f:
            try:
                reader = pacsv.open_csv(
                    io.BufferedReader(f) if not hasattr(f, "peek") else f,
                    parse_options=pacsv.ParseOptions(
                        delimiter=delimiter, newlines_in_values=True, invalid_row_handler=on_invalid
                    ),
                    convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
                    read_options=pacsv.ReadOptions(block_size=1 << 20),
                )
                names = reader.schema.names
                url_col, cap_col = _pick(names, URL_COLUMNS), _pick(names, CAPTION_COLUMNS)
                if url_col is None:
                    raise SourceError(
                        f"{uri}: no url column in header {names} (expected one of {', '.join(URL_COLUMNS)})"
                    )
                for col in (url_col, cap_col):
                    if col and not pa.types.is_string(reader.schema.field(col).type):
                        # pyarrow reads text that is not UTF-8 as binary: name the line instead
                        for _ in _text_lines(fs, path, uri):
                            pass
                for batch in reader:
                    yield from self._batch_rows(batch, url_col, cap_col)
            except pa.ArrowInvalid as e:
                raise SourceError(_csv_error(uri, fs, path, invalid[0] if invalid else None, e)) from None

    @staticmethod
    def _batch_rows(
        batch: pa.RecordBatch, url_col: str, cap_col: str | None
    ) -> Iterator[tuple[str, str | None]]:
        urls = batch.column(url_col).to_pylist()
        caps = batch.column(cap_col).to_pylist() if cap_col else [None] * len(urls)
        for u, c in zip(urls, caps, strict=True):
            yield ("" if u is None else str(u).strip()), (None if c is None else str(c))

    def plan(self, samples_per_shard: int) -> Iterator[Any]:
        files = _list_files(self.uri, self.cfg)
        if not files:
            raise SourceError(f"no URL list matches {self.uri}")
        for f in files:
            if not is_s3(f) and not Store(f).exists():
                raise SourceError(f"URL list not found: {f}")

        def rows() -> Iterator[tuple[str, str | None]]:
            for f in files:
                yield from self._rows(f)

        yield from chunked(rows(), samples_per_shard)

    def read(self, payload: list[tuple[str, str | None]]) -> Iterator[RawSample]:
        # URL shards are downloaded by img2dataset's Downloader, not read sample by sample.
        for url, caption in payload:
            yield RawSample(url=url, caption=caption)

    def fetch(self, url: str) -> bytes:
        from engine.download import fetch_url

        return fetch_url(url, self.cfg.ingest)
