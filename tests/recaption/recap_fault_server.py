"""A fault-injecting OpenAI-compatible chat-completions server on 127.0.0.1 (aiohttp.web).

Each request body is hashed; the hash picks its fault from ``plan`` (fractions per mode),
so a run is deterministic. Transient faults hit the first ``transient_attempts`` attempts of
a body only (a retry of the same request then succeeds); modes in ``persistent`` hit every
attempt (a model that always answers badly).

Modes: ``ok``; transport faults ``500``, ``503``, ``429`` (with ``Retry-After``), ``slow``
(sleeps past the client's timeout, then answers 504), ``reset`` (drops the connection), ``garbage`` (HTTP 200,
not JSON); answer faults ``empty``, ``refusal``, ``length`` (finish_reason=length),
``malformed_json``, ``wrong_json``, ``out_of_range`` (boxes outside the image).
``restart(down_s)`` stops listening and comes back on the same port.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

CAPTION = "A large red striped circle at the top left and two small blue squares at the bottom right on a grey background."
TRANSPORT = {"500", "503", "429", "400", "slow", "reset", "garbage"}


@dataclass
class FaultServer:
    plan: dict[str, float] = field(default_factory=dict)
    persistent: set[str] = field(default_factory=set)
    transient_attempts: int = 1
    health_ok: bool = True  # False: /health and /v1/models answer 503 (probes fail: an outage)
    model: str = "fake-vlm"
    bbox_format: str = "norm1000"
    retry_after: float = 0.2
    slow_s: float = 2.0
    service_s: float = 0.0
    port: int = 0
    host: str = "127.0.0.1"
    seen: Counter = field(default_factory=Counter)  # body hash -> attempts
    modes: Counter = field(default_factory=Counter)  # mode -> times served
    times: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    content: dict[str, str] = field(default_factory=dict)  # body hash -> content hash (picks the fault)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    keep_bodies: bool = False
    gets: int = 0  # GET /v1/models and /health answered
    active: int = 0  # chat requests being served now
    peak_active: int = 0  # the most ever served at once

    # ---- life cycle (a thread with its own loop) ------------------------------------------
    def start(self) -> FaultServer:
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._up())
        ready.set()
        self._loop.run_forever()

    async def _up(self) -> None:
        app = web.Application(client_max_size=64 * 2**20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def _down(self) -> None:
        await self._runner.cleanup()

    def _call(self, coro, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self) -> None:
        self._call(self._down())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def restart(self, down_s: float) -> None:
        """Go away (connections refused) for ``down_s`` seconds, then serve again; returns at once."""

        async def cycle() -> None:
            await self._down()
            await asyncio.sleep(down_s)
            await self._up()

        asyncio.run_coroutine_threadsafe(cycle(), self._loop)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- handlers -------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        self.gets += 1
        if not self.health_ok:
            return web.Response(status=503, text="down")
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _health(self, request: web.Request) -> web.Response:
        self.gets += 1
        return web.Response(text="ok") if self.health_ok else web.Response(status=503, text="down")

    def _mode(self, h: str, attempt: int) -> str:
        u = int(h[:8], 16) / 2**32
        acc, mode = 0.0, "ok"
        for m, frac in sorted(self.plan.items()):
            acc += frac
            if u < acc:
                mode = m
                break
        if mode == "ok" or mode in self.persistent or attempt <= self.transient_attempts:
            return mode
        return "ok"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.peak_active = max(self.peak_active, self.active)
        try:
            return await self._answer(request)
        finally:
            self.active -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        h = hashlib.sha256(raw).hexdigest()
        self.seen[h] += 1
        self.times[h].append(time.monotonic())
        try:
            body = json.loads(raw)
        except ValueError:
            return web.Response(status=400, text="body is not JSON")
        # the fault follows the image and prompt, not the sampling: a persistent fault stays
        # when a retry changes the seed, temperature or max_tokens (a model that always fails)
        content = {k: v for k, v in body.items() if k not in ("seed", "temperature", "max_tokens")}
        ch = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
        self.content[h] = ch
        mode = self._mode(ch, self.seen[h])
        self.modes[mode] += 1
        if self.keep_bodies:
            self.bodies.append(body)
        if self.service_s:
            await asyncio.sleep(self.service_s)
        if mode in ("500", "503"):
            return web.Response(status=int(mode), text="upstream overloaded")
        if mode == "400":
            return web.Response(status=400, text="This model's maximum context length is 4096 tokens")
        if mode == "429":
            return web.Response(status=429, text="slow down", headers={"Retry-After": str(self.retry_after)})
        if mode == "slow":
            # past the client's timeout, then a gateway timeout: a client whose timer fires late
            # (its loop stalled under load) still sees a fault, never a late good answer, so a
            # slow request costs exactly one retry either way (the flaky "assert 9 == 10")
            await asyncio.sleep(self.slow_s)
            return web.Response(status=504, text="gateway timeout")
        if mode == "reset":
            request.transport.abort()
            return web.Response(status=500)
        if mode == "garbage":
            return web.Response(status=200, text="<html>502 Bad Gateway</html>", content_type="text/html")
        grounded = bool(body.get("response_format"))
        content, finish = self._content(body, mode, grounded)
        return web.json_response(
            {
                "id": f"chatcmpl-{h[:12]}",
                "object": "chat.completion",
                "model": self.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": finish,
                    }
                ],
                "usage": {
                    "prompt_tokens": 100,
                    "completion_tokens": len(content.split()) if content else 0,
                    "total_tokens": 100 + (len(content.split()) if content else 0),
                },
            }
        )

    def _boxes(self, scale: float) -> list[dict[str, Any]]:
        return [
            {
                "bbox": [0.05 * scale, 0.05 * scale, 0.4 * scale, 0.45 * scale],
                "label": "circle",
                "caption": "a large red striped circle",
            },
            {
                "bbox": [0.6 * scale, 0.6 * scale, 0.95 * scale, 0.9 * scale],
                "label": "square",
                "caption": "a small blue square",
            },
            {
                "bbox": [0.6 * scale, 0.6 * scale, 0.95 * scale, 0.9 * scale],
                "label": "square",
                "caption": "a duplicate box",
            },
        ]

    def _content(self, body: dict[str, Any], mode: str, grounded: bool) -> tuple[str, str]:
        if mode == "empty":
            return "", "stop"
        if mode == "refusal":
            return "I'm sorry, but I can't help with describing this image.", "stop"
        if mode == "length":
            return CAPTION[:40], "length"
        if not grounded:
            return CAPTION, "stop"
        scale = {"norm1000": 1000.0, "norm1": 1.0}.get(
            self.bbox_format, 100.0
        )  # pixels: the tests use 100 px images
        if mode == "malformed_json":
            return '{"regions": [{"bbox": [10, 20, 30', "stop"
        if mode == "wrong_json":
            return json.dumps({"objects": ["circle"]}), "stop"
        if mode == "out_of_range":
            return json.dumps(
                {
                    "regions": [
                        {"bbox": [5 * scale, 5 * scale, 9 * scale, 9 * scale], "label": "x", "caption": "y"}
                    ]
                }
            ), "stop"
        return json.dumps({"regions": self._boxes(scale)}), "stop"
