"""``--sql``: run queries over the audit views and write its result as a table, CSV, JSON or Parquet."""

from __future__ import annotations

import csv
import datetime as _dt
import decimal
import io
import json
import re
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Statement:
    """One statement of the user's ``--sql`` text, and the line of that text it starts on (0-based)."""

    sql: str
    first_line: int
    returns_rows: bool  # a query (SELECT, PRAGMA, EXPLAIN, CALL) rather than SET / CREATE / INSERT ...


def split_statements(audit: Audit, sql: str) -> list[Statement]:
    """The statements of ``sql``, in order; an empty text (blanks, ``;``, comments) is an error."""
    try:
        parsed = audit.con.extract_statements(sql)
    except duckdb.Error as e:  # a syntax error: DuckDB's position is already in the user's text
        raise SqlError(f"{str(e).strip()}\n{views_help(audit)}") from None
    if not parsed:
        raise SqlError(
            '--sql is empty: give a query, e.g. --sql "SELECT status, count(*) FROM samples GROUP BY 1"'
        )
    out, pos = [], 0
    for st in parsed:
        at = sql.find(st.query, pos)
        at = pos if at < 0 else at
        out.append(Statement(st.query, sql.count("\n", 0, at), st.type in _QUERY_TYPES))
        pos = at + len(st.query)
    return out


_QUERY_TYPES = frozenset(
    {
        duckdb.StatementType.SELECT,
        duckdb.StatementType.PRAGMA,
        duckdb.StatementType.EXPLAIN,
        duckdb.StatementType.CALL,
    }
)
_LINE_RE = re.compile(r"^LINE (\d+): (.*)$", re.MULTILINE)


def in_user_sql(message: str, stmt: Statement) -> str:
    """Rewrite DuckDB's ``LINE n:`` so that n counts lines of the user's ``--sql`` text.

    DuckDB numbers lines of the text it ran, which is not always the user's: rendering a
    table wraps the query (two lines more), and a statement after the first starts further
    down. The line shown is looked up in the statement, then offset to where it starts.
    """
    m = _LINE_RE.search(message)
    if m is None:
        return message
    shown = m.group(2).strip().removeprefix("...").removesuffix("...").strip()
    lines = stmt.sql.split("\n")
    n = int(m.group(1))
    if not (1 <= n <= len(lines) and shown in lines[n - 1]):
        n = next((i + 1 for i, line in enumerate(lines) if shown and shown in line), 0)
    if n == 0:
        return message
    return message[: m.start(1)] + str(stmt.first_line + n) + message[m.end(1) :]


def _relation(audit: Audit, stmt: Statement) -> duckdb.DuckDBPyRelation | None:
    """The statement's result relation; statements that return no rows are run here, eagerly."""
    try:
        if not stmt.returns_rows:
            audit.con.execute(stmt.sql)
            return None
        return audit.con.sql(stmt.sql)
    except duckdb.Error as e:
        raise SqlError(f"{in_user_sql(str(e).strip(), stmt)}\n{views_help(audit)}") from None


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

    ``sql`` may hold several statements: they run in order and each result is printed, one
    after the other (a blank line between); statements with no result (``SET``, ``CREATE
    VIEW``) print ``ok``. ``--out`` writes one result, so with ``out`` only one statement may
    return rows (others may prepare it: ``CREATE TEMP VIEW v AS ...; SELECT ... FROM v``);
    that is checked before anything runs.
    An empty ``sql`` is an error.

    ``table`` is DuckDB's own box rendering (long results are elided in the middle);
    ``csv``, ``json`` (one JSON object per line) and ``parquet`` stream every row in
    batches, so a large export never sits in memory. ``parquet`` needs ``out``.
    Raises :class:`SqlError` with DuckDB's message (positions in the user's text) and the
    list of views.
    """
    if fmt not in FORMATS:
        raise SqlError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    if fmt == "parquet" and not out:
        raise SqlError("--format parquet writes a file: give --out FILE.parquet")
    stdout = stdout or sys.stdout
    statements = split_statements(audit, sql)
    results = [i for i, st in enumerate(statements) if st.returns_rows]
    if out and len(results) > 1:
        raise SqlError(
            f"--out writes one result, but {len(results)} statements return rows "
            f"(statements {', '.join(str(i + 1) for i in results)}): give one query, or leave out --out"
        )
    n = 0
    for i, stmt in enumerate(statements):
        if i > 0 and not out:
            stdout.write("\n")
        rel = _relation(audit, stmt)
        if rel is None:  # a statement with no result (SET, CREATE VIEW ...)
            stdout.write("ok\n")
            continue
        n = _write_result(audit, stmt, rel, fmt, out, stdout)
    return n


def _write_result(
    audit: Audit, stmt: Statement, rel: duckdb.DuckDBPyRelation, fmt: str, out: str | None, stdout: IO[str]
) -> int:
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
        raise SqlError(f"{in_user_sql(str(e).strip(), stmt)}\n{views_help(audit)}") from None
