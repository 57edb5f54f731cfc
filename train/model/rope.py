"""Rotary position embeddings: 1D (text) and 2D axial (vision patches; no table, no resolution cap).

Legend: T tokens, H heads, K head size, F = K/2 rotated pairs (K/4 per axis in 2D).
"""

from __future__ import annotations

import torch


def rope_1d(pos_T: torch.Tensor, head_dim: int, theta: float = 10_000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos_TF, sin_TF)`` for integer positions ``pos_T``; F = head_dim / 2."""
    inv_F = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=pos_T.device, dtype=torch.float32) / head_dim)
    )
    ang_TF = pos_T.to(torch.float32)[:, None] * inv_F[None]
    return ang_TF.cos(), ang_TF.sin()


def rope_2d(pos_T2: torch.Tensor, head_dim: int, theta: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Axial 2D: half of the pairs rotate with the row, half with the column. ``pos_T2``: (row, col)."""
    half = head_dim // 2
    cos_r, sin_r = rope_1d(pos_T2[:, 0], half, theta)
    cos_c, sin_c = rope_1d(pos_T2[:, 1], half, theta)
    return torch.cat([cos_r, cos_c], -1), torch.cat([sin_r, sin_c], -1)


def apply_rope(x_THK: torch.Tensor, cos_TF: torch.Tensor, sin_TF: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) by the angles; computed in float32, returned in x's dtype.

    As one complex multiply (pairs viewed as complex numbers): ~6x faster on CPU than
    rotating the halves with separate multiplies and a stack."""
    xc_THF = torch.view_as_complex(x_THK.float().reshape(*x_THK.shape[:-1], -1, 2))
    rot_T1F = torch.complex(cos_TF, sin_TF)[:, None]
    return torch.view_as_real(xc_THF * rot_T1F).flatten(-2).to(x_THK.dtype)
