"""Image filters from the shard metadata alone (no decode): failed ingest, size, aspect ratio.

Duplicates (exact by ``sha256``, near by perceptual hash) need the whole dataset at once and
live in :mod:`filtering.dedup`.
"""

from __future__ import annotations

import pyarrow as pa

from filtering.base import KEEP, Filter, Sample, Verdict


class ImageStatusFilter(Filter):
    """Samples whose image failed ingest keep their row (nothing is silently lost); drop them here."""

    name = "image_status"
    needs = "image"

    def check(self, s: Sample) -> Verdict:
        status = s.meta.get("status")
        if status != "success":
            msg = s.meta.get("error_message")
            return self.drop(f"failed ingest ({status}{': ' + str(msg)[:80] if msg else ''})")
        return KEEP


class ImageSizeFilter(Filter):
    """Minimum side and maximum aspect ratio, from the shard's ``width``/``height`` (or the
    source's ``original_width``/``original_height`` with ``original: true``)."""

    name = "image_size"
    needs = "image"

    def __init__(self, min_side: int = 0, max_aspect: float | None = None, original: bool = False) -> None:
        self.min_side, self.max_aspect = min_side, max_aspect
        self.cols = ("original_width", "original_height") if original else ("width", "height")

    def score_columns(self) -> dict[str, pa.DataType]:
        return {"min_side": pa.int32(), "aspect": pa.float32()}

    def check(self, s: Sample) -> Verdict:
        w, h = s.meta.get(self.cols[0]), s.meta.get(self.cols[1])
        if s.meta.get("status") != "success":  # no image: image_status says why
            return Verdict(True, None, {"min_side": None, "aspect": None})
        if not w or not h:
            return self.drop("no image size in the shard metadata", {"min_side": None, "aspect": None})
        side, aspect = min(w, h), max(w, h) / min(w, h)
        sc = {"min_side": side, "aspect": aspect}
        if side < self.min_side:
            return self.drop(f"side {side} px < {self.min_side}", sc)
        if self.max_aspect is not None and aspect > self.max_aspect:
            return self.drop(f"aspect ratio {aspect:.1f} > {self.max_aspect}", sc)
        return Verdict(True, None, sc)
