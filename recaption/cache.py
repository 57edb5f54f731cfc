"""The response cache: a sample whose image (sha256 of its bytes in the shard), model, prompt,
sampling and task settings equal an earlier one's is answered with that row, not sent again.

Scope: one client actor (its shards share one cache), so duplicate images within a shard and
across the shards an actor handles cost one request. A second request for an image already in
flight waits for the first answer. Only ok rows are reused; a failed answer lets the next
duplicate try for itself. Hits are counted as ``cache_hits`` in ``_stats.json``.

Across runs (:class:`CacheStore`): the ok answers of each committed shard are written, before
its commit, to ``<cache dir>/<fingerprint>/<run>-<shard>.json.gz`` (default cache dir:
``<dataset>/cache/recaption``, local or S3, or ``--cache-dir``); a client actor loads its
fingerprint's files when it starts. So a run on a new layer name with the same model, prompt,
sampling and task settings sends no request for an image answered before. Content-addressed:
a file written by a run killed before its commit is harmless.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from collections import OrderedDict
from typing import Any

from recaption.tasks import Sample, Task


def fingerprint(task: Task, extra: dict[str, Any] | None = None) -> str:
    """What makes two answers interchangeable besides the image: model, prompt, sampling, task."""
    s = task.s
    return hashlib.sha256(
        json.dumps(
            {
                "kind": task.kind,
                "model": s.model,
                "prompt": task.prompt.text,
                "sampling": repr(s.sampling),
                "bbox_format": s.bbox_format,
                "box_hint": s.box_hint,
                "keep_truncated": s.keep_truncated,
                # only when set: an unseeded run keeps the fingerprint (and the answers) it had
                **({"seed": s.seed} if s.seed is not None else {}),
                **(extra or {}),
            },
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()


class ResponseCache:
    def __init__(self, fingerprint: str, max_entries: int = 200_000, boxes: bool = True) -> None:
        self.fp = fingerprint
        self.max_entries = max_entries
        self.boxes = boxes  # the sample's proposals are part of the question (proposals tasks)
        self._rows: OrderedDict[str, asyncio.Future] = OrderedDict()
        self._loaded: dict[str, dict[str, Any]] = {}  # from earlier runs (CacheStore)
        self.fresh: dict[str, dict[str, Any]] = {}  # ok answers of this actor not yet stored

    def preload(self, rows: dict[str, dict[str, Any]]) -> None:
        self._loaded.update(rows)

    def drain(self) -> dict[str, dict[str, Any]]:
        out, self.fresh = self.fresh, {}
        return out

    def key(self, sample: Sample) -> str | None:
        if sample.sha256 is None or sample.image is None:
            return None
        boxes = ""
        if self.boxes and sample.proposals:
            boxes = json.dumps(sample.proposals, sort_keys=True, default=str)
        return hashlib.sha256(f"{self.fp}|{sample.sha256}|{sample.image.size}|{boxes}".encode()).hexdigest()

    async def lookup(self, k: str) -> dict[str, Any] | None:
        """An ok row for ``k`` (waiting for one in flight), or None: the caller must ask and then
        :meth:`put` (even a failed row, to release the waiters)."""
        while True:
            fut = self._rows.get(k)
            if fut is None and k in self._loaded:
                return self._loaded[k]
            if fut is None:
                self._rows[k] = asyncio.get_running_loop().create_future()
                if len(self._rows) > self.max_entries:
                    self._rows.popitem(last=False)
                return None
            row = await asyncio.shield(fut)
            if row is not None:
                self._rows.move_to_end(k)
                return row
            # the first answer failed: the next caller asks for itself
            if self._rows.get(k) is fut:
                del self._rows[k]

    def put(self, k: str, row: dict[str, Any]) -> None:
        fut = self._rows.get(k)
        ok = row.get("status") == "ok"
        if ok and k not in self._loaded:
            self.fresh[k] = row
        if fut is None or fut.done():
            if ok:
                f = asyncio.get_running_loop().create_future()
                f.set_result(row)
                self._rows[k] = f
            return
        fut.set_result(row if ok else None)
        if not ok:
            del self._rows[k]


class CacheStore:
    """The response cache's answers on storage, one gzip JSON file per committed shard."""

    def __init__(self, store: Any) -> None:  # engine.store.Store of <cache dir>/<fingerprint>
        self.store = store

    def load(self) -> dict[str, dict[str, Any]]:
        rows: dict[str, dict[str, Any]] = {}
        if not self.store.exists():
            return rows
        for name in sorted(self.store.listdir()):
            if name.endswith(".json.gz"):
                rows.update(json.loads(gzip.decompress(self.store.read_bytes(name))))
        return rows

    def save(self, name: str, rows: dict[str, dict[str, Any]]) -> None:
        if rows:
            data = json.dumps(rows, separators=(",", ":"), default=str).encode()
            self.store.write_bytes(f"{name}.json.gz", gzip.compress(data, 6))


class CacheHub:
    """The response cache shared by several client actors (a small async Ray actor), for the
    samples whose image another shard of the run also holds (recaption/dedupe.py finds them
    before the run): the first actor to :meth:`claim` a key asks; the others wait for its
    :meth:`put` and reuse an ok row. A failed answer, or none within ``wait_s`` (its actor
    died), lets the next one ask for itself. Holds the rows of duplicated images only."""

    def __init__(self, wait_s: float = 600.0) -> None:
        self.wait_s = wait_s
        self.rows: dict[str, dict[str, Any]] = {}
        self.flight: dict[str, asyncio.Future] = {}

    async def claim(self, k: str) -> dict[str, Any] | None:
        """An ok row for ``k`` (waiting for one in flight), or None: the caller asks, then puts."""
        while True:
            if k in self.rows:
                return self.rows[k]
            fut = self.flight.get(k)
            if fut is None:
                self.flight[k] = asyncio.get_running_loop().create_future()
                return None
            try:
                row = await asyncio.wait_for(asyncio.shield(fut), self.wait_s)
            except TimeoutError:
                row = None
            if row is not None:
                return row
            if self.flight.get(k) is fut:
                del self.flight[k]

    def put(self, k: str, row: dict[str, Any]) -> None:
        ok = row.get("status") == "ok"
        if ok:
            self.rows[k] = row
        fut = self.flight.pop(k, None)
        if fut is not None and not fut.done():
            fut.set_result(row if ok else None)
