"""Image sources; each module registers one Source (``priority`` sets the match order)."""

from engine.config import FineVitConfig
from engine.sources import (  # noqa: F401  - each module registers its Source
    existing,
    files,
    i2d_parquet,
    parquet,
    synthetic,
    urllist,
    webdataset,
)
from engine.sources.base import _REGISTRY, RawSample, Source, SourceError

__all__ = ["RawSample", "Source", "SourceError", "open_source"]


def open_source(uri: str, cfg: FineVitConfig) -> Source:
    """The first registered source that recognises ``uri``; a clear error when none does."""
    _check_exists(uri)
    for cls in sorted(_REGISTRY, key=lambda c: c.priority):
        if cls.matches(uri, cfg):
            return cls(uri, cfg)
    kinds = ", ".join(c.kind for c in _REGISTRY)
    raise SourceError(
        f"cannot read source {uri!r}: not a folder of images, URL list, WebDataset tar, Parquet file, "
        f"s3:// prefix or synthetic:// URI (known kinds: {kinds})"
    )


def _check_exists(uri: str) -> None:
    """A local SOURCE that is not there is named as such, before any source guesses at it."""
    import glob
    import os

    if "://" in uri or "{" in uri:
        return  # s3:// and synthetic:// are checked by their source; braces expand to many tars
    if any(c in uri for c in "*?["):
        if not glob.glob(os.path.expanduser(uri)):
            raise SourceError(f"no file matches {uri}")
    elif not os.path.exists(os.path.expanduser(uri)):
        raise SourceError(f"{uri} does not exist")
