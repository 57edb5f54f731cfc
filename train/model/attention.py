"""One entry point for packed (varlen) attention and its backend ladder.

Legend (shape suffixes):
    T  total tokens of a step (R rows x S tokens per row, flattened)
    R  packed rows (sequences)          S  tokens per row
    H  heads                            K  head size
    N  documents (images + padding chunks) + 1: ``cu_seqlens_N`` are cumulative offsets

A *document* is one image's tokens, or the padding at the end of a row (padding attends only
to itself, its output is ignored). Every backend computes the same thing: full (bidirectional)
attention inside each document, nothing across documents.

Ladder (``backend="auto"``): CUDA: flash-attn's ``flash_attn_varlen_func`` if importable, then
``torch.nn.attention.varlen.varlen_attn``, then FlexAttention with a document mask;
CPU: SDPA with a dense block-diagonal mask (the reference; FlexAttention backward is not
implemented on CPU, varlen is CUDA-only).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "varlen", "flex", "sdpa_dense")


@dataclass
class PackedMeta:
    """Where the documents of a packed step are. ``seg_RS``: document id per token (unique over
    the step); ``cu_seqlens_N``: int32 offsets into the flattened T tokens; ``max_seqlen``: an
    upper bound on document length (a constant keeps torch.compile from recompiling)."""

    seg_RS: torch.Tensor
    cu_seqlens_N: torch.Tensor
    max_seqlen: int

    @property
    def rows(self) -> int:
        return self.seg_RS.shape[0]

    def to(self, device: torch.device | str) -> PackedMeta:
        return PackedMeta(self.seg_RS.to(device), self.cu_seqlens_N.to(device), self.max_seqlen)


def meta_from_segments(seg_RS: torch.Tensor, max_seqlen: int | None = None) -> PackedMeta:
    """Build :class:`PackedMeta` from per-token document ids (contiguous runs within each row)."""
    flat_T = seg_RS.reshape(-1)
    change_T = torch.ones_like(flat_T, dtype=torch.bool)
    change_T[1:] = flat_T[1:] != flat_T[:-1]
    S = seg_RS.shape[1]
    change_T[::S] = True  # a row always starts a new document
    starts = torch.nonzero(change_T).flatten()
    cu = torch.cat([starts, torch.tensor([flat_T.numel()], device=flat_T.device)]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return PackedMeta(seg_RS, cu, max_seqlen if max_seqlen is not None else longest)


# ---------------------------------------------------------------------------- backends


def _sdpa_dense(
    q_THK: torch.Tensor, k_THK: torch.Tensor, v_THK: torch.Tensor, meta: PackedMeta
) -> torch.Tensor:
    R, S = meta.seg_RS.shape
    T, H, K = q_THK.shape

    def rows(x_THK: torch.Tensor) -> torch.Tensor:
        return x_THK.view(R, S, H, K).transpose(1, 2)  # R H S K

    mask_R1SS = (meta.seg_RS[:, :, None] == meta.seg_RS[:, None, :])[:, None]
    o_RHSK = F.scaled_dot_product_attention(rows(q_THK), rows(k_THK), rows(v_THK), attn_mask=mask_R1SS)
    return o_RHSK.transpose(1, 2).reshape(T, H, K)


def _flex(q_THK: torch.Tensor, k_THK: torch.Tensor, v_THK: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc_T = meta.seg_RS.reshape(-1)
    T = doc_T.numel()

    def document(b, h, q_idx, kv_idx):
        return doc_T[q_idx] == doc_T[kv_idx]

    block = create_block_mask(document, None, None, T, T, device=q_THK.device)
    # on CUDA the fused kernel needs torch.compile (eager materializes T x T scores)
    attn = _compiled_flex() if q_THK.is_cuda else flex_attention
    o_1HTK = attn(
        q_THK.transpose(0, 1)[None],
        k_THK.transpose(0, 1)[None],
        v_THK.transpose(0, 1)[None],
        block_mask=block,
    )
    return o_1HTK[0].transpose(0, 1)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def _varlen_kwargs() -> frozenset[str]:
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def _varlen(q_THK: torch.Tensor, k_THK: torch.Tensor, v_THK: torch.Tensor, meta: PackedMeta) -> torch.Tensor:
    from torch.nn.attention.varlen import varlen_attn

    names = _varlen_kwargs()  # the signature changed across releases: name what exists
    cu = meta.cu_seqlens_N.to(torch.int32)
    if "cu_seq_q" in names:
        return varlen_attn(q_THK, k_THK, v_THK, cu, cu, meta.max_seqlen, meta.max_seqlen)
    return varlen_attn(
        q_THK,
        k_THK,
        v_THK,
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=meta.max_seqlen,
        max_seqlen_k=meta.max_seqlen,
    )


def _flash_attn(
    q_THK: torch.Tensor, k_THK: torch.Tensor, v_THK: torch.Tensor, meta: PackedMeta
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = meta.cu_seqlens_N.to(torch.int32)
    return flash_attn_varlen_func(q_THK, k_THK, v_THK, cu, cu, meta.max_seqlen, meta.max_seqlen)


_IMPLS = {"flash_attn": _flash_attn, "varlen": _varlen, "flex": _flex, "sdpa_dense": _sdpa_dense}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def backend_available(name: str, device: torch.device | str) -> bool:
    """Whether ``name`` can run on ``device`` here (installed, right device)."""
    is_cuda = torch.device(device).type == "cuda"
    if name == "sdpa_dense":
        return True
    if name == "flex":
        return _importable("torch.nn.attention.flex_attention")
    if name == "varlen":
        return is_cuda and _importable("torch.nn.attention.varlen")
    if name == "flash_attn":
        return is_cuda and _importable("flash_attn")
    raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS} or 'auto'")


def pick_backend(requested: str, device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """Resolve ``auto`` down the ladder; check an explicit choice can run."""
    if requested != "auto":
        if not backend_available(requested, device):
            raise RuntimeError(
                f"attention backend {requested!r} is not available on {device} (not installed or CPU)"
            )
        return requested
    if torch.device(device).type != "cuda":
        return "sdpa_dense"
    half = dtype in (torch.float16, torch.bfloat16)
    for name in ("flash_attn", "varlen") if half else ():
        if backend_available(name, device):
            return name
    return "flex"


def packed_attention(
    q_THK: torch.Tensor,
    k_THK: torch.Tensor,
    v_THK: torch.Tensor,
    meta: PackedMeta,
    backend: str = "sdpa_dense",
) -> torch.Tensor:
    """Attention within each document of a packed step. q, k, v: (T, H, K); returns (T, H, K)."""
    return _IMPLS[backend](q_THK, k_THK, v_THK, meta)
