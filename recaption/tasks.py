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

import hashlib
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from engine.schemas import GLOBAL_CAPTION_SCHEMA, LAYER_FAILED, LAYER_OK, REGION_SCHEMA
from recaption.backends.base import Backend, CaptionRequest, CaptionResult, SamplingParams
from recaption.images import Prepared, crop_box, draw_box
from recaption.prompts import Prompt
from recaption.regions import (
    CONVENTION_TEXT,
    RegionError,
    box_tag,
    from_unit,
    grounded_schema,
    parse_grounded,
)

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
    sha256: str | None = None  # of the image bytes in the shard (the response cache's key)


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
    cache_hits: int = 0  # samples answered from the response cache (recaption/cache.py)

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
            "cache_hits": self.cache_hits,
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


def varied(req: CaptionRequest, attempt: int, last: CaptionResult | None) -> CaptionRequest:
    """The request of answer attempt ``attempt`` (0: as given). A retry of a bad answer must be
    able to come back different: another seed, a small temperature step (0.2 per retry, at most
    1.0), and after ``finish_reason=length`` twice the ``max_tokens`` (at most 4x)."""
    if attempt == 0:
        return req
    s = req.sampling
    max_tokens = s.max_tokens
    if last is not None and last.finish_reason == "length":
        max_tokens = min(s.max_tokens * 2**attempt, s.max_tokens * 4)
    return replace(
        req,
        sampling=replace(
            s,
            seed=(s.seed or 0) + attempt,
            temperature=min(1.0, s.temperature + 0.2 * attempt),
            max_tokens=max_tokens,
        ),
    )


def judge_one(
    r: CaptionResult, judge: Callable[[CaptionResult], Any]
) -> tuple[Any, CaptionResult, str | None]:
    """``(value, r, error)`` of one result: a transport error, a bad answer or the judged value."""
    if not r.ok:
        return None, r, r.error
    try:
        return judge(r), r, None
    except (AnswerError, RegionError) as e:
        return None, r, str(e)


async def ask(
    backend: Backend,
    req: CaptionRequest,
    judge: Callable[[CaptionResult], Any],
    retries: int,
    metrics: Metrics,
) -> tuple[Any, CaptionResult, str | None]:
    """``(value, last result, error)``: asks again while the answer is bad, up to ``retries``
    times, each time with a varied request (:func:`varied`)."""
    r: CaptionResult | None = None
    err = "not attempted"
    for attempt in range(retries + 1):
        r = await backend.generate(varied(req, attempt, r))
        metrics.add(r)
        value, r, err = judge_one(r, judge)
        if err is None or not r.ok:
            return value, r, err
        if attempt < retries:
            metrics.answer_retries += 1
    assert r is not None
    return None, r, f"{err} (after {retries + 1} answers)"


def request_seed(seed: int, *parts: object) -> int:
    """A request's own sampling seed: ``seed`` mixed with what identifies the question (63 bits,
    a valid ``seed`` for vLLM, SGLang and OpenAI's API)."""
    h = hashlib.blake2b("\0".join(map(str, (seed, *parts))).encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


@dataclass
class TaskSettings:
    model: str
    sampling: SamplingParams
    seed: int | None = None  # RecaptionConfig.seed: per-request seeds (Task.sampling)
    retries: int = 3
    keep_truncated: bool = False
    bbox_format: str = "norm1000"
    box_hint: str = "coords"
    min_box_area: float = 1e-4
    dedup_iou: float = 0.9
    max_regions: int = 64
    jpeg_quality: int = 90


class Task:
    """One sample in, one layer row out: :meth:`requests` to send, :meth:`judge` for each
    answer, :meth:`finish` to build the row. :meth:`run` does the three with a backend (and
    asks again on a bad answer); the vLLM driver does them apart, the engine in between."""

    kind = "?"
    schema: pa.Schema

    def __init__(self, prompt: Prompt, s: TaskSettings) -> None:
        self.prompt = prompt
        self.s = s

    def failed_row(self, key: str, error: str, raw: str | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def premade_row(self, sample: Sample) -> dict[str, Any] | None:
        """The row of a sample that gets no request (no image, no proposals); None otherwise."""
        if sample.image is None:
            return self.failed_row(sample.key, sample.error or "image not available")
        return None

    def meta(self, sample: Sample) -> dict[str, Any]:
        """What judging and the row need of a sample, without its image (small, picklable)."""
        assert sample.image is not None
        w, h = sample.image.size
        return {"key": sample.key, "w": w, "h": h, "proposals": sample.proposals}

    def requests(self, sample: Sample) -> list[CaptionRequest]:
        raise NotImplementedError

    def sampling(self, sample: Sample, i: int = 0) -> SamplingParams:
        """The sampling of ``sample``'s request ``i``. With ``seed`` set and a temperature above 0,
        the request carries its own seed, made from the image's bytes (the key when unknown) and
        ``i``: the same answer on a rerun, whatever batch or order the server sees it in, and for a
        duplicate image the answer the response cache would have given it."""
        sp = self.s.sampling
        if self.s.seed is None or sp.temperature <= 0:
            return sp
        return replace(sp, seed=request_seed(self.s.seed, sample.sha256 or sample.key, i))

    # bytes of one request per byte of the sample's JPEG: its base64 copy in the body
    body_factor = 4 / 3

    def n_requests(self, sample: Sample) -> int:
        return 1

    def bytes_estimate(self, sample: Sample) -> int:
        """What ``sample`` holds from the moment it waits for the backend until its row is done:
        its JPEG plus, per request, the body (the image base64, 4/3 of its bytes, and the
        prompt). The byte budget (recaption/budget.py) charges this."""
        if sample.image is None:
            return 0
        j = len(sample.image.jpeg)
        return j + self.n_requests(sample) * (int(j * self.body_factor) + 4096)

    def judge(self, meta: dict[str, Any]) -> Callable[[CaptionResult], Any]:
        return lambda r: judge_text(r, self.s.keep_truncated)

    def finish(
        self, meta: dict[str, Any], outs: list[tuple[Any, CaptionResult, str | None]], metrics: Metrics
    ) -> dict[str, Any]:
        raise NotImplementedError

    async def run(self, backend: Backend, sample: Sample, metrics: Metrics) -> dict[str, Any]:
        import asyncio

        row = self.premade_row(sample)
        if row is not None:
            return row
        meta = self.meta(sample)
        judge = self.judge(meta)
        outs = await asyncio.gather(
            *(ask(backend, q, judge, self.s.retries, metrics) for q in self.requests(sample))
        )
        return self.finish(meta, list(outs), metrics)

    def _user(self, text: str, n_images: int = 1) -> list[dict[str, Any]]:
        return [
            {"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}
        ]


class GlobalTask(Task):
    kind = "global"
    schema = GLOBAL_LAYER_SCHEMA

    def requests(self, sample: Sample) -> list[CaptionRequest]:
        assert sample.image is not None
        w, h = sample.image.size
        return [
            CaptionRequest(
                sample.key,
                self._user(self.prompt.render(width=w, height=h)),
                [sample.image.jpeg],
                self.sampling(sample),
            )
        ]

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

    def finish(
        self, meta: dict[str, Any], outs: list[tuple[Any, CaptionResult, str | None]], metrics: Metrics
    ) -> dict[str, Any]:
        ((text, r, err),) = outs
        if err is not None:
            return self.failed_row(meta["key"], err, r.text, r)
        return {
            "key": meta["key"],
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

    def requests(self, sample: Sample) -> list[CaptionRequest]:
        assert sample.image is not None
        w, h = sample.image.size
        text = self.prompt.render(width=w, height=h, bbox_convention=CONVENTION_TEXT[self.s.bbox_format])
        return [
            CaptionRequest(
                sample.key,
                self._user(text),
                [sample.image.jpeg],
                self.sampling(sample),
                json_schema=grounded_schema(self.s.max_regions),
                schema_name="regions",
            )
        ]

    def judge(self, meta: dict[str, Any]) -> Callable[[CaptionResult], Any]:
        def judge(r: CaptionResult):
            if r.finish_reason == "length":
                raise AnswerError("truncated (finish_reason=length)")
            if not (r.text or "").strip():
                raise AnswerError("empty answer")
            return parse_grounded(
                r.text,
                self.s.bbox_format,
                meta["w"],
                meta["h"],
                min_area=self.s.min_box_area,
                dedup_iou=self.s.dedup_iou,
                max_regions=self.s.max_regions,
            )

        return judge

    def finish(
        self, meta: dict[str, Any], outs: list[tuple[Any, CaptionResult, str | None]], metrics: Metrics
    ) -> dict[str, Any]:
        ((value, r, err),) = outs
        if err is not None:
            return self.failed_row(meta["key"], err, r.text)
        regions, dropped = value
        for k, n in dropped.items():
            metrics.dropped_boxes[k] = metrics.dropped_boxes.get(k, 0) + n
        return self.ok_row(meta["key"], regions)


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

    def premade_row(self, sample: Sample) -> dict[str, Any] | None:
        row = super().premade_row(sample)
        if row is None and sample.proposals is None:
            return self.failed_row(sample.key, sample.proposals_error or "no proposals for this image")
        return row

    @staticmethod
    def boxes(props: list[dict[str, Any]]) -> list[tuple[float, float, float, float]]:
        return [(float(p["x0"]), float(p["y0"]), float(p["x1"]), float(p["y1"])) for p in props]

    def build(self, sample: Sample, i: int, box: tuple[float, float, float, float]) -> CaptionRequest:
        assert sample.image is not None
        w, h = sample.image.size
        text = self.prompt.render(
            width=w,
            height=h,
            box_hint=self.hint(box, w, h),
            box_tag=box_tag(box),
            bbox_convention=CONVENTION_TEXT[self.s.bbox_format],
        )
        q = self.s.jpeg_quality
        if self.s.box_hint == "draw":
            images = [draw_box(sample.image.decoded(), box, q)]
        elif self.s.box_hint == "crop":
            images = [sample.image.jpeg, crop_box(sample.image.decoded(), box, q)]
        else:
            images = [sample.image.jpeg]
        return CaptionRequest(
            f"{sample.key}#{i}", self._user(text, len(images)), images, self.sampling(sample, i)
        )

    def requests(self, sample: Sample) -> list[CaptionRequest]:
        return [self.build(sample, i, b) for i, b in enumerate(self.boxes(sample.proposals or []))]

    def n_requests(self, sample: Sample) -> int:
        return len(sample.proposals or [])

    @property
    def body_factor(self) -> float:  # type: ignore[override]
        # draw: a second JPEG (about as big) and its base64; crop: the full image and a crop
        return {"coords": 4 / 3, "draw": 1 + 4 / 3, "crop": 1 + 8 / 3}[self.s.box_hint]

    def finish(
        self, meta: dict[str, Any], outs: list[tuple[Any, CaptionResult, str | None]], metrics: Metrics
    ) -> dict[str, Any]:
        props = meta["proposals"] or []
        regions, first_err = [], None
        for (text, r, err), b, p in zip(outs, self.boxes(props), props, strict=True):
            if err is not None:
                first_err = first_err or (f"region: {err}", r.text)
                continue
            regions.append(
                {"x0": b[0], "y0": b[1], "x1": b[2], "y1": b[3], "caption": text, "label": p.get("label")}
            )
        if first_err is not None:
            return self.failed_row(meta["key"], first_err[0], first_err[1], regions)
        return self.ok_row(meta["key"], regions)
