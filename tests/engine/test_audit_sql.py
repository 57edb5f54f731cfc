"""``finevit audit --sql`` edge cases: empty text, several statements, error positions.

Several statements run in order and each result is printed (a blank line between); with
``--out`` only one of them may return rows, checked before anything runs. DuckDB's
``LINE n`` always counts lines of the text the user gave.
"""

from __future__ import annotations

import io
import re

import pytest

from engine.audit import open_audit
from engine.audit.query import SqlError, run_sql
from finevit import cli
from tests.engine.test_audit import make_dataset


@pytest.fixture
def audit(tmp_path):
    make_dataset(str(tmp_path / "ds"))
    a = open_audit(str(tmp_path / "ds"))
    yield a
    a.close()


@pytest.mark.parametrize("sql", ["", "   ", ";", " ; ;", "-- only a comment\n"])
def test_empty_sql_is_a_usage_error(sql, tmp_path, capsys):
    make_dataset(str(tmp_path / "ds"))
    assert cli.main(["audit", str(tmp_path / "ds"), "--sql", sql]) == 2
    captured = capsys.readouterr()
    assert captured.out == "", "nothing is printed as a result"
    lines = captured.err.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith("finevit: error: --sql is empty"), captured.err


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_every_statement_runs_and_each_result_is_printed(audit, fmt):
    buf = io.StringIO()
    sql = "SELECT 'first' AS a; CREATE TEMP VIEW v AS SELECT 'second' AS b;\nSELECT * FROM v"
    run_sql(audit, sql, fmt, stdout=buf)
    text = buf.getvalue()
    assert "first" in text and "second" in text, text
    assert text.index("first") < text.index("ok") < text.index("second"), text


def test_out_takes_one_result_checked_before_running(audit, tmp_path):
    out = tmp_path / "r.csv"
    n = run_sql(audit, "CREATE TEMP VIEW w AS SELECT 7 AS x; SELECT * FROM w", "csv", str(out), io.StringIO())
    assert n == 1 and out.read_text().split() == ["x", "7"]
    other = tmp_path / "two.csv"
    with pytest.raises(SqlError, match="--out writes one result, but 2 statements"):
        run_sql(audit, "CREATE TEMP VIEW z AS SELECT 1 AS y; SELECT 1; SELECT 2", "csv", str(other))
    assert not other.exists()
    with pytest.raises(SqlError, match="does not exist"):  # the CREATE before them did not run
        run_sql(audit, "SELECT * FROM z", "csv", stdout=io.StringIO())


def _line(err: SqlError) -> tuple[int, str]:
    m = re.search(r"^LINE (\d+): (.*)$", str(err), re.MULTILINE)
    assert m, str(err)
    return int(m.group(1)), m.group(2)


@pytest.mark.parametrize("fmt", ["table", "csv"])
def test_error_positions_are_in_the_users_sql(audit, fmt):
    # a conversion error found while running: one line
    with pytest.raises(SqlError) as e:
        run_sql(audit, "SELECT CAST(caption AS INTEGER) FROM samples", fmt, stdout=io.StringIO())
    assert _line(e.value)[0] == 1
    # the same error in the second statement, on the third line of the text
    sql = "SELECT 1 AS one;\nSELECT key,\n  CAST(caption AS INTEGER) AS n\nFROM samples"
    with pytest.raises(SqlError) as e:
        run_sql(audit, sql, fmt, stdout=io.StringIO())
    n, shown = _line(e.value)
    assert n == 3 and "CAST(caption AS INTEGER)" in shown
    # a syntax error in a later statement
    with pytest.raises(SqlError) as e:
        run_sql(audit, "SELECT 1;\nSELEC 2", fmt, stdout=io.StringIO())
    assert _line(e.value)[0] == 2
