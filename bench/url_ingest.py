"""URL-list ingest vs plain img2dataset, the same images over loopback HTTP, side by side.

Both are run as their users run them, as whole commands (start-up included):
  * finevit:     finevit ingest urls.txt OUT --allow-private-network --image-size 512 --workers 2
  * img2dataset: img2dataset --url_list urls.txt --output_folder OUT2 --image_size 512
                 --resize_mode keep_ratio_largest --resize_only_if_bigger True --processes_count 2
                 --thread_count 32 --output_format webdataset --extract_exif False --enable_wandb False
Same resize settings, same shard size, same thread count, sha256 on both (img2dataset's
default). img2dataset's EXIF extraction is off because we do not extract EXIF.
A ``python -m http.server`` process serves the images on 127.0.0.1.
Target: finevit >= 1.0x img2dataset.

    python bench/url_ingest.py            # 1000 images
    python bench/url_ingest.py --quick    # 150 images
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import Timer, alternate, machine, print_table, size_args, write_images

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], n: int, out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    env = {
        **os.environ,
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "WANDB_MODE": "disabled",
        "RAY_AUTH_MODE": "disabled",
    }
    with Timer() as t:
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ok = 0
    for stats in out.rglob("*_stats.json"):
        import json

        ok += json.loads(stats.read_text())["successes"]
    assert ok == n, f"{cmd[0]} got {ok}/{n} images"
    return n / t.seconds


def main() -> None:
    _, n, repeats = size_args(full_n=1000, quick_n=150)
    work = Path(tempfile.mkdtemp(prefix="fv-bench-url-"))
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(work / "imgs"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        write_images(work / "imgs", n)
        urls = work / "urls.txt"
        urls.write_text("".join(f"http://127.0.0.1:{port}/{i:06d}.jpg\n" for i in range(n)))
        time.sleep(0.5)
        sps = str(max(1, n // 4))
        ours = [
            str(BIN / "finevit"),
            "ingest",
            str(urls),
            str(work / "a"),
            "--allow-private-network",
            "--image-size",
            "512",
            "--samples-per-shard",
            sps,
            "--workers",
            "2",
            "--no-progress",
        ]
        theirs = [
            str(BIN / "img2dataset"),
            "--url_list",
            str(urls),
            "--output_folder",
            str(work / "b"),
            "--image_size",
            "512",
            "--resize_mode",
            "keep_ratio_largest",
            "--resize_only_if_bigger",
            "True",
            "--processes_count",
            "2",
            "--thread_count",
            "32",
            "--number_sample_per_shard",
            sps,
            "--output_format",
            "webdataset",
            "--extract_exif",
            "False",
            "--enable_wandb",
            "False",
        ]
        res = alternate(
            {
                "finevit ingest (urls)": lambda: run(ours, n, work / "a" / "shards"),
                "img2dataset": lambda: run(theirs, n, work / "b"),
            },
            repeats,
        )
        print(f"# {n} JPEGs 1024x768 over loopback HTTP -> long side 512, 2 processes/workers; {machine()}")
        print_table(res, "images/s (whole command)")
        a, b = statistics.median(res["finevit ingest (urls)"]), statistics.median(res["img2dataset"])
        print(f"url ingest: {a / b:.2f}x img2dataset ({a:.1f} / {b:.1f} images/s, start-up included)")
    finally:
        server.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
