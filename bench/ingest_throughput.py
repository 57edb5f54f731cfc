"""Ingest throughput per core: a local folder of ~1024x768 JPEGs -> resized shards.

Compares, side by side in one run:
  * pil-ceiling: one process, plain PIL decode + resize + JPEG encode, nothing else
    (no tar, no Parquet, no hashing): the per-core ceiling for this work;
  * pil-ceiling+draft: the same loop letting libjpeg decode at reduced scale (``draft``),
    the trick our decoder uses: the ratio is taken against the faster of the two ceilings;
  * finevit-1-worker: `finevit ingest FOLDER OUT` on Ray with one shard task in flight
    (so one core), all of its work included (read, hash, decode, resize, encode, tar,
    Parquet, commit); Ray start-up excluded (it is paid once per run, not per image);
  * finevit-2-workers: the same with two tasks in flight, reported per core.
Target: finevit per core >= 0.8 of the ceiling.

    python bench/ingest_throughput.py            # 1000 images
    python bench/ingest_throughput.py --quick    # 120 images, under a minute
"""

from __future__ import annotations

import io
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from _common import Timer, alternate, machine, print_table, size_args, write_images
from PIL import Image

IMAGE_SIZE = 512  # the long side after resize: real resizing work for 1024x768 inputs


def pil_ceiling(paths: list[Path], draft: bool = False) -> float:
    with Timer() as t:
        for p in paths:
            img = Image.open(p)
            if draft:  # let libjpeg decode at a reduced scale, no smaller than the target
                img.draft("RGB", (IMAGE_SIZE, IMAGE_SIZE * img.height // img.width))
            img = img.convert("RGB")
            w, h = img.size
            s = IMAGE_SIZE / max(w, h)
            img = img.resize((round(w * s), round(h * s)), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=95)
    return len(paths) / t.seconds


def finevit_rate(folder: Path, work: Path, workers: int, n: int) -> float:
    from engine.config import load_config
    from engine.ingest import ingest

    out = work / f"out-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(
        None,
        [
            f"ingest.samples_per_shard={max(1, n // 8)}",
            f"ingest.workers={workers}",
            f"ingest.image.image_size={IMAGE_SIZE}",
        ],
    )
    with Timer() as t:
        report = ingest(str(folder), str(out), cfg, progress=False)
    assert report.successes == n, report
    return n / t.seconds / workers  # per core


def main() -> None:
    _, n, repeats = size_args(full_n=1000, quick_n=120)
    work = Path(tempfile.mkdtemp(prefix="fv-bench-ingest-"))
    try:
        paths = write_images(work / "imgs", n)
        from engine.config import RayConfig
        from engine.runtime import init_ray

        init_ray(RayConfig(num_cpus=2))
        res = alternate(
            {
                "pil-ceiling (1 process)": lambda: pil_ceiling(paths),
                "pil-ceiling+draft (1 process)": lambda: pil_ceiling(paths, draft=True),
                "finevit-1-worker": lambda: finevit_rate(work / "imgs", work, 1, n),
                "finevit-2-workers (per core)": lambda: finevit_rate(work / "imgs", work, 2, n),
            },
            repeats,
        )
        print(f"# {n} JPEGs 1024x768 -> long side {IMAGE_SIZE}; {machine()}")
        print_table(res, "images/s/core")
        ceil = max(
            statistics.median(res["pil-ceiling (1 process)"]),
            statistics.median(res["pil-ceiling+draft (1 process)"]),
        )
        one = statistics.median(res["finevit-1-worker"])
        two = statistics.median(res["finevit-2-workers (per core)"])
        print(
            f"ingest: {one / ceil:.2f} of the best PIL ceiling per core with 1 worker ({one:.1f} / {ceil:.1f} img/s), "
            f"{two / ceil:.2f} per core with 2 workers"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
