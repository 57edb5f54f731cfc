"""Packing variable-length images into fixed-length rows, and assembling a packed step.

Legend: R rows, S tokens per row, T = R*S, P patch values, B image slots (``max_images``),
L text context.

Planning needs only each image's patch count, so it runs on metadata (and can replay a
stream to resume without decoding). Best fit from a pool: each row takes the largest pending
image that still fits, until none does; the pool is refilled from the stream as it empties.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from train.model.attention import meta_from_segments
from train.model.towers import VisionBatch


def plan_rows(
    pool: list[Any],
    size: Callable[[Any], int],
    refill: Callable[[], None],
    rows: int,
    seq_len: int,
    max_images: int,
) -> list[list[Any]]:
    """Take items from ``pool`` (refilled by ``refill()``) into ``rows`` rows of ``seq_len`` tokens."""
    out: list[list[Any]] = []
    n_images = 0
    for _ in range(rows):
        row: list[Any] = []
        room = seq_len
        refill()
        while pool and n_images < max_images:
            best, best_n = -1, 0
            for i, item in enumerate(pool):
                n = size(item)
                if best_n < n <= room:
                    best, best_n = i, n
                    if n == room:
                        break
            if best < 0:
                break
            row.append(pool.pop(best))
            room -= best_n
            n_images += 1
            refill()
        out.append(row)
    return out


def assemble(
    rows: list[list[tuple[torch.Tensor, torch.Tensor]]], seq_len: int, max_images: int, patch_values: int
) -> tuple[VisionBatch, int]:
    """Pack rows of ``(patches_NP, pos_N2)`` into a :class:`VisionBatch`; returns it and the real token count.

    Images get slots 0.. in row order; padding at a row's end is its own document
    (id ``max_images + row``) so it attends only to itself.
    """
    R = len(rows)
    patches_TP = torch.zeros(R * seq_len, patch_values)
    pos_T2 = torch.zeros(R * seq_len, 2, dtype=torch.long)
    img_T = torch.full((R * seq_len,), -1, dtype=torch.long)
    seg_RS = torch.empty(R, seq_len, dtype=torch.long)
    slot, real = 0, 0
    for r, row in enumerate(rows):
        seg_RS[r] = max_images + r
        at = 0
        for patches_NP, pos_N2 in row:
            n = patches_NP.shape[0]
            t0 = r * seq_len + at
            patches_TP[t0 : t0 + n] = patches_NP
            pos_T2[t0 : t0 + n] = pos_N2
            img_T[t0 : t0 + n] = slot
            seg_RS[r, at : at + n] = slot
            slot, at, real = slot + 1, at + n, real + n
    meta = meta_from_segments(seg_RS, max_seqlen=seq_len)
    meta.cu_seqlens_N = pad_cu_seqlens(meta.cu_seqlens_N, R + max_images + 1)
    return VisionBatch(patches_TP, pos_T2, img_T, meta, max_images), real


def pad_cu_seqlens(cu_seqlens_N: torch.Tensor, length: int) -> torch.Tensor:
    """Pad offsets to a fixed ``length`` with zero-length documents at the end (no recompiles)."""
    n = cu_seqlens_N.numel()
    if n >= length:
        return cu_seqlens_N
    return torch.cat([cu_seqlens_N, cu_seqlens_N[-1:].expand(length - n)])
