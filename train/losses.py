"""Contrastive losses, correct across ranks, with a variable number of images per rank.

Legend: B image/text slots per rank (padded to a fixed count), E embedding size, W ranks,
G = W*B gathered slots. ``valid_B`` marks real pairs; padding slots never enter a loss.

Both losses return ``(loss_to_backward, global_loss_value)``. The global loss is a sum over
all real pairs of the global batch divided by the global count of real images N. Each rank
backpropagates ``W * partial / N``: DDP/FSDP average gradients over ranks, so the update
equals the gradient of the global loss, whatever the images per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from train.distributed import (
    all_gather_nograd,
    all_gather_with_grad,
    neighbour_exchange,
    neighbour_exchange_with_grad,
    rank,
    world,
)


def _global_count(valid_B: torch.Tensor) -> torch.Tensor:
    n = valid_B.sum().to(torch.float32)
    if world() > 1:
        n = n.clone()
        dist.all_reduce(n)
    return n.clamp_min(1.0)


def _finish(partial: torch.Tensor, n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    value = partial.detach().clone()
    if world() > 1:
        dist.all_reduce(value)
    return partial * world() / n, value / n


def _sigmoid_block(
    img_BE: torch.Tensor,
    txt_CE: torch.Tensor,
    valid_B: torch.Tensor,
    valid_C: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    positives: bool,
) -> torch.Tensor:
    logits_BC = img_BE @ txt_CE.T * scale + bias
    sign_BC = -torch.ones_like(logits_BC)
    if positives:
        sign_BC = sign_BC + 2 * torch.eye(*logits_BC.shape, dtype=logits_BC.dtype, device=logits_BC.device)
    pair_BC = valid_B[:, None] & valid_C[None, :]
    return torch.where(pair_BC, -F.logsigmoid(sign_BC * logits_BC), torch.zeros_like(logits_BC)).sum()


def sigmoid_loss(
    img_BE: torch.Tensor,
    txt_BE: torch.Tensor,
    valid_B: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    mode: str = "all_gather",
    neg_BE: torch.Tensor | None = None,
    neg_valid_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SigLIP: ``-log sigmoid(z_ij (t x_i.y_j + b))`` summed over pairs, over N images.

    Chunked over ranks: each rank's images meet one rank's texts at a time (a B x B block),
    the texts either all-gathered (``all_gather``) or passed round the ring (``ring``).
    Hard negative texts (``neg_BE``, gathered from every rank) are one more block of negatives.
    """
    img_BE = torch.where(valid_B[:, None], img_BE, torch.zeros_like(img_BE))
    txt_BE = torch.where(valid_B[:, None], txt_BE, torch.zeros_like(txt_BE))
    scale = logit_scale.exp()
    n = _global_count(valid_B)
    partial = _sigmoid_block(img_BE, txt_BE, valid_B, valid_B, scale, logit_bias, True)
    W, r = world(), rank()
    if W > 1 and mode == "all_gather":
        txt_WBE = all_gather_with_grad(txt_BE).view(W, *txt_BE.shape)
        valid_WB = all_gather_nograd(valid_B.to(torch.uint8)).view(W, -1).bool()
        for other in range(W):
            if other != r:
                partial = partial + _sigmoid_block(
                    img_BE, txt_WBE[other], valid_B, valid_WB[other], scale, logit_bias, False
                )
    elif W > 1 and mode == "ring":
        txt, valid = txt_BE, valid_B
        for _ in range(W - 1):
            txt = neighbour_exchange_with_grad(txt)
            valid = neighbour_exchange(valid.to(torch.uint8)).bool()
            partial = partial + _sigmoid_block(img_BE, txt, valid_B, valid, scale, logit_bias, False)
    elif W > 1:
        raise ValueError(f"unknown sigmoid distribution mode {mode!r}: use all_gather or ring")
    if neg_BE is not None and neg_valid_B is not None:
        neg_GE = all_gather_with_grad(torch.where(neg_valid_B[:, None], neg_BE, torch.zeros_like(neg_BE)))
        neg_valid_G = all_gather_nograd(neg_valid_B.to(torch.uint8)).bool()
        partial = partial + _sigmoid_block(img_BE, neg_GE, valid_B, neg_valid_G, scale, logit_bias, False)
    return _finish(partial, n)


def softmax_loss(
    img_BE: torch.Tensor,
    txt_BE: torch.Tensor,
    valid_B: torch.Tensor,
    logit_scale: torch.Tensor,
    neg_BE: torch.Tensor | None = None,
    neg_valid_B: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP: symmetric cross-entropy; local images/texts against gathered texts/images (with grads).

    Hard negative texts (``neg_BE``, gathered from every rank) join the image->text candidates
    (NegCLIP); they have no image, so text->image is unchanged."""
    n = _global_count(valid_B)
    scale = logit_scale.exp()
    img_GE, txt_GE = all_gather_with_grad(img_BE), all_gather_with_grad(txt_BE)
    valid_G = all_gather_nograd(valid_B.to(torch.uint8)).bool()
    B = img_BE.shape[0]
    target_B = torch.arange(B, device=img_BE.device) + rank() * B
    neg = torch.finfo(img_BE.dtype).min
    logits_i_BG = (img_BE @ txt_GE.T * scale).masked_fill(~valid_G[None], neg)
    if neg_BE is not None and neg_valid_B is not None:
        neg_GE = all_gather_with_grad(neg_BE)
        neg_valid_G = all_gather_nograd(neg_valid_B.to(torch.uint8)).bool()
        logits_i_BG = torch.cat(
            [logits_i_BG, (img_BE @ neg_GE.T * scale).masked_fill(~neg_valid_G[None], neg)], 1
        )
    logits_t_BG = (txt_BE @ img_GE.T * scale).masked_fill(~valid_G[None], neg)
    ce = F.cross_entropy(logits_i_BG, target_B, reduction="none") + F.cross_entropy(
        logits_t_BG, target_B, reduction="none"
    )
    partial = torch.where(valid_B, ce, torch.zeros_like(ce)).sum() / 2
    return _finish(partial, n)
