"""The two towers and the contrastive model.

Legend: R packed rows, S tokens per row, T = R*S, P patch values (3*p*p), D width, B images
(= texts, padded to a fixed count), L text context, E embedding size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from train.config import ModelConfig
from train.model.attention import PackedMeta, packed_attention
from train.model.blocks import Block, MapHead
from train.model.rope import rope_1d, rope_2d


@dataclass
class VisionBatch:
    """A packed step of images. ``img_T``: image slot (0..B-1) per token, -1 for padding."""

    patches_TP: torch.Tensor
    pos_T2: torch.Tensor
    img_T: torch.Tensor
    meta: PackedMeta
    n_images: int

    def to(self, device: torch.device | str) -> VisionBatch:
        return VisionBatch(
            self.patches_TP.to(device),
            self.pos_T2.to(device),
            self.img_T.to(device),
            self.meta.to(device),
            self.n_images,
        )


def _run_blocks(
    blocks: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend, ckpt: bool
) -> torch.Tensor:
    for blk in blocks:
        x = (
            checkpoint(blk, x, cos, sin, attend, use_reentrant=False)
            if ckpt and blk.training
            else blk(x, cos, sin, attend)
        )
    return x


class VisionTower(nn.Module):
    def __init__(self, cfg: ModelConfig, backend: str = "sdpa_dense") -> None:
        super().__init__()
        v = cfg.vision
        self.cfg, self.backend, self.checkpointing = v, backend, False
        self.patch_embed = nn.Linear(3 * v.patch_size**2, v.width)
        self.norm_pre = nn.LayerNorm(v.width)  # CLIP's ln_pre: steadier early training at high lr
        self.blocks = nn.ModuleList(Block(v.width, v.heads, v.mlp_ratio) for _ in range(v.depth))
        self.norm = nn.LayerNorm(v.width)
        self.head = MapHead(v.width, v.heads, v.mlp_ratio)
        self.proj = nn.Linear(v.width, cfg.embed_dim, bias=False)

    def forward(self, batch: VisionBatch) -> torch.Tensor:
        x_TD = self.norm_pre(self.patch_embed(batch.patches_TP))
        cos_TF, sin_TF = rope_2d(batch.pos_T2, self.cfg.width // self.cfg.heads, self.cfg.rope_theta)
        meta, backend = batch.meta, self.backend

        def attend(q, k, v):
            return packed_attention(q, k, v, meta, backend)

        x_TD = self.norm(_run_blocks(self.blocks, x_TD, cos_TF, sin_TF, attend, self.checkpointing))
        return self.proj(self.head(x_TD, batch.img_T, batch.n_images))


class TextTower(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int) -> None:
        super().__init__()
        t = cfg.text
        self.cfg, self.checkpointing = t, False
        self.embed = nn.Embedding(vocab_size, t.width)
        self.blocks = nn.ModuleList(Block(t.width, t.heads, t.mlp_ratio) for _ in range(t.depth))
        self.norm = nn.LayerNorm(t.width)
        self.head = MapHead(t.width, t.heads, t.mlp_ratio) if t.pool == "map" else None
        self.proj = nn.Linear(t.width, cfg.embed_dim, bias=False)

    def forward(self, tokens_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
        """Bidirectional attention over each caption's tokens, then masked mean or MAP pooling."""
        B, L = tokens_BL.shape
        D, H = self.cfg.width, self.cfg.heads
        x_TD = self.embed(tokens_BL).reshape(B * L, D)
        pos_T = torch.arange(L, device=tokens_BL.device).repeat(B)
        cos_TF, sin_TF = rope_1d(pos_T, D // H, self.cfg.rope_theta)
        # an all-padding caption (padding slot) attends to itself so softmax stays finite
        keys_BL = mask_BL | ~mask_BL.any(1, keepdim=True)
        key_B11L = keys_BL[:, None, None, :]

        def attend(q_THK, k_THK, v_THK):
            def rows(x):
                return x.view(B, L, H, D // H).transpose(1, 2)

            o = F.scaled_dot_product_attention(rows(q_THK), rows(k_THK), rows(v_THK), attn_mask=key_B11L)
            return o.transpose(1, 2).reshape(B * L, H, D // H)

        x_BLD = self.norm(_run_blocks(self.blocks, x_TD, cos_TF, sin_TF, attend, self.checkpointing)).view(
            B, L, D
        )
        if self.head is not None:
            seg_BL = torch.where(mask_BL, torch.arange(B, device=mask_BL.device)[:, None], -1)
            return self.proj(self.head(x_BLD.reshape(B * L, D), seg_BL.reshape(-1), B))
        m_BL1 = mask_BL[..., None].to(x_BLD.dtype)
        pooled_BD = (x_BLD * m_BL1).sum(1) / m_BL1.sum(1).clamp_min(1.0)
        return self.proj(pooled_BD)


class Stage1Model(nn.Module):
    """Image and text towers plus SigLIP's learnable logit scale (log temperature) and bias."""

    def __init__(
        self,
        cfg: ModelConfig,
        vocab_size: int,
        backend: str = "sdpa_dense",
        init_logit_scale: float = 2.302585,
        init_logit_bias: float = -10.0,
    ) -> None:
        super().__init__()
        self.vision = VisionTower(cfg, backend)
        self.text = TextTower(cfg, vocab_size)
        # shape (1,), not 0-d: FSDP2 shards parameters along dim 0
        self.logit_scale = nn.Parameter(torch.tensor([float(init_logit_scale)]))
        self.logit_bias = nn.Parameter(torch.tensor([float(init_logit_bias)]))
        self.apply(_init)

    def set_checkpointing(self, on: bool) -> None:
        self.vision.checkpointing = self.text.checkpointing = on

    def forward(
        self, vision: VisionBatch, tokens_BL: torch.Tensor, mask_BL: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unit-norm embeddings ``(img_BE, txt_BE)`` and ``(logit_scale, logit_bias)``.

        The scalars are returned from forward (as OpenCLIP does) so that under FSDP2 the loss
        uses the gathered parameters, never a sharded one outside forward."""
        img_BE = F.normalize(self.vision(vision).float(), dim=-1)
        txt_BE = F.normalize(self.text(tokens_BL, mask_BL).float(), dim=-1)
        return img_BE, txt_BE, self.logit_scale * 1.0, self.logit_bias * 1.0


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, std=0.02)
