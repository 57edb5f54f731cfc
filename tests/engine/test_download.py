"""The URL guard, through the same downloader a shard uses (img2dataset's, via ``fetch_url``).

Real sockets only: a TCP listener on 127.0.0.1 counts the connections it gets, so "blocked"
means that not one packet reached it; redirects come from the session's HTTP image server.
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator

import pytest

from engine.config import IngestConfig
from engine.download import fetch_url, is_private_address


@pytest.fixture(autouse=True)
def _restore_opener() -> Iterator[None]:
    """fetch_url installs a process-wide urllib opener; put back whatever was there."""
    before = urllib.request._opener
    yield
    urllib.request.install_opener(before)


class Listener:
    """A TCP port on a loopback address that accepts and counts connections (and says nothing)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


def _cfg(**kw) -> IngestConfig:
    return IngestConfig(timeout=2, retries=0, **kw)


def _reason(url: str, **kw) -> str:
    with pytest.raises(OSError) as e:
        fetch_url(url, _cfg(**kw))
    return str(e.value)


# ---------------------------------------------------------------- schemes: only http and https


@pytest.mark.parametrize(
    ("template", "scheme"),
    [
        ("ftp://127.0.0.1:{port}/x.jpg", "ftp"),
        ("FTP://127.0.0.1:{port}/x.jpg", "ftp"),
        ("gopher://127.0.0.1:{port}/_GET%20/", "gopher"),
        ("jar:http://127.0.0.1:{port}/a.jar!/x.jpg", "jar"),
        ("netdoc://127.0.0.1:{port}/x.jpg", "netdoc"),
        ("dict://127.0.0.1:{port}/x", "dict"),
    ],
)
@pytest.mark.parametrize("allow_private", [False, True])
def test_network_schemes_other_than_http_are_blocked_before_connecting(
    template, scheme, allow_private, listener
):
    reason = _reason(template.format(port=listener.port), allow_private_network=allow_private)
    assert reason == f"blocked: scheme {scheme}"
    assert listener.accepted == 0, "nothing may connect for a refused scheme"


@pytest.mark.parametrize("allow_private", [False, True])
def test_file_and_data_urls_are_blocked(tmp_path, allow_private):
    img = tmp_path / "secret.png"
    img.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    for url, scheme in [
        (img.as_uri(), "file"),
        (f"file://localhost{img}", "file"),
        ("file:/etc/hostname", "file"),
        ("data:image/png;base64,iVBORw0KGgo=", "data"),
        ("jar:file:///tmp/a.jar!/x.jpg", "jar"),
    ]:
        assert _reason(url, allow_private_network=allow_private) == f"blocked: scheme {scheme}", url


# ---------------------------------------------------------------- addresses: nothing but the public internet


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",  # a DNS name resolving to 127.0.0.1
        "0.0.0.0",
        "2130706433",  # 127.0.0.1 in decimal
        "0x7f000001",  # in hex
        "0177.0.0.1",  # in octal
        "127.1",  # short form
        "0x7f.1",
    ],
)
def test_loopback_spellings_are_blocked(host, listener):
    reason = _reason(f"http://{host}:{listener.port}/x.jpg")
    assert reason.startswith("blocked: private address"), reason
    assert listener.accepted == 0


def test_ipv6_loopback_and_mapped_are_blocked():
    try:
        lst6 = Listener("::1")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    try:
        for host in ("[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:0:0:1]"):
            reason = _reason(f"http://{host}:{lst6.port}/x.jpg")
            assert reason.startswith("blocked: private address"), (host, reason)
        assert lst6.accepted == 0
    finally:
        lst6.close()


@pytest.mark.parametrize(
    "ip",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # shared address space (carrier NAT): not private, not public either
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",  # v4-mapped
        "::ffff:169.254.169.254",
        "::127.0.0.1",  # v4-compatible
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
    ],
)
def test_private_addresses_are_recognised(ip):
    assert is_private_address(ip)


@pytest.mark.parametrize("ip", ["8.8.8.8", "2606:4700:4700::1111", "64:ff9b::808:808", "::ffff:8.8.8.8"])
def test_public_addresses_pass(ip):
    assert not is_private_address(ip)


# ---------------------------------------------------------------- redirects meet the same guard


@pytest.mark.parametrize("target", ["file:///etc/hostname", "ftp://127.0.0.1:21/x.jpg", "data:,hello"])
def test_redirect_to_another_scheme_is_blocked(target, http_images):
    reason = _reason(http_images.url(f"redirect/{target}"), allow_private_network=True)
    assert reason.startswith(f"blocked: scheme {target.split(':')[0]} (redirect to {target})"), reason


def test_redirect_to_a_private_address_is_blocked(http_images, listener):
    http_images.files["guard/ok.jpg"] = b"\xff\xd8image"
    allowed = {"allow_hosts": ["127.0.0.1"]}  # the image server's host, and only that name
    # the allowed host itself is fetched, directly and through a redirect to itself
    assert fetch_url(http_images.url("guard/ok.jpg"), _cfg(**allowed)) == b"\xff\xd8image"
    assert fetch_url(http_images.url(f"redirect/{http_images.url('guard/ok.jpg')}"), _cfg(**allowed))
    # ... but a redirect to any other name for a private address is refused before connecting
    for target in (
        f"http://localhost:{listener.port}/x.jpg",
        f"http://2130706433:{listener.port}/x.jpg",
        f"http://0.0.0.0:{listener.port}/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
    ):
        reason = _reason(http_images.url(f"redirect/{target}"), **allowed)
        assert reason.startswith("blocked: private address"), (target, reason)
    assert listener.accepted == 0
