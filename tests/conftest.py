"""Real components for the tests, started once per session on 127.0.0.1.

* ``s3``: moto's S3 server (a real S3 API over HTTP) with a fresh bucket per test.
* ``ray_local``: one local Ray cluster for the whole session (start-up costs seconds).
* ``http_images``: an HTTP server serving images, with fault injection (503, 429, slow).

Tiers: a test that uses a fixture in :data:`SLOW_FIXTURES` (it starts Ray or ingests a
dataset) is marked ``slow``, one that uses ``s3`` is marked ``s3``, at collection, so
``-m "not slow"`` stays fast and ``-m "not s3"`` runs without the S3 server. A test that
asks for ``s3`` at run time (``request.getfixturevalue``) must carry the mark itself: the
fixture refuses to run otherwise.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
SHARED_TESTDATA = REPO.parent / "shared" / "testdata"


# Fixtures that start Ray or run an ingest: whoever uses one (directly or through another
# fixture) is in the slow tier.
SLOW_FIXTURES = frozenset({"ray_local", "stage1_data"})


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SLOW_FIXTURES and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
        if names & {"s3", "s3_server"} and not item.get_closest_marker("s3"):
            item.add_marker(pytest.mark.s3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- S3 (moto server)


@dataclass
class S3:
    endpoint: str
    bucket: str

    @property
    def storage(self):
        from engine.config import StorageConfig

        return StorageConfig(
            endpoint_url=self.endpoint,
            access_key_id="testing",
            secret_access_key="testing",
            region="us-east-1",
        )

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def upload_dir(self, local: Path, prefix: str) -> str:
        c = self.client()
        for p in sorted(local.rglob("*")):
            if p.is_file():
                c.upload_file(str(p), self.bucket, f"{prefix}/{p.relative_to(local).as_posix()}")
        return self.uri(prefix)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str, request: pytest.FixtureRequest) -> S3:
    if request.node.get_closest_marker("s3") is None:
        pytest.fail(
            f"{request.node.nodeid} uses the S3 server: mark it (or its parameter) with pytest.mark.s3"
        )
    s = S3(endpoint=s3_server, bucket=f"test-{uuid.uuid4().hex[:12]}")
    s.client().create_bucket(Bucket=s.bucket)
    return s


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    import ray

    from engine.config import RayConfig
    from engine.runtime import init_ray

    temp = tempfile.mkdtemp(prefix="fvray-", dir="/tmp")
    init_ray(RayConfig(num_cpus=2, temp_dir=temp))
    yield
    ray.shutdown()


# ---------------------------------------------------------------- HTTP image server


@dataclass
class ImageServer:
    """Serves ``files`` at ``/<name>``. ``/flaky/<n>/<name>`` answers 503 to the first n requests
    for that path, ``/ratelimit/<n>/<name>`` answers 429, ``/slow/<seconds>/<name>`` sleeps first,
    ``/status/<code>`` always answers that code, ``/redirect/<url>`` answers 302 to ``<url>``."""

    host: str
    port: int
    files: dict[str, bytes] = field(default_factory=dict)
    hits: Counter = field(default_factory=Counter)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"


def _make_handler(state: ImageServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def _send(self, code: int, body: bytes = b"", ctype: str = "application/octet-stream") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            if code == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.lstrip("/")
            state.hits[path] += 1
            parts = path.split("/")
            if parts[0] == "status" and len(parts) == 2:
                return self._send(int(parts[1]), b"error")
            if parts[0] == "redirect" and len(parts) >= 2:
                self.send_response(302)
                self.send_header("Location", path[len("redirect/") :])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            if parts[0] in ("flaky", "ratelimit") and len(parts) >= 3:
                if state.hits[path] <= int(parts[1]):
                    return self._send(503 if parts[0] == "flaky" else 429, b"try later")
                path = "/".join(parts[2:])
            elif parts[0] == "slow" and len(parts) >= 3:
                time.sleep(float(parts[1]))
                path = "/".join(parts[2:])
            body = state.files.get(path)
            if body is None:
                return self._send(404, b"not found")
            self._send(200, body, "image/jpeg")

    return Handler


@pytest.fixture(scope="session")
def http_images() -> Iterator[ImageServer]:
    state = ImageServer(host="127.0.0.1", port=0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    server.daemon_threads = True
    state.port = server.server_address[1]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield state
    server.shutdown()
