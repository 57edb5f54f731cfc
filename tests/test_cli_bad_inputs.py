"""Every bad input to ``finevit ingest``, through the CLI: one line naming the file (and the line
where known), exit 2, no traceback, and no dataset left half-made.

The cases run through ``main()`` on the session's Ray cluster (several reach the shard plan,
which runs after Ray starts); two of them also run as a real ``python -m finevit`` process, so
a traceback printed by anything (Ray included) would show.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from finevit.cli import main

pytestmark = pytest.mark.usefixtures("ray_local")

Setup = Callable[[Path], tuple[str, str]]  # tmp dir -> (SOURCE, OUTPUT)


def _file(name: str, data: bytes | str, out: str = "out") -> Setup:
    def setup(tmp: Path) -> tuple[str, str]:
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(p if "*" not in name else tmp / name), str(tmp / out)

    return setup


def _missing(name: str) -> Setup:
    return lambda tmp: (str(tmp / name), str(tmp / "out"))


def _output_is_file(below: bool) -> Setup:
    def setup(tmp: Path) -> tuple[str, str]:
        (tmp / "taken").write_text("a file, not a folder")
        return "synthetic://scenes?n=2&size=32", str(tmp / "taken" / "ds" if below else tmp / "taken")

    return setup


def _empty_folder(tmp: Path) -> tuple[str, str]:
    (tmp / "empty").mkdir()
    return str(tmp / "empty"), str(tmp / "out")


def _parquet_without_url(tmp: Path) -> tuple[str, str]:
    pq.write_table(pa.table({"link": ["http://x/1.jpg"]}), tmp / "urls.parquet")
    return str(tmp / "urls.parquet"), str(tmp / "out")


URLS = "url,caption\nhttp://example.com/1.jpg,one\n"
CASES: dict[str, tuple[Setup, list[str]]] = {
    "csv-extra-columns": (
        _file("list.csv", URLS + "http://example.com/2.jpg,two,extra\nhttp://example.com/3.jpg,three\n"),
        ["list.csv, line 3", "3 columns where the header has 2"],
    ),
    "csv-unterminated-quote": (
        _file("list.csv", URLS + '"http://example.com/2.jpg,two\nhttp://example.com/3.jpg,three\n'),
        ["list.csv, line 3", "quote that is never closed"],
    ),
    "tsv-extra-columns": (
        _file("list.tsv", "url\tcaption\nhttp://example.com/1.jpg\ta\tb\n"),
        ["list.tsv, line 2", "not a valid TSV URL list"],
    ),
    "csv-not-utf8": (
        _file("list.csv", b"url,caption\nhttp://e.com/\xff\xfe.jpg,x\n"),
        ["list.csv, line 2", "not UTF-8"],
    ),
    "csv-no-url-column": (_file("list.csv", "link,caption\nhttp://e.com/1.jpg,x\n"), ["list.csv", "no url"]),
    "txt-not-utf8": (_file("list.txt", b"http://e.com/1.jpg\nhttp://e.com/\xff.jpg\n"), ["list.txt, line 2"]),
    "jsonl-not-json": (
        _file("list.jsonl", '{"url": "http://e.com/1.jpg"}\n{"url": \n'),
        ["list.jsonl, line 2"],
    ),
    "jsonl-not-object": (_file("list.jsonl", '["http://e.com/1.jpg"]\n'), ["list.jsonl, line 1", "object"]),
    "parquet-not-parquet": (
        _file("urls.parquet", "url\nhttp://e.com/1.jpg\n"),
        ["urls.parquet", "not a Parquet"],
    ),
    "parquet-glob-not-parquet": (_file("p/a.parquet", "junk"), ["a.parquet", "not a Parquet file"]),
    "parquet-without-url-or-image": (_parquet_without_url, ["urls.parquet"]),
    "tar-not-tar": (_file("a.tar", "not a tar"), ["a.tar", "not a readable tar"]),
    "empty-folder": (_empty_folder, ["empty", "no image files"]),
    "missing-folder": (_missing("no/such/folder"), ["no/such/folder does not exist"]),
    "missing-csv": (_missing("nope.csv"), ["nope.csv does not exist"]),
    "missing-parquet": (_missing("nope.parquet"), ["nope.parquet does not exist"]),
    "missing-tar": (_missing("nope.tar"), ["nope.tar does not exist"]),
    "glob-matches-nothing": (_missing("none-*.parquet"), ["no file matches", "none-*.parquet"]),
    "output-is-a-file": (_output_is_file(below=False), ["taken is a file"]),
    "output-below-a-file": (_output_is_file(below=True), ["which is a file"]),
}
# the glob case wants the glob, not the file it made
CASES["parquet-glob-not-parquet"] = (
    lambda tmp: (_file("p/a.parquet", "junk")(tmp)[0].replace("a.parquet", "*.parquet"), str(tmp / "out")),
    ["a.parquet", "not a Parquet file"],
)


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("finevit: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_behind(case, tmp_path, capsys):
    setup, needles = CASES[case]
    source, output = setup(tmp_path)
    code = main(["ingest", source, output, "--no-progress"])
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2, line
    for needle in needles:
        assert needle in line, (needle, line)
    if Path(output).is_dir():
        assert not (Path(output) / "dataset.json").exists(), "a refused first source leaves no dataset"


@pytest.mark.parametrize("case", ["csv-extra-columns", "output-is-a-file", "parquet-not-parquet"])
def test_bad_input_in_a_real_process(case, tmp_path):
    setup, needles = CASES[case]
    source, output = setup(tmp_path)
    res = subprocess.run(
        [sys.executable, "-m", "finevit", "ingest", source, output, "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = _one_error_line(res.stderr + res.stdout)
    assert res.returncode == 2, res.stderr
    assert all(n in line for n in needles), line
