"""URL downloads: img2dataset's downloader inside our Ray task, behind a network guard.

The guard resolves each host at connect time, refuses private targets before a packet is
sent, and connects only to the addresses it checked (so DNS rebinding and redirects to
internal hosts are caught too): loopback, private, link-local
(cloud metadata at 169.254.169.254), multicast, reserved and unspecified addresses are
refused with ``blocked: private address`` unless ``allow_private_network`` is set.
"""

from __future__ import annotations

import http.client
import ipaddress
import os
import socket
import urllib.request
from typing import Any

import pyarrow as pa
import pyarrow.feather as feather

from engine.config import ImageConfig, IngestConfig
from engine.layout import SHARD_DIGITS
from engine.schemas import SHARD_INPUT_COLUMNS

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset imports albumentations
os.environ.setdefault("WANDB_MODE", "disabled")

BLOCKED_REASON = "blocked: private address"
# img2dataset's defaults: respect the opt-outs site owners publish
DISALLOWED_HEADER_DIRECTIVES = ["noai", "noimageai", "noindex", "noimageindex"]


class BlockedAddressError(Exception):
    """Not an OSError on purpose: urllib re-raises it unchanged, so the reason stays clean."""


def is_private_address(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_multicast
        or addr.is_reserved
        or addr.is_unspecified
    )


def guarded_create_connection(
    address: tuple[str, int], timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT, source_address: Any = None
) -> socket.socket:
    """``socket.create_connection`` that resolves first, refuses private targets *before* any
    packet is sent, and then connects only to the addresses it checked (no DNS rebinding)."""
    host, port = address
    infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
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
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = guarded_create_connection


class _GuardedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = guarded_create_connection  # TLS is wrapped after this in connect()


class _GuardedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_GuardedHTTPConnection, req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(_GuardedHTTPSConnection, req, context=self._context)


def install_network_guard(allow_private_network: bool) -> None:
    """Set this process's urllib opener (img2dataset downloads through ``urlopen``)."""
    if allow_private_network:
        urllib.request.install_opener(urllib.request.build_opener())
    else:
        urllib.request.install_opener(urllib.request.build_opener(_GuardedHTTPHandler, _GuardedHTTPSHandler))


def fetch_url(url: str, cfg: IngestConfig) -> bytes:
    """One URL's bytes with img2dataset's downloader (user agent, X-Robots-Tag, retries)."""
    from img2dataset.downloader import download_image_with_retry

    install_network_guard(cfg.allow_private_network)
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

    install_network_guard(cfg.allow_private_network)
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
