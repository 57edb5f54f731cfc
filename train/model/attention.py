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
CPU: SDPA per document, documents of equal length batched (``sdpa_docs``: no score across
documents is computed). SDPA with a dense block-diagonal mask (``sdpa_dense``) is the reference
every backend is tested against (FlexAttention backward is not implemented on CPU, varlen is
CUDA-only). Per-step structures (Flex's block mask, document groups) live in ``PackedMeta.cache``:
built by the first layer, reused by the rest.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "varlen", "flex", "sdpa_docs", "sdpa_dense")


@dataclass
class PackedMeta:
    """Where the documents of a packed step are. ``seg_RS``: document id per token (unique over
    the step); ``cu_seqlens_N``: int32 offsets into the flattened T tokens; ``max_seqlen``: an
    upper bound on document length (a constant keeps torch.compile from recompiling)."""

    seg_RS: torch.Tensor
    cu_seqlens_N: torch.Tensor
    max_seqlen: int
    # per-step derived structures (FlexAttention's block mask, per-document index groups), built
    # by the first layer that needs them and reused by every other layer of the step
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

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

    block = meta.cache.get("flex_block")
    if block is None:  # once per step, not once per layer
        doc_T = meta.seg_RS.reshape(-1)
        T = doc_T.numel()

        def document(b, h, q_idx, kv_idx):
            return doc_T[q_idx] == doc_T[kv_idx]

        block = meta.cache["flex_block"] = create_block_mask(document, None, None, T, T, device=q_THK.device)
    # on CUDA the fused kernel needs torch.compile (eager materializes T x T scores)
    attn = _compiled_flex() if q_THK.is_cuda else flex_attention
    o_1HTK = attn(
        q_THK.transpose(0, 1)[None],
        k_THK.transpose(0, 1)[None],
        v_THK.transpose(0, 1)[None],
        block_mask=block,
    )
    return o_1HTK[0].transpose(0, 1)


def _document_groups(meta: PackedMeta, device: torch.device) -> list[tuple[int, int, torch.Tensor]]:
    """Documents grouped by length: ``(count, length, token_index)`` per group (cached on ``meta``)."""
    groups = meta.cache.get("doc_groups")
    if groups is None:
        cu = meta.cu_seqlens_N.tolist()
        by_len: dict[int, list[int]] = {}
        for a, b in zip(cu[:-1], cu[1:], strict=True):
            if b > a:  # padded cu_seqlens end in zero-length documents
                by_len.setdefault(b - a, []).append(a)
        groups = []
        for n, starts in sorted(by_len.items()):
            idx = (torch.tensor(starts)[:, None] + torch.arange(n)[None]).reshape(-1).to(device)
            groups.append((len(starts), n, idx))
        meta.cache["doc_groups"] = groups
    return groups


def _sdpa_docs(
    q_THK: torch.Tensor, k_THK: torch.Tensor, v_THK: torch.Tensor, meta: PackedMeta
) -> torch.Tensor:
    """Per-document SDPA, documents of equal length batched together: computes sum(n^2) scores
    instead of the dense mask's R*S^2, so packed rows cost no more than padded ones on the CPU."""
    T, H, K = q_THK.shape
    out = q_THK.new_zeros(T, H, K)
    for count, n, idx in _document_groups(meta, q_THK.device):

        def docs(x_THK: torch.Tensor, idx=idx, count=count, n=n) -> torch.Tensor:
            return x_THK.index_select(0, idx).view(count, n, H, K).transpose(1, 2)

        o = F.scaled_dot_product_attention(docs(q_THK), docs(k_THK), docs(v_THK))
        out = out.index_copy(0, idx, o.transpose(1, 2).reshape(count * n, H, K))
    return out


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


_IMPLS = {
    "flash_attn": _flash_attn,
    "varlen": _varlen,
    "flex": _flex,
    "sdpa_docs": _sdpa_docs,
    "sdpa_dense": _sdpa_dense,
}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def backend_available(name: str, device: torch.device | str) -> bool:
    """Whether ``name`` can run on ``device`` here (installed, right device)."""
    is_cuda = torch.device(device).type == "cuda"
    if name in ("sdpa_dense", "sdpa_docs"):
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
        return "sdpa_docs"
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
