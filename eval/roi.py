"""RoIAlign (1x1 output) over one image's patch grid: torchvision's op when it imports, else plain torch.

torchvision's wheels do not import beside torch CPU here (shared/KNOWN-TRAPS.md), so
:func:`roi_align_1x1` is the same computation written out: torchvision's semantics with
``aligned=True`` (a box edge at feature coordinate ``x`` is the continuous coordinate ``x - 0.5``,
patch centres sit on integers) and an adaptive sampling ratio (``ceil(box size)`` samples per
side), bilinear interpolation, samples averaged. :func:`roi_align` uses
``torchvision.ops.roi_align`` instead when torchvision imports *with its compiled ops*, and this
one otherwise: without its ops (the copy OpenCLIP brings from ``.bench-deps``) torchvision falls
back to a Python version that it ``torch.compile``s on first use, minutes on a loaded CPU. Boxes
are clipped to the grid first, where both agree (that fallback also undercounts the samples of a
box larger than the map).

Legend: h, w patch grid, C channels, B boxes.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections.abc import Callable
from typing import Any

import torch

BACKENDS = ("auto", "torchvision", "torch")
_TV: list[Callable[..., Any] | None] = []  # cached torchvision.ops.roi_align (or None), once per process


def _torchvision_op() -> Callable[..., Any] | None:
    """``torchvision.ops.roi_align`` if torchvision is already imported or importable, else None."""
    if not _TV:
        op = None
        if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
            try:
                from torchvision.ops import roi_align as op
            except Exception:  # a CUDA wheel beside torch CPU fails here in several ways
                op = None
        _TV.append(op)
    return _TV[0]


def _torchvision_has_ops() -> bool:
    try:
        from torchvision.extension import _has_ops

        return bool(_has_ops())
    except Exception:
        return False


def roi_backend(backend: str = "auto") -> str:
    """Which implementation :func:`roi_align` uses: ``torchvision`` (its compiled op) or ``torch`` (ours)."""
    if backend not in BACKENDS:
        raise ValueError(f"RoIAlign backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if _torchvision_op() is None:
        if backend == "torchvision":
            raise ImportError("RoIAlign backend 'torchvision': torchvision.ops is not importable")
        return "torch"
    return "torchvision" if backend == "torchvision" or _torchvision_has_ops() else "torch"


def roi_align(feat_HWC: torch.Tensor, boxes_B4: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``(B, C)`` 1x1 RoIAlign of boxes in feature units, clipped to the grid (see the module doc)."""
    H, W, _ = feat_HWC.shape
    boxes_B4 = boxes_B4.float().reshape(-1, 4)
    boxes_B4 = torch.stack(
        [
            boxes_B4[:, 0].clamp(0, W),
            boxes_B4[:, 1].clamp(0, H),
            boxes_B4[:, 2].clamp(0, W),
            boxes_B4[:, 3].clamp(0, H),
        ],
        dim=1,
    )
    if roi_backend(backend) == "torch":
        return roi_align_1x1(feat_HWC, boxes_B4)
    op = _torchvision_op()
    assert op is not None
    feat_1CHW = feat_HWC.float().permute(2, 0, 1)[None].contiguous()
    out = op(feat_1CHW, [boxes_B4], output_size=1, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out[:, :, 0, 0]


def _bilinear(feat_HWC: torch.Tensor, y_S: torch.Tensor, x_S: torch.Tensor) -> torch.Tensor:
    """torchvision's ``bilinear_interpolate``: zero outside [-1, H] x [-1, W], edges clamped."""
    H, W, C = feat_HWC.shape
    outside_S = (y_S < -1.0) | (y_S > H) | (x_S < -1.0) | (x_S > W)
    y_S, x_S = y_S.clamp(min=0.0), x_S.clamp(min=0.0)
    y0_S, x0_S = y_S.floor().long(), x_S.floor().long()
    y_top = y0_S >= H - 1
    x_top = x0_S >= W - 1
    y0_S = torch.where(y_top, torch.full_like(y0_S, H - 1), y0_S)
    x0_S = torch.where(x_top, torch.full_like(x0_S, W - 1), x0_S)
    y1_S = torch.where(y_top, y0_S, y0_S + 1)
    x1_S = torch.where(x_top, x0_S, x0_S + 1)
    y_S = torch.where(y_top, y0_S.to(y_S.dtype), y_S)
    x_S = torch.where(x_top, x0_S.to(x_S.dtype), x_S)
    ly, lx = (y_S - y0_S)[:, None], (x_S - x0_S)[:, None]
    hy, hx = 1 - ly, 1 - lx
    v = (
        hy * hx * feat_HWC[y0_S, x0_S]
        + hy * lx * feat_HWC[y0_S, x1_S]
        + ly * hx * feat_HWC[y1_S, x0_S]
        + ly * lx * feat_HWC[y1_S, x1_S]
    )
    return torch.where(outside_S[:, None], torch.zeros_like(v), v)


def roi_align_1x1(feat_HWC: torch.Tensor, boxes_B4: torch.Tensor, sampling_ratio: int = -1) -> torch.Tensor:
    """``(B, C)``: one pooled feature per box ``(x0, y0, x1, y1)`` given in *feature* units (0..w, 0..h)."""
    out = []
    feat_HWC = feat_HWC.float()
    for x0, y0, x1, y1 in boxes_B4.float().tolist():
        x0, y0, x1, y1 = x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5
        rw, rh = x1 - x0, y1 - y0
        gy = sampling_ratio if sampling_ratio > 0 else max(1, math.ceil(rh))
        gx = sampling_ratio if sampling_ratio > 0 else max(1, math.ceil(rw))
        ys = y0 + (torch.arange(gy, dtype=torch.float32) + 0.5) * rh / gy
        xs = x0 + (torch.arange(gx, dtype=torch.float32) + 0.5) * rw / gx
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        out.append(_bilinear(feat_HWC, yy.reshape(-1), xx.reshape(-1)).mean(0))
    if not out:
        return feat_HWC.new_zeros(0, feat_HWC.shape[-1])
    return torch.stack(out)


def normalized_to_grid(boxes_B4: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Boxes normalized to [0, 1] of the image -> feature units of an ``h x w`` patch grid."""
    scale = torch.tensor([grid_w, grid_h, grid_w, grid_h], dtype=torch.float32)
    return boxes_B4.float() * scale
