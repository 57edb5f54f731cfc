"""``finevit serve-captioner MODEL_DIR``: an OpenAI-compatible server around the ``hf`` backend.

Endpoints: ``POST /v1/chat/completions`` (text and ``image_url`` parts; images as base64
``data:`` URLs only: this server fetches nothing), ``GET /v1/models``, ``GET /health``.
Concurrent requests are batched by the backend. ``response_format`` is accepted and not
enforced (see :mod:`recaption.backends.hf_local`). It makes the HTTP path run on a laptop
and in CI exactly as against ``vllm serve``.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from typing import Any

from aiohttp import web

from recaption.backends.base import CaptionRequest, SamplingParams
from recaption.backends.hf_local import HFBackend


class BadRequest(ValueError):
    pass


def _error(status: int, msg: str, kind: str = "invalid_request_error") -> web.Response:
    return web.json_response({"error": {"message": msg, "type": kind, "code": status}}, status=status)


def parse_chat_request(body: Any, default_max_tokens: int = 256) -> CaptionRequest:
    """An OpenAI chat-completions body as a :class:`CaptionRequest` (images decoded from data URLs)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
        raise BadRequest("'messages' must be a non-empty list")
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
    try:
        sp = SamplingParams(
            max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or default_max_tokens),
            temperature=float(body.get("temperature", 0.0) or 0.0),
            top_p=float(body.get("top_p", 1.0) or 1.0),
        )
    except (TypeError, ValueError):
        raise BadRequest("max_tokens, temperature and top_p must be numbers") from None
    if sp.max_tokens < 1:
        raise BadRequest("max_tokens must be >= 1")
    rf = body.get("response_format") or {}
    schema = (
        (rf.get("json_schema") or {}).get("schema")
        if isinstance(rf, dict) and rf.get("type") == "json_schema"
        else None
    )
    return CaptionRequest(
        key=uuid.uuid4().hex, messages=messages, images=images, sampling=sp, json_schema=schema
    )


def make_app(backend: HFBackend, model_name: str) -> web.Application:
    app = web.Application(client_max_size=64 * 2**20)

    async def chat(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON")
        try:
            req = parse_chat_request(body)
        except BadRequest as e:
            return _error(400, str(e))
        if body.get("model") not in (None, model_name):
            return _error(
                404,
                f"model {body.get('model')!r} is not served here; this server serves {model_name!r}",
                "not_found_error",
            )
        res = await backend.generate(req)
        if res.error:
            return _error(500, res.error, "server_error")
        return web.json_response(
            {
                "id": f"chatcmpl-{req.key[:16]}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": res.text},
                        "finish_reason": res.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": res.prompt_tokens,
                    "completion_tokens": res.completion_tokens,
                    "total_tokens": res.prompt_tokens + res.completion_tokens,
                },
            }
        )

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
