"""Model-family presets: how a VLM family writes boxes and on which grid it sees the image.

Qwen2-VL / Qwen2.5-VL / Qwen3-VL resize every image with ``smart_resize`` (sides rounded to
multiples of ``patch_size * merge_size``, the area kept between ``min_pixels`` and
``max_pixels``) before the vision tower sees it, and Qwen2.5-VL writes absolute pixels *of
that resized input*. We therefore send images already at that size: the processor's resize is
then the identity and the model's pixels are pixels of the image we sent, so boxes map back
exactly. The numbers are those of the families' published ``preprocessor_config.json``.

============  ===========  ======  ==========  ============
family        boxes        factor  min_pixels  max_pixels
============  ===========  ======  ==========  ============
qwen2.5-vl    pixels       28      3,136       12,845,056
qwen2-vl      norm1000     28      3,136       12,845,056
qwen3-vl      norm1000     32      65,536      16,777,216
internvl      norm1000     -       -           -
generic       (--bbox-format, default norm1000; the image as downscaled)
============  ===========  ======  ==========  ============
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ModelFamily = Literal["generic", "qwen2.5-vl", "qwen2-vl", "qwen3-vl", "internvl"]


@dataclass(frozen=True)
class Grid:
    factor: int
    min_pixels: int
    max_pixels: int

    def size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` the model's processor resizes a ``width x height`` image to."""
        h, w = smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)
        return w, h


@dataclass(frozen=True)
class Preset:
    bbox_format: str
    grid: Grid | None


PRESETS: dict[str, Preset] = {
    "generic": Preset("norm1000", None),
    "qwen2.5-vl": Preset("pixels", Grid(28, 56 * 56, 28 * 28 * 16384)),
    "qwen2-vl": Preset("norm1000", Grid(28, 56 * 56, 28 * 28 * 16384)),
    "qwen3-vl": Preset("norm1000", Grid(32, 65536, 32 * 32 * 16384)),
    "internvl": Preset("norm1000", None),
}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize rule (transformers ``qwen2_vl`` image processor): ``(height, width)``.
    tests/recaption/test_recap_presets.py checks it against the installed transformers."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio above 200: {width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
