"""NaFlex-style native-resolution patchify.

An image keeps its aspect ratio and is resized to the largest scale whose patch grid fits
``max_patches``, sides rounded to the patch size, never upscaled past the source (an image
smaller than one patch still gets one). With ``upscale`` a smaller image is scaled *up* to fill the
budget, as SigLIP 2's NaFlex does: stage 2 reads the same image with more, smaller-in-the-image
patches (FineViT's progressive resolution). Legend: N patches of one image, P = 3*p*p values.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def grid_for(width: int, height: int, patch: int, max_patches: int, upscale: bool = False) -> tuple[int, int]:
    """``(rows, cols)`` of the patch grid for a ``width`` x ``height`` image (``upscale``: see the
    module doc)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")

    def grid(s: float) -> tuple[int, int]:
        if upscale:
            return max(1, round(height * s / patch)), max(1, round(width * s / patch))
        gh = max(1, min(round(height * s / patch), max(1, height // patch)))
        gw = max(1, min(round(width * s / patch), max(1, width // patch)))
        return gh, gw

    s = math.sqrt(max_patches * patch * patch / (width * height))
    if not upscale:
        s = min(1.0, s)
    gh, gw = grid(s)
    while gh * gw > max_patches:
        s *= 0.995
        gh, gw = grid(s)
    return gh, gw


def patchify(
    image: Image.Image,
    grid: tuple[int, int],
    patch: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize ``image`` to ``grid`` patches; returns ``(patches_NP float32, pos_N2 int64 (row, col))``."""
    gh, gw = grid
    im = image.convert("RGB")
    if im.size != (gw * patch, gh * patch):
        im = im.resize((gw * patch, gh * patch), Image.BICUBIC)
    a = (np.asarray(im, dtype=np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(
        std, np.float32
    )
    # (gh*p, gw*p, 3) -> (gh, gw, p, p, 3) -> (N, P)
    a = a.reshape(gh, patch, gw, patch, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, patch * patch * 3)
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    pos = np.stack([rows.ravel(), cols.ravel()], 1)
    return torch.from_numpy(np.ascontiguousarray(a)), torch.from_numpy(pos).long()
