"""Recaption under load: a captioner with a fixed capacity, and one client in a process of its own.

* :class:`CapacityServer`: the recaption tests' OpenAI-compatible fault server on 127.0.0.1
  (aiohttp, a thread of the test process) with a chat handler that serves at most ``capacity``
  requests at once, each for ``service_s`` seconds; the others wait in its queue, as in vLLM. It records when each
  request arrived, started and ended, so a test can tell how busy it was kept.
* ``python -m tests.chaos._load ROOT ARGS_JSON``: the recaption client actor's code
  (:class:`recaption.run.ShardWorker`, what each Ray client actor runs) over the first
  ``limit`` images of a dataset, in this fresh process, so that ``ru_maxrss`` is its own peak
  RSS (bench/recaption_throughput.py's ``--rss`` mode measures the same way). It prints one
  JSON line: rows ok / failed with their reasons, peak RSS, RSS before the work, the byte
  budget's peak.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tests.recaption.recap_fault_server import FaultServer

CAPTION = "A noisy square image: grey static with no object, no text and no clear region in it."


@dataclass
class CapacityServer(FaultServer):
    """The recaption tests' fault server (its life cycle, ``/health`` and ``/v1/models``) with a
    chat handler that serves at most ``capacity`` requests at once, each for ``service_s``."""

    capacity: int = 1
    model: str = "load-vlm"
    events: list[tuple[float, float, float]] = field(default_factory=list)  # (arrived, started, ended)
    in_service: int = 0
    peak_in_service: int = 0
    present: int = 0  # requests in the server now (queued + in service): the client's in-flight
    peak_present: int = 0
    bytes_in: int = 0

    async def _up(self) -> None:
        self._slots = asyncio.Semaphore(self.capacity)
        await super()._up()

    async def _chat(self, request: Any) -> Any:
        from aiohttp import web

        arrived = time.monotonic()
        self.present += 1
        self.peak_present = max(self.peak_present, self.present)
        try:
            self.bytes_in += len(await request.read())
            async with self._slots:
                started = time.monotonic()
                self.in_service += 1
                self.peak_in_service = max(self.peak_in_service, self.in_service)
                try:
                    await asyncio.sleep(self.service_s)
                finally:
                    self.in_service -= 1
                    self.events.append((arrived, started, time.monotonic()))
        finally:
            self.present -= 1
        return web.json_response(
            {
                "id": "chatcmpl-load",
                "object": "chat.completion",
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": CAPTION},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 600, "completion_tokens": 20, "total_tokens": 620},
            }
        )

    def busy(self) -> tuple[float, float]:
        """(fraction of the capacity in use from the first arrival to the last answer,
        fraction of that time with every slot busy)."""
        if not self.events:
            return 0.0, 0.0
        t0 = min(a for a, _, _ in self.events)
        t1 = max(e for _, _, e in self.events)
        used = sum(e - s for _, s, e in self.events)
        steps = sorted([(s, 1) for _, s, _ in self.events] + [(e, -1) for _, _, e in self.events])
        full, level, last = 0.0, 0, t0
        for t, d in steps:
            if level >= self.capacity:
                full += t - last
            level, last = level + d, t
        span = max(t1 - t0, 1e-9)
        return used / (self.capacity * span), full / span


def client(root: str, a: dict[str, Any]) -> dict[str, Any]:
    """Caption the first ``a["limit"]`` images of ``root`` into layer ``a["layer"]`` with the
    shard worker in this process; what it did and its memory."""
    import resource
    from collections import Counter

    from engine.config import StorageConfig
    from engine.layout import Dataset
    from recaption.config import RecaptionConfig
    from recaption.plan import check_or_write_info, layer_info, select_shards
    from recaption.run import ShardWorker

    cfg = RecaptionConfig(
        endpoints=[a["url"]],
        layer=a["layer"],
        max_in_flight=a["in_flight"],
        max_bytes_in_flight=a["budget"],
        image_max_side=a["max_side"],
        shards_in_flight=a["shards_in_flight"],
        limit=a["limit"],
        timeout=a["timeout"],
        retries=0,  # a timeout stays a failed row: none may happen
        progress=False,
        persistent_cache=False,
    )
    dataset = Dataset(root)
    check_or_write_info(dataset.layer(cfg.layer), layer_info(cfg, "load-vlm"))
    shards = select_shards(dataset, cfg)
    worker = ShardWorker(root, StorageConfig(), cfg, "load-vlm")
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize() / 2**20

    async def go() -> list[dict[str, Any]]:
        sem = asyncio.Semaphore(cfg.shards_in_flight)

        async def one(s: str) -> dict[str, Any]:
            async with sem:
                return (await worker.run_shard(s))["stats"]

        try:
            return await asyncio.gather(*(one(s) for s in shards))
        finally:
            await worker.close()

    t = time.monotonic()
    stats = asyncio.run(go())
    seconds = time.monotonic() - t
    reasons: Counter = Counter()
    for s in stats:
        reasons.update(s.get("error_reasons") or {})
    return {
        "shards": len(stats),
        "ok": sum(s["ok"] for s in stats),
        "failed": sum(s["count"] - s["ok"] for s in stats),
        "reasons": dict(reasons),
        "seconds": seconds,
        "rss_before_mib": before,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "budget_peak_mib": worker.budget.peak / 2**20,
    }


if __name__ == "__main__":
    print(json.dumps(client(sys.argv[1], json.loads(sys.argv[2]))), flush=True)
