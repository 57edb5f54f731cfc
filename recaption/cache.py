"""The response cache: a sample whose image (sha256 of its bytes in the shard), model, prompt,
sampling and task settings equal an earlier one's is answered with that row, not sent again.

Scope: one client actor (its shards share one cache), so duplicate images within a shard and
across the shards an actor handles cost one request. A second request for an image already in
flight waits for the first answer. Only ok rows are reused; a failed answer lets the next
duplicate try for itself. Across runs, a layer's committed shards are never sent again (their
commit markers); hits are counted as ``cache_hits`` in ``_stats.json``.
"""

from __future__ import annotations

import asyncio
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
                **(extra or {}),
            },
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()


class ResponseCache:
    def __init__(self, fingerprint: str, max_entries: int = 200_000) -> None:
        self.fp = fingerprint
        self.max_entries = max_entries
        self._rows: OrderedDict[str, asyncio.Future] = OrderedDict()

    def key(self, sample: Sample) -> str | None:
        if sample.sha256 is None or sample.image is None:
            return None
        boxes = json.dumps(sample.proposals, sort_keys=True, default=str) if sample.proposals else ""
        return hashlib.sha256(f"{self.fp}|{sample.sha256}|{sample.image.size}|{boxes}".encode()).hexdigest()

    async def lookup(self, k: str) -> dict[str, Any] | None:
        """An ok row for ``k`` (waiting for one in flight), or None: the caller must ask and then
        :meth:`put` (even a failed row, to release the waiters)."""
        while True:
            fut = self._rows.get(k)
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
        if fut is None or fut.done():
            if ok:
                f = asyncio.get_running_loop().create_future()
                f.set_result(row)
                self._rows[k] = f
            return
        fut.set_result(row if ok else None)
        if not ok:
            del self._rows[k]
