"""DuckDB audit: views over committed parts only, SQL, report, compare; local disk and S3 (moto), offline.

Fast tests build a small dataset by hand through the engine's own writers (shards with
tars, a caption layer with failed rows, a region layer, a filter layer with a score
column, and parts left uncommitted). Slow tests run ``finevit audit`` on a dataset made
by ``engine.ingest`` from ``synthetic://scenes``.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.audit import AuditError, open_audit
from engine.audit.compare import compare_layers
from engine.audit.page import SECTIONS
from engine.audit.query import SqlError, run_sql
from engine.audit.report import write_report
from engine.audit.stats import collect
from engine.layers import write_layer_shard
from engine.layout import Dataset, make_key
from engine.schemas import FILTER_BASE_SCHEMA, GLOBAL_CAPTION_SCHEMA, REGION_SCHEMA, SHARD_SCHEMA
from finevit import cli

SPS = 5  # samples per shard
FILTER_SCHEMA = FILTER_BASE_SCHEMA.append(pa.field("score", pa.float32()))


# ---------------------------------------------------------------------------- a dataset by hand


def _jpeg(i: int, w: int, h: int) -> bytes:
    im = Image.new("RGB", (w, h), (40 * i % 255, 120, 200))
    buf = io.BytesIO()
    im.save(buf, format="JPEG")
    return buf.getvalue()


def _commit_shard(
    ds: Dataset, shard: int, rows: list[dict], images: dict[str, bytes], commit: bool = True
) -> None:
    name = f"{shard:05d}"
    with tempfile.TemporaryDirectory() as tmp:
        tar_path = os.path.join(tmp, "s.tar")
        with tarfile.open(tar_path, "w") as tar:
            for key, data in images.items():
                for ext, payload in (("jpg", data), ("txt", b"alt")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        pq_path = os.path.join(tmp, "s.parquet")
        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), pq_path)
        ds.shards.put_file(tar_path, f"{name}.tar")
        ds.shards.put_file(pq_path, f"{name}.parquet")
    if commit:
        ok = sum(r["status"] == "success" for r in rows)
        ds.shards.write_json(f"{name}_stats.json", {"count": len(rows), "successes": ok, "shard": name})


def make_dataset(root: str, storage=None) -> Dataset:
    """3 shards of 5 samples: 00000 and 00001 committed, 00002 in progress (no _stats.json).

    Shard 00000 has one failed download; caption layer ``recap`` has one failed row; the
    ``regions`` layer has 2 boxes per ok image (one invalid box in total); ``quality``
    (filter) drops keys ending in 0 or 1. Layer part 00002 of ``recap`` is committed
    although its image shard is not: it must stay invisible too.
    """
    ds = Dataset(root, storage)
    ds.write_manifest({"name": "hand", "samples_per_shard": SPS, "shard_root": "shards", "sources": []})
    for layer, kind in (
        ("recap", "caption"),
        ("recap-v2", "caption"),
        ("regions", "regions"),
        ("quality", "filter"),
    ):
        ds.layer(layer).write_info({"kind": kind, "stage": "test", "model": f"m-{layer}"})
    with tempfile.TemporaryDirectory() as staging:
        for shard in range(3):
            rows, images, caps, caps2, regs, filt = [], {}, [], [], [], []
            for i in range(SPS):
                key = make_key(shard, i, SPS)
                failed = shard == 0 and i == 3
                w, h = (64, 32) if i % 2 else (48, 48)
                rows.append(
                    {
                        "url": f"file://{key}",
                        "caption": "a photo" if i < 2 else f"alt {key}",
                        "source": "hand" if shard < 1 else "other",
                        "meta": None,
                        "key": key,
                        "status": "failed_to_download" if failed else "success",
                        "error_message": "HTTP Error 404" if failed else None,
                        "width": None if failed else w,
                        "height": None if failed else h,
                        "original_width": None,
                        "original_height": None,
                        "sha256": None if failed else ("same" if i == 4 else f"sha{key}"),
                    }
                )
                if not failed:
                    images[key] = _jpeg(i, w, h)
                cap_failed = shard == 1 and i == 2
                caps.append(
                    {
                        "key": key,
                        "caption": None if cap_failed else f"a dense caption of sample {key} with words",
                        "model": "m",
                        "prompt_id": "p",
                        "n_tokens": None if cap_failed else 9,
                        "finish_reason": None if cap_failed else "stop",
                        "latency_ms": 100.0 + i,
                        "status": "failed" if cap_failed else "ok",
                        "error": "timeout after 60 s" if cap_failed else None,
                    }
                )
                caps2.append({**caps[-1], "caption": f"v2 {key}", "status": "ok", "error": None})
                regs.append(
                    {
                        "key": key,
                        "model": "m",
                        "prompt_id": "r",
                        "status": "ok",
                        "error": None,
                        "regions": [
                            {
                                "x0": 0.1,
                                "y0": 0.1,
                                "x1": 0.5,
                                "y1": 0.5,
                                "caption": "a blue square",
                                "label": "square",
                            },
                            {
                                "x0": 0.5,
                                "y0": 0.5,
                                "x1": 0.9 if key != "000001" else 1.2,
                                "y1": 0.9,
                                "caption": "a red circle",
                                "label": "circle",
                            },
                        ],
                    }
                )
                drop = key[-1] in "01"
                filt.append(
                    {
                        "key": key,
                        "keep": not drop,
                        "reasons": ["too_dark"] if drop else [],
                        "score": 0.1 if drop else 0.9,
                    }
                )
            committed = shard < 2
            _commit_shard(ds, shard, rows, images, commit=committed)
            name = f"{shard:05d}"
            write_layer_shard(ds.layer("recap"), name, caps, GLOBAL_CAPTION_SCHEMA, staging)
            if committed:
                write_layer_shard(ds.layer("recap-v2"), name, caps2, GLOBAL_CAPTION_SCHEMA, staging)
                write_layer_shard(ds.layer("quality"), name, filt, FILTER_SCHEMA, staging)
            if shard == 0:
                write_layer_shard(ds.layer("regions"), name, regs, REGION_SCHEMA, staging)
            elif shard == 1:  # an in-progress region part: the parquet is there, no _stats.json
                local = os.path.join(staging, "r.parquet")
                pq.write_table(pa.Table.from_pylist(regs, schema=REGION_SCHEMA), local)
                ds.layer("regions").store.put_file(local, f"{name}.parquet")
    return ds


@pytest.fixture(scope="module")
def hand_ds(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audit") / "ds"
    make_dataset(str(root))
    return root


def one(audit, sql):
    return audit.con.execute(sql).fetchall()[0]


# ---------------------------------------------------------------------------- views


def test_views_read_only_committed_parts(hand_ds):
    a = open_audit(str(hand_ds))
    assert a.shards == ["00000", "00001"]
    assert one(a, "SELECT count(*), count(DISTINCT shard) FROM samples") == (10, 2)
    # shard 00002 exists on disk (parquet + tar) but has no _stats.json: invisible everywhere
    assert one(a, "SELECT count(*) FROM samples WHERE key LIKE '00002%'") == (0,)
    # recap part 00002 is committed but its image shard is not: invisible as well
    assert one(a, "SELECT count(*), max(shard) FROM layer_recap") == (10, "00001")
    # regions part 00001 has no _stats.json: only shard 00000's boxes
    assert one(a, "SELECT count(*), count(DISTINCT key), min(shard), max(shard) FROM regions") == (
        10,
        5,
        "00000",
        "00000",
    )
    assert one(a, "SELECT count(*) FROM stats WHERE shard = '00002'") == (0,)
    assert sorted(a.views()) == sorted(
        [
            "samples",
            "layer_recap",
            "layer_recap_v2",
            "layer_regions",
            "layer_quality",
            "regions",
            "captions",
            "stats",
            "layers",
        ]
    )
    assert a.warnings == []


def test_views_are_lazy_and_offline(hand_ds):
    a = open_audit(str(hand_ds))
    assert one(
        a,
        "SELECT current_setting('autoinstall_known_extensions'), "
        "current_setting('autoload_known_extensions')",
    ) == (False, False)
    # views, not tables: nothing is loaded until queried; the file list is explicit, never a glob
    kinds = dict(a.con.execute("SELECT table_name, table_type FROM information_schema.tables").fetchall())
    assert kinds["samples"] == "VIEW" and kinds["layer_recap"] == "VIEW" and kinds["regions"] == "VIEW"
    assert "*" not in a.view_sql["samples"].split("read_parquet(")[1].split("]")[0]
    assert "00002.parquet" not in a.view_sql["samples"]


def test_regions_captions_stats_layers(hand_ds):
    a = open_audit(str(hand_ds))
    area, label = one(a, "SELECT area, label FROM regions WHERE key = '000000' AND idx = 1")
    assert area == pytest.approx(0.16) and label == "square"
    # captions: one row per (sample, caption layer), LEFT JOIN keeps the failed download
    assert one(a, "SELECT count(*), count(DISTINCT layer) FROM captions") == (20, 2)
    assert one(a, "SELECT status, error FROM captions WHERE layer = 'recap' AND key = '000012'") == (
        "failed",
        "timeout after 60 s",
    )
    assert one(a, "SELECT sum(count), sum(ok), sum(failed) FROM stats WHERE part = 'shards'") == (10, 9, 1)
    assert one(a, "SELECT sum(failed) FROM stats WHERE part = 'recap'") == (1,)
    rows = a.con.execute("SELECT name, kind, view, shards, schema_ok FROM layers ORDER BY name").fetchall()
    assert rows == [
        ("quality", "filter", "layer_quality", 2, True),
        ("recap", "caption", "layer_recap", 2, True),
        ("recap-v2", "caption", "layer_recap_v2", 2, True),
        ("regions", "regions", "layer_regions", 1, True),
    ]


def test_missing_root_and_no_committed_shard(tmp_path, capsys):
    with pytest.raises(AuditError, match=str(tmp_path / "nope")):
        open_audit(str(tmp_path / "nope"))
    ds = Dataset(str(tmp_path / "empty"))
    ds.write_manifest({"samples_per_shard": 5, "shard_root": "shards", "sources": []})
    with pytest.raises(AuditError, match=r"no committed shard under .*empty/shards"):
        open_audit(str(tmp_path / "empty"))
    for root in (tmp_path / "nope", tmp_path / "empty"):
        assert cli.main(["audit", str(root)]) == 2
        err = capsys.readouterr().err
        assert str(root) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_wrong_schema_layer_is_a_warning_and_the_report_is_still_written(tmp_path):
    root = tmp_path / "ds"
    ds = make_dataset(str(root))
    bad = ds.layer("bad-caps")
    bad.write_info({"kind": "caption"})
    with tempfile.TemporaryDirectory() as staging:
        for shard in ("00000", "00001"):
            schema = pa.schema([("key", pa.string()), ("caption", pa.int64()), ("status", pa.string())])
            write_layer_shard(bad, shard, [{"key": "x", "caption": 3, "status": "ok"}], schema, staging)
    a = open_audit(str(root))
    assert len(a.warnings) == 1 and "bad-caps" in a.warnings[0] and "caption is BIGINT" in a.warnings[0]
    assert one(a, "SELECT schema_ok FROM layers WHERE name = 'bad-caps'") == (False,)
    assert one(a, "SELECT count(DISTINCT layer) FROM captions") == (2,)  # left out of captions
    files = write_report(a, str(tmp_path / "rep"))
    html = Path(files.html).read_text()
    assert "bad-caps" in html and "Warnings" in html and 'id="samples"' in html
    assert [c.layer.name for c in files.data.captions] == ["recap", "recap-v2"]


# ---------------------------------------------------------------------------- --sql


def test_sql_formats(hand_ds, tmp_path, capsys):
    a = open_audit(str(hand_ds))
    sql = "SELECT key, status, width FROM samples ORDER BY key"
    assert run_sql(a, sql, "csv", str(tmp_path / "o.csv")) == 10
    lines = (tmp_path / "o.csv").read_text().splitlines()
    assert lines[0] == "key,status,width" and lines[4] == "000003,failed_to_download,"
    run_sql(a, sql + " LIMIT 2", "json")
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rows == [
        {"key": "000000", "status": "success", "width": 48},
        {"key": "000001", "status": "success", "width": 64},
    ]
    assert run_sql(a, "SELECT * FROM regions", "parquet", str(tmp_path / "r.parquet")) == 10
    assert pq.read_table(tmp_path / "r.parquet").num_rows == 10
    run_sql(a, "SELECT count(*) AS n FROM samples", "table")
    assert "│ 10 │" in capsys.readouterr().out.replace("  ", " ").replace("  ", " ")
    with pytest.raises(SqlError, match="needs|--out"):
        run_sql(a, sql, "parquet")


def test_bad_sql_prints_duckdb_message_and_views(hand_ds, capsys):
    assert cli.main(["audit", str(hand_ds), "--sql", "SELECT nope FROM samples"]) == 2
    err = capsys.readouterr().err
    assert "Binder Error" in err and "nope" in err and "Traceback" not in err
    for v in ("samples", "layer_recap", "regions", "captions", "stats", "layers"):
        assert f"  {v}\n" in err
    assert cli.main(["audit", str(hand_ds), "--sql", "SELEC 1"]) == 2
    assert "Parser Error" in capsys.readouterr().err


def test_cli_sql_and_list(hand_ds, capsys):
    assert (
        cli.main(
            [
                "audit",
                str(hand_ds),
                "--sql",
                "SELECT count(*) AS n FROM layer_quality WHERE keep",
                "--format",
                "csv",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines() == ["n", "6"]
    assert cli.main(["audit", str(hand_ds)]) == 0
    out = capsys.readouterr().out
    assert "layer_recap_v2" in out and "samples" in out


def test_python_shell_has_the_views(hand_ds, monkeypatch, capsys):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(
        "sys.stdin", io.StringIO("print('ROWS', con.execute('SELECT count(*) FROM samples').fetchall())\n")
    )
    assert cli.main(["audit", str(hand_ds), "--shell"]) == 0
    assert "ROWS [(10,)]" in capsys.readouterr().out


# ---------------------------------------------------------------------------- report, compare


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.imgs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a["src"])

    def handle_data(self, data):
        self.text.append(data)


def check_report(out: Path, n_thumbs: int) -> _Page:
    page = _Page()
    page.feed((out / "report.html").read_text())
    assert {sid for sid, _ in SECTIONS} <= page.ids
    assert len([s for s in page.imgs if s.startswith("thumbs/")]) == n_thumbs
    for src in page.imgs:
        data = (out / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 100, src
        w, h = struct.unpack(">II", data[16:24])
        if src.startswith("thumbs/"):
            assert max(w, h) <= 160
    md = (out / "report.md").read_text()
    for _, title in SECTIONS:
        assert f"## {title}" in md
    for src in page.imgs:
        assert f"({src})" in md
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    assert total < 2_000_000
    return page


def test_report_sections_numbers_and_images(hand_ds, tmp_path):
    a = open_audit(str(hand_ds))
    data = collect(a)
    assert (data.samples, data.success) == (10, 9)
    assert data.reasons == [("failed_to_download", "HTTP Error 404", 1)]
    assert data.width.values == [48.0, 64.0] and sum(data.width.counts) == 9
    recap = next(c for c in data.captions if c.layer.name == "recap")
    assert (recap.rows, recap.ok, recap.failed) == (10, 9, 1)
    assert recap.errors == [("timeout after 60 s", 1)] and recap.words.values == [8.0]
    assert recap.latency["p50"] == pytest.approx(102.0)
    reg = data.regions[0]
    assert (reg.rows, reg.boxes, reg.invalid) == (5, 10, 1) and reg.per_image.values == [2.0]
    assert {lb for lb, *_ in reg.labels} == {"square", "circle"}
    f = data.filters[0]
    assert (f.rows, f.kept, f.reasons) == (10, 6, [("too_dark", 4)])
    assert f.scores["score"]["kept"][1] == pytest.approx(0.9)
    assert (data.sha_dups.groups, data.sha_dups.rows) == (1, 2)  # "same" in both shards
    assert (data.alt_dups.groups, data.alt_dups.rows) == (1, 4)  # "a photo"

    files = write_report(a, str(tmp_path / "rep"), n_samples=20)
    page = check_report(tmp_path / "rep", n_thumbs=9)  # 9 successful samples
    text = " ".join(page.text)
    assert "HTTP Error 404" in text and "timeout after 60 s" in text and "too_dark" in text
    assert "1 boxes (10.0 %) are outside [0,1]" in text
    assert len(files.thumbs) == 9


def test_compare_layers(hand_ds):
    a = open_audit(str(hand_ds))
    c = compare_layers(a, "recap", "recap-v2", n_pairs=3)
    assert (c.both, c.only_a, c.only_b, c.both_ok, c.identical) == (10, 0, 0, 9, 0)
    assert c.a.failed == 1 and c.b.failed == 0 and c.b.words["p50"] == 2
    assert len(c.pairs) == 3 and all(p[2] == f"v2 {p[0]}" for p in c.pairs)
    with pytest.raises(AuditError, match="regions layer"):
        compare_layers(a, "recap", "regions")
    with pytest.raises(AuditError, match="caption layers: recap, recap-v2"):
        compare_layers(a, "recap", "nope")


# ---------------------------------------------------------------------------- S3 (moto on 127.0.0.1)


def _s3_args(s3) -> list[str]:
    return [
        "--s3-endpoint-url",
        s3.endpoint,
        "--set",
        "storage.access_key_id=testing",
        "--set",
        "storage.secret_access_key=testing",
        "--set",
        "storage.region=us-east-1",
    ]


def test_s3_views_report_offline(s3, tmp_path, capsys):
    root = s3.uri("hand")
    make_dataset(root, s3.storage)
    a = open_audit(root, s3.storage)
    assert a.shards == ["00000", "00001"]
    assert one(a, "SELECT count(*) FROM samples") == (10,)
    assert one(a, "SELECT count(*) FROM regions") == (10,)
    files = write_report(a, str(tmp_path / "rep"))
    check_report(tmp_path / "rep", n_thumbs=9)
    assert files.data.samples == 10
    assert (
        cli.main(
            ["audit", root, *_s3_args(s3), "--sql", "SELECT count(*) AS n FROM captions", "--format", "csv"]
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines() == ["n", "20"]


# ---------------------------------------------------------------------------- end to end on an ingested dataset


@pytest.fixture(scope="module")
def ingested(ray_local, tmp_path_factory) -> Path:
    from engine.config import FineVitConfig
    from engine.ingest import ingest

    out = tmp_path_factory.mktemp("ingested") / "ds"
    cfg = FineVitConfig()
    cfg.ingest.samples_per_shard = 16
    ingest("synthetic://scenes?n=40&seed=0&size=96", str(out), cfg, progress=False)
    ds = Dataset(str(out))
    # a regenerated caption layer beside gt-global, as a recaption stage would write it
    with tempfile.TemporaryDirectory() as staging:
        ds.layer("recap-v2").write_info({"kind": "caption", "stage": "recaption", "model": "test"})
        for shard in ds.committed_shards():
            t = pq.read_table(ds.layer("gt-global").store.path(f"{shard}.parquet"))
            rows = t.to_pylist()
            for i, r in enumerate(rows):
                r["caption"] = r["caption"].split(".")[0] + "."
                if i == 0:
                    r.update(caption=None, status="failed", error="HTTP 503")
            write_layer_shard(ds.layer("recap-v2"), shard, rows, GLOBAL_CAPTION_SCHEMA, staging)
    return out


@pytest.mark.slow
def test_e2e_ingested_local(ingested, tmp_path, capsys):
    root = str(ingested)
    assert cli.main(["audit", root, "--sql", "SELECT count(*) FROM samples", "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "40"
    assert cli.main(["audit", root, "--report", str(tmp_path / "rep")]) == 0
    page = check_report(tmp_path / "rep", n_thumbs=20)
    text = " ".join(page.text)
    assert "caption layer gt-global" in text and "region layer gt-regions" in text and "HTTP 503" in text
    assert cli.main(["audit", root, "--compare", "gt-global", "recap-v2", "--pairs", "2"]) == 0
    out = capsys.readouterr().out
    assert "gt-global" in out and "recap-v2" in out and "keys in both: 40" in out


@pytest.mark.slow
def test_e2e_ingested_s3(ingested, s3, tmp_path, capsys):
    root = s3.upload_dir(ingested, "ingested")
    args = _s3_args(s3)
    assert (
        cli.main(
            [
                "audit",
                root,
                *args,
                "--sql",
                "SELECT count(*) AS n FROM regions WHERE layer = 'gt-regions'",
                "--format",
                "json",
            ]
        )
        == 0
    )
    n_boxes = json.loads(capsys.readouterr().out)["n"]
    assert n_boxes >= 40
    assert cli.main(["audit", root, *args, "--report", str(tmp_path / "rep"), "--samples", "6"]) == 0
    check_report(tmp_path / "rep", n_thumbs=6)
    assert cli.main(["audit", root, *args, "--compare", "gt-global", "recap-v2"]) == 0
    assert "keys in both: 40" in capsys.readouterr().out
