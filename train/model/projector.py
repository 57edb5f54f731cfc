"""The stage-2 projector: 2x2 neighbouring-patch merge + MLP into the language model's width.

Qwen2-VL's ``PatchMerger``: the four tokens of each 2x2 block of an image's patch grid are
concatenated (grids with an odd side are zero-padded first), normalized and mapped by a
two-layer MLP, so an image of ``h x w`` patches becomes ``ceil(h/2) * ceil(w/2)`` LM tokens.
Legend: h, w patch grid of one image; C vision width; H the LM's hidden size; M merged tokens.

With ``abs_pos`` each merged token also gets where it sits in the image, as a fraction of the
height and width (sin/cos features, a learned linear map added after the norm). The encoder's 2D
RoPE is relative: its tokens do not carry their absolute place, and the LM reads them as one row
whose length changes with the aspect ratio -- so without this it cannot tell "top left" from
"bottom right" (Qwen2-VL solves the same with M-RoPE in the LM; this works with any causal LM).

Imports only torch: this file is copied into exported model folders (``train/export.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

MERGE = 2


def merged_grid(gh: int, gw: int, merge: int = MERGE) -> tuple[int, int]:
    """The merged grid of an ``gh x gw`` patch grid."""
    return -(-gh // merge), -(-gw // merge)


def merged_tokens(gh: int, gw: int, merge: int = MERGE) -> int:
    """How many LM tokens an image of ``gh x gw`` patches becomes."""
    mh, mw = merged_grid(gh, gw, merge)
    return mh * mw


POS_FREQS = 4  # sin/cos at 1..4 cycles per side: 16 features per token
PIXEL_BINS = 4  # region pixels: a 4x4 grid of mean colours per box (48 features)
PIXEL_SAMPLES = 4  # bilinear samples per bin side


def cell_centres(mh: int, mw: int, device: torch.device | None = None) -> torch.Tensor:
    """``(mh * mw, 2)`` (y, x) of each merged cell's centre as fractions of the sides, row-major."""
    y = (torch.arange(mh, device=device, dtype=torch.float32) + 0.5) / mh
    x = (torch.arange(mw, device=device, dtype=torch.float32) + 0.5) / mw
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1)


def cell_boxes(gh: int, gw: int, merge: int = MERGE, device: torch.device | None = None) -> torch.Tensor:
    """``(M, 4)`` normalized ``(x0, y0, x1, y1)`` of each merged cell of a ``gh x gw`` patch grid,
    row-major, clipped to the image (the last row and column of an odd side hold one patch)."""
    mh, mw = merged_grid(gh, gw, merge)
    ys = torch.arange(mh + 1, device=device, dtype=torch.float32).mul(merge).clamp(max=gh) / gh
    xs = torch.arange(mw + 1, device=device, dtype=torch.float32).mul(merge).clamp(max=gw) / gw
    y0, x0 = torch.meshgrid(ys[:-1], xs[:-1], indexing="ij")
    y1, x1 = torch.meshgrid(ys[1:], xs[1:], indexing="ij")
    return torch.stack([x0, y0, x1, y1], dim=-1).reshape(-1, 4)


def position_features(centres_M2: torch.Tensor) -> torch.Tensor:
    """``(M, 4 * POS_FREQS)`` sin/cos features of (y, x) fractions."""
    k = torch.arange(1, POS_FREQS + 1, device=centres_M2.device, dtype=torch.float32) * torch.pi
    ang = torch.cat([centres_M2[:, :1].float() * k, centres_M2[:, 1:].float() * k], dim=1)
    return torch.cat([ang.sin(), ang.cos()], dim=1)


def roi_blocks(
    x_hwC: torch.Tensor, boxes_R4: torch.Tensor, merge: int = MERGE, samples: int = 2
) -> torch.Tensor:
    """RoIAlign of normalized ``(x0, y0, x1, y1)`` boxes on a patch grid: each box as a
    ``merge x merge`` block of bins, each bin the mean of ``samples x samples`` bilinear samples
    (Mask R-CNN's RoIAlign, aligned) -> ``(R, merge, merge, C)``, the input shape of one merged token."""
    h, w, C = x_hwC.shape
    R, n = boxes_R4.shape[0], merge * samples
    t = (torch.arange(n, device=x_hwC.device, dtype=torch.float32) + 0.5) / n  # sample points in [0, 1]
    b = boxes_R4.float()
    xs = b[:, 0:1] + (b[:, 2:3] - b[:, 0:1]) * t  # (R, n) fractions of the width
    ys = b[:, 1:2] + (b[:, 3:4] - b[:, 1:2]) * t
    # grid_sample's align_corners=False: -1 and 1 are the outer edges of the grid
    grid = torch.stack([xs[:, None, :].expand(R, n, n), ys[:, :, None].expand(R, n, n)], dim=-1) * 2 - 1
    img = x_hwC.permute(2, 0, 1)[None].expand(R, C, h, w)
    out = F.grid_sample(
        img, grid.to(x_hwC.dtype), mode="bilinear", padding_mode="border", align_corners=False
    )
    out = out.reshape(R, C, merge, samples, merge, samples).mean(dim=(3, 5))  # (R, C, merge, merge)
    return out.permute(0, 2, 3, 1)


class PatchMerger(nn.Module):
    def __init__(
        self,
        vision_width: int,
        lm_width: int,
        merge: int = MERGE,
        abs_pos: bool = False,
        region_pixels: bool = False,
        image_pixels: bool = False,
    ) -> None:
        super().__init__()
        self.merge = merge
        self.region_pixels = region_pixels
        self.image_pixels = image_pixels
        inner = vision_width * merge * merge
        self.norm = nn.LayerNorm(inner)
        self.pos = nn.Linear(4 * POS_FREQS, inner) if abs_pos else None
        # region tokens (and with image_pixels the image's tokens: each its merged cell) also get
        # the box's pixels: mean colours of a PIXEL_BINS^2 grid of bins, one map for both
        self.pix = nn.Linear(3 * PIXEL_BINS * PIXEL_BINS, inner) if region_pixels or image_pixels else None
        self.fc1 = nn.Linear(inner, inner)
        self.fc2 = nn.Linear(inner, lm_width)

    def forward(self, x_hwC: torch.Tensor, pixels_HW3: torch.Tensor | None = None) -> torch.Tensor:
        """One image's ``(h, w, C)`` patch grid -> ``(M, H)`` LM tokens, row-major over the merged grid.
        With ``image_pixels``, each token also reads its cell's pixels (``pixels_HW3``, the image as
        the tower sees it) as a region token reads its box's."""
        h, w, C = x_hwC.shape
        m = self.merge
        mh, mw = merged_grid(h, w, m)
        x = F.pad(x_hwC, (0, 0, 0, mw * m - w, 0, mh * m - h))
        x_MK = x.reshape(mh, m, mw, m, C).permute(0, 2, 1, 3, 4).reshape(mh * mw, m * m * C)
        extra = None
        if self.image_pixels:
            if pixels_HW3 is None:
                raise ValueError("this projector's image tokens read pixels: pass the image's pixels")
            extra = self._pixels(pixels_HW3.to(x_MK.dtype), cell_boxes(h, w, m, x_MK.device))
        return self._mlp(x_MK, cell_centres(mh, mw, x_MK.device), extra)

    def regions(
        self, x_hwC: torch.Tensor, boxes_R4: torch.Tensor, pixels_HW3: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One LM token per normalized box of one image's patch grid: the box RoIAligned to a
        ``merge x merge`` block and mapped like any block of the grid (placed at the box's centre).
        With ``region_pixels``, plus the box's pixels (``pixels_HW3``, the image as the tower sees
        it) RoIAligned to ``PIXEL_BINS x PIXEL_BINS`` mean colours: a patch embedding blurs a small
        object into its 16-px patches, the pixels keep its colour and rough outline."""
        boxes_R4 = boxes_R4.to(x_hwC.device)
        blocks = roi_blocks(x_hwC, boxes_R4, self.merge)
        centres = torch.stack([boxes_R4[:, 1] + boxes_R4[:, 3], boxes_R4[:, 0] + boxes_R4[:, 2]], 1) / 2
        extra = None
        if self.region_pixels:
            if pixels_HW3 is None:
                raise ValueError("this projector's region tokens read pixels: pass the image's pixels")
            extra = self._pixels(pixels_HW3.to(x_hwC.dtype), boxes_R4)
        return self._mlp(blocks.reshape(blocks.shape[0], -1), centres, extra)

    def _pixels(self, pixels_HW3: torch.Tensor, boxes_R4: torch.Tensor) -> torch.Tensor:
        """The pixel term of each normalized box: its ``PIXEL_BINS^2`` mean colours, mapped."""
        assert self.pix is not None
        px = roi_blocks(pixels_HW3, boxes_R4, PIXEL_BINS, samples=PIXEL_SAMPLES)
        return self.pix(px.reshape(px.shape[0], -1))

    def _mlp(
        self, x_MK: torch.Tensor, centres_M2: torch.Tensor, extra_MK: torch.Tensor | None = None
    ) -> torch.Tensor:
        x_MK = self.norm(x_MK)
        if self.pos is not None:
            x_MK = x_MK + self.pos(position_features(centres_M2).to(x_MK.dtype))
        if extra_MK is not None:
            x_MK = x_MK + extra_MK
        return self.fc2(F.gelu(self.fc1(x_MK)))
