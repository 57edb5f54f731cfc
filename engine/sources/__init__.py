"""Image sources; each module registers one Source (``priority`` sets the match order)."""

from engine.sources import (  # noqa: F401  - each module registers its Source
    synthetic,
    existing,
    webdataset,
    parquet,
    urllist,
    files,
)
from engine.sources.base import RawSample, Source, SourceError, open_source

__all__ = ["RawSample", "Source", "SourceError", "open_source"]
