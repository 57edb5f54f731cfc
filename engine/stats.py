"""Typed ``_stats.json``: the commit marker of an image shard and of a layer shard.

Every stage counts what it did per shard and writes it last, as the shard's commit marker
(:func:`engine.layout.commit_parts`). This module is the one place that reads or writes
those files; everyone else holds a :class:`ShardStats` or a :class:`LayerStats`.

::

    RowStatus             'ok' | 'failed'                       a layer row's ``status``
    ImageStatus           'success' | 'failed_to_download' | 'failed_to_resize'   an image shard row's
    Reason                TRANSIENT | PERMANENT | UPSTREAM      why a row failed; Reason.of(error)
    unavailable(detail)   the error of a layer row whose image is missing (Reason.UPSTREAM)

    ShardStats(count, successes, failed_to_download, failed_to_resize, status_dict,
               start_time, end_time, duration, code_version, shard, source, kind, bytes,
               retried, retries_total, node, extra)
        .from_rows(rows, started, **fields)   .read(store, path)   .write(store, path)
        .to_dict()   .failed   .reasons (Counter, 'success' left out)   .has_transient()
    LayerStats(count, ok, failed, error_reasons, start_time, end_time, duration, shard, layer, node, extra)
        .from_table(table, started, **fields)  .read(store, path)   .write(store, path)
        .to_dict()   .reasons (Counter)   extra: a stage's own counters (requests, tokens,
        per-filter counts, ...), written as top-level keys and read back into ``extra``
    current_node()        the Ray node id this process runs on (None outside Ray): every marker's
                          ``node``, so ``finevit info`` shows how the work spread over a cluster

The JSON keeps img2dataset's field names for image shards (``count``, ``successes``,
``status_dict``, ...), so an img2dataset download reads as a FineViT dataset. Keys this
code does not know are kept in ``extra`` and written back unchanged.

A failed row's reason is a message for people (``error`` / ``error_message``); what to do
with it is :meth:`Reason.of`'s answer, decided here once: ``TRANSIENT`` (timeouts, 429/5xx,
dropped connections: ``--retry-failed`` redoes them), ``UPSTREAM`` (the input itself is
missing, e.g. the image failed ingest: nothing to redo in this layer), ``PERMANENT`` (bad
content or a bad answer: a new attempt may differ only for a sampling model).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from engine.errors import is_transient

if TYPE_CHECKING:
    import pyarrow as pa

    from engine.store import Store


class RowStatus(StrEnum):
    """A layer row's ``status``."""

    OK = "ok"
    FAILED = "failed"


class ImageStatus(StrEnum):
    """An image shard row's ``status`` (img2dataset's values)."""

    SUCCESS = "success"
    FAILED_TO_DOWNLOAD = "failed_to_download"  # the bytes could not be had
    FAILED_TO_RESIZE = "failed_to_resize"  # bytes, but not a usable image


# The one spelling of "this row's input is missing"; Reason.of recognises it.
_UPSTREAM_PREFIX = "image not "


def unavailable(detail: str) -> str:
    """The error of a layer row whose image is not there (``Reason.UPSTREAM``)."""
    return f"{_UPSTREAM_PREFIX}{detail}"


class Reason(StrEnum):
    """Why a row failed, as far as a retry cares."""

    TRANSIENT = "transient"  # timeout, 429/5xx, dropped connection: worth retrying as it is
    PERMANENT = "permanent"  # bad content, a bad or refused answer
    UPSTREAM = "upstream"  # the input was not there (its image failed ingest): nothing to redo here

    @classmethod
    def of(cls, error: str | None) -> Reason:
        """Classify a row's error message (``None`` counts as permanent)."""
        if error and error.startswith(_UPSTREAM_PREFIX):
            return cls.UPSTREAM
        return cls.TRANSIENT if is_transient(error) else cls.PERMANENT


def current_node() -> str | None:
    """The Ray node id of this process when it runs inside Ray (a task, an actor or a driver
    that called ``ray.init``); ``None`` otherwise. Ray is never imported here just to ask."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def _split(cls: type, data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``data``'s keys that are fields of ``cls``, and the rest (for ``extra``)."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in data.items() if k in names}
    return known, {k: v for k, v in data.items() if k not in names}


class _Marker:
    """Shared read/write of a ``_stats.json``: known fields, then ``extra`` as top-level keys."""

    _OPTIONAL: ClassVar[tuple[str, ...]] = ()  # written only when set, as before typing
    extra: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if f.name == "extra" or (f.name in self._OPTIONAL and v is None):
                continue
            out[f.name] = dict(v) if isinstance(v, Mapping) else v
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        known, extra = _split(cls, data)
        return cls(**known, extra=extra)

    @classmethod
    def read(cls, store: Store, path: str) -> Any:
        """Read a committed marker (``path`` relative to ``store``)."""
        return cls.from_dict(store.read_json(path))

    def write(self, store: Store, path: str) -> None:
        """Write the marker; call it through :func:`engine.layout.commit_parts`, last."""
        store.write_json(path, self.to_dict())


@dataclass
class ShardStats(_Marker):
    """An image shard's ``_stats.json``: img2dataset's fields plus where the shard came from."""

    count: int = 0
    successes: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    status_dict: dict[str, int] = field(default_factory=dict)  # error message (or 'success') -> rows
    start_time: float | None = None
    end_time: float | None = None
    duration: float | None = None
    code_version: str | None = None
    shard: str | None = None
    source: str | None = None
    kind: str | None = None
    bytes: int | None = None  # size of the tar
    retried: int | None = None  # rows re-attempted by the last --retry-failed
    retries_total: int | None = None
    node: str | None = None  # the Ray node id that built the shard (None outside Ray)
    extra: dict[str, Any] = field(default_factory=dict)

    _OPTIONAL: ClassVar[tuple[str, ...]] = (
        "start_time",
        "end_time",
        "duration",
        "code_version",
        "shard",
        "source",
        "kind",
        "bytes",
        "retried",
        "retries_total",
        "node",
    )

    def __post_init__(self) -> None:
        self.count, self.successes = int(self.count or 0), int(self.successes or 0)
        self.status_dict = {k: int(v) for k, v in (self.status_dict or {}).items()}

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], started: float, **fields: Any) -> ShardStats:
        """Count a shard's metadata rows (``status``, ``error_message``); ``fields`` not known go to extra."""
        status: Counter[str] = Counter()
        reasons: Counter[str] = Counter()
        for r in rows:
            status[r["status"]] += 1
            reasons[r["error_message"] if r["status"] != ImageStatus.SUCCESS else ImageStatus.SUCCESS] += 1
        now = time.time()
        known, extra = _split(cls, fields)
        base = {
            "count": sum(status.values()),
            "successes": status[ImageStatus.SUCCESS],
            "failed_to_download": status[ImageStatus.FAILED_TO_DOWNLOAD],
            "failed_to_resize": status[ImageStatus.FAILED_TO_RESIZE],
            "duration": now - started,
            "start_time": started,
            "end_time": now,
            "status_dict": {str(k): v for k, v in reasons.most_common(100)},
            "node": current_node(),
        }
        return cls(**{**base, **known}, extra=extra)

    @property
    def failed(self) -> int:
        return self.count - self.successes

    @property
    def reasons(self) -> Counter[str]:
        """Failure reason -> rows (img2dataset's ``status_dict`` without ``success``)."""
        return Counter({k: n for k, n in self.status_dict.items() if k != ImageStatus.SUCCESS})

    def has_transient(self) -> bool:
        """Whether ``--retry-failed`` has something to redo in this shard."""
        return any(Reason.of(r) is Reason.TRANSIENT for r in self.reasons)


@dataclass
class LayerStats(_Marker):
    """A layer shard's ``_stats.json``: rows ok / failed, reasons, and the stage's own counters."""

    count: int = 0
    ok: int = 0
    failed: int = 0
    error_reasons: dict[str, int] = field(default_factory=dict)  # error message -> rows
    start_time: float | None = None
    end_time: float | None = None
    duration: float | None = None
    shard: str | None = None
    layer: str | None = None
    node: str | None = None  # the Ray node id that wrote the layer shard (None outside Ray)
    extra: dict[str, Any] = field(default_factory=dict)  # requests, tokens, per-filter counts, ...

    _OPTIONAL: ClassVar[tuple[str, ...]] = ("start_time", "end_time", "duration", "shard", "layer", "node")

    def __post_init__(self) -> None:
        self.count, self.ok, self.failed = int(self.count or 0), int(self.ok or 0), int(self.failed or 0)
        self.error_reasons = {k: int(v) for k, v in (self.error_reasons or {}).items()}

    @classmethod
    def from_table(cls, rows: pa.Table, started: float, **fields: Any) -> LayerStats:
        """Count a layer shard's rows by ``status`` and ``error``; ``fields`` not known go to extra."""
        n = rows.num_rows
        status = rows.column("status").to_pylist() if "status" in rows.column_names else [RowStatus.OK] * n
        errors = rows.column("error").to_pylist() if "error" in rows.column_names else [None] * n
        ok = sum(1 for s in status if s == RowStatus.OK)
        reasons = Counter(e for s, e in zip(status, errors, strict=True) if s != RowStatus.OK)
        now = time.time()
        known, extra = _split(cls, fields)
        base = {
            "count": n,
            "ok": ok,
            "failed": n - ok,
            "error_reasons": dict(reasons.most_common(50)),
            "start_time": started,
            "end_time": now,
            "duration": now - started,
            "node": current_node(),
        }
        return cls(**{**base, **known}, extra=extra)

    @property
    def reasons(self) -> Counter[str]:
        return Counter(self.error_reasons)
