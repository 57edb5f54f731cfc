"""The source interface: how an input becomes a deterministic plan of shards.

A source does two things, on two sides of the cluster:

* :meth:`Source.plan` runs in the driver and streams *shard payloads*: small, picklable
  descriptions of the inputs of one shard (file paths, URL rows, ``(file, start, count)``
  segments). It must be deterministic: the same input gives the same payloads in the same
  order, whatever the worker count, so keys are stable across reruns. It never holds more
  than one shard's worth of inputs in memory.
* :meth:`Source.read` runs in a worker and yields exactly one :class:`RawSample` per input
  of a payload, in order; a sample that cannot be read is yielded with ``error`` set (it
  becomes a row with a failed status), never skipped.

Adding a source is one new module with a :class:`Source` subclass registered with
:func:`register`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from engine.config import FineVitConfig, IngestConfig


class SourceError(ValueError):
    """The source URI cannot be used (missing, empty, wrong format); the message says why."""


@dataclass
class RawSample:
    """One input, as read by a worker, before decoding."""

    url: str
    data: bytes | None = None
    caption: str | None = None
    error: str | None = None  # the bytes could not be had: becomes failed_to_download
    meta: dict[str, Any] | None = None  # source metadata carried into the shard's ``meta`` column
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # rows for layers the source writes

    def meta_json(self) -> str | None:
        return json.dumps(self.meta, sort_keys=True, default=str) if self.meta else None


@dataclass(frozen=True)
class LayerSpec:
    """A layer a source writes alongside its shards (e.g. the synthetic ground truth)."""

    name: str
    kind: str  # "caption" | "regions"
    info: dict[str, Any] = field(default_factory=dict)


class Source(ABC):
    """An image source. Subclasses set ``kind`` and implement ``matches``, ``plan`` and ``read``."""

    kind: ClassVar[str]
    #: match order: lower first (specific recognisers before the folder/prefix catch-all)
    priority: ClassVar[int] = 50
    #: layers written with every shard of this source
    layers: ClassVar[tuple[LayerSpec, ...]] = ()
    #: whether samples are fetched over the network (img2dataset's downloader path)
    downloads: ClassVar[bool] = False
    #: whether the source's own keys are kept (then it must be the first source of a dataset)
    keeps_keys: ClassVar[bool] = False

    def __init__(self, uri: str, cfg: FineVitConfig) -> None:
        self.uri = uri
        self.cfg = cfg

    @classmethod
    @abstractmethod
    def matches(cls, uri: str, cfg: FineVitConfig) -> bool:
        """Whether this source reads ``uri`` (cheap: a scheme, a suffix, a marker file)."""

    @abstractmethod
    def plan(self, samples_per_shard: int) -> Iterator[Any]:
        """Stream one picklable payload per output shard, deterministically."""

    @abstractmethod
    def read(self, payload: Any) -> Iterator[RawSample]:
        """Yield one RawSample per input of ``payload``, in plan order."""

    def build_shard(
        self,
        payload: Any,
        shard_index: int,
        staging_dir: str,
        cfg: IngestConfig,
        on_sample: Callable[[str, RawSample], None] | None = None,
    ) -> list[dict[str, Any]] | None:
        """Write ``<shard>.tar`` + ``<shard>.parquet`` into ``staging_dir`` and return the rows,
        or None (the default) to let ingest decode every sample of :meth:`read` and number the
        keys. A source whose inputs already are finished img2dataset shards overrides it to
        keep their keys and statuses."""
        return None

    def fetch(self, url: str) -> bytes:
        """Fetch one sample's bytes again (``--retry-failed``); sources that can't, raise."""
        raise NotImplementedError(f"{self.kind} sources cannot re-fetch single samples")

    @property
    def can_fetch(self) -> bool:
        """Whether single samples can be fetched again (what ``--retry-failed`` needs)."""
        return type(self).fetch is not Source.fetch

    def describe(self) -> dict[str, Any]:
        return {"uri": self.uri, "kind": self.kind}


_REGISTRY: list[type[Source]] = []


def register(cls: type[Source]) -> type[Source]:
    _REGISTRY.append(cls)
    return cls


def chunked(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Group a stream into lists of ``size`` (the last may be shorter)."""
    buf: list[Any] = []
    for item in items:
        buf.append(item)
        if len(buf) == size:
            yield buf
            buf = []
    if buf:
        yield buf


def segment_plan(
    counts: Iterator[tuple[Any, int]], samples_per_shard: int
) -> Iterator[list[tuple[Any, int, int]]]:
    """Cut a stream of ``(file, n_samples)`` into shards of ``(file, start, count)`` segments.

    Used by sources whose files hold many samples (tars, Parquet): a shard may span files
    and a file may span shards, and only the per-file counts are held in the driver.
    """
    shard: list[tuple[Any, int, int]] = []
    room = samples_per_shard
    for file, n in counts:
        start = 0
        while start < n:
            take = min(room, n - start)
            shard.append((file, start, take))
            start += take
            room -= take
            if room == 0:
                yield shard
                shard, room = [], samples_per_shard
    if shard:
        yield shard
