"""Shared pieces of the benchmarks: input generation, timing, the result table."""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter


def photo_like_jpeg(seed: int, size: tuple[int, int] = (1024, 768), quality: int = 90) -> bytes:
    """A JPEG with photo-like entropy (gradients, shapes, blur, grain) so decode cost is realistic."""
    rng = random.Random(seed)
    w, h = size
    img = Image.linear_gradient("L").resize((w, h)).convert("RGB")
    tint = Image.new("RGB", (w, h), tuple(rng.randrange(256) for _ in range(3)))
    img = Image.blend(img, tint, 0.6)
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        box = [x0, y0, x0 + rng.randrange(20, w // 3), y0 + rng.randrange(20, h // 3)]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(
            box, fill=tuple(rng.randrange(256) for _ in range(3))
        )
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    noise = Image.effect_noise((w, h), 24).convert("RGB")
    img = Image.blend(img, noise, 0.15)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_images(folder: Path, n: int, size: tuple[int, int] = (1024, 768)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:06d}.jpg"
        if not p.exists():
            p.write_bytes(photo_like_jpeg(i, size))
        paths.append(p)
    return paths


def size_args(full_n: int, quick_n: int) -> tuple[argparse.Namespace, int, int]:
    """The image benchmarks' flags: ``--quick``, ``--n``, ``--repeats``; returns (args, n, repeats)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    return args, args.n or (quick_n if args.quick else full_n), 1 if args.quick else args.repeats


def alternate(candidates: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Run candidates A B A B ... after one warm-up each; each returns its measured rate."""
    for fn in candidates.values():
        fn()
    results: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            results[name].append(fn())
    return results


def print_table(results: dict[str, list[float]], unit: str) -> None:
    width = max(len(k) for k in results) + 2
    print(f"{'candidate':<{width}} {'median':>10} {'min':>10} {'max':>10}  unit")
    for name, vals in results.items():
        print(
            f"{name:<{width}} {statistics.median(vals):>10.2f} {min(vals):>10.2f} {max(vals):>10.2f}  {unit}"
        )


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


class Timer:
    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
