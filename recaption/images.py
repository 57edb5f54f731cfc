"""Images as the captioner sees them: decoded from the shard, downscaled to ``image_max_side``
(then, for a model family with a resize grid, to the size its processor would use), encoded as
JPEG once. Only the JPEG is kept while a sample waits for the backend (a decoded image is
~10x its JPEG); drawing or cropping a proposal box decodes it again. Boxes are given and
returned relative to this image; normalized [0,1] coordinates are the same for the shard's
image."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageDraw

from recaption.presets import Grid


@dataclass
class Prepared:
    jpeg: bytes
    size: tuple[int, int]  # (width, height) of the image sent

    def decoded(self) -> Image.Image:
        return Image.open(io.BytesIO(self.jpeg)).convert("RGB")


def encode_jpeg(im: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def prepare(data: bytes, max_side: int, quality: int, grid: Grid | None = None) -> Prepared:
    """Decode, convert to RGB, downscale so the long side is at most ``max_side`` (never up),
    then resize to the model's grid (``grid``: see :mod:`recaption.presets`)."""
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale when it can
    im = im.convert("RGB")
    if max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BICUBIC)
    if grid is not None:
        size = grid.size(im.width, im.height)
        if size != im.size:
            im = im.resize(size, Image.Resampling.BICUBIC)
    return Prepared(encode_jpeg(im, quality), im.size)


def draw_box(im: Image.Image, box: tuple[float, float, float, float], quality: int) -> bytes:
    """A copy with the normalized box outlined in red (the region to describe)."""
    w, h = im.size
    out = im.copy()
    x0, y0, x1, y1 = box
    width = max(2, round(max(w, h) / 200))
    ImageDraw.Draw(out).rectangle([x0 * w, y0 * h, x1 * w, y1 * h], outline=(255, 0, 0), width=width)
    return encode_jpeg(out, quality)


def crop_box(
    im: Image.Image, box: tuple[float, float, float, float], quality: int, margin: float = 0.1
) -> bytes:
    """The region itself with a small margin of context."""
    w, h = im.size
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin, (y1 - y0) * margin
    px = (
        max(0, int((x0 - mx) * w)),
        max(0, int((y0 - my) * h)),
        min(w, int((x1 + mx) * w + 1)),
        min(h, int((y1 + my) * h + 1)),
    )
    if px[2] <= px[0] or px[3] <= px[1]:
        px = (0, 0, w, h)
    return encode_jpeg(im.crop(px), quality)
