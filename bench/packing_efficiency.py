"""Packing efficiency (real tokens / total tokens) of our packed steps vs a padded one-image-per-row batch.

Inputs: a realistic mix of web image sizes (common aspect ratios, long sides 160-2048 px, a tail of
small images), NaFlex grids at ``max_patches``, packed into the ViT-B/16 recipe's rows
(``seq_len`` tokens each) by the trainer's planner (best fit from a pool fed by a shuffle buffer).
Baseline: each image padded to ``max_patches`` in its own row (what a fixed-shape batch does).

    python bench/packing_efficiency.py [--quick]

Prints a table (candidate, median, min, max, unit) over trials, then the ratio line. Target: >= 98 %.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.data.naflex import grid_for
from train.data.packing import plan_rows

RATIOS = [(1, 1), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (2, 1), (1, 2), (21, 9), (5, 4)]


def image_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(RATIOS)
        long = int(rng.choice([rng.uniform(160, 512), rng.uniform(512, 1024), rng.uniform(1024, 2048)]))
        w, h = (long, max(1, long * b // a)) if a >= b else (max(1, long * a // b), long)
        out.append((w, h))
    return out


def ours(sizes: list[int], rows: int, seq_len: int, max_images: int, pack_buffer: int) -> tuple[float, float]:
    """Efficiency over all full steps, and planning time per step (ms)."""
    stream = iter(sizes)
    pool: list[int] = []
    done = False

    def refill() -> None:
        nonlocal done
        while len(pool) < pack_buffer and not done:
            try:
                pool.append(next(stream))
            except StopIteration:
                done = True

    real = total = steps = 0
    t = time.perf_counter()
    while True:
        plan = plan_rows(pool, lambda n: n, refill, rows, seq_len, max_images)
        if done:  # the stream ran dry during this step: the tail is not a steady-state step
            break
        real += sum(map(sum, plan))
        total += rows * seq_len
        steps += 1
    return real / total, (time.perf_counter() - t) / max(steps, 1) * 1e3


def padded(sizes: list[int], max_patches: int) -> float:
    return sum(sizes) / (len(sizes) * max_patches)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-patches", type=int, default=256)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--max-images", type=int, default=320)
    ap.add_argument("--pack-buffer", type=int, default=256)
    ap.add_argument("--patch", type=int, default=16)
    a = ap.parse_args()
    trials, n = (3, 4000) if a.quick else (7, 40000)
    eff_ours, eff_pad, ms = [], [], []
    for seed in range(trials):
        sizes = [
            gh * gw for gh, gw in (grid_for(w, h, a.patch, a.max_patches) for w, h in image_sizes(n, seed))
        ]
        e, t = ours(sizes, a.rows, a.seq_len, a.max_images, a.pack_buffer)
        eff_ours.append(100 * e)
        ms.append(t)
        eff_pad.append(100 * padded(sizes, a.max_patches))
    print(
        f"images per trial: {n}, trials: {trials}, max_patches={a.max_patches}, seq_len={a.seq_len}, "
        f"rows={a.rows}, pack_buffer={a.pack_buffer}"
    )
    print(f"{'candidate':<34}{'median':>10}{'min':>10}{'max':>10}  unit")
    for name, xs, unit in (
        ("ours: packed rows (best fit)", eff_ours, "% real"),
        ("padded one image per row", eff_pad, "% real"),
        ("ours: planning time per step", ms, "ms"),
    ):
        print(f"{name:<34}{statistics.median(xs):>10.2f}{min(xs):>10.2f}{max(xs):>10.2f}  {unit}")
    mo, mp = statistics.median(eff_ours), statistics.median(eff_pad)
    print(
        f"packing: {mo / 100:.4f} of ideal ({mo:.2f} % real tokens; target >= 98 %), "
        f"{mo / mp:.2f}x padded one-image-per-row ({mp:.2f} %)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
