"""The hf backend and ``serve-captioner`` with a tiny random LLaVA built from configs (offline)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import time
import urllib.request

import pytest
from PIL import Image

from recaption.backends.base import CaptionRequest, SamplingParams
from recaption.backends.hf_local import HFBackend
from recaption.server import BadRequest, parse_chat_request
from tests.recaption.recap_helpers import CLI, N_IMAGES


def _jpeg(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "JPEG")
    return buf.getvalue()


def test_hf_backend_batches_and_reports(tiny_vlm):
    b = HFBackend(str(tiny_vlm), device="cpu", batch_size=4, batch_wait_ms=50)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]

    async def go():
        await b.start()
        try:
            return await asyncio.gather(
                *(
                    b.generate(CaptionRequest(f"k{i}", msgs, [_jpeg((i * 60, 0, 0))], SamplingParams(6)))
                    for i in range(3)
                )
            )
        finally:
            await b.close()

    res = asyncio.run(go())
    assert [r.key for r in res] == ["k0", "k1", "k2"]
    for r in res:
        assert r.ok and isinstance(r.text, str) and r.finish_reason in ("stop", "length")
        assert 0 < r.completion_tokens <= 6 and r.prompt_tokens > 0
        assert (r.finish_reason == "length") == (r.completion_tokens == 6)


def test_hf_backend_seeded_answer_does_not_depend_on_its_batch(tiny_vlm):
    """A seeded sampled request gets the same answer alone and batched with a greedy request and
    another temperature (per-row sampling, as vLLM does); a greedy row is unchanged by sampled
    neighbours; another seed, another answer."""
    b = HFBackend(str(tiny_vlm), device="cpu")
    b._load()
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]

    def req(key, color, temperature, seed=None):
        return CaptionRequest(key, msgs, [_jpeg(color)], SamplingParams(12, temperature, seed=seed))

    def text(reqs, key):
        return next(r.text for r in b.generate_batch(reqs) if r.key == key)

    sampled = req("s", (0, 90, 200), 1.0, seed=5)
    greedy = req("g", (200, 0, 0), 0.0)
    alone = text([sampled], "s")
    batch = [greedy, sampled, req("o", (0, 200, 0), 0.7, seed=9)]
    assert text(batch, "s") == alone
    assert text(batch, "g") == text([greedy], "g")
    others = {text([req("s", (0, 90, 200), 1.0, seed=s)], "s") for s in (6, 7, 8)}
    assert others - {alone}, "three other seeds all gave the seed-5 answer"


def test_parse_chat_request_validates():
    import base64

    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(b"abc").decode()},
                    },
                    {"type": "text", "text": "hi"},
                ],
            }
        ],
        "max_tokens": 5,
    }
    req = parse_chat_request(body)
    assert (
        req.images == [b"abc"]
        and req.messages[0]["content"][0] == {"type": "image"}
        and req.sampling.max_tokens == 5
    )
    for bad, msg in [
        ({"messages": []}, "non-empty"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.jpg"}}],
                    }
                ]
            },
            "data URLs",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "unsupported"),
    ]:
        with pytest.raises(BadRequest, match=msg):
            parse_chat_request(bad)


@pytest.fixture
def captioner(tiny_vlm):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            *CLI,
            "serve-captioner",
            str(tiny_vlm),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--served-model-name",
            "tiny-llava",
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.2)
    yield url
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.mark.slow
def test_serve_captioner_end_to_end(captioner, scenes):
    from engine.layers import read_layer
    from engine.layout import Dataset
    from recaption.config import RecaptionConfig, RecaptionRunConfig
    from recaption.run import recaption

    with urllib.request.urlopen(captioner + "/v1/models") as r:
        assert json.load(r)["data"][0]["id"] == "tiny-llava"
    bad = urllib.request.Request(
        captioner + "/v1/chat/completions", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(bad)
    assert e.value.code == 400

    common = dict(endpoints=[captioner], max_tokens=8, retries=0, max_in_flight=8, image_max_side=64)

    def run(**kw):
        return recaption(
            str(scenes), RecaptionRunConfig(recaption=RecaptionConfig(**common, **kw)), progress=False
        )

    # global captions over HTTP: a random model rambles until max_tokens, so keep truncated answers
    rep = run(layer="tiny-global", keep_truncated=True)
    assert (rep.shards_written, rep.count, rep.ok) == (3, N_IMAGES, N_IMAGES - 1)
    t = read_layer(str(scenes), "tiny-global").to_pylist()
    ok = [r for r in t if r["status"] == "ok"]
    assert all(
        r["model"] == "tiny-llava" and isinstance(r["caption"], str) and 0 < r["n_tokens"] <= 8 for r in ok
    )
    assert {r["finish_reason"] for r in ok} <= {"stop", "length"}

    # sampled with a seed: the same layer again, whatever the requests in flight (batches of 1 or
    # mixed batches of 8 on the server); another seed samples other answers
    def sampled(layer, seed, in_flight):
        kw = dict(common, max_in_flight=in_flight, persistent_cache=False)
        cfg = RecaptionConfig(**kw, layer=layer, keep_truncated=True, temperature=1.0, seed=seed)
        recaption(str(scenes), RecaptionRunConfig(recaption=cfg), progress=False)
        return {r["key"]: r["caption"] for r in read_layer(str(scenes), layer).to_pylist()}

    first, again, other = sampled("s7", 7, 1), sampled("s7-again", 7, 8), sampled("s8", 8, 8)
    assert first == again and len([c for c in first.values() if c]) == N_IMAGES - 1
    assert other != first
    assert Dataset(str(scenes)).layer("s7").info()["sampling"]["seed"] == 7

    # without --keep-truncated the same answers are failed with the reason, raw text kept
    rep = run(layer="tiny-strict")
    t = read_layer(str(scenes), "tiny-strict").to_pylist()
    assert all(
        r["status"] == "ok" or r["error"].startswith(("truncated", "empty answer", "image not available"))
        for r in t
    )
    assert any(
        r["status"] == "failed" and r["error"].startswith("truncated") and r["raw"] is not None for r in t
    )

    # grounded regions: random text is not JSON -> every row failed with a reason, never a crash
    rep = run(layer="tiny-grounded", task="regions", region_mode="grounded")
    t = read_layer(str(scenes), "tiny-grounded").to_pylist()
    assert len(t) == N_IMAGES and all(r["status"] == "failed" and r["error"] for r in t)

    # proposals: each gt-regions box captioned with the full image as context
    rep = run(
        layer="tiny-props", task="regions", region_mode="proposals", keep_truncated=True, box_hint="draw"
    )
    assert rep.ok == N_IMAGES - 1
    gt = read_layer(str(scenes), "gt-regions").to_pylist()
    mine = {r["key"]: r for r in read_layer(str(scenes), "tiny-props").to_pylist()}
    for g in gt:
        m = mine[g["key"]]
        if m["status"] == "ok":
            assert [r["label"] for r in m["regions"]] == [r["label"] for r in g["regions"]]
    assert Dataset(str(scenes)).layer("tiny-props").info()["box_hint"] == "draw"


NO_TORCHVISION = """
import sys
def _tv(name):
    return name == "torchvision" or name.startswith("torchvision.")
class Hide:  # wraps each import finder: torchvision is not installed, as far as anyone can see
    def __init__(self, f):
        self.f = f
    def find_spec(self, name, path=None, target=None):
        if _tv(name) or not hasattr(self.f, "find_spec"):
            return None
        return self.f.find_spec(name, path, target)
    def find_distributions(self, *a, **k):
        if not hasattr(self.f, "find_distributions"):
            return iter(())
        return (d for d in self.f.find_distributions(*a, **k) if not _tv(d.metadata["Name"] or ""))
    def invalidate_caches(self):
        getattr(self.f, "invalidate_caches", lambda: None)()
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
"""


def test_hf_qwen2vl_without_torchvision(tmp_path):
    """Finding 11: a Qwen2-VL directory (whose video processor needs torchvision) captions
    through the hf backend with torchvision hidden: the image-only processor path."""
    import sys

    from tests.recaption.recap_tiny_vlm import build_tiny_qwen2vl

    model = build_tiny_qwen2vl(tmp_path / "tiny-qwen2vl")
    code = (
        NO_TORCHVISION
        + f"""
import asyncio, io, json
from PIL import Image
from recaption.backends.base import CaptionRequest, SamplingParams
from recaption.backends.hf_local import HFBackend
buf = io.BytesIO(); Image.new("RGB", (40, 30), (200, 0, 0)).save(buf, "JPEG")
msgs = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "Describe."}}]}}]
b = HFBackend({str(model)!r}, device="cpu")
async def go():
    await b.start()
    try:
        return await b.generate(CaptionRequest("k", msgs, [buf.getvalue()], SamplingParams(5)))
    finally:
        await b.close()
r = asyncio.run(go())
print(json.dumps({{"error": r.error, "n": r.completion_tokens, "p": r.prompt_tokens,
                  "proc": type(b.processor).__name__, "tv": "torchvision" in sys.modules}}))
"""
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["error"] is None and 0 < r["n"] <= 5 and r["p"] > 0, r
    assert r["proc"] == "ImageOnlyQwen2VLProcessor" and not r["tv"], r


def test_serve_captioner_speaks_openai(tiny_vlm):
    """Finding 11: serve-captioner honours ``n`` and ``stream`` (SSE chunks in OpenAI's
    chat.completion.chunk format ending with ``data: [DONE]``), takes OpenAI's default
    temperature (1.0) when none is given, and refuses fields it does not honour with an
    OpenAI-style 400 instead of ignoring them. Raw HTTP (the ``openai`` client is not installed)."""
    import base64

    from aiohttp import ClientSession
    from aiohttp.test_utils import TestServer

    from recaption.server import make_app

    img = "data:image/jpeg;base64," + base64.b64encode(_jpeg((200, 0, 0))).decode()
    base = {
        "model": "tiny",
        "max_tokens": 6,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": img}}, {"type": "text", "text": "Hi"}],
            }
        ],
    }
    assert parse_chat_request(base).sampling.temperature == 1.0  # OpenAI's default
    assert parse_chat_request({**base, "temperature": 0}).sampling.temperature == 0.0

    async def go():
        server = TestServer(make_app(HFBackend(str(tiny_vlm), device="cpu"), "tiny"), host="127.0.0.1")
        await server.start_server()
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
        try:
            async with ClientSession() as s:

                async def post(body):
                    async with s.post(url, json=body) as r:
                        return r.status, r.headers.get("Content-Type", ""), await r.read()

                greedy = {**base, "temperature": 0}
                st, _, raw = await post({**greedy, "n": 3})
                one = json.loads(raw)
                st1, _, raw1 = await post(greedy)
                single = json.loads(raw1)["choices"][0]
                single["_n"] = json.loads(raw1)["usage"]["completion_tokens"]
                st2, ctype, sse = await post(
                    {**greedy, "stream": True, "stream_options": {"include_usage": True}}
                )
                refusals = [
                    await post({**base, **extra})
                    for extra in ({"tools": []}, {"stop": ["\n"]}, {"logprobs": True}, {"n": 0}, {"n": 99})
                ]
                st3, _, _ = await post({**greedy, "frequency_penalty": 0})  # a default value is fine
                return st, one, st1, single, st2, ctype, sse, refusals, st3
        finally:
            await server.close()

    st, one, st1, single, st2, ctype, sse, refusals, st3 = asyncio.run(go())
    assert st == 200 and st1 == 200 and st3 == 200
    len_single = single["_n"]
    assert [c["index"] for c in one["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == single["message"]["content"] for c in one["choices"])  # greedy
    assert one["usage"]["completion_tokens"] == 3 * len_single > 0  # n answers counted

    # stream: every event is `data: ...`; chunks rebuild the non-streamed answer; [DONE] last
    assert st2 == 200 and ctype.startswith("text/event-stream")
    events = [e for e in sse.decode().split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == single["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == single["finish_reason"] and all(f is None for f in finishes[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0

    # unsupported fields: 400 with an OpenAI error body naming the field
    for (status, _, raw), param in zip(refusals, ["tools", "stop", "logprobs", "n", "n"], strict=True):
        err = json.loads(raw)["error"]
        assert status == 400 and err["type"] == "invalid_request_error" and err["param"] == param, err
        assert param in err["message"]
