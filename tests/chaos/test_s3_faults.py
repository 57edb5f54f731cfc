"""S3 that fails: moto on 127.0.0.1 stopped mid-write and restarted, and 503 SlowDown throttling.

* **Outage.** ``finevit ingest`` writes a dataset to a moto server of this test's own; once the
  first shard is committed the server stops listening (connections refused) for 3 s and then
  serves again with its data (moto's state lives in this process). The run either retries
  through it or fails the shards it could not write (exit 1, each named); a rerun completes.
* **Throttling past the retries.** The proxy answers every request from the n-th on with
  SlowDown, with botocore's own retries off (``AWS_MAX_ATTEMPTS=1``; s3fs still tries 5 times):
  S3 throttling a prefix for longer than the client waits. The run must stop with one line
  naming the URI (no traceback) and a rerun against a healthy S3 complete, exactly once.
* **Throttling.** A small proxy in front of moto answers a seeded quarter of the requests with
  S3's ``503 SlowDown`` (never more than twice in a row for one method + path), the way S3
  throttles a hot prefix; the client must retry and the run complete with no failure.

Both must end as an uninterrupted local run does: the same keys, each once, the same image
bytes (sha256), every committed shard whole (marker count = Parquet rows, tar bytes = marker
bytes) and no staged object left in the bucket.
"""

from __future__ import annotations

import http.client
import random
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.chaos._chaos import read_committed, run, start, tally
from tests.chaos._faults import run_cli
from tests.conftest import free_port

pytestmark = [pytest.mark.slow, pytest.mark.s3, pytest.mark.timeout(900)]

N, SPS = 24, 4
SOURCE = f"synthetic://scenes?n={N}&seed=5&size=128"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
SHARD_FILE = re.compile(r"^(\d+)\.(tar|parquet)$")
SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_address):
    base = tmp_path_factory.mktemp("s3fault-ref")
    rc, log, wall = run_cli(
        ["ingest", SOURCE, str(base / "ds"), "--samples-per-shard", str(SPS)], base / "log"
    )
    assert rc == 0, log
    return read_committed(base / "ds" / "shards"), wall


class Moto:
    """moto's server on a fixed port that can stop listening and come back with its data."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()
        self.server._server.server_close()  # stop() leaves the socket listening

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, endpoint: str | None = None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )


@pytest.fixture
def moto() -> Iterator[Moto]:
    m = Moto()
    m.start()
    yield m
    m.stop()


class SlowDownProxy:
    """HTTP proxy to ``upstream`` answering a seeded fraction of requests with 503 SlowDown, or,
    given ``always(n, "METHOD /path")``, every request it picks (the n-th of the run)."""

    def __init__(
        self,
        upstream_port: int,
        fraction: float,
        seed: int,
        max_in_row: int = 2,
        always: Callable[[int, str], bool] | None = None,
    ) -> None:
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.in_row: Counter = Counter()
        self.served: Counter = Counter()  # "503" / "ok"
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                what = f"{self.command} {self.path.split('?')[0]}"
                with proxy.lock:
                    n = sum(proxy.served.values())
                    if always is not None:  # a throttle that outlasts every retry
                        throttle = always(n, what)
                    else:
                        throttle = proxy.in_row[what] < max_in_row and proxy.rng.random() < fraction
                    proxy.in_row[what] = proxy.in_row[what] + 1 if throttle else 0
                    proxy.served["503" if throttle else "ok"] += 1
                if throttle:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("expect",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _ingest_args(endpoint: str, bucket: str) -> list[str]:
    return [
        "ingest",
        SOURCE,
        f"s3://{bucket}/ds",
        "--samples-per-shard",
        str(SPS),
        "--workers",
        "1",
        "--no-progress",
        "--set",
        f"storage.endpoint_url={endpoint}",
    ]


def _download(client, bucket: str, dst: Path) -> list[str]:
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            keys.append(o["Key"])
            p = dst / o["Key"]
            p.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, o["Key"], str(p))
    return keys


def _check(client, bucket: str, tmp: Path, ref) -> tuple[int, int, int, int, int]:
    objects = _download(client, bucket, tmp / "bucket")
    assert not [k for k in objects if "/.staging/" in k or "/_tmp" in k], objects
    got = read_committed(tmp / "bucket" / "ds" / "shards")
    assert not got.partial, got.partial
    ref_rows, _ = ref
    assert sorted(got.keys) == sorted(ref_rows.keys)
    assert {k: r["sha256"] for k, r in got.rows.items()} == {k: r["sha256"] for k, r in ref_rows.rows.items()}
    # no shard file without its marker (a partial commit) visible among the objects
    shards = {m[1] for k in objects if "/shards/" in k and (m := SHARD_FILE.match(Path(k).name))}
    markers = {
        Path(k).name[: -len("_stats.json")] for k in objects if k.endswith("_stats.json") and "/shards/" in k
    }
    assert shards == markers, (shards, markers)
    counts = tally(got, set(ref_rows.keys), lambda r: r["status"] != "success", lambda r: r["error_message"])
    assert counts[2:] == (0, 0, 0), counts
    return counts


def _n_markers(client, bucket: str) -> int:
    try:
        r = client.list_objects_v2(Bucket=bucket, Prefix="ds/shards/")
    except Exception:  # the server is down for a moment
        return -1
    return sum(1 for o in r.get("Contents", []) if o["Key"].endswith("_stats.json"))


def test_s3_server_stopped_mid_write_then_rerun(
    moto, reference, tmp_path, monkeypatch, chaos_figures
) -> None:
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)
    bucket = f"outage-{uuid.uuid4().hex[:8]}"
    client = moto.client()
    client.create_bucket(Bucket=bucket)
    t0 = time.time()
    proc = start(_ingest_args(moto.url, bucket), tmp_path / "run1.log")
    deadline = time.time() + 300
    while proc.alive() and _n_markers(client, bucket) < 1 and time.time() < deadline:
        time.sleep(0.05)
    at = _n_markers(client, bucket)
    assert proc.alive() and at < N // SPS, f"the outage must land mid-run:\n{proc.text()[-3000:]}"
    moto.stop()
    time.sleep(3.0)
    moto.start()
    rc1, log1, _ = proc.wait(400)
    assert rc1 in (0, 1), log1[-3000:]
    if rc1 == 1:
        assert "Traceback" not in log1, log1[-3000:]
    rc, log, _ = run_cli(_ingest_args(moto.url, bucket), tmp_path / "run2.log")
    assert rc == 0, log[-3000:]
    wall = time.time() - t0
    ok, failed, lost, dup, unacc = _check(client, bucket, tmp_path, reference)
    chaos_figures.add(
        scenario="S3 stopped mid-write and restarted (ingest to moto)",
        trials=1,
        faults=1,
        ok=ok,
        failed=failed,
        lost=lost,
        duplicated=dup,
        unaccounted=unacc,
        wall_s=wall,
        clean_wall_s=reference[1],
        note=f"{N} samples, {N // SPS} shards; moto refused connections for 3 s after {at} committed shard(s); "
        f"the run {'retried through it' if rc1 == 0 else 'exited 1 naming the shards it could not write'}; "
        "the rerun completed; no object of an uncommitted shard in the bucket (clean run: local disk)",
    )


def test_s3_slowdown_is_retried(moto, reference, tmp_path, monkeypatch, chaos_figures) -> None:
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)
    bucket = f"slowdown-{uuid.uuid4().hex[:8]}"
    client = moto.client()
    client.create_bucket(Bucket=bucket)
    proxy = SlowDownProxy(moto.port, fraction=0.25, seed=17)
    try:
        rc, log, wall = run_cli(_ingest_args(proxy.url, bucket), tmp_path / "run.log")
    finally:
        proxy.close()
    assert rc == 0, log[-3000:]
    assert proxy.served["503"] > 0, proxy.served
    ok, failed, lost, dup, unacc = _check(client, bucket, tmp_path, reference)
    assert failed == 0
    chaos_figures.add(
        scenario="S3 503 SlowDown through a proxy (ingest to moto)",
        trials=1,
        faults=proxy.served["503"],
        ok=ok,
        failed=failed,
        lost=lost,
        duplicated=dup,
        unaccounted=unacc,
        wall_s=wall,
        clean_wall_s=reference[1],
        note=f"{N} samples; {proxy.served['503']} of {sum(proxy.served.values())} requests answered "
        "503 SlowDown (seeded, at most 2 in a row per request), each retried by the client; clean run: local disk",
    )


# request 0 is the dataset lease's PUT; request 5 the check for a source layer's layer.json
THROTTLE_FROM = (0, 5)
FIRST_TAR = re.compile(r"^PUT /[^/]+/ds/shards/00000\.tar$")


def test_s3_throttled_past_retries_fails_in_one_line_then_rerun(
    moto, reference, tmp_path, monkeypatch, chaos_figures
) -> None:
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)
    bucket = f"throttled-{uuid.uuid4().hex[:8]}"
    client = moto.client()
    client.create_bucket(Bucket=bucket)
    t0, throttled = time.time(), 0
    for n in THROTTLE_FROM:
        proxy = SlowDownProxy(moto.port, fraction=0.0, seed=0, always=lambda i, _what, n=n: i >= n)
        try:
            log = tmp_path / f"throttled-{n}.log"
            rc, text, _ = run(_ingest_args(proxy.url, bucket), log, 300, extra_env={"AWS_MAX_ATTEMPTS": "1"})
        finally:
            proxy.close()
        throttled += proxy.served["503"]
        assert proxy.served["503"] > 0, proxy.served
        last = text.strip().splitlines()[-1]
        assert rc in (1, 2) and "Traceback" not in text, text[-3000:]
        assert last.startswith("finevit: error: ") and f"s3://{bucket}/ds" in last, last
    # in a worker: the first shard's tar cannot be written (every try of every task attempt);
    # that shard must fail, named, with nothing of it committed, and the others commit
    proxy = SlowDownProxy(
        moto.port, fraction=0.0, seed=0, always=lambda _i, what: bool(FIRST_TAR.match(what))
    )
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # each task attempt gives up in about 2 s
    try:
        rc, text, _ = run_cli(_ingest_args(proxy.url, bucket), tmp_path / "tar.log")
    finally:
        proxy.close()
        monkeypatch.delenv("AWS_MAX_ATTEMPTS")
    throttled += proxy.served["503"]
    # (Ray logs each failed task attempt's traceback as it retries it: the run's own end is one line)
    assert rc == 1, text[-3000:]
    named = rf"shard 00000 failed: [\w.]*StorageError: cannot upload to s3://{bucket}/ds/shards/00000\.tar"
    assert re.search(named, text), text[-3000:]
    assert _n_markers(client, bucket) == N // SPS - 1, text[-3000:]
    rc, log, _ = run_cli(_ingest_args(moto.url, bucket), tmp_path / "rerun.log")
    assert rc == 0, log[-3000:]
    ok, failed, lost, dup, unacc = _check(client, bucket, tmp_path, reference)
    chaos_figures.add(
        scenario="S3 503 SlowDown past the client's retries, then rerun (ingest to moto)",
        trials=len(THROTTLE_FROM) + 1,
        faults=throttled,
        ok=ok,
        failed=failed,
        lost=lost,
        duplicated=dup,
        unaccounted=unacc,
        wall_s=time.time() - t0,
        clean_wall_s=reference[1],
        note=f"{N} samples; every request from the {THROTTLE_FROM}-th on answered 503 SlowDown, botocore "
        "retries off (s3fs's 5 tries left): each run stopped with one line naming the URI (exit 2); "
        "then every PUT of the first shard's tar throttled: that shard failed, named (exit 1), the "
        f"{N // SPS - 1} others committed; the rerun on a healthy S3 completed; clean run: local disk",
    )
