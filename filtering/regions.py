"""Region filters: per box (a keep mask per region) and per image.

Per box, in order: valid (finite, inside [0,1], x0 < x1, y0 < y1), area within bounds,
caption length within bounds, not a duplicate (IoU >= ``dup_iou`` with an earlier kept box of
the same label). The layer gets ``region_keep: list<bool>`` aligned with the region layer's
``regions``, so a stage-2 reader can keep the good boxes of an image it keeps. Per image:
drop when the region layer failed, when there are more than ``max_boxes`` boxes, or when
fewer than ``min_boxes`` survive.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from filtering.base import Filter, Sample, Verdict


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class RegionFilter(Filter):
    name = "regions"
    needs = "regions"

    def __init__(
        self,
        min_area: float = 0.0005,
        max_area: float = 1.0,
        max_boxes: int = 100,
        min_boxes: int = 1,
        dup_iou: float = 0.9,
        min_caption_chars: int = 0,
        max_caption_chars: int | None = None,
    ) -> None:
        self.min_area, self.max_area = min_area, max_area
        self.max_boxes, self.min_boxes = max_boxes, min_boxes
        self.dup_iou = dup_iou
        self.min_cap, self.max_cap = min_caption_chars, max_caption_chars

    def score_columns(self) -> dict[str, pa.DataType]:
        return {"region_keep": pa.list_(pa.bool_()), "n_regions": pa.int32(), "n_regions_kept": pa.int32()}

    def box_problem(self, r: dict[str, Any], kept: list[tuple[tuple[float, ...], str | None]]) -> str | None:
        """Why one box is dropped (``kept``: the boxes kept so far), or None."""
        try:
            box = (float(r["x0"]), float(r["y0"]), float(r["x1"]), float(r["y1"]))
        except (KeyError, TypeError, ValueError):
            return "invalid"
        eps = 1e-4
        if (
            not all(math.isfinite(v) and -eps <= v <= 1 + eps for v in box)
            or box[0] >= box[2]
            or box[1] >= box[3]
        ):
            return "invalid"
        area = (box[2] - box[0]) * (box[3] - box[1])
        if area < self.min_area:
            return "too small"
        if area > self.max_area:
            return "too large"
        cap = r.get("caption")
        n = len(cap) if isinstance(cap, str) else 0
        if n < self.min_cap or (self.max_cap is not None and n > self.max_cap):
            return "caption length"
        label = r.get("label")
        for other, other_label in kept:
            if other_label == label and iou(box, other) >= self.dup_iou:  # type: ignore[arg-type]
                return "duplicate"
        kept.append((box, label))
        return None

    def check(self, s: Sample) -> Verdict:
        if s.regions_status is not None and s.regions_status != "ok":
            return self.drop(
                "failed in the region layer", {"region_keep": None, "n_regions": 0, "n_regions_kept": 0}
            )
        regions = s.regions or []
        kept: list[tuple[tuple[float, ...], str | None]] = []
        mask, why = [], []
        for r in regions:
            p = self.box_problem(r, kept) if isinstance(r, dict) else "invalid"
            mask.append(p is None)
            if p is not None:
                why.append(p)
        n_kept = sum(mask)
        sc = {"region_keep": mask, "n_regions": len(regions), "n_regions_kept": n_kept}
        if len(regions) > self.max_boxes:
            return self.drop(f"{len(regions)} boxes > {self.max_boxes}", sc)
        if n_kept < self.min_boxes:
            detail = ", ".join(sorted(set(why))) or "none given"
            return self.drop(f"{n_kept} usable boxes < {self.min_boxes} ({detail})", sc)
        return Verdict(True, None, sc)
