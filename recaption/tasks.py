"""What to ask for each image and how to judge the answer: global captions, grounded
regions, captions of proposed regions. Each task turns one sample into one layer row.

A transport failure (the backend gave up) ends the row at once. A bad answer (empty, a
refusal, cut by ``max_tokens``, malformed JSON, no valid box) is asked again up to
``retries`` times, then recorded as ``failed`` with the reason and the raw text in ``raw``.

Layer schemas are the standard ones (engine/schemas.py) plus one extra column after them:
``raw`` (string): the model's last answer for failed rows (null for ok rows), so a bad
answer can be inspected. Readers use ``union_by_name``; the standard columns come first.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from engine.schemas import GLOBAL_CAPTION_SCHEMA, LAYER_FAILED, LAYER_OK, REGION_SCHEMA
from recaption.backends.base import Backend, CaptionRequest, CaptionResult, SamplingParams
from recaption.images import Prepared, crop_box, draw_box
from recaption.prompts import Prompt
from recaption.regions import CONVENTION_TEXT, GROUNDED_SCHEMA, RegionError, from_unit, parse_grounded

RAW_FIELD = pa.field("raw", pa.string())
GLOBAL_LAYER_SCHEMA = GLOBAL_CAPTION_SCHEMA.append(RAW_FIELD)
REGION_LAYER_SCHEMA = REGION_SCHEMA.append(RAW_FIELD)
RAW_KEEP = 2000  # characters of a failed answer kept in ``raw``

_REFUSAL = re.compile(
    r"^\W*(i'?m sorry|i am sorry|sorry, (but )?i|i cannot|i can'?t|i can not|i am unable|i'm unable|i won'?t|"
    r"as an ai\b|i am not able|i'm not able)",
    re.IGNORECASE,
)


class AnswerError(ValueError):
    """The answer is not usable; the message is the recorded reason."""


@dataclass
class Sample:
    key: str
    image: Prepared | None  # None: no usable image (ingest failed)
    error: str | None = None  # why there is no image
    proposals: list[dict[str, Any]] | None = None
    proposals_error: str | None = None


@dataclass
class Metrics:
    """What one shard's requests did; merged into its ``_stats.json``."""

    requests: int = 0  # HTTP attempts / engine calls, retries included
    transport_retries: int = 0
    answer_retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    dropped_boxes: dict[str, int] = field(default_factory=dict)

    def add(self, r: CaptionResult) -> None:
        self.requests += r.attempts
        self.transport_retries += max(0, r.attempts - 1)
        self.prompt_tokens += r.prompt_tokens
        self.completion_tokens += r.completion_tokens
        if r.ok:
            self.latencies_ms.append(r.latency_ms)

    def as_stats(self, seconds: float, images: int) -> dict[str, Any]:
        lat = sorted(self.latencies_ms)

        def pct(p: float) -> float | None:
            if not lat:
                return None
            return round(lat[min(len(lat) - 1, int(round(p / 100 * (len(lat) - 1))))], 2)

        return {
            "requests": self.requests,
            "retries": self.transport_retries + self.answer_retries,
            "transport_retries": self.transport_retries,
            "answer_retries": self.answer_retries,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "latency_ms_p50": pct(50),
            "latency_ms_p95": pct(95),
            "latency_ms_p99": pct(99),
            "latency_ms_mean": round(statistics.fmean(lat), 2) if lat else None,
            "images_per_s": round(images / seconds, 3) if seconds > 0 else None,
            "tokens_per_s": round(self.completion_tokens / seconds, 3) if seconds > 0 else None,
            "dropped_boxes": dict(self.dropped_boxes),
        }


def judge_text(r: CaptionResult, keep_truncated: bool) -> str:
    text = (r.text or "").strip()
    if r.finish_reason in ("refusal", "content_filter") or _REFUSAL.match(text):
        raise AnswerError(
            f"refusal ({r.finish_reason})" if r.finish_reason in ("refusal", "content_filter") else "refusal"
        )
    if not text:
        raise AnswerError("empty answer")
    if r.finish_reason == "length" and not keep_truncated:
        raise AnswerError("truncated (finish_reason=length)")
    return text


async def ask(
    backend: Backend,
    req: CaptionRequest,
    judge: Callable[[CaptionResult], Any],
    retries: int,
    metrics: Metrics,
) -> tuple[Any, CaptionResult, str | None]:
    """``(value, last result, error)``: asks again while the answer is bad, up to ``retries`` times."""
    r = CaptionResult(req.key, error="not attempted")
    for attempt in range(retries + 1):
        r = await backend.generate(req)
        metrics.add(r)
        if not r.ok:
            return None, r, r.error
        try:
            return judge(r), r, None
        except (AnswerError, RegionError) as e:
            err = str(e)
            if attempt < retries:
                metrics.answer_retries += 1
    return None, r, f"{err} (after {retries + 1} answers)"


@dataclass
class TaskSettings:
    model: str
    sampling: SamplingParams
    retries: int = 3
    keep_truncated: bool = False
    bbox_format: str = "norm1000"
    box_hint: str = "coords"
    min_box_area: float = 1e-4
    dedup_iou: float = 0.9
    max_regions: int = 64
    jpeg_quality: int = 90


class Task:
    kind = "?"
    schema: pa.Schema

    def __init__(self, prompt: Prompt, s: TaskSettings) -> None:
        self.prompt = prompt
        self.s = s

    def failed_row(self, key: str, error: str, raw: str | None = None) -> dict[str, Any]:
        raise NotImplementedError

    async def run(self, backend: Backend, sample: Sample, metrics: Metrics) -> dict[str, Any]:
        raise NotImplementedError

    def _user(self, text: str, n_images: int = 1) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}
        ]


class GlobalTask(Task):
    kind = "global"
    schema = GLOBAL_LAYER_SCHEMA

    def build(self, sample: Sample) -> CaptionRequest:
        assert sample.image is not None
        w, h = sample.image.size
        return CaptionRequest(
            sample.key,
            self._user(self.prompt.render(width=w, height=h)),
            [sample.image.jpeg],
            self.s.sampling,
        )

    def failed_row(
        self, key: str, error: str, raw: str | None = None, r: CaptionResult | None = None
    ) -> dict[str, Any]:
        return {
            "key": key,
            "caption": None,
            "model": self.s.model,
            "prompt_id": self.prompt.id,
            "n_tokens": r.completion_tokens if r else None,
            "finish_reason": r.finish_reason if r else None,
            "latency_ms": r.latency_ms if r and r.ok else None,
            "status": LAYER_FAILED,
            "error": error,
            "raw": raw[:RAW_KEEP] if raw else None,
        }

    async def run(self, backend: Backend, sample: Sample, metrics: Metrics) -> dict[str, Any]:
        if sample.image is None:
            return self.failed_row(sample.key, sample.error or "image not available")
        text, r, err = await ask(
            backend,
            self.build(sample),
            lambda r: judge_text(r, self.s.keep_truncated),
            self.s.retries,
            metrics,
        )
        if err is not None:
            return self.failed_row(sample.key, err, r.text, r)
        return {
            "key": sample.key,
            "caption": text,
            "model": self.s.model,
            "prompt_id": self.prompt.id,
            "n_tokens": r.completion_tokens,
            "finish_reason": r.finish_reason,
            "latency_ms": r.latency_ms,
            "status": LAYER_OK,
            "error": None,
            "raw": None,
        }


class RegionTask(Task):
    schema = REGION_LAYER_SCHEMA

    def failed_row(
        self, key: str, error: str, raw: str | None = None, regions: list | None = None
    ) -> dict[str, Any]:
        return {
            "key": key,
            "regions": regions or [],
            "model": self.s.model,
            "prompt_id": self.prompt.id,
            "status": LAYER_FAILED,
            "error": error,
            "raw": raw[:RAW_KEEP] if raw else None,
        }

    def ok_row(self, key: str, regions: list) -> dict[str, Any]:
        return {
            "key": key,
            "regions": regions,
            "model": self.s.model,
            "prompt_id": self.prompt.id,
            "status": LAYER_OK,
            "error": None,
            "raw": None,
        }


class GroundedTask(RegionTask):
    kind = "grounded"

    def build(self, sample: Sample) -> CaptionRequest:
        assert sample.image is not None
        w, h = sample.image.size
        text = self.prompt.render(width=w, height=h, bbox_convention=CONVENTION_TEXT[self.s.bbox_format])
        return CaptionRequest(
            sample.key,
            self._user(text),
            [sample.image.jpeg],
            self.s.sampling,
            json_schema=GROUNDED_SCHEMA,
            schema_name="regions",
        )

    async def run(self, backend: Backend, sample: Sample, metrics: Metrics) -> dict[str, Any]:
        if sample.image is None:
            return self.failed_row(sample.key, sample.error or "image not available")
        w, h = sample.image.size

        def judge(r: CaptionResult):
            if r.finish_reason == "length":
                raise AnswerError("truncated (finish_reason=length)")
            if not (r.text or "").strip():
                raise AnswerError("empty answer")
            return parse_grounded(
                r.text,
                self.s.bbox_format,
                w,
                h,
                min_area=self.s.min_box_area,
                dedup_iou=self.s.dedup_iou,
                max_regions=self.s.max_regions,
            )

        value, r, err = await ask(backend, self.build(sample), judge, self.s.retries, metrics)
        if err is not None:
            return self.failed_row(sample.key, err, r.text)
        regions, dropped = value
        for k, n in dropped.items():
            metrics.dropped_boxes[k] = metrics.dropped_boxes.get(k, 0) + n
        return self.ok_row(sample.key, regions)


class ProposalTask(RegionTask):
    kind = "proposals"

    def hint(self, box: tuple[float, float, float, float], w: int, h: int) -> str:
        coords = from_unit(box, self.s.bbox_format, w, h)
        where = f"the box {coords} ([x0, y0, x1, y1] in {CONVENTION_TEXT[self.s.bbox_format]})"
        if self.s.box_hint == "draw":
            return f"Look at the region outlined by the red rectangle, {where}."
        if self.s.box_hint == "crop":
            return f"The second image is a close-up of one region of the first image: {where}."
        return f"Look at the region inside {where}."

    def build(self, sample: Sample, i: int, box: tuple[float, float, float, float]) -> CaptionRequest:
        assert sample.image is not None
        w, h = sample.image.size
        text = self.prompt.render(
            width=w,
            height=h,
            box_hint=self.hint(box, w, h),
            bbox_convention=CONVENTION_TEXT[self.s.bbox_format],
        )
        q = self.s.jpeg_quality
        if self.s.box_hint == "draw":
            images = [draw_box(sample.image.image, box, q)]
        elif self.s.box_hint == "crop":
            images = [sample.image.jpeg, crop_box(sample.image.image, box, q)]
        else:
            images = [sample.image.jpeg]
        return CaptionRequest(f"{sample.key}#{i}", self._user(text, len(images)), images, self.s.sampling)

    async def run(self, backend: Backend, sample: Sample, metrics: Metrics) -> dict[str, Any]:
        import asyncio

        if sample.image is None:
            return self.failed_row(sample.key, sample.error or "image not available")
        if sample.proposals is None:
            return self.failed_row(sample.key, sample.proposals_error or "no proposals for this image")
        props = sample.proposals
        boxes = [(float(p["x0"]), float(p["y0"]), float(p["x1"]), float(p["y1"])) for p in props]
        judge = lambda r: judge_text(r, self.s.keep_truncated)  # noqa: E731
        outs = await asyncio.gather(
            *(
                ask(backend, self.build(sample, i, b), judge, self.s.retries, metrics)
                for i, b in enumerate(boxes)
            )
        )
        regions, first_err = [], None
        for (text, r, err), b, p in zip(outs, boxes, props, strict=True):
            if err is not None:
                first_err = first_err or (f"region: {err}", r.text)
                continue
            regions.append(
                {"x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3], "caption": text, "label": p.get("label")}
            )
        if first_err is not None:
            return self.failed_row(sample.key, first_err[0], first_err[1], regions)
        return self.ok_row(sample.key, regions)
