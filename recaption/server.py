"""``finevit serve-captioner MODEL_DIR``: an OpenAI-compatible server around the ``hf`` backend.

Endpoints: ``POST /v1/chat/completions`` (text and ``image_url`` parts; images as base64
``data:`` URLs only: this server fetches nothing), ``GET /v1/models``, ``GET /health``.
Concurrent requests are batched by the backend. ``response_format`` is accepted and not
enforced (see :mod:`recaption.backends.hf_local`). It makes the HTTP path run on a laptop
and in CI exactly as against ``vllm serve``.

The request follows OpenAI's chat-completions API: ``temperature`` defaults to 1.0 and
``top_p`` to 1.0 when absent (OpenAI's defaults), ``n`` asks for n choices, ``seed`` seeds
sampling, ``stream: true`` answers with server-sent events (``chat.completion.chunk`` objects,
``stream_options.include_usage`` adds the usage chunk, then ``data: [DONE]``; the answer is
generated whole and then streamed). Any other field (``tools``, ``stop``, ``logprobs``, ...)
is refused with HTTP 400 and an OpenAI-style error naming it: never silently ignored. A few
are accepted at their default value only (e.g. ``frequency_penalty: 0``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from dataclasses import replace
from typing import Any

from aiohttp import web

from recaption.backends.base import CaptionRequest, SamplingParams
from recaption.backends.hf_local import HFBackend


class BadRequest(ValueError):
    def __init__(self, msg: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(msg)
        self.param = param
        self.code = code


# fields this server honours; the others are refused (400), except these at their default value
SUPPORTED = {
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "seed",
    "stream",
    "stream_options",
    "response_format",
    "user",
}
DEFAULT_ONLY = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logprobs": False,
    "parallel_tool_calls": True,
    "store": False,
}
MAX_N = 16


def _error(
    status: int,
    msg: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | int | None = None,
) -> web.Response:
    return web.json_response(
        {
            "error": {
                "message": msg,
                "type": kind,
                "param": param,
                "code": code if code is not None else status,
            }
        },
        status=status,
    )


def check_fields(body: dict[str, Any]) -> None:
    """Refuse (BadRequest) the first field this server would otherwise ignore."""
    for k, v in body.items():
        if k in SUPPORTED or (k in DEFAULT_ONLY and v in (None, DEFAULT_ONLY[k])):
            continue
        what = f"{k}={v!r}" if k in DEFAULT_ONLY else repr(k)
        raise BadRequest(
            f"unsupported request field {what}: finevit serve-captioner honours only "
            f"{', '.join(sorted(SUPPORTED))}",
            param=k,
            code="unsupported_parameter",
        )


def parse_chat_request(body: Any, default_max_tokens: int = 256) -> CaptionRequest:
    """An OpenAI chat-completions body as a :class:`CaptionRequest` (images decoded from data URLs)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    check_fields(body)
    messages, images = [], []
    for m in body["messages"]:
        if not isinstance(m, dict) or "role" not in m:
            raise BadRequest("each message needs a 'role'")
        content = m.get("content")
        if isinstance(content, str):
            messages.append({"role": m["role"], "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise BadRequest("message content must be a string or a list of parts")
        parts = []
        for c in content:
            kind = c.get("type") if isinstance(c, dict) else None
            if kind == "text":
                parts.append({"type": "text", "text": str(c.get("text", ""))})
            elif kind == "image_url":
                url = (
                    (c.get("image_url") or {}).get("url", "")
                    if isinstance(c.get("image_url"), dict)
                    else str(c.get("image_url"))
                )
                if not url.startswith("data:") or ";base64," not in url:
                    raise BadRequest(
                        "images must be base64 data URLs (data:image/...;base64,...): this server fetches nothing"
                    )
                try:
                    images.append(base64.b64decode(url.split(";base64,", 1)[1], validate=True))
                except (binascii.Error, ValueError):
                    raise BadRequest("an image data URL is not valid base64") from None
                parts.append({"type": "image"})
            else:
                raise BadRequest(f"unsupported content part type {kind!r}")
        messages.append({"role": m["role"], "content": parts})

    def num(k: str, default: float) -> float:
        v = body.get(k)
        return default if v is None else float(v)

    try:
        sp = SamplingParams(
            max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or default_max_tokens),
            temperature=num("temperature", 1.0),  # OpenAI's default when none is given
            top_p=num("top_p", 1.0),
            seed=None if body.get("seed") is None else int(body["seed"]),
        )
    except (TypeError, ValueError):
        raise BadRequest("max_tokens, temperature, top_p and seed must be numbers") from None
    if sp.max_tokens < 1:
        raise BadRequest("max_tokens must be >= 1", param="max_tokens")
    if not 0 <= sp.temperature <= 2:
        raise BadRequest("temperature must be in [0, 2]", param="temperature")
    if not 0 < sp.top_p <= 1:
        raise BadRequest("top_p must be in (0, 1]", param="top_p")
    rf = body.get("response_format") or {}
    schema = (
        (rf.get("json_schema") or {}).get("schema")
        if isinstance(rf, dict) and rf.get("type") == "json_schema"
        else None
    )
    return CaptionRequest(
        key=uuid.uuid4().hex, messages=messages, images=images, sampling=sp, json_schema=schema
    )


def request_n(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_N:
        raise BadRequest(f"n must be an integer in [1, {MAX_N}]", param="n")
    return n


def _chunk(cid: str, created: int, model: str, choices: list, usage: dict | None = None) -> bytes:
    obj: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _pieces(text: str) -> list[str]:
    """The answer in word-sized deltas (whitespace kept), as a streaming server sends it."""
    out, cur = [], ""
    for ch in text:
        if ch.isspace() and cur.strip():
            out.append(cur)
            cur = ""
        cur += ch
    if cur:
        out.append(cur)
    return out


def make_app(backend: HFBackend, model_name: str) -> web.Application:
    app = web.Application(client_max_size=64 * 2**20)

    async def chat(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        try:
            req = parse_chat_request(body)
            n = request_n(body)
            stream = bool(body.get("stream"))
            opts = body.get("stream_options") or {}
            if opts and (not stream or not isinstance(opts, dict) or set(opts) - {"include_usage"}):
                raise BadRequest(
                    "stream_options takes only include_usage, with stream: true", param="stream_options"
                )
        except BadRequest as e:
            return _error(400, str(e), param=e.param, code=e.code)
        if body.get("model") not in (None, model_name):
            return _error(
                404,
                f"model {body.get('model')!r} is not served here; this server serves {model_name!r}",
                "not_found_error",
            )
        # n choices: n requests; with a seed, choice i samples with seed + i (else they would agree)
        reqs = [
            req
            if i == 0
            else replace(
                req,
                key=f"{req.key}-{i}",
                sampling=replace(
                    req.sampling, seed=None if req.sampling.seed is None else req.sampling.seed + i
                ),
            )
            for i in range(n)
        ]
        results = await asyncio.gather(*(backend.generate(r) for r in reqs))
        bad = next((r for r in results if r.error), None)
        if bad is not None:
            return _error(500, bad.error or "", "server_error")
        completion = sum(r.completion_tokens for r in results)
        usage = {
            "prompt_tokens": results[0].prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": results[0].prompt_tokens + completion,
        }
        cid, created = f"chatcmpl-{req.key[:16]}", int(time.time())
        if not stream:
            return web.json_response(
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model_name,
                    "choices": [
                        {
                            "index": i,
                            "message": {"role": "assistant", "content": r.text},
                            "finish_reason": r.finish_reason,
                        }
                        for i, r in enumerate(results)
                    ],
                    "usage": usage,
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        for i, r in enumerate(results):
            first = {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            await resp.write(_chunk(cid, created, model_name, [first]))
            for piece in _pieces(r.text or ""):
                d = {"index": i, "delta": {"content": piece}, "finish_reason": None}
                await resp.write(_chunk(cid, created, model_name, [d]))
            end = {"index": i, "delta": {}, "finish_reason": r.finish_reason}
            await resp.write(_chunk(cid, created, model_name, [end]))
        if opts.get("include_usage"):
            await resp.write(_chunk(cid, created, model_name, [], usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "finevit"}]}
        )

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def on_startup(app: web.Application) -> None:
        await backend.start()

    async def on_cleanup(app: web.Application) -> None:
        await backend.close()

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def serve(
    model_dir: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 8,
    batch_wait_ms: float = 5.0,
    trust_remote_code: bool = False,
) -> None:
    """Load the model, then serve until interrupted (prints one line when ready)."""
    import os

    backend = HFBackend(
        model_dir,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        batch_wait_ms=batch_wait_ms,
        trust_remote_code=trust_remote_code,
    )
    name = model_name or os.path.basename(os.path.normpath(model_dir))
    web.run_app(
        make_app(backend, name),
        host=host,
        port=port,
        access_log=None,
        print=lambda *_: print(f"serve-captioner: {name} on http://{host}:{port}/v1", flush=True),
    )
