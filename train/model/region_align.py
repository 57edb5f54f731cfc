"""Stage 2's regional contrastive term (FG-CLIP's regional alignment), beside the LM loss.

The LM loss trains the vision tower through the projector, but box classification and region
retrieval read an encoder another way: a box RoIAligned (1x1) on the final patch tokens, pooled
by stage 1's MAP head and projection, compared with stage-1 text embeddings. Nothing in the LM
loss trains that path (the head and projection are not even used), so a stage-2 encoder's
regions drift away from its text tower. This term trains exactly that path: every region of
the step's images against its region caption, a softmax contrast over the step's regions in
both directions (CLIP's loss), with the stage-1 text tower and temperature trained beside it.
(Two regions captioned with the same text need no masking: their text embeddings are equal, so
the loss of each direction is the same whichever of them is called the target.)

Legend: R regions, C vision width, E joint embedding width, L caption tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.losses import softmax_loss
from train.model.projector import roi_blocks
from train.model.towers import TextTower, VisionTower

ROI_SAMPLES = 4  # bilinear samples per side of the 1x1 RoIAlign bin


def region_embeddings(
    vision: VisionTower, grids: Sequence[torch.Tensor], boxes_R5: torch.Tensor
) -> torch.Tensor:
    """``(R, E)`` unit-norm embeddings of ``[image, x0, y0, x1, y1]`` rows (normalized boxes):
    each box RoIAligned 1x1 on its image's final patch grid ``(h, w, C)``, then pooled as a
    one-token image by the MAP head and projected (as ``FineViTEncoder.pool_regions`` does)."""
    feats: list[torch.Tensor | None] = [None] * boxes_R5.shape[0]
    images = boxes_R5[:, 0].long()
    for i in images.unique().tolist():
        rows = (images == i).nonzero().flatten()
        f = roi_blocks(grids[i], boxes_R5[rows, 1:].to(grids[i].device), 1, ROI_SAMPLES)
        for r, x in zip(rows.tolist(), f.reshape(len(rows), -1), strict=True):
            feats[r] = x
    x_RC = torch.stack(feats)  # type: ignore[arg-type]
    R = x_RC.shape[0]
    return _pooled(vision, x_RC, torch.arange(R, device=x_RC.device), R)


def image_embeddings(vision: VisionTower, grids: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(N, E)`` unit-norm embeddings of whole images from their final patch grids ``(h, w, C)``:
    pooled by the MAP head and projected, as stage 1 embeds an image."""
    x_TC = torch.cat([g.reshape(-1, g.shape[-1]) for g in grids])
    sizes = torch.tensor([g.shape[0] * g.shape[1] for g in grids], device=x_TC.device)
    seg_T = torch.repeat_interleave(torch.arange(len(grids), device=x_TC.device), sizes)
    return _pooled(vision, x_TC, seg_T, len(grids))


def _pooled(vision: VisionTower, x_TC: torch.Tensor, seg_T: torch.Tensor, n: int) -> torch.Tensor:
    """``(n, E)``: tokens pooled per segment by the MAP head, projected, unit norm."""
    return F.normalize(vision.proj(vision.head(x_TC, seg_T, n)).float(), dim=-1)


class RegionAligner(nn.Module):
    """The stage-1 text tower and temperature, trained in stage 2 by the regional contrastive term."""

    def __init__(self, text: TextTower, logit_scale: float) -> None:
        super().__init__()
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor([float(logit_scale)]))

    def contrast(self, img_NE: torch.Tensor, tokens_NL: torch.Tensor, mask_NL: torch.Tensor) -> torch.Tensor:
        """CLIP's symmetric softmax loss: row n's text is row n's one positive (the regional term:
        :func:`region_embeddings` against the regions' captions)."""
        txt_NE = F.normalize(self.text(tokens_NL, mask_NL).float(), dim=-1)
        valid_N = torch.ones(img_NE.shape[0], dtype=torch.bool, device=img_NE.device)
        return softmax_loss(img_NE, txt_NE, valid_N, self.logit_scale)[0]

    def global_loss(
        self,
        vision: VisionTower,
        grids: Sequence[torch.Tensor],
        tokens_BL: torch.Tensor,
        mask_BL: torch.Tensor,
    ) -> torch.Tensor:
        """Stage 1's loss over whole images and their global captions (FG-CLIP's global term)."""
        return self.contrast(image_embeddings(vision, grids), tokens_BL, mask_BL)

    def hard_negative_loss(
        self, img_RE: torch.Tensor, tokens_NL: torch.Tensor, mask_NL: torch.Tensor, owner_N: torch.Tensor
    ) -> torch.Tensor:
        """FG-CLIP's region hard-negative term: each region (``img_RE``, from :func:`region_embeddings`)
        against its own caption and the captions made from it by changing one word
        (``train/data/negatives.py: replacements``), a softmax over those texts alone. Text n
        describes region ``owner_N[n]``; each region's first text is its caption. The batch's
        contrast tells regions apart by whatever differs most (colour, place); this term asks the
        region for the one detail its negatives change."""
        txt_NE = F.normalize(self.text(tokens_NL, mask_NL).float(), dim=-1)
        logit_N = self.logit_scale.exp() * (img_RE[owner_N] * txt_NE).sum(-1)
        R = img_RE.shape[0]
        top_R = torch.full((R,), float("-inf"), device=logit_N.device).scatter_reduce(
            0, owner_N, logit_N.detach(), reduce="amax"
        )
        sum_R = torch.zeros(R, device=logit_N.device).index_add(0, owner_N, (logit_N - top_R[owner_N]).exp())
        first_N = torch.ones_like(owner_N, dtype=torch.bool)
        first_N[1:] = owner_N[1:] != owner_N[:-1]
        return (top_R + sum_R.log() - logit_N[first_N]).mean()
