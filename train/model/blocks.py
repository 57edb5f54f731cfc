"""Pre-norm transformer blocks on packed tokens, and the MAP (attention-pooling) head.

Legend: T tokens (flattened packed step), D width, H heads, K head size, B images (or texts),
F rotary pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from train.model.rope import apply_rope

# attend(q_THK, k_THK, v_THK) -> o_THK: the tower decides the mask (packed documents / padding).
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Mlp(nn.Module):
    def __init__(self, width: int, ratio: float) -> None:
        super().__init__()
        hidden = int(width * ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x_TD), approximate="tanh"))


class Block(nn.Module):
    """``x + attn(norm(x))`` then ``x + mlp(norm(x))``; q and k get RoPE."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, mlp_ratio)

    def forward(
        self, x_TD: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        T, D = x_TD.shape
        q_THK, k_THK, v_THK = self.qkv(self.norm1(x_TD)).view(T, 3, self.heads, D // self.heads).unbind(1)
        q_THK, k_THK = apply_rope(q_THK, cos_TF, sin_TF), apply_rope(k_THK, cos_TF, sin_TF)
        x_TD = x_TD + self.proj(attend(q_THK, k_THK, v_THK).reshape(T, D))
        return x_TD + self.mlp(self.norm2(x_TD))


def segment_softmax(score_TH: torch.Tensor, seg_T: torch.Tensor, n_seg: int) -> torch.Tensor:
    """Softmax of ``score_TH`` over the tokens of each segment (``seg_T`` in [0, n_seg))."""
    H = score_TH.shape[1]
    idx_TH = seg_T[:, None].expand(-1, H)
    max_BH = torch.full((n_seg, H), float("-inf"), dtype=score_TH.dtype, device=score_TH.device)
    max_BH = max_BH.scatter_reduce(0, idx_TH, score_TH, reduce="amax", include_self=True)
    e_TH = (score_TH - max_BH.gather(0, idx_TH).detach()).exp()
    sum_BH = torch.zeros((n_seg, H), dtype=e_TH.dtype, device=e_TH.device).index_add(0, seg_T, e_TH)
    return e_TH / sum_BH.gather(0, idx_TH).clamp_min(1e-30)


class MapHead(nn.Module):
    """Multihead attention pooling (SigLIP's MAP): a learned probe attends to each image's tokens.

    Each token belongs to one image, so the probe's scores are one dot product per token and
    the softmax runs per image over the packed tokens (exact, O(T), no mask). An image with no
    tokens (padding slot) pools to zeros.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.heads = heads
        self.probe_D = nn.Parameter(torch.randn(width) * width**-0.5)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.mlp = Mlp(width, mlp_ratio)

    def forward(self, x_TD: torch.Tensor, seg_T: torch.Tensor, n_images: int) -> torch.Tensor:
        """``seg_T``: image index in [0, n_images) per token, -1 for tokens to ignore. Returns x_BD."""
        T, D = x_TD.shape
        H, K = self.heads, D // self.heads
        keep_T = seg_T >= 0
        x_TD, seg_T = x_TD[keep_T], seg_T[keep_T]
        q_HK = self.q(self.probe_D).view(H, K)
        k_THK, v_THK = self.kv(x_TD).view(-1, 2, H, K).unbind(1)
        score_TH = (k_THK * q_HK[None]).sum(-1) * K**-0.5
        w_TH = segment_softmax(score_TH, seg_T, n_images)
        o_BHK = torch.zeros((n_images, H, K), dtype=v_THK.dtype, device=v_THK.device)
        o_BHK = o_BHK.index_add(0, seg_T, w_TH[..., None] * v_THK)
        o_BD = self.proj(o_BHK.reshape(n_images, D))
        return o_BD + self.mlp(self.norm(o_BD))
