"""Existing WebDataset tars: a path, a glob or a brace pattern, local or ``s3://``, plain or gzipped.

Members are read as a stream and never extracted, so nothing is ever written from a
member's name. A sample whose members try to escape (``..``, absolute paths) or are links
or devices is recorded as failed with the reason. ``.txt``/``.caption`` becomes the
caption; ``.json`` and other small members are carried into the ``meta`` column.
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


def iter_tar_samples(fileobj: Any) -> Iterator[tuple[str, list[tuple[tarfile.TarInfo, bytes | None]]]]:
    """Group a tar stream's members into samples by key; member data read only for regular files."""
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
            if m.isfile() and _unsafe(m) is None:
                f = tar.extractfile(m)
                data = f.read() if f is not None else None
            members.append((m, data))
    if current is not None:
        yield current, members


def count_tar_samples(uri: str, cfg: FineVitConfig) -> int:
    fs, path = filesystem_for(uri, cfg.storage)
    n = 0
    with fs.open(path, "rb") as f:
        for _ in iter_tar_samples(f):
            n += 1
    return n


def sample_from_members(
    tar_uri: str, key: str, members: list[tuple[tarfile.TarInfo, bytes | None]]
) -> RawSample:
    url = f"{tar_uri}#{key}"
    for m, _ in members:
        reason = _unsafe(m)
        if reason:
            return RawSample(url=url, error=reason)
    image: bytes | None = None
    caption: str | None = None
    meta: dict[str, Any] = {}
    for m, data in members:
        _, ext = _sample_key(m.name)
        last = ext.rsplit(".", 1)[-1]
        if data is None:
            continue
        if last in IMAGE_EXTENSIONS and image is None:
            image = data
        elif last in ("txt", "caption") and caption is None:
            caption = data.decode("utf-8", "replace").strip()
        elif len(data) <= META_MEMBER_LIMIT:
            text = data.decode("utf-8", "replace")
            if last == "json":
                try:
                    meta[ext] = json.loads(text)
                    continue
                except json.JSONDecodeError:
                    pass
            meta[ext] = text.strip()
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
        for tar_uri, start, count in payload:
            fs, path = filesystem_for(tar_uri, self.cfg.storage)
            with fs.open(path, "rb") as f:
                for i, (key, members) in enumerate(iter_tar_samples(f)):
                    if i < start:
                        continue
                    if i >= start + count:
                        break
                    yield sample_from_members(tar_uri, key, members)
