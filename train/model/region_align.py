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
    seg = torch.arange(R, device=x_RC.device)
    return F.normalize(vision.proj(vision.head(x_RC, seg, R)).float(), dim=-1)


def image_embeddings(vision: VisionTower, grids: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(N, E)`` unit-norm embeddings of whole images from their final patch grids ``(h, w, C)``:
    pooled by the MAP head and projected, as stage 1 embeds an image."""
    x_TC = torch.cat([g.reshape(-1, g.shape[-1]) for g in grids])
    sizes = torch.tensor([g.shape[0] * g.shape[1] for g in grids], device=x_TC.device)
    seg_T = torch.repeat_interleave(torch.arange(len(grids), device=x_TC.device), sizes)
    return F.normalize(vision.proj(vision.head(x_TC, seg_T, len(grids))).float(), dim=-1)


class RegionAligner(nn.Module):
    """The stage-1 text tower and temperature, trained in stage 2 by the regional contrastive term."""

    def __init__(self, text: TextTower, logit_scale: float) -> None:
        super().__init__()
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor([float(logit_scale)]))

    def loss(
        self,
        vision: VisionTower,
        grids: Sequence[torch.Tensor],
        boxes_R5: torch.Tensor,
        tokens_RL: torch.Tensor,
        mask_RL: torch.Tensor,
    ) -> torch.Tensor:
        """CLIP's symmetric softmax loss over the regions: region r's caption is its one positive."""
        img_RE = region_embeddings(vision, grids, boxes_R5)
        txt_RE = F.normalize(self.text(tokens_RL, mask_RL).float(), dim=-1)
        valid_R = torch.ones(img_RE.shape[0], dtype=torch.bool, device=img_RE.device)
        return softmax_loss(img_RE, txt_RE, valid_R, self.logit_scale)[0]

    def global_loss(
        self,
        vision: VisionTower,
        grids: Sequence[torch.Tensor],
        tokens_BL: torch.Tensor,
        mask_BL: torch.Tensor,
    ) -> torch.Tensor:
        """Stage 1's loss over whole images and their global captions (FG-CLIP's global term)."""
        img_BE = image_embeddings(vision, grids)
        txt_BE = F.normalize(self.text(tokens_BL, mask_BL).float(), dim=-1)
        valid_B = torch.ones(img_BE.shape[0], dtype=torch.bool, device=img_BE.device)
        return softmax_loss(img_BE, txt_BE, valid_B, self.logit_scale)[0]
