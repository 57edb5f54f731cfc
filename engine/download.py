"""URL downloads: img2dataset's downloader inside our Ray task, behind a network guard.

Only ``http`` and ``https`` are fetched. Any other scheme (``file``, ``ftp``, ``data``,
``gopher``, ``jar:...``) is refused before anything is opened, with ``blocked: scheme X``:
the opener we install holds no file, FTP or data handler at all, and every redirect
target passes the same check.

The address guard resolves each host at connect time, refuses non-public targets before a
packet is sent, and connects only to the addresses it checked (so DNS rebinding and
redirects to internal hosts are caught too): loopback, private, link-local (cloud metadata
at 169.254.169.254), shared (100.64/10), multicast, reserved and unspecified (``0.0.0.0``,
``::``) addresses, and IPv6 addresses that embed one of those (``::ffff:127.0.0.1``, 6to4,
NAT64, Teredo) are refused with ``blocked: private address`` unless
``allow_private_network`` is set. Numeric spellings (``2130706433``, ``0x7f000001``,
``0177.0.0.1``, ``127.1``) resolve to the address they spell and are judged as that.
``allow_hosts`` names hosts (as written in the URL) that may resolve to private addresses,
e.g. an internal image mirror, without opening the rest of the network.

Every response body is read under two caps: ``max_download_bytes`` (a declared
``Content-Length`` over it is refused before reading, a body that grows past it is cut off:
``too large: ...``) and ``download_deadline_s``, the total time for one download (a server
that drips bytes under the socket timeout is cut off: ``too slow: ...``).
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import os
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.feather as feather

from engine.config import ImageConfig, IngestConfig
from engine.layout import SHARD_DIGITS
from engine.schemas import SHARD_INPUT_COLUMNS

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations
os.environ.setdefault("WANDB_MODE", "disabled")

BLOCKED_REASON = "blocked: private address"
ALLOWED_SCHEMES = ("http", "https")
# img2dataset's defaults: respect the opt-outs site owners publish
DISALLOWED_HEADER_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


class BlockedAddressError(Exception):
    """Not an OSError on purpose: urllib re-raises it unchanged, so the reason stays clean."""


class BlockedSchemeError(BlockedAddressError):
    """A URL (or a redirect target) whose scheme is not http or https."""


def url_scheme(url: str) -> str:
    """The scheme as urllib reads it (lower case; ``""`` when there is none)."""
    return urllib.parse.urlsplit(url.strip()).scheme.lower()


def check_scheme(url: str, what: str = "") -> None:
    """Raise :class:`BlockedSchemeError` (``blocked: scheme X``) unless ``url`` is http(s)."""
    scheme = url_scheme(url)
    if scheme not in ALLOWED_SCHEMES:
        raise BlockedSchemeError(f"blocked: scheme {scheme or '(none)'}{what}")


def _embedded_ipv4(addr: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, compatible, 6to4, NAT64, Teredo), if any."""
    if addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    if addr.sixtofour is not None:
        return addr.sixtofour
    if addr.teredo is not None:
        return addr.teredo[1]
    packed = addr.packed
    if packed[:12] == bytes(12) and packed[12:] != bytes(4):  # ::a.b.c.d (deprecated "compatible")
        return ipaddress.IPv4Address(packed[12:])
    if addr in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64's well-known prefix
        return ipaddress.IPv4Address(packed[12:])
    return None


def is_private_address(ip: str) -> bool:
    """Whether a connection to ``ip`` could reach something that is not the public internet."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None:  # the packet ends up at the IPv4 address: judge that one
            return is_private_address(str(inner))
    return (
        not addr.is_global
        or addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


def guarded_create_connection(
    address: tuple[str, int],
    timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,
    source_address: Any = None,
    allow_hosts: frozenset[str] = frozenset(),
) -> socket.socket:
    """``socket.create_connection`` that resolves first, refuses private targets *before* any
    packet is sent, and then connects only to the addresses it checked (no DNS rebinding)."""
    host, port = address
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    if host.lower() not in allow_hosts:
        for *_, sockaddr in infos:
            if is_private_address(sockaddr[0]):
                raise BlockedAddressError(f"{BLOCKED_REASON} ({sockaddr[0]})")
    err: OSError | None = None
    for family, socktype, proto, _, sockaddr in infos:
        sock = socket.socket(family, socktype, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            err = e
    raise err or OSError(f"cannot connect to {host}:{port}")


class _GuardedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args: Any, allow_hosts: frozenset[str] = frozenset(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = functools.partial(guarded_create_connection, allow_hosts=allow_hosts)


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, allow_hosts: frozenset[str] = frozenset(), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # TLS is wrapped after this in connect()
        self._create_connection = functools.partial(guarded_create_connection, allow_hosts=allow_hosts)


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, allow_hosts: frozenset[str]) -> None:
        super().__init__()
        self.allow_hosts = allow_hosts

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(functools.partial(_GuardedHTTPConnection, allow_hosts=self.allow_hosts), req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, allow_hosts: frozenset[str]) -> None:
        super().__init__()
        self.allow_hosts = allow_hosts

    def https_open(self, req: urllib.request.Request) -> Any:
        conn = functools.partial(_GuardedHTTPSConnection, allow_hosts=self.allow_hosts)
        return self.do_open(conn, req, context=self._context)


class _SchemeGuardRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows redirects only to http(s); the new target then meets the address guard again."""

    def http_error_302(self, req: Any, fp: Any, code: int, msg: str, headers: Any) -> Any:
        target = headers.get("location") or headers.get("uri")
        if target:
            check_scheme(urllib.parse.urljoin(req.full_url, target), f" (redirect to {target})")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302


class DownloadCapError(BlockedAddressError):
    """A body over ``max_download_bytes`` or a download over ``download_deadline_s``."""


class _CappedResponse:
    """A response whose ``read`` stops at a byte cap and a total deadline (one socket read at a
    time, so a slow drip is noticed within one socket timeout of the deadline)."""

    CHUNK = 1 << 16

    def __init__(self, resp: Any, max_bytes: int, deadline_s: float, started: float) -> None:
        self._resp, self._max, self._deadline_s, self._started = resp, max_bytes, deadline_s, started
        declared = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
        if declared and declared.strip().isdigit() and int(declared) > max_bytes:
            resp.close()
            raise DownloadCapError(
                f"too large: Content-Length {int(declared)} > max_download_bytes {max_bytes}"
            )

    def read(self, amt: int | None = None) -> bytes:
        limit = self._max + 1 if amt is None else min(amt, self._max + 1)
        buf = bytearray()
        read1 = getattr(self._resp, "read1", None) or self._resp.read
        while len(buf) < limit:
            if time.monotonic() - self._started > self._deadline_s:
                self._resp.close()
                raise DownloadCapError(
                    f"too slow: download took over download_deadline_s {self._deadline_s:g}"
                )
            chunk = read1(min(self.CHUNK, limit - len(buf)))
            if not chunk:
                break
            buf += chunk
        if len(buf) > self._max:
            self._resp.close()
            raise DownloadCapError(f"too large: body over max_download_bytes {self._max}")
        return bytes(buf)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._resp, name)

    def __enter__(self) -> _CappedResponse:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._resp.close()


class _SchemeGuardOpener(urllib.request.OpenerDirector):
    """An opener that refuses every scheme but http(s) before any handler (proxies included) runs,
    and hands back responses that read under the byte cap and the total deadline."""

    max_bytes: int = 64 * 2**20
    deadline_s: float = 60.0

    def open(self, fullurl: Any, data: Any = None, timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT) -> Any:
        check_scheme(fullurl if isinstance(fullurl, str) else fullurl.full_url)
        started = time.monotonic()
        resp = super().open(fullurl, data, timeout)
        return _CappedResponse(resp, self.max_bytes, self.deadline_s, started)


def build_guarded_opener(
    allow_private_network: bool,
    allow_hosts: Iterable[str] = (),
    max_bytes: int = 64 * 2**20,
    deadline_s: float = 60.0,
) -> urllib.request.OpenerDirector:
    """http(s) only, redirects re-checked; private targets refused unless allowed; bodies read
    under ``max_bytes`` and ``deadline_s`` (total seconds per download).

    Built by hand rather than with ``build_opener``, which always adds the file, FTP and data
    handlers."""
    opener = _SchemeGuardOpener()
    opener.max_bytes, opener.deadline_s = max_bytes, deadline_s
    if allow_private_network:
        http_handlers: list[Any] = [urllib.request.HTTPHandler(), urllib.request.HTTPSHandler()]
    else:
        hosts = frozenset(h.lower().strip("[]") for h in allow_hosts)
        http_handlers = [_GuardedHTTPHandler(hosts), _GuardedHTTPSHandler(hosts)]
    for handler in (
        urllib.request.ProxyHandler(),
        *http_handlers,
        urllib.request.HTTPDefaultErrorHandler(),
        _SchemeGuardRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def install_network_guard(cfg: IngestConfig) -> None:
    """Set this process's urllib opener (img2dataset downloads through ``urlopen``)."""
    urllib.request.install_opener(
        build_guarded_opener(
            cfg.allow_private_network, cfg.allow_hosts, cfg.max_download_bytes, cfg.download_deadline_s
        )
    )


def fetch_url(url: str, cfg: IngestConfig) -> bytes:
    """One URL's bytes with img2dataset's downloader (user agent, X-Robots-Tag, retries)."""
    from img2dataset.downloader import download_image_with_retry

    install_network_guard(cfg)
    _, stream, err = download_image_with_retry(
        (0, url), cfg.timeout, cfg.retries, cfg.user_agent_token, DISALLOWED_HEADER_DIRECTIVES
    )
    if stream is None:
        raise OSError(err)
    return stream.getvalue()


def download_shard(
    rows: list[tuple[str, str | None]],
    shard_index: int,
    staging_dir: str,
    source_label: str,
    samples_per_shard: int,
    cfg: IngestConfig,
) -> str:
    """Download one shard of ``(url, caption)`` rows into ``staging_dir`` with img2dataset.

    Writes ``<shard>.tar``, ``<shard>.parquet`` and img2dataset's ``<shard>_stats.json`` there;
    returns the staging folder. Keys are img2dataset's: shard id + row index in the shard.
    """
    from img2dataset.downloader import Downloader
    from img2dataset.writer import WebDatasetSampleWriter

    from engine.images import Img2datasetResizer

    install_network_guard(cfg)
    table = pa.table(
        {
            "url": [u for u, _ in rows],
            "caption": [c for _, c in rows],
            "source": [source_label] * len(rows),
            "meta": pa.nulls(len(rows), pa.string()),
        }
    )
    input_file = os.path.join(staging_dir, "input.feather")
    feather.write_feather(table, input_file, compression="uncompressed")
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter,
        resizer=Img2datasetResizer(cfg.image if isinstance(cfg.image, ImageConfig) else ImageConfig()),
        thread_count=cfg.download_threads,
        save_caption=True,
        extract_exif=False,
        output_folder=staging_dir,
        column_list=SHARD_INPUT_COLUMNS,
        timeout=cfg.timeout,
        number_sample_per_shard=samples_per_shard,
        oom_shard_count=SHARD_DIGITS,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=cfg.image.encode_format,
        retries=cfg.retries,
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=DISALLOWED_HEADER_DIRECTIVES,
    )
    downloader.download_shard((shard_index, input_file))  # raises on a shard-level failure
    return staging_dir
