"""The stage-2 projector: 2x2 neighbouring-patch merge + MLP into the language model's width.

Qwen2-VL's ``PatchMerger``: the four tokens of each 2x2 block of an image's patch grid are
concatenated (grids with an odd side are zero-padded first), normalized and mapped by a
two-layer MLP, so an image of ``h x w`` patches becomes ``ceil(h/2) * ceil(w/2)`` LM tokens.
Legend: h, w patch grid of one image; C vision width; H the LM's hidden size; M merged tokens.

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


class PatchMerger(nn.Module):
    def __init__(self, vision_width: int, lm_width: int, merge: int = MERGE) -> None:
        super().__init__()
        self.merge = merge
        inner = vision_width * merge * merge
        self.norm = nn.LayerNorm(inner)
        self.fc1 = nn.Linear(inner, inner)
        self.fc2 = nn.Linear(inner, lm_width)

    def forward(self, x_hwC: torch.Tensor) -> torch.Tensor:
        """One image's ``(h, w, C)`` patch grid -> ``(M, H)`` LM tokens, row-major over the merged grid."""
        h, w, C = x_hwC.shape
        m = self.merge
        mh, mw = merged_grid(h, w, m)
        x = F.pad(x_hwC, (0, 0, 0, mw * m - w, 0, mh * m - h))
        x_MK = x.reshape(mh, m, mw, m, C).permute(0, 2, 1, 3, 4).reshape(mh * mw, m * m * C)
        return self.fc2(F.gelu(self.fc1(self.norm(x_MK))))
