"""Existing WebDataset tars: a path, a glob or a brace pattern, local or ``s3://``, plain or gzipped.

Members are read as a stream and never extracted, so nothing is ever written from a
member's name. A sample whose members try to escape (``..``, absolute paths) or are links
or devices is recorded as failed with the reason. ``.txt``/``.caption`` becomes the
caption; ``.json`` and other small members are carried into the ``meta`` column.

Only members a sample can use are read into memory, each under a cap decided from its tar
header before a byte of it is read: an image up to ``ingest.max_download_bytes`` (the cap on
one URL download), a caption up to :data:`CAPTION_MEMBER_LIMIT`, any other member up to
:data:`META_MEMBER_LIMIT`. An image or caption over its cap fails the sample with the reason;
a larger sidecar (a multi-GB ``.json``) is skipped unread, streamed past in blocks, and named
in the sample's ``meta["_dropped"]``. Counting samples (planning) reads no member at all.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import Any

from engine.config import FineVitConfig
from engine.sources.base import RawSample, Source, SourceError, register, segment_plan
from engine.sources.files import IMAGE_EXTENSIONS
from engine.store import filesystem_for, is_s3

TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
META_MEMBER_LIMIT = 4096  # bytes: larger non-image members are not carried into meta
CAPTION_MEMBER_LIMIT = 1 << 20  # bytes: a larger .txt/.caption member fails its sample
CAPTION_EXTENSIONS = ("txt", "caption")
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20  # ingest.max_download_bytes' default


def expand_tar_uris(uri: str, cfg: FineVitConfig) -> list[str]:
    from braceexpand import braceexpand

    out: list[str] = []
    for pattern in braceexpand(uri):
        if any(c in pattern for c in "*?["):
            fs, path = filesystem_for(pattern, cfg.storage)
            out.extend(("s3://" if is_s3(pattern) else "") + p for p in sorted(fs.glob(path)))
        else:
            out.append(pattern)
    return out


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's split: key = folder + basename up to its first dot; the rest is the extension."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower() if dot else ""


def _unsafe(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if member.issym() or member.islnk():
        return f"unsafe tar member: {name!r} is a link"
    if not member.isfile():
        return f"unsafe tar member: {name!r} is not a regular file"
    if name.startswith("/") or posixpath.isabs(name):
        return f"unsafe tar member: {name!r} is an absolute path"
    if ".." in name.split("/"):
        return f"unsafe tar member: {name!r} escapes the archive"
    return None


def member_limit(name: str, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> int:
    """The most bytes of a member named ``name`` that are ever read into memory."""
    last = _sample_key(name)[1].rsplit(".", 1)[-1]
    if last in IMAGE_EXTENSIONS:
        return max_image_bytes
    if last in CAPTION_EXTENSIONS:
        return CAPTION_MEMBER_LIMIT
    return META_MEMBER_LIMIT


def iter_tar_samples(
    fileobj: Any, read_data: bool = True, max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes | None]]]]:
    """Group a tar stream's members into samples by key. Member data is read only for safe
    regular files within :func:`member_limit` (and not at all unless ``read_data``); the rest
    is streamed past unread, so memory stays bounded whatever sizes the archive declares."""
    current: str | None = None
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for m in tar:
            if m.isdir():
                continue
            key, _ = _sample_key(m.name)
            if posixpath.basename(m.name).startswith("__"):
                continue  # webdataset's special members (__index__ and the like)
            if key != current and current is not None:
                yield current, members
                members = []
            current = key
            data = None
            if read_data and _unsafe(m) is None and m.size <= member_limit(m.name, max_image_bytes):
                f = tar.extractfile(m)
                data = f.read() if f is not None else None
            members.append((m, data))
    if current is not None:
        yield current, members


def count_tar_samples(uri: str, cfg: FineVitConfig) -> int:
    fs, path = filesystem_for(uri, cfg.storage)
    n = 0
    with fs.open(path, "rb") as f:
        for _ in iter_tar_samples(f, read_data=False):
            n += 1
    return n


def sample_from_members(
    tar_uri: str,
    key: str,
    members: list[tuple[tarfile.TarInfo, bytes | None]],
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
) -> RawSample:
    url = f"{tar_uri}#{key}"
    for m, _ in members:
        reason = _unsafe(m)
        if reason:
            return RawSample(url=url, error=reason)
    image: bytes | None = None
    caption: str | None = None
    meta: dict[str, Any] = {}
    dropped: list[str] = []
    for m, data in members:
        _, ext = _sample_key(m.name)
        last = ext.rsplit(".", 1)[-1]
        limit = member_limit(m.name, max_image_bytes)
        if m.size > limit:
            if last in IMAGE_EXTENSIONS or last in CAPTION_EXTENSIONS:
                what = "image" if last in IMAGE_EXTENSIONS else "caption"
                return RawSample(
                    url=url, error=f"too large: {what} member {m.name!r} is {m.size} bytes (limit {limit})"
                )
            dropped.append(f"{ext} ({m.size} bytes, over {limit})")
            continue
        if data is None:
            continue
        if last in IMAGE_EXTENSIONS and image is None:
            image = data
        elif last in CAPTION_EXTENSIONS and caption is None:
            caption = data.decode("utf-8", "replace").strip()
        elif len(data) <= META_MEMBER_LIMIT:  # a second image or caption lands here too
            text = data.decode("utf-8", "replace")
            if last == "json":
                try:
                    meta[ext] = json.loads(text)
                    continue
                except json.JSONDecodeError:
                    pass
            meta[ext] = text.strip()
    if dropped:
        meta["_dropped"] = dropped
    if (
        caption is None
        and isinstance(meta.get("json"), dict)
        and isinstance(meta["json"].get("caption"), str)
    ):
        caption = meta["json"]["caption"]
    meta["key"] = key
    if image is None:
        kinds = ", ".join(sorted({_sample_key(m.name)[1] or "(none)" for m, _ in members}))
        return RawSample(url=url, caption=caption, meta=meta, error=f"no image member (members: {kinds})")
    return RawSample(url=url, data=image, caption=caption, meta=meta)


@register
class WebDatasetSource(Source):
    kind = "webdataset"
    priority = 20

    @classmethod
    def matches(cls, uri: str, cfg: FineVitConfig) -> bool:
        base = uri.lower()
        return base.endswith(TAR_SUFFIXES) or (".tar" in base and ("{" in base or "*" in base))

    def plan(self, samples_per_shard: int) -> Iterator[Any]:
        tars = expand_tar_uris(self.uri, self.cfg)
        if not tars:
            raise SourceError(f"no tar file matches {self.uri}")

        def counts() -> Iterator[tuple[str, int]]:
            for t in tars:
                try:
                    yield t, count_tar_samples(t, self.cfg)
                except FileNotFoundError:
                    raise SourceError(f"tar not found: {t}") from None
                except tarfile.TarError as e:
                    raise SourceError(f"{t} is not a readable tar: {e}") from None

        yield from segment_plan(counts(), samples_per_shard)

    def read(self, payload: list[tuple[str, int, int]]) -> Iterator[RawSample]:
        max_image = self.cfg.ingest.max_download_bytes
        for tar_uri, start, count in payload:
            fs, path = filesystem_for(tar_uri, self.cfg.storage)
            with fs.open(path, "rb") as f:
                samples = iter_tar_samples(f, max_image_bytes=max_image)
                for i, (key, members) in enumerate(samples):
                    if i < start:
                        continue
                    if i >= start + count:
                        break
                    yield sample_from_members(tar_uri, key, members, max_image)
