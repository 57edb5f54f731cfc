"""A folder of image files, recursive: a local path or an ``s3://bucket/prefix/``.

Files are taken in a deterministic order (sorted local walk; S3's lexicographic listing),
streamed one folder / one listing page at a time. A ``<stem>.txt`` beside an image (next to
it in that order) is its caption. Files without an image extension are not inputs.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

from engine.config import FineVitConfig
from engine.sources.base import RawSample, Source, SourceError, chunked, register
from engine.store import Store, is_s3

IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "ppm", "pgm", "avif"}
)
CAPTION_EXTENSIONS = frozenset({"txt", "caption"})


def _split(rel: str) -> tuple[str, str]:
    stem, _, ext = rel.rpartition(".")
    return (stem, ext.lower()) if stem and "/" not in ext else (rel, "")


def pair_captions(paths: Iterator[str]) -> Iterator[tuple[str, str | None]]:
    """``(image, caption_file|None)`` from a sorted stream of paths, grouping adjacent same-stem files."""
    group_stem: str | None = None
    images: list[str] = []
    caption: str | None = None

    def flush() -> Iterator[tuple[str, str | None]]:
        for img in images:
            yield img, caption

    for rel in paths:
        stem, ext = _split(rel)
        if ext not in IMAGE_EXTENSIONS and ext not in CAPTION_EXTENSIONS:
            continue
        if stem != group_stem:
            yield from flush()
            group_stem, images, caption = stem, [], None
        if ext in IMAGE_EXTENSIONS:
            images.append(rel)
        elif caption is None:
            caption = rel
    yield from flush()


@register
class FolderSource(Source):
    kind = "folder"
    priority = 100

    def __init__(self, uri: str, cfg: FineVitConfig) -> None:
        super().__init__(uri, cfg)
        self.store = Store(uri, cfg.storage)

    @classmethod
    def matches(cls, uri: str, cfg: FineVitConfig) -> bool:
        if is_s3(uri):
            return True  # the fallback for s3:// URIs: a prefix of image files
        return Store(uri).isdir()

    def plan(self, samples_per_shard: int) -> Iterator[Any]:
        found = False
        for chunk in chunked(pair_captions(self.store.walk_files()), samples_per_shard):
            found = True
            yield chunk
        if not found:
            raise SourceError(
                f"no image files under {self.uri} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )

    def read(self, payload: list[tuple[str, str | None]]) -> Iterator[RawSample]:
        for rel, caption_rel in payload:
            url = self.store.uri(rel)
            caption = None
            if caption_rel is not None:
                try:
                    caption = self.store.read_bytes(caption_rel).decode("utf-8", "replace").strip()
                except Exception:
                    caption = None
            try:
                data = self.store.read_bytes(rel)
            except Exception as e:
                yield RawSample(url=url, caption=caption, error=f"cannot read file: {e}")
                continue
            yield RawSample(url=url, data=data, caption=caption, meta={"path": posixpath.normpath(rel)})

    def fetch(self, url: str) -> bytes:
        return Store(url, self.cfg.storage).read_bytes("")
