"""Per-download caps: a byte cap (declared or streamed) and a total deadline (slow-loris drips)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from engine.config import IngestConfig
from engine.download import fetch_url

BODY = b"\xff\xd8" + b"x" * 4094  # 4 KiB


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *a) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if self.path == "/declared":  # honest Content-Length, over the cap
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/undeclared":  # no length: the body is read until the server closes
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/drip":  # a byte every 0.3 s: each read is under the socket timeout
            self.send_header("Content-Length", "64")
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.3)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
                pass
        else:
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)


@pytest.fixture
def server() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    old = urllib.request._opener  # fetch_url installs a process-wide opener
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    urllib.request.install_opener(old)
    srv.shutdown()


def _cfg(**kw) -> IngestConfig:
    return IngestConfig(timeout=2, retries=0, allow_private_network=True, **kw)


def test_a_body_within_the_cap_downloads_whole(server: str) -> None:
    assert fetch_url(f"{server}/ok", _cfg(max_download_bytes=len(BODY))) == BODY


@pytest.mark.parametrize("path", ["declared", "undeclared"])
def test_a_body_over_the_byte_cap_is_refused(server: str, path: str) -> None:
    with pytest.raises(OSError, match="too large"):
        fetch_url(f"{server}/{path}", _cfg(max_download_bytes=1024))


def test_a_drip_under_the_socket_timeout_is_cut_at_the_deadline(server: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(OSError, match="too slow"):
        fetch_url(f"{server}/drip", _cfg(download_deadline_s=1.0))
    assert time.monotonic() - t0 < 5  # not the 19 s the drip would take
