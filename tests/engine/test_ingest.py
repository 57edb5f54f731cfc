"""End to end: every source form through the real Ray pipeline, to a local folder and to S3."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.config import FineVitConfig, StorageConfig, load_config
from engine.ingest import ingest
from engine.layout import Dataset, LayoutError

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

TESTDATA = Path(__file__).resolve().parents[3] / "shared" / "testdata" / "webdataset"


def cfg_for(storage: StorageConfig | None = None, **ingest_overrides) -> FineVitConfig:
    overrides = [f"ingest.{k}={v}" for k, v in ingest_overrides.items()]
    cfg = load_config(None, overrides)
    if storage is not None:
        cfg = cfg.model_copy(update={"storage": storage})
    return cfg


def jpeg(w: int, h: int, seed: int = 0) -> bytes:
    img = Image.effect_noise((w, h), 40 + seed).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def rows_of(ds: Dataset) -> list[dict]:
    out = []
    for shard in ds.committed_shards():
        with ds.shards.open(f"{shard}.parquet") as f:
            out.extend(pq.read_table(f).to_pylist())
    return out


def tar_keys(ds: Dataset) -> list[str]:
    keys = []
    for shard in ds.committed_shards():
        with ds.shards.open(f"{shard}.tar") as f, tarfile.open(fileobj=f) as t:
            keys.extend(m.name.split(".")[0] for m in t if m.name.endswith(".jpg"))
    return keys


def assert_exactly_once(ds: Dataset, n: int) -> list[dict]:
    rows = rows_of(ds)
    keys = [r["key"] for r in rows]
    assert len(rows) == n
    assert len(set(keys)) == n, "every input exactly once"
    ok = {r["key"] for r in rows if r["status"] == "success"}
    assert sorted(tar_keys(ds)) == sorted(ok), "the tar holds exactly the successful samples"
    for r in rows:
        assert r["status"] == "success" or r["error_message"], f"failed row without a reason: {r}"
    return rows


# ---------------------------------------------------------------- 6. synthetic (+ layers), local and S3


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_synthetic_scenes_with_ground_truth_layers(where, tmp_path, request):
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        out, storage = s3.uri("ds"), s3.storage
    else:
        out, storage = str(tmp_path / "ds"), None
    report = ingest(
        "synthetic://scenes?n=25&seed=3&size=128", out, cfg_for(storage, samples_per_shard=10), progress=False
    )
    assert (report.shards_written, report.count, report.failed) == (3, 25, 0)
    ds = Dataset(out, storage)
    assert ds.committed_shards() == ["00000", "00001", "00002"]
    rows = assert_exactly_once(ds, 25)
    assert all(r["source"] == "synthetic" and r["caption"] for r in rows)
    assert ds.manifest["sources"][0]["num_shards"] == 3
    assert sorted(ds.layers()) == ["gt-global", "gt-regions"]
    for layer in ("gt-global", "gt-regions"):
        lay = ds.layer(layer)
        assert lay.committed() == ds.committed_shards()
        keys = []
        for shard in lay.committed():
            with lay.store.open(lay.parquet(shard)) as f:
                t = pq.read_table(f)
            keys += t.column("key").to_pylist()
            assert set(t.column("status").to_pylist()) == {"ok"}
        assert sorted(keys) == sorted(r["key"] for r in rows)
        assert lay.info()["kind"] in ("caption", "regions")
    # deterministic: the same seed gives the same bytes, and a rerun is a no-op
    again = ingest(
        "synthetic://scenes?n=25&seed=3&size=128", out, cfg_for(storage, samples_per_shard=10), progress=False
    )
    assert (again.shards_written, again.shards_skipped) == (0, 3)


# ---------------------------------------------------------------- 1. folder, with every bad input


def test_folder_with_bad_inputs(tmp_path):
    from tests.engine.bad_inputs import write_bad_inputs

    src = tmp_path / "imgs"
    (src / "sub dir").mkdir(parents=True)
    expected = write_bad_inputs(src)
    # a folder source takes files by image extension: random bytes must look like an image to be an input
    (src / "random.bin").rename(src / "random bytes.jpg")
    expected["random bytes.jpg"] = expected.pop("random.bin")
    (src / "sub dir" / "nested.jpg").write_bytes(jpeg(64, 48))
    (src / "sub dir" / "nested.txt").write_text("a caption from a sidecar file")
    (src / "notes.pdf").write_bytes(b"%PDF-1.4 not an input")
    out = tmp_path / "out"
    report = ingest(str(src), str(out), cfg_for(samples_per_shard=8), progress=False)
    n = len(expected) + 1
    rows = assert_exactly_once(Dataset(str(out)), n)
    by_name = {Path(r["url"]).name: r for r in rows}
    assert by_name["nested.jpg"]["caption"] == "a caption from a sidecar file"
    assert "notes.pdf" not in by_name
    for name, reason in expected.items():
        r = by_name[name]
        if reason is None:
            assert r["status"] == "success", (name, r["error_message"])
            assert r["width"] >= 1 and r["height"] >= 1
        else:
            assert r["status"] == "failed_to_resize", name
            assert r["error_message"].startswith(reason), (name, r["error_message"])
    assert report.count == n and report.failed == sum(v is not None for v in expected.values())


def test_keys_do_not_depend_on_worker_count(tmp_path):
    src = tmp_path / "imgs"
    src.mkdir()
    for i in range(23):
        (src / f"{i:03d}.jpg").write_bytes(jpeg(40 + i, 30, seed=i))
    a = {r["key"]: r["sha256"] for r in rows_of(_ingest(src, tmp_path / "a", workers=1))}
    b = {r["key"]: r["sha256"] for r in rows_of(_ingest(src, tmp_path / "b", workers=2))}
    assert a == b and len(a) == 23


def _ingest(src: Path, out: Path, **kw) -> Dataset:
    ingest(str(src), str(out), cfg_for(samples_per_shard=5, **kw), progress=False)
    return Dataset(str(out))


# ---------------------------------------------------------------- 2. URL lists over HTTP (img2dataset's downloader)


def _serve(http_images, n: int, prefix: str) -> list[str]:
    urls = []
    for i in range(n):
        http_images.files[f"{prefix}/{i}.jpg"] = jpeg(80, 60, seed=i)
        urls.append(http_images.url(f"{prefix}/{i}.jpg"))
    return urls


@pytest.mark.parametrize("fmt", ["txt", "csv", "tsv", "jsonl", "parquet"])
def test_url_list_formats(fmt, tmp_path, http_images):
    urls = _serve(http_images, 7, f"fmt-{fmt}")
    urls.append(http_images.url("status/404"))
    caps = [f"caption {i}" for i in range(len(urls))]
    lst = tmp_path / f"list.{fmt}"
    if fmt == "txt":
        lst.write_text("\n".join(urls) + "\n")
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        lst.write_text(
            f"url{sep}caption\n" + "".join(f"{u}{sep}{c}\n" for u, c in zip(urls, caps, strict=True))
        )
    elif fmt == "jsonl":
        lst.write_text(
            "".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in zip(urls, caps, strict=True))
        )
    else:
        pq.write_table(pa.table({"url": urls, "caption": caps}), lst)
    out = tmp_path / "out"
    cfg = cfg_for(samples_per_shard=3, allow_private_network="true", timeout=5)
    report = ingest(str(lst), str(out), cfg, progress=False)
    rows = assert_exactly_once(Dataset(str(out)), 8)
    assert report.successes == 7
    by_url = {r["url"]: r for r in rows}
    bad = by_url[http_images.url("status/404")]
    assert bad["status"] == "failed_to_download" and "404" in bad["error_message"]
    if fmt != "txt":
        assert by_url[urls[2]]["caption"] == "caption 2"
    # keys follow the list order, whatever the download order
    assert [by_url[u]["key"] for u in urls] == sorted(by_url[u]["key"] for u in urls)


def test_private_addresses_are_refused_by_default(tmp_path, http_images):
    local = tmp_path / "local.jpg"
    local.write_bytes(jpeg(40, 30, seed=7))
    urls = _serve(http_images, 2, "private") + [
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost:9/x.jpg",
        "http://0.0.0.0:9/x.jpg",
        "http://[::ffff:127.0.0.1]:9/x.jpg",
        http_images.url("redirect/http://169.254.169.254/latest/meta-data/"),
    ]
    schemes = {
        local.as_uri(): "file",
        "ftp://127.0.0.1:1/x.jpg": "ftp",
        "gopher://127.0.0.1:1/x": "gopher",
        "data:image/jpeg;base64,/9j/4AAQ": "data",
    }
    lst = tmp_path / "l.txt"
    lst.write_text("\n".join(urls + list(schemes)))
    out = tmp_path / "out"
    ingest(str(lst), str(out), cfg_for(samples_per_shard=20, timeout=2), progress=False)
    rows = {r["url"]: r for r in rows_of(Dataset(str(out)))}
    assert len(rows) == len(urls) + len(schemes)
    for url in urls:
        r = rows[url]
        assert r["status"] == "failed_to_download"
        assert r["error_message"].startswith("blocked: private address"), r["error_message"]
    for url, scheme in schemes.items():
        assert rows[url]["status"] == "failed_to_download"
        assert rows[url]["error_message"] == f"blocked: scheme {scheme}", rows[url]
    assert http_images.hits["private/0.jpg"] == 0, "no request reached the private server"
    assert not any(p.name.endswith(".jpg") for p in _tar_members(out / "shards" / "00000.tar"))
    # with private addresses allowed, other schemes are still refused, and redirects to them too
    urls = [local.as_uri(), http_images.url(f"redirect/{local.as_uri()}"), http_images.url("private/0.jpg")]
    lst.write_text("\n".join(urls))
    out = tmp_path / "out2"
    ingest(str(lst), str(out), cfg_for(samples_per_shard=20, allow_private_network="true"), progress=False)
    rows = {r["url"]: r for r in rows_of(Dataset(str(out)))}
    assert rows[urls[0]]["error_message"] == "blocked: scheme file"
    assert rows[urls[1]]["error_message"].startswith("blocked: scheme file (redirect to")
    assert rows[urls[2]]["status"] == "success"


def _tar_members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as t:
        return t.getmembers()


def test_retry_failed_rewrites_only_affected_shards(tmp_path, http_images):
    good = _serve(http_images, 4, "retry")
    flaky = http_images.url("flaky/1/retry/0.jpg")  # 503 once, then the image
    urls = good + [flaky, http_images.url("status/404")]
    lst = tmp_path / "l.txt"
    lst.write_text("\n".join(urls))
    out = tmp_path / "out"
    cfg = cfg_for(samples_per_shard=4, allow_private_network="true", timeout=5)
    first = ingest(str(lst), str(out), cfg, progress=False)
    assert first.successes == 4 and first.failed == 2
    assert _sizes(out) == {"00000.tar": 4, "00001.tar": 0}
    ds = Dataset(str(out))
    untouched = (out / "shards" / "00000.tar").stat().st_mtime_ns
    again = ingest(str(lst), str(out), cfg, progress=False)
    assert again.shards_written == 0 and again.shards_retried == 0, "a plain rerun retries nothing"
    cfg_retry = cfg.model_copy(update={"ingest": cfg.ingest.model_copy(update={"retry_failed": True})})
    retried = ingest(str(lst), str(out), cfg_retry, progress=False)
    assert retried.shards_retried == 1
    rows = {r["url"]: r for r in assert_exactly_once(ds, 6)}
    assert rows[flaky]["status"] == "success"
    assert rows[http_images.url("status/404")]["status"] == "failed_to_download", "404 is not transient"
    assert (out / "shards" / "00000.tar").stat().st_mtime_ns == untouched
    assert ds.shard_stats("00001").retried == 1
    assert _sizes(out) == {"00000.tar": 4, "00001.tar": 1}, "sizes.json follows --retry-failed"
    assert _sizes(out) == _tar_sample_counts(out)


def _sizes(out: Path) -> dict[str, int]:
    return json.loads((out / "shards" / "sizes.json").read_text())


def _tar_sample_counts(out: Path) -> dict[str, int]:
    counts = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            counts[tar.name] = len({m.name.split(".")[0] for m in t})
    return counts


def test_size_files_let_openclip_and_wids_size_an_epoch(tmp_path):
    out = tmp_path / "ds"
    ingest("synthetic://scenes?n=7&seed=1&size=64", str(out), cfg_for(samples_per_shard=3), progress=False)
    assert _sizes(out) == {"00000.tar": 3, "00001.tar": 3, "00002.tar": 1} == _tar_sample_counts(out)
    info = json.loads((out / "shards" / "_info.json").read_text())
    assert info["__kind__"] == "wids-shard-index-v1"
    assert [(s["url"], s["nsamples"]) for s in info["shardlist"]] == list(_sizes(out).items())
    import wids

    wds = wids.ShardListDataset(str(out / "shards" / "_info.json"), cache_dir=str(tmp_path / "wids"))
    assert len(wds) == 7 and wds[6]["__key__"] == "000020"
    deps = Path(__file__).resolve().parents[2] / ".bench-deps"
    if not (deps / "open_clip_train").is_dir():
        pytest.skip(
            "OpenCLIP is not installed: `make bench-deps` puts it (and webdataset 0.2.86) in .bench-deps"
        )
    probe = Path(__file__).with_name("openclip_probe.py")
    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(deps), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run(
        [sys.executable, str(probe), str(out / "shards" / "{00000..00002}.tar")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["num_samples"] == 8 and got["num_batches"] == 4  # 7 samples, batches of 2, rounded up
    assert got["seen"] == 8 and got["image_shape"] == [2, 3, 32, 32] and got["text_shape"] == [2, 77]


def test_a_source_that_plans_no_shard_leaves_no_stuck_dataset(tmp_path, capsys):
    from engine.sources.base import SourceError
    from finevit.render import print_dataset_summary

    empty, out = tmp_path / "empty", tmp_path / "ds"
    empty.mkdir()
    with pytest.raises(SourceError, match="no image files"):
        ingest(str(empty), str(out), cfg_for(samples_per_shard=5), progress=False)
    assert not (out / "dataset.json").exists(), "a refused first source leaves no dataset behind"
    ingest("synthetic://scenes?n=3&seed=0&size=64", str(out), cfg_for(samples_per_shard=5), progress=False)
    with pytest.raises(SourceError, match="no image files"):
        ingest(str(empty), str(out), cfg_for(samples_per_shard=5), progress=False)
    # the refused source left no unfinished entry: another source can still be added
    ingest("synthetic://scenes?n=2&seed=5&size=64", str(out), cfg_for(samples_per_shard=5), progress=False)
    ds = Dataset(str(out))
    assert [s["num_shards"] for s in ds.manifest["sources"]] == [1, 1]
    # a dataset left stuck by an older version (an unfinished entry for the empty folder) is freed
    m = json.loads((out / "dataset.json").read_text())
    stuck = {"uri": str(empty), "kind": "folder", "first_shard": 2, "num_shards": None}
    m["sources"].append({**stuck, "image": m["sources"][0]["image"]})  # as an older version left it
    (out / "dataset.json").write_text(json.dumps(m))
    capsys.readouterr()
    print_dataset_summary(Dataset(str(out)))
    shown = capsys.readouterr().out
    assert "None" not in shown and "ingest not finished" in shown
    with pytest.raises(SourceError):
        ingest(str(empty), str(out), cfg_for(samples_per_shard=5), progress=False)
    assert [s["uri"] for s in Dataset(str(out)).manifest["sources"]] == [s["uri"] for s in m["sources"][:2]]
    print_dataset_summary(Dataset(str(out)))
    assert "None" not in capsys.readouterr().out


# ---------------------------------------------------------------- 3. WebDataset tars


def _tar(path: Path, members: list[tuple[str, bytes]], links: tuple[str, ...] = ()) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            t.addfile(info)


def test_shared_testdata_tars(tmp_path):
    report = ingest(
        str(TESTDATA / "sample.tgz"), str(tmp_path / "a"), cfg_for(samples_per_shard=40), progress=False
    )
    assert (report.count, report.successes) == (90, 90)
    rows = assert_exactly_once(Dataset(str(tmp_path / "a")), 90)
    assert all("cls" in json.loads(r["meta"]) for r in rows), "the .cls member is carried into meta"
    report = ingest(
        str(TESTDATA / "mpdata.tar"), str(tmp_path / "b"), cfg_for(samples_per_shard=40), progress=False
    )
    assert report.count > 0 and report.successes == 0
    for r in rows_of(Dataset(str(tmp_path / "b"))):
        assert r["status"] == "failed_to_download" and r["error_message"].startswith("no image member")


def test_tar_members_cannot_escape(tmp_path):
    img = jpeg(32, 32)
    evil = tmp_path / "evil.tar"
    _tar(
        evil,
        [("ok.jpg", img), ("ok.txt", b"fine"), ("../../escape.jpg", img), ("/abs/x.jpg", img)],
        links=("link.jpg",),
    )
    out = tmp_path / "deep" / "out"
    ingest(str(evil), str(out), cfg_for(samples_per_shard=10), progress=False)
    rows = {r["url"].split("#", 1)[1]: r for r in rows_of(Dataset(str(out)))}
    assert rows["ok"]["status"] == "success" and rows["ok"]["caption"] == "fine"
    for key in ("../../escape", "/abs/x", "link"):
        assert rows[key]["status"] == "failed_to_download"
        assert rows[key]["error_message"].startswith("unsafe tar member")
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "deep" / "escape.jpg").exists()
    assert not Path("/abs/x.jpg").exists()


def test_brace_pattern_of_tars_spanning_shards(tmp_path):
    for t in range(3):
        _tar(tmp_path / f"part-{t:03d}.tar", [(f"s{t}_{i}.jpg", jpeg(20, 20, i)) for i in range(5)])
    out = tmp_path / "out"
    ingest(str(tmp_path / "part-{000..002}.tar"), str(out), cfg_for(samples_per_shard=4), progress=False)
    rows = assert_exactly_once(Dataset(str(out)), 15)
    assert [r["url"].rsplit("#", 1)[1] for r in rows] == [f"s{t}_{i}" for t in range(3) for i in range(5)]


# ---------------------------------------------------------------- 4. Parquet with image bytes


@pytest.mark.parametrize("style", ["binary", "hf-struct"])
def test_parquet_with_image_bytes(style, tmp_path):
    imgs = [jpeg(30, 20, i) for i in range(9)] + [b""]
    if style == "binary":
        table = pa.table({"jpg": imgs, "caption": [f"c{i}" for i in range(10)]})
    else:
        struct = [{"bytes": b, "path": f"img{i}.jpg"} for i, b in enumerate(imgs)]
        table = pa.table({"image": struct, "text": [f"c{i}" for i in range(10)]})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=3)
    out = tmp_path / "out"
    report = ingest(str(tmp_path / "data.parquet"), str(out), cfg_for(samples_per_shard=4), progress=False)
    rows = assert_exactly_once(Dataset(str(out)), 10)
    assert report.successes == 9
    assert [r["caption"] for r in rows] == [f"c{i}" for i in range(10)]
    assert rows[-1]["error_message"] == "no image bytes in row"


# ---------------------------------------------------------------- 5. an s3:// prefix of images, and S3 everywhere


def test_s3_prefix_to_s3_and_readback(tmp_path, s3):
    src = tmp_path / "imgs"
    (src / "a").mkdir(parents=True)
    for i in range(6):
        (src / "a" / f"{i}.jpg").write_bytes(jpeg(50, 40, i))
    (src / "a" / "broken.jpg").write_bytes(b"<html>nope</html>")
    s3.upload_dir(src, "raw")
    out = s3.uri("ds")
    report = ingest(s3.uri("raw") + "/", out, cfg_for(s3.storage, samples_per_shard=4), progress=False)
    assert (report.count, report.successes) == (7, 6)
    ds = Dataset(out, s3.storage)
    assert_exactly_once(ds, 7)
    assert not any(".staging" in k["Key"] for k in s3.client().list_objects_v2(Bucket=s3.bucket)["Contents"])
    _readback_ray(ds, s3.storage, 6)


def test_tars_and_parquet_on_s3(tmp_path, s3):
    _tar(tmp_path / "t.tar", [(f"k{i}.jpg", jpeg(20, 20, i)) for i in range(3)])
    pq.write_table(pa.table({"jpg": [jpeg(20, 20, 9)]}), tmp_path / "p.parquet")
    c = s3.client()
    c.upload_file(str(tmp_path / "t.tar"), s3.bucket, "in/t.tar")
    c.upload_file(str(tmp_path / "p.parquet"), s3.bucket, "in/p.parquet")
    r1 = ingest(
        s3.uri("in/t.tar"), str(tmp_path / "o1"), cfg_for(s3.storage, samples_per_shard=2), progress=False
    )
    r2 = ingest(
        s3.uri("in/p.parquet"), str(tmp_path / "o2"), cfg_for(s3.storage, samples_per_shard=2), progress=False
    )
    assert (r1.successes, r2.successes) == (3, 1)


def _readback_ray(ds: Dataset, storage: StorageConfig | None, n_ok: int) -> None:
    import ray.data

    from engine.store import pyarrow_filesystem

    fs, path = pyarrow_filesystem(ds.shards.root, storage)
    tars = [f"{path}/{s}.tar" for s in ds.committed_shards()]
    got = ray.data.read_webdataset(tars, filesystem=fs).take_all()
    assert len(got) == n_ok
    assert all(isinstance(g["jpg"], bytes | bytearray) or hasattr(g["jpg"], "shape") for g in got)


def test_readback_with_webdataset_pyarrow_and_ray(tmp_path):
    import webdataset as wds

    out = tmp_path / "ds"
    ingest("synthetic://scenes?n=12&seed=1&size=96", str(out), cfg_for(samples_per_shard=5), progress=False)
    ds = Dataset(str(out))
    tars = [ds.shard_tar(s) for s in ds.committed_shards()]
    samples = list(
        wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg", "txt", "json")
    )
    assert len(samples) == 12
    key, img, txt, meta = samples[0]
    assert img.size == (meta["width"], meta["height"]) and meta["key"] == key and txt == meta["caption"]
    table = pq.ParquetDataset(sorted(str(p) for p in (out / "shards").glob("*.parquet"))).read()
    assert table.num_rows == 12
    _readback_ray(ds, None, 12)


# ---------------------------------------------------------------- 7. an existing img2dataset output


@pytest.fixture(scope="module")
def i2d_output(tmp_path_factory, http_images) -> Path:
    """A real img2dataset download (5 images, 2 shards) of images served on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("i2d")
    urls = _serve(http_images, 5, "i2d")
    lst = tmp / "urls.txt"
    lst.write_text("\n".join(urls))
    out = tmp / "i2d"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from img2dataset import download; download(url_list=sys.argv[1], output_folder=sys.argv[2], "
        "output_format='webdataset', processes_count=1, thread_count=4, number_sample_per_shard=3, "
        "image_size=64, resize_mode='keep_ratio', distributor='multiprocessing', enable_wandb=False)",
        str(lst),
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, env=_env())
    return out


@pytest.fixture(scope="module")
def i2d_parquet_output(tmp_path_factory, http_images) -> Path:
    """A real img2dataset download in its Parquet output format: 4 images, a 404 and a non-image."""
    tmp = tmp_path_factory.mktemp("i2dp")
    http_images.files["i2dp/html.jpg"] = b"<html>not an image</html>"
    urls = _serve(http_images, 4, "i2dp") + [http_images.url("status/404"), http_images.url("i2dp/html.jpg")]
    lst = tmp / "urls.csv"
    lst.write_text("url,caption\n" + "".join(f"{u},caption {i}\n" for i, u in enumerate(urls)))
    out = tmp / "i2dp"
    cmd = [
        sys.executable,
        "-c",
        "import sys; from img2dataset import download; download(url_list=sys.argv[1], output_folder=sys.argv[2], "
        "input_format='csv', caption_col='caption', output_format='parquet', processes_count=1, thread_count=4, "
        "number_sample_per_shard=4, image_size=64, resize_mode='keep_ratio', distributor='multiprocessing', "
        "enable_wandb=False)",
        str(lst),
        str(out),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300, env=_env())
    return out


@pytest.mark.parametrize("form", ["folder", "glob"])
def test_img2dataset_parquet_output_keeps_keys_and_statuses(form, tmp_path, i2d_parquet_output):
    import hashlib

    originals = {}
    for f in sorted(i2d_parquet_output.glob("*.parquet")):
        for r in pq.read_table(f).to_pylist():
            originals[r["key"]] = r
    assert {r["status"] for r in originals.values()} == {"success", "failed_to_download", "failed_to_resize"}
    source = str(i2d_parquet_output) if form == "folder" else str(i2d_parquet_output / "*.parquet")
    out = tmp_path / "ds"
    report = ingest(source, str(out), cfg_for(samples_per_shard=4), progress=False)
    assert (report.count, report.successes) == (6, 4)
    ds = Dataset(str(out))
    assert ds.committed_shards() == ["00000", "00001"]
    rows = {r["key"]: r for r in assert_exactly_once(ds, 6)}
    assert sorted(rows) == sorted(originals), "img2dataset's keys are kept, not renumbered"
    for key, orig in originals.items():
        got = rows[key]
        for col in ("status", "error_message", "url", "caption", "width", "height", "sha256"):
            assert got[col] == orig[col], (key, col, got[col], orig[col])
        assert json.loads(got["meta"]).get("exif") == orig["exif"]
    assert rows[min(k for k, r in originals.items() if "404" in r["url"])]["error_message"].startswith(
        "HTTP Error 404"
    )
    # the tar holds img2dataset's image bytes as they were: nothing re-encoded
    for shard in ds.committed_shards():
        with tarfile.open(out / "shards" / f"{shard}.tar") as t:
            for m in t:
                if m.name.endswith(".jpg"):
                    key = m.name[: -len(".jpg")]
                    data = t.extractfile(m).read()
                    assert hashlib.sha256(data).digest() == hashlib.sha256(originals[key]["jpg"]).digest()
    assert _sizes(out) == {"00000.tar": 4, "00001.tar": 0}
    # it must be the first source (its keys are its own); a rerun changes nothing
    again = ingest(source, str(out), cfg_for(samples_per_shard=4), progress=False)
    assert again.shards_written == 0
    with pytest.raises(LayoutError, match="keeps its own keys"):
        other = tmp_path / "other"
        ingest(
            "synthetic://scenes?n=2&seed=0&size=64", str(other), cfg_for(samples_per_shard=4), progress=False
        )
        ingest(source, str(other), cfg_for(samples_per_shard=4), progress=False)


def test_existing_img2dataset_output_is_registered_not_copied(tmp_path, i2d_output):
    i2d_out = _copy_without_manifest(i2d_output, tmp_path / "i2d")
    before = sorted(p.name for p in i2d_out.iterdir())
    report = ingest(str(i2d_out), str(i2d_out), cfg_for(), progress=False)
    assert report.registered_only and report.successes == 5
    after = sorted(p.name for p in i2d_out.iterdir())
    assert sorted(set(after) - set(before)) == ["dataset.json"]
    ds = Dataset(str(i2d_out))
    assert ds.committed_shards() == ["00000", "00001"]
    assert ds.manifest["shard_root"] == "."
    # a separate OUTPUT points at the shards without copying them
    other = tmp_path / "other"
    ingest(str(_copy_without_manifest(i2d_output, tmp_path / "i2d2")), str(other), cfg_for(), progress=False)
    assert sorted(p.name for p in other.iterdir()) == ["dataset.json"]
    assert Dataset(str(other)).summary()["successes"] == 5


def _copy_without_manifest(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("dataset.json"))
    return dst


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}


# ---------------------------------------------------------------- many sources, one dataset; guard rails


def test_second_source_appends_shards_and_mismatches_are_refused(tmp_path):
    out = tmp_path / "ds"
    ingest("synthetic://scenes?n=7&seed=0&size=64", str(out), cfg_for(samples_per_shard=5), progress=False)
    ingest("synthetic://scenes?n=4&seed=9&size=64", str(out), cfg_for(samples_per_shard=5), progress=False)
    ds = Dataset(str(out))
    assert ds.committed_shards() == ["00000", "00001", "00002"]
    assert [s["first_shard"] for s in ds.manifest["sources"]] == [0, 2]
    assert_exactly_once(ds, 11)
    with pytest.raises(LayoutError, match="samples_per_shard=5"):
        ingest(
            "synthetic://scenes?n=4&seed=9&size=64", str(out), cfg_for(samples_per_shard=6), progress=False
        )
    with pytest.raises(LayoutError, match="image settings"):
        ingest(
            "synthetic://scenes?n=4&seed=9&size=64",
            str(out),
            cfg_for(samples_per_shard=5, **{"image.image_size": 77}),
            progress=False,
        )


# ---------------------------------------------------------------- every source form, written to S3


@pytest.mark.parametrize("form", ["folder", "urls", "webdataset", "parquet", "img2dataset"])
def test_every_source_form_to_s3(form, tmp_path, s3, http_images, i2d_output):
    storage = s3.storage
    out = s3.uri(f"out-{form}")
    n_ok = 3
    if form == "folder":
        src = tmp_path / "imgs"
        src.mkdir()
        for i in range(3):
            (src / f"{i}.jpg").write_bytes(jpeg(30, 30, i))
        source = str(src)
    elif form == "urls":
        src = tmp_path / "urls.jsonl"
        src.write_text("".join(json.dumps({"url": u}) + "\n" for u in _serve(http_images, 3, "to-s3")))
        source = str(src)
    elif form == "webdataset":
        _tar(tmp_path / "a.tar", [(f"k{i}.png", _png(i)) for i in range(3)])
        source = str(tmp_path / "a.tar")
    elif form == "parquet":
        pq.write_table(
            pa.table({"image": [{"bytes": jpeg(20, 20, i), "path": None} for i in range(3)]}),
            tmp_path / "p.parquet",
        )
        source = str(tmp_path / "p.parquet")
    else:
        source = s3.upload_dir(i2d_output, "i2d")
        out, n_ok = source, 5
    cfg = cfg_for(storage, samples_per_shard=2, allow_private_network="true", timeout=5)
    report = ingest(source, out, cfg, progress=False)
    assert report.successes == n_ok and report.failed == 0
    ds = Dataset(out, storage)
    assert Dataset(out, storage).summary()["successes"] == n_ok
    if form != "img2dataset":
        assert_exactly_once(ds, n_ok)
        keys = [
            o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=f"out-{form}/")["Contents"]
        ]
        assert not any(".staging" in k or "tmp" in k for k in keys), keys
    else:
        assert ds.manifest["shard_root"] == "."
    _readback_ray(ds, storage, n_ok)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (seed * 40, 10, 10)).save(buf, "PNG")
    return buf.getvalue()
