"""``--sql``: run one query over the audit views and write its result as a table, CSV, JSON or Parquet."""

from __future__ import annotations

import csv
import datetime as _dt
import decimal
import io
import json
import sys
from typing import IO, Any

import duckdb

from engine.audit.views import Audit

FORMATS = ("table", "csv", "json", "parquet")
BATCH_ROWS = 65_536


class SqlError(ValueError):
    """The query failed; the message is DuckDB's, followed by the views one can query."""


def views_help(audit: Audit) -> str:
    lines = ["views:"]
    for name in audit.views():
        lines.append(f"  {name}")
    return "\n".join(lines)


def _relation(audit: Audit, sql: str) -> duckdb.DuckDBPyRelation | None:
    try:
        return audit.con.sql(sql)
    except duckdb.Error as e:
        raise SqlError(f"{str(e).strip()}\n{views_help(audit)}") from None


def _json_default(v: Any) -> Any:
    if isinstance(v, (_dt.date, _dt.datetime, _dt.time)):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return float(v)
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


def run_sql(
    audit: Audit, sql: str, fmt: str = "table", out: str | None = None, stdout: IO[str] | None = None
) -> int:
    """Run ``sql`` and write its result to ``out`` (a local file) or ``stdout``. Returns the row count.

    ``table`` is DuckDB's own box rendering (long results are elided in the middle);
    ``csv``, ``json`` (one JSON object per line) and ``parquet`` stream every row in
    batches, so a large export never sits in memory. ``parquet`` needs ``out``.
    Raises :class:`SqlError` with DuckDB's message and the list of views.
    """
    if fmt not in FORMATS:
        raise SqlError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "parquet" and not out:
        raise SqlError("--format parquet writes a file: give --out FILE.parquet")
    stdout = stdout or sys.stdout
    rel = _relation(audit, sql)
    if rel is None:  # a statement with no result (SET, CREATE VIEW ...)
        stdout.write("ok\n")
        return 0
    try:
        if fmt == "table":
            text = str(rel)
            n = -1
            if out:
                with open(out, "w", encoding="utf-8") as f:
                    f.write(text)
            else:
                stdout.write(text if text.endswith("\n") else text + "\n")
            return n
        reader = rel.to_arrow_reader(BATCH_ROWS)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            n = 0
            with pq.ParquetWriter(out, reader.schema, compression="zstd") as w:
                for batch in reader:
                    w.write_batch(batch)
                    n += batch.num_rows
            return n
        f: IO[str] = open(out, "w", encoding="utf-8", newline="") if out else stdout  # noqa: SIM115
        try:
            n = 0
            if fmt == "csv":
                w = csv.writer(f)
                w.writerow(reader.schema.names)
                for batch in reader:
                    cols = [c.to_pylist() for c in batch.columns]
                    w.writerows(zip(*cols, strict=True))
                    n += batch.num_rows
            else:
                for batch in reader:
                    buf = io.StringIO()
                    for row in batch.to_pylist():
                        buf.write(json.dumps(row, default=_json_default, ensure_ascii=False))
                        buf.write("\n")
                    f.write(buf.getvalue())
                    n += batch.num_rows
            return n
        finally:
            if out:
                f.close()
    except duckdb.Error as e:  # errors found while running (conversion, out-of-range, ...)
        raise SqlError(f"{str(e).strip()}\n{views_help(audit)}") from None
