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


def position_features(mh: int, mw: int, device: torch.device | None = None) -> torch.Tensor:
    """``(mh * mw, 4 * POS_FREQS)`` sin/cos of each merged cell's centre as a fraction of the side."""
    y = (torch.arange(mh, device=device, dtype=torch.float32) + 0.5) / mh
    x = (torch.arange(mw, device=device, dtype=torch.float32) + 0.5) / mw
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    k = torch.arange(1, POS_FREQS + 1, device=device, dtype=torch.float32) * torch.pi
    ang = torch.cat([yy.reshape(-1, 1) * k, xx.reshape(-1, 1) * k], dim=1)
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class PatchMerger(nn.Module):
    def __init__(self, vision_width: int, lm_width: int, merge: int = MERGE, abs_pos: bool = False) -> None:
        super().__init__()
        self.merge = merge
        inner = vision_width * merge * merge
        self.norm = nn.LayerNorm(inner)
        self.pos = nn.Linear(4 * POS_FREQS, inner) if abs_pos else None
        self.fc1 = nn.Linear(inner, inner)
        self.fc2 = nn.Linear(inner, lm_width)

    def forward(self, x_hwC: torch.Tensor) -> torch.Tensor:
        """One image's ``(h, w, C)`` patch grid -> ``(M, H)`` LM tokens, row-major over the merged grid."""
        h, w, C = x_hwC.shape
        m = self.merge
        mh, mw = merged_grid(h, w, m)
        x = F.pad(x_hwC, (0, 0, 0, mw * m - w, 0, mh * m - h))
        x_MK = x.reshape(mh, m, mw, m, C).permute(0, 2, 1, 3, 4).reshape(mh * mw, m * m * C)
        x_MK = self.norm(x_MK)
        if self.pos is not None:
            x_MK = x_MK + self.pos(position_features(mh, mw, x_MK.device).to(x_MK.dtype))
        return self.fc2(F.gelu(self.fc1(x_MK)))
