"""Image sources; each module registers one Source (``priority`` sets the match order)."""

from engine.sources import (  # noqa: F401  - each module registers its Source
    existing,
    files,
    i2d_parquet,
    parquet,
    synthetic,
    urllist,
    webdataset,
)
from engine.sources.base import RawSample, Source, SourceError, open_source

__all__ = ["RawSample", "Source", "SourceError", "open_source"]
