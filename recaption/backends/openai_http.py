"""``openai`` backend: an asyncio client for OpenAI-compatible chat-completions servers
(``vllm serve``, ``python -m sglang.launch_server``, ``finevit serve-captioner``).

* Images go as base64 JPEG data URLs, encoded once per request (not per attempt).
* Each endpoint has at most ``max_in_flight`` requests outstanding; a new request goes to
  the live endpoint with the fewest outstanding (least-outstanding balancing), and waits
  when every endpoint is full, so the servers' queues stay short and nothing is dropped.
* Timeouts, HTTP 429 (``Retry-After`` honoured), 5xx, unreadable answers and connection
  errors are retried with exponential backoff and jitter, up to ``retries`` times. Other
  4xx answers (a bad request) are final at once.
* ``eject_after`` consecutive failures take an endpoint out of rotation; a background
  probe (``GET /health``, then ``/v1/models``) puts it back as soon as it answers.
* JSON-schema constrained output uses ``response_format: {"type": "json_schema", ...}``
  (vLLM >= 0.12 and SGLang honour it; the old ``guided_json`` is silently ignored by
  recent vLLM, so it is never sent).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

from recaption.backends.base import (
    Backend,
    BackendError,
    CaptionRequest,
    CaptionResult,
    CircuitOpen,
    fill_images,
)

RETRY_AFTER_CAP = 300.0


def normalize_endpoint(url: str) -> str:
    """``http://h:p``, ``http://h:p/`` and ``http://h:p/v1`` all mean the server at ``http://h:p``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, min(float(value), RETRY_AFTER_CAP))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, min(when.timestamp() - time.time(), RETRY_AFTER_CAP))


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with 'equal jitter': in [d/2, d] for d = min(cap, base * 2**attempt)."""
    d = min(cap, base * (2**attempt))
    return d * (0.5 + 0.5 * (rng or random).random())


def image_part(data: bytes) -> dict[str, Any]:
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()},
    }


def build_payload(req: CaptionRequest, model: str) -> dict[str, Any]:
    """The chat-completions body for ``req`` (what goes over the wire, images inlined)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": fill_images(req.messages, req.images, image_part),
        "max_tokens": req.sampling.max_tokens,
        "temperature": req.sampling.temperature,
        "top_p": req.sampling.top_p,
    }
    body.update(dict(req.sampling.extra))  # chat_template_kwargs, mm_processor_kwargs, stop, ...
    if req.sampling.seed is not None:
        body["seed"] = req.sampling.seed
    if req.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": req.schema_name, "schema": req.json_schema, "strict": True},
        }
    return body


def parse_completion(data: Any) -> tuple[str, str | None, int, int]:
    """``(text, finish_reason, prompt_tokens, completion_tokens)``; ValueError if it is not a completion."""
    try:
        choice = data["choices"][0]
        msg = choice.get("message") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError("no choices[0].message in the answer") from None
    text = msg.get("content")
    finish = choice.get("finish_reason")
    if not text and msg.get("refusal"):
        text, finish = msg["refusal"], "refusal"
    if text is not None and not isinstance(text, str):
        raise ValueError(f"message.content is a {type(text).__name__}, not a string")
    usage = data.get("usage") or {}
    return text or "", finish, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


@dataclass
class Endpoint:
    url: str
    outstanding: int = 0
    consecutive_failures: int = 0
    ejected: bool = False
    requests: int = 0
    ok: int = 0
    failures: int = 0
    ejections: int = 0
    latencies_ms: list[float] = field(default_factory=list, repr=False)  # answered requests
    probe: asyncio.Task | None = field(default=None, repr=False)

    @property
    def chat_url(self) -> str:
        return f"{self.url}/v1/chat/completions"

    def record_latency(self, ms: float, rng: random.Random, keep: int = 100_000) -> None:
        """Keep a uniform sample of at most ``keep`` latencies (reservoir): bounded memory."""
        if len(self.latencies_ms) < keep:
            self.latencies_ms.append(ms)
        else:
            i = rng.randrange(self.ok + 1)
            if i < keep:
                self.latencies_ms[i] = ms

    def snapshot(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 2) if lat else None

        return {
            "requests": self.requests,
            "ok": self.ok,
            "failures": self.failures,
            "ejections": self.ejections,
            "ejected": self.ejected,
            "latency_ms_p50": pct(50),
            "latency_ms_p90": pct(90),
            "latency_ms_p99": pct(99),
        }


class NoEndpoint(RuntimeError):
    pass


class EndpointPool:
    """Bounded in-flight per endpoint, least-outstanding choice, ejection and probing back."""

    def __init__(
        self,
        urls: list[str],
        max_in_flight: int,
        eject_after: int,
        probe_interval: float,
        probe,
        wait_limit: float,
    ) -> None:
        if not urls:
            raise BackendError("no endpoint given: pass --endpoint http://HOST:PORT (repeatable)")
        self.endpoints = [Endpoint(normalize_endpoint(u)) for u in urls]
        self.max_in_flight = max_in_flight
        self.eject_after = eject_after
        self.probe_interval = probe_interval
        self._probe = probe  # async (Endpoint) -> bool
        self._wait_limit = wait_limit
        self._cond = asyncio.Condition()
        self._rr = 0

    def _pick(self) -> Endpoint | None:
        best = None
        n = len(self.endpoints)
        for i in range(n):  # start after the last choice so ties rotate
            e = self.endpoints[(self._rr + i) % n]
            if (
                not e.ejected
                and e.outstanding < self.max_in_flight
                and (best is None or e.outstanding < best.outstanding)
            ):
                best = e
        return best

    async def acquire(self) -> Endpoint:
        async with self._cond:
            all_out_since = None
            while True:
                e = self._pick()
                if e is not None:
                    e.outstanding += 1
                    e.requests += 1
                    self._rr = (self.endpoints.index(e) + 1) % len(self.endpoints)
                    return e
                if all(x.ejected for x in self.endpoints):
                    now = time.monotonic()
                    all_out_since = all_out_since or now
                    if now - all_out_since > self._wait_limit:
                        raise NoEndpoint(
                            "no endpoint available: all taken out after repeated failures "
                            f"({', '.join(x.url for x in self.endpoints)})"
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._cond.wait(), self.probe_interval)
                else:
                    all_out_since = None
                    await self._cond.wait()

    async def release(self, e: Endpoint, outcome: str) -> None:
        """``outcome``: ``ok``, ``fail`` (counts toward ejection) or ``neutral`` (429, 4xx)."""
        async with self._cond:
            e.outstanding -= 1
            if outcome == "ok":
                e.ok += 1
                e.consecutive_failures = 0
            elif outcome == "fail":
                e.failures += 1
                e.consecutive_failures += 1
                if e.consecutive_failures >= self.eject_after and not e.ejected:
                    e.ejected = True
                    e.ejections += 1
                    e.probe = asyncio.ensure_future(self._probe_back(e))
            self._cond.notify_all() if outcome != "ok" else self._cond.notify(1)

    async def _probe_back(self, e: Endpoint) -> None:
        while True:
            await asyncio.sleep(self.probe_interval)
            if await self._probe(e):
                async with self._cond:
                    e.ejected = False
                    e.consecutive_failures = 0
                    self._cond.notify_all()
                return

    async def close(self) -> None:
        for e in self.endpoints:
            if e.probe is not None and not e.probe.done():
                e.probe.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await e.probe


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(
        self,
        endpoints: list[str],
        model: str | None = None,
        *,
        max_in_flight: int = 64,
        timeout: float = 120.0,
        retries: int = 3,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        eject_after: int = 5,
        probe_interval: float = 2.0,
        api_key: str | None = None,
        check_timeout: float = 10.0,
        seed: int | None = None,
        outage_s: float | None = None,
        breaker_http400: int = 32,
    ) -> None:
        self.urls = [normalize_endpoint(u) for u in endpoints]
        if not self.urls:
            raise BackendError("no endpoint given: pass --endpoint http://HOST:PORT (repeatable)")
        self.model = model
        self.max_in_flight = max_in_flight
        self.timeout = timeout
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.eject_after = eject_after
        self.probe_interval = probe_interval
        self.check_timeout = check_timeout
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self._rng = random.Random(seed)
        self.outage_s = outage_s if outage_s is not None else timeout
        self.breaker_http400 = breaker_http400
        self._http400_in_a_row = 0
        self._session = None
        self.pool: EndpointPool | None = None

    @property
    def capacity(self) -> int:
        return self.max_in_flight * len(self.urls)

    def describe(self) -> dict[str, Any]:
        d = {"backend": self.name, "model": self.model, "endpoints": self.urls}
        if self.pool is not None:
            d["endpoint_stats"] = {e.url: e.snapshot() for e in self.pool.endpoints}
        return d

    # ---- life cycle -----------------------------------------------------------------------
    async def _ensure_session(self) -> None:
        import aiohttp

        if self._session is None:
            # we bound concurrency ourselves; the connector must not add a second, smaller bound
            connector = aiohttp.TCPConnector(
                limit=0, limit_per_host=0, keepalive_timeout=30, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(connector=connector, headers=self.headers)
            self.pool = EndpointPool(
                self.urls,
                self.max_in_flight,
                self.eject_after,
                self.probe_interval,
                self._probe,
                wait_limit=max(self.outage_s, self.probe_interval * 3),
            )

    async def _get(self, url: str) -> tuple[int, Any]:
        import aiohttp

        async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=self.check_timeout)) as r:
            body = await r.read()
            try:
                return r.status, json.loads(body) if body else None
            except ValueError:
                return r.status, None

    async def _probe(self, e: Endpoint) -> bool:
        for path in ("/health", "/v1/models"):
            try:
                status, _ = await self._get(e.url + path)
            except Exception:
                continue
            if status == 200:
                return True
        return False

    async def check_endpoint(self, url: str) -> list[str]:
        """The model ids an endpoint serves ([] if it has no /v1/models but /health answers).
        Raises BackendError naming the endpoint and the reason when it does not answer."""
        try:
            status, data = await self._get(url + "/v1/models")
            if status == 200:
                return [m.get("id") for m in (data or {}).get("data", []) if isinstance(m, dict)]
            status2, _ = await self._get(url + "/health")
            if status2 == 200:
                return []
            raise BackendError(f"{url}: /v1/models answered HTTP {status}, /health HTTP {status2}")
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"{url}: {type(e).__name__}: {e or 'no answer'}") from None

    async def start(self) -> None:
        """Every endpoint must answer before any work starts; resolves the model name."""
        await self._ensure_session()
        results = await asyncio.gather(*(self.check_endpoint(u) for u in self.urls), return_exceptions=True)
        bad = [str(r) for r in results if isinstance(r, BaseException)]
        if bad:
            raise BackendError(
                "endpoint(s) unreachable: " + "; ".join(bad) + " (is the server up? check --endpoint)"
            )
        served = [m for r in results for m in r]  # type: ignore[union-attr]
        if self.model is None:
            if not served:
                raise BackendError(f"{self.urls[0]} lists no model: pass --model NAME")
            self.model = served[0]
        elif served and self.model not in served:
            raise BackendError(
                f"model {self.model!r} is not served by {self.urls}: they serve {sorted(set(served))}"
            )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- requests -------------------------------------------------------------------------
    async def generate(self, request: CaptionRequest) -> CaptionResult:
        import aiohttp

        await self._ensure_session()
        if self.model is None:
            raise BackendError("no model name: call start() or pass --model")
        body = json.dumps(build_payload(request, self.model), separators=(",", ":")).encode()
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        error = "not attempted"
        for attempt in range(self.retries + 1):
            try:
                ep = await self.pool.acquire()
            except NoEndpoint as e:  # an outage: stop the run, commit nothing of it
                raise CircuitOpen(f"circuit breaker: {e} for more than {self.outage_s:g}s") from e
            t0 = time.perf_counter()
            delay = None
            outcome = "fail"
            try:
                async with self._session.post(ep.chat_url, data=body, timeout=timeout) as r:
                    raw = await r.read()
                    status, retry_after = r.status, r.headers.get("Retry-After")
            except TimeoutError:
                error = f"timeout after {self.timeout:g}s"
            except aiohttp.ClientError as e:
                error = f"connection error: {type(e).__name__}: {str(e)[:200]}"
            else:
                latency = (time.perf_counter() - t0) * 1000
                if status == 200:
                    try:
                        text, finish, pt, ct = parse_completion(json.loads(raw))
                    except ValueError as e:  # garbage from the server: a server fault, retry
                        error = f"bad response: not a chat completion ({str(e)[:120]}): {raw[:80]!r}"
                    else:
                        self._http400_in_a_row = 0
                        ep.record_latency(latency, self._rng)
                        await self.pool.release(ep, "ok")
                        return CaptionResult(
                            request.key, text, finish, pt, ct, latency, attempt + 1, None, ep.url
                        )
                elif status == 429:
                    outcome = "neutral"
                    error = "HTTP 429 rate limited"
                    delay = parse_retry_after(retry_after)
                elif status >= 500:
                    error = f"HTTP {status} server error"
                else:  # 4xx other than 429: the request itself is wrong; asking again cannot help
                    await self.pool.release(ep, "neutral")
                    self._http400_in_a_row += 1
                    if self._http400_in_a_row >= self.breaker_http400:
                        raise CircuitOpen(
                            f"circuit breaker: {self._http400_in_a_row} requests in a row refused with "
                            f"HTTP {status} and none answered (last: {raw[:200].decode(errors='replace')}); "
                            "check --model, the prompt and the server's limits"
                        )
                    return CaptionResult(
                        request.key,
                        error=f"HTTP {status}: {raw[:300].decode(errors='replace')}",
                        attempts=attempt + 1,
                        endpoint=ep.url,
                    )
            await self.pool.release(ep, outcome)
            if attempt < self.retries:
                await asyncio.sleep(
                    delay
                    if delay is not None
                    else backoff_delay(attempt, self.backoff_base, self.backoff_max, self._rng)
                )
        return CaptionResult(
            request.key, error=f"{error} (after {self.retries + 1} attempts)", attempts=self.retries + 1
        )
