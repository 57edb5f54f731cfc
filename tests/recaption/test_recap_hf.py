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
