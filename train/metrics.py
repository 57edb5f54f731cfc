"""Throughput accounting: model FLOPs of a packed step, device peaks, MFU; console + TensorBoard logging."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any

import torch

from train.config import ModelConfig

# Dense (no sparsity) peak TFLOP/s by device-name substring, bf16 tensor cores (fp32 column: TF32).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp32": 494.0},
    "H100": {"bf16": 989.0, "fp32": 494.0},  # SXM; PCIe is ~756
    "A100": {"bf16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.0, "fp32": 183.0},
    "A10G": {"bf16": 70.0, "fp32": 35.0},
    "L4": {"bf16": 121.0, "fp32": 60.0},
    "B200": {"bf16": 2250.0, "fp32": 1100.0},
}


@functools.cache
def cpu_peak_tflops(n: int = 1024, repeats: int = 8) -> float:
    """Measured fp32 matmul rate of this process's CPU threads (best of ``repeats``), TFLOP/s."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    if device.type != "cuda":
        return cpu_peak_tflops()
    name = torch.cuda.get_device_name(device)
    kind = "bf16" if dtype in (torch.bfloat16, torch.float16) else "fp32"
    for sub, peaks in PEAK_TFLOPS.items():
        if sub in name:
            return peaks[kind]
    return float("nan")


def _tower_flops(width: int, depth: int, mlp_ratio: float, tokens: int, attn_pairs: int) -> float:
    """Forward FLOPs of ``depth`` blocks: matmuls (2 x params x tokens) + attention (4 x D per pair)."""
    per_token = 2 * (4 * width * width + 2 * width * int(width * mlp_ratio))
    return depth * (per_token * tokens + 4 * width * attn_pairs)


def step_flops(
    cfg: ModelConfig, patch_tokens: int, doc_lengths: list[int], text_tokens: int, text_lengths: list[int]
) -> float:
    """Training FLOPs (3 x forward) of one step: useful work only (padding not counted)."""
    v, t = cfg.vision, cfg.text
    fwd = _tower_flops(v.width, v.depth, v.mlp_ratio, patch_tokens, sum(n * n for n in doc_lengths))
    fwd += 2 * 3 * v.patch_size**2 * v.width * patch_tokens
    fwd += _tower_flops(t.width, t.depth, t.mlp_ratio, text_tokens, sum(n * n for n in text_lengths))
    return 3 * fwd


class Logger:
    """Prints one line per log step (and a progress bar with tqdm when asked) and writes TensorBoard."""

    def __init__(
        self,
        log_dir: str,
        tensorboard: bool,
        progress: bool,
        total: int,
        enabled: bool = True,
        start: int = 0,
    ) -> None:
        self.enabled = enabled
        self.tb = None
        self.bar = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir)
            except ImportError:
                print(
                    "tensorboard is not installed (pip install tensorboard): logging to the console only",
                    file=sys.stderr,
                )
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, int | float):
                    self.tb.add_scalar(k, v, step)
        line = " ".join(f"{k}={_fmt(v)}" for k, v in values.items())
        if self.bar is not None:
            self.bar.write(f"step {step} {line}")
        else:
            print(f"step {step} {line}", flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        for h in (self.bar, self.tb, self.jsonl):
            if h is not None:
                h.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
