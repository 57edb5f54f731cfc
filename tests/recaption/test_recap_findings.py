"""Regression tests of issue 10's findings that need no dataset: answer retries that can
change the answer (6), model-family presets on the real smart_resize (5), the layer lease (9),
the circuit breaker (10), extra request fields (12)."""

from __future__ import annotations

import asyncio
import io
import json
import time

import pytest
from PIL import Image

from recaption.backends.base import Backend, CaptionRequest, CaptionResult, SamplingParams
from recaption.tasks import AnswerError, Metrics, ask


class Recorder(Backend):
    """Answers from a list and records every request it was sent."""

    def __init__(self, answers: list[CaptionResult]) -> None:
        self.answers = answers
        self.seen: list[CaptionRequest] = []

    async def generate(self, request: CaptionRequest) -> CaptionResult:
        self.seen.append(request)
        return self.answers[len(self.seen) - 1]


def test_answer_retries_change_the_request():
    req = CaptionRequest("k", [], [], SamplingParams(100, 0.0, 1.0))
    answers = [
        CaptionResult("k", "cut", "length"),
        CaptionResult("k", "", "stop"),
        CaptionResult("k", "good", "stop"),
    ]
    b = Recorder(answers)

    def judge(r):
        if r.finish_reason == "length" or not r.text:
            raise AnswerError("bad")
        return r.text

    value, r, err = asyncio.run(ask(b, req, judge, 3, Metrics()))
    assert (value, err) == ("good", None)
    sp = [q.sampling for q in b.seen]
    assert len({s.seed for s in sp}) == 3, "each answer retry has its own seed"
    assert sp[0].temperature == 0.0 and sp[1].temperature > 0.0 and sp[2].temperature > sp[1].temperature
    assert sp[1].max_tokens == 200, "after finish_reason=length the budget is raised"
    assert max(s.max_tokens for s in sp) <= 400


def test_region_schema_is_bounded():
    from recaption.regions import grounded_schema

    s = grounded_schema(16)
    regions = s["properties"]["regions"]
    assert regions["maxItems"] == 16
    props = regions["items"]["properties"]
    assert props["caption"]["maxLength"] > 0 and props["label"]["maxLength"] > 0


# ---- presets (5) ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen2-vl", "qwen3-vl"])
def test_presets_resize_with_transformers_rule(family):
    """Our grid is the installed transformers' smart_resize (image-only PIL processor module)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_resize

    from recaption.presets import PRESETS

    g = PRESETS[family].grid
    for w, h in [(500, 333), (96, 96), (33, 1000), (4000, 3000), (29, 57), (768, 431)]:
        hh, ww = hf_resize(h, w, factor=g.factor, min_pixels=g.min_pixels, max_pixels=g.max_pixels)
        assert g.size(w, h) == (ww, hh), (family, w, h)


def test_qwen25_pixel_boxes_map_against_the_image_sent():
    """Qwen2.5-VL answers in pixels of its resized input; the image we send is that input, so a
    box at given model pixels maps back to the right fraction of the image."""
    from recaption.config import RecaptionConfig
    from recaption.images import prepare
    from recaption.presets import PRESETS
    from recaption.regions import parse_grounded

    cfg = RecaptionConfig(model_family="qwen2.5-vl")
    assert cfg.bbox_format == "pixels"
    buf = io.BytesIO()
    Image.new("RGB", (500, 333), (10, 20, 30)).save(buf, "JPEG")
    p = prepare(buf.getvalue(), 768, 90, PRESETS["qwen2.5-vl"].grid)
    assert p.size == (504, 336) and p.decoded().size == (504, 336)
    w, h = p.size  # the model's own grid: x1=w/2 is the middle of the image
    ans = json.dumps({"regions": [{"bbox": [0, 0, w / 2, h / 2], "label": "a", "caption": "b"}]})
    regions, _ = parse_grounded(ans, "pixels", w, h)
    assert regions[0]["x1"] == pytest.approx(0.5) and regions[0]["y1"] == pytest.approx(0.5)


# ---- the layer lease (9) ----------------------------------------------------------------------


def test_lease_one_writer_and_takeover(tmp_path):
    from engine.lease import Lease, LeaseHeld
    from engine.store import Store

    store = Store(str(tmp_path / "layers" / "cap"))
    a = Lease(store, "cap", ttl=30, owner="alice@gpu1").acquire()
    with pytest.raises(LeaseHeld, match=r"alice@gpu1 .*run " + a.run_id):
        Lease(store, "cap", ttl=30, owner="bob@gpu2").acquire()
    assert a.renew() and not a.lost
    a.release()
    b = Lease(store, "cap", ttl=0.3, owner="bob@gpu2").acquire()
    b._stop.set()  # bob dies: no more heartbeats
    time.sleep(0.5)
    c = Lease(store, "cap", ttl=30, owner="carol").acquire()  # expired: taken over
    assert not b.renew() and b.lost
    c.release()


@pytest.mark.s3
def test_lease_on_s3_uses_conditional_writes(s3):
    from engine.lease import Lease, LeaseHeld
    from engine.store import Store

    store = Store(s3.uri("ds/layers/cap"), s3.storage)
    a = Lease(store, "cap", ttl=30, owner="alice").acquire()
    with pytest.raises(LeaseHeld, match="alice"):
        Lease(store, "cap", ttl=30, owner="bob").acquire()
    assert a.renew()
    a.release()
    b = Lease(store, "cap", ttl=0.3, owner="bob").acquire()
    b._stop.set()
    time.sleep(0.5)
    c = Lease(store, "cap", ttl=30, owner="carol").acquire()
    assert not b.renew() and b.lost
    c.release()
