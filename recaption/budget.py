"""A byte budget for the samples one client actor holds: prepared JPEGs waiting for the
backend plus the request bodies in flight (finding 8).

A count alone does not bound memory: 64 requests of 30 KB and 64 of 3 MB differ by 100x. Each
sample is charged :meth:`recaption.tasks.Task.bytes_estimate` before it is handed to the
backend and credited back when its row is done; a sample waits while the charge would pass the
limit. The shards of one actor share one budget, so ``shards_in_flight`` no longer multiplies
the memory. A sample larger than the whole budget is admitted alone (never a deadlock).
"""

from __future__ import annotations

import asyncio
import re

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20}
_UNITS |= {"g": 10**9, "gb": 10**9, "gib": 2**30}


def parse_bytes(v: int | float | str) -> int:
    """``"512MiB"``, ``"2GB"``, ``"64k"`` or a plain number of bytes -> bytes (ValueError otherwise)."""
    if isinstance(v, int | float):
        return int(v)
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(v))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {v!r} (e.g. 512MiB, 2GB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class ByteBudget:
    """An async counting semaphore over bytes. ``peak`` is the most ever held (for tests and
    ``_stats.json``)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the byte budget must be >= 1 byte")
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._cond: asyncio.Condition | None = None

    def _c(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def acquire(self, n: int) -> None:
        async with self._c():
            await self._c().wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n
            self.peak = max(self.peak, self.used)

    async def release(self, n: int) -> None:
        async with self._c():
            self.used -= n
            self._c().notify_all()
