"""Region captions: the grounded JSON schema, box conventions, parsing and validation.

Grounded mode asks the model for ``{"regions": [{"bbox": [x0, y0, x1, y1], "label", "caption"}]}``.
Models differ in how they write boxes (``bbox_format``):

* ``pixels``: absolute pixels of the image the model was sent (Qwen2.5-VL);
* ``norm1000``: integers in 0..1000 (Qwen-VL, many grounding models);
* ``norm1``: fractions in 0..1.

Every box is normalized to [0,1] of the image, clamped into it, and kept only if
``x0 < x1``, ``y0 < y1`` and its area is at least ``min_area``; boxes that overlap an
earlier kept box with the same label above ``dedup_iou`` are dropped as duplicates.
Answers that are not JSON, do not match the schema, or keep no valid box raise
:class:`RegionError` with the reason (the caller retries, then records it).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

Box = tuple[float, float, float, float]

CONVENTION_TEXT = {
    "pixels": "absolute pixel coordinates of this image",
    "norm1000": "integers from 0 to 1000 relative to the image width and height",
    "norm1": "fractions from 0 to 1 relative to the image width and height",
}

GROUNDED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "regions": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "bbox": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                    "label": {"type": "string"},
                    "caption": {"type": "string"},
                },
                "required": ["bbox", "label", "caption"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["regions"],
    "additionalProperties": False,
}


CAPTION_MAX_CHARS = 600  # per region, in the schema: constrained decoding cannot run on forever
LABEL_MAX_CHARS = 80


def grounded_schema(max_regions: int = 64) -> dict[str, Any]:
    """:data:`GROUNDED_SCHEMA` bounded: at most ``max_regions`` regions (``maxItems``) and
    bounded strings (``maxLength``), so a constrained decoder cannot loop until ``max_tokens``."""
    item = GROUNDED_SCHEMA["properties"]["regions"]["items"]
    return {
        **GROUNDED_SCHEMA,
        "properties": {
            "regions": {
                "type": "array",
                "maxItems": max_regions,
                "items": {
                    **item,
                    "properties": {
                        **item["properties"],
                        "label": {"type": "string", "maxLength": LABEL_MAX_CHARS},
                        "caption": {"type": "string", "maxLength": CAPTION_MAX_CHARS},
                    },
                },
            }
        },
    }


class RegionError(ValueError):
    """A model answer that gives no usable regions; the message is the recorded reason."""


def _scale(fmt: str, width: int, height: int) -> tuple[float, float]:
    if fmt == "pixels":
        return float(width), float(height)
    if fmt == "norm1000":
        return 1000.0, 1000.0
    if fmt == "norm1":
        return 1.0, 1.0
    raise ValueError(f"unknown bbox_format {fmt!r}: use pixels, norm1000 or norm1")


def to_unit(bbox: Any, fmt: str, width: int, height: int) -> Box:
    """A model box in ``fmt`` as [0,1] coordinates (not yet clamped or checked)."""
    if not isinstance(bbox, list | tuple) or len(bbox) != 4:
        raise RegionError(f"bbox must be 4 numbers, got {json.dumps(bbox)[:60]}")
    try:
        vals = [float(v) for v in bbox]
    except (TypeError, ValueError):
        raise RegionError(f"bbox must be numbers, got {json.dumps(bbox)[:60]}") from None
    if not all(math.isfinite(v) for v in vals):
        raise RegionError("bbox has a non-finite number")
    sx, sy = _scale(fmt, width, height)
    return vals[0] / sx, vals[1] / sy, vals[2] / sx, vals[3] / sy


def from_unit(box: Box, fmt: str, width: int, height: int) -> list[float]:
    """The inverse of :func:`to_unit` (to tell a model where a proposal is)."""
    sx, sy = _scale(fmt, width, height)
    vals = [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]
    return [round(v) for v in vals] if fmt in ("pixels", "norm1000") else [round(v, 3) for v in vals]


def box_tag(box: Box) -> str:
    """A unit box as Qwen2-VL's grounding text, ``<box>(x0,y0),(x1,y1)</box>`` on the 0-1000 grid:
    the form a stage-2 captioner of this project is trained with (``train/data/regions.box_text``)."""
    x0, y0, x1, y1 = (min(1000, max(0, round(v * 1000))) for v in box)
    return f"<box>({x0},{y0}),({x1},{y1})</box>"


def clamp_box(box: Box, tolerance: float = 0.05) -> Box | None:
    """Clamp into [0,1]; None when a box lies mostly outside the image (by more than ``tolerance``)."""
    x0, y0, x1, y1 = box
    if min(x0, y0, x1, y1) < -tolerance or max(x0, y0, x1, y1) > 1 + tolerance:
        return None
    c = [min(1.0, max(0.0, v)) for v in box]
    return c[0], c[1], c[2], c[3]


def iou(a: Box, b: Box) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def extract_json(text: str) -> Any:
    """Parse a JSON answer, tolerating a Markdown code fence around it."""
    t = text.strip()
    m = re.match(r"^```(?:json)?\s*(.*?)\s*```$", t, re.DOTALL)
    if m:
        t = m.group(1)
    try:
        return json.loads(t)
    except ValueError as e:
        raise RegionError(f"malformed JSON: {e.msg} at char {e.pos}") from None


def validate_regions(
    items: list[dict[str, Any]],
    fmt: str,
    width: int,
    height: int,
    *,
    min_area: float = 1e-4,
    dedup_iou: float = 0.9,
    max_regions: int = 64,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Valid regions (x0..y1 in [0,1], caption, label) and counts of what was dropped and why."""
    kept: list[dict[str, Any]] = []
    dropped = {
        "out_of_image": 0,
        "degenerate": 0,
        "too_small": 0,
        "duplicate": 0,
        "no_caption": 0,
        "bad_bbox": 0,
    }
    for it in items:
        if not isinstance(it, dict):
            dropped["bad_bbox"] += 1
            continue
        try:
            unit = to_unit(it.get("bbox"), fmt, width, height)
        except RegionError:
            dropped["bad_bbox"] += 1
            continue
        box = clamp_box(unit)
        if box is None:
            dropped["out_of_image"] += 1
            continue
        if not (box[0] < box[2] and box[1] < box[3]):
            dropped["degenerate"] += 1
            continue
        if (box[2] - box[0]) * (box[3] - box[1]) < min_area:
            dropped["too_small"] += 1
            continue
        caption = str(it.get("caption") or "").strip()
        label = str(it.get("label") or "").strip()
        if not caption:
            dropped["no_caption"] += 1
            continue
        if any(
            k["label"] == label and iou(box, (k["x0"], k["y0"], k["x1"], k["y1"])) >= dedup_iou for k in kept
        ):
            dropped["duplicate"] += 1
            continue
        kept.append(
            {"x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3], "caption": caption, "label": label}
        )
        if len(kept) >= max_regions:
            break
    return kept, {k: v for k, v in dropped.items() if v}


def parse_grounded(
    text: str, fmt: str, width: int, height: int, **kw: Any
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Regions from a grounded answer; RegionError with the reason when none is usable."""
    data = extract_json(text)
    if isinstance(data, list):  # some models drop the wrapper object
        data = {"regions": data}
    if not isinstance(data, dict) or not isinstance(data.get("regions"), list):
        raise RegionError('wrong JSON: expected {"regions": [...]}')
    if not data["regions"]:
        return [], {}
    kept, dropped = validate_regions(data["regions"], fmt, width, height, **kw)
    if not kept:
        why = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(dropped.items()))
        raise RegionError(f"invalid boxes: none of {len(data['regions'])} kept ({why})")
    return kept, dropped
