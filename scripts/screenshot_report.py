"""The demo's report as headless Chromium renders it: a PNG of the whole page, to look at.

    python scripts/screenshot_report.py demo_out/report.html demo_out/report.png
    make demo-screenshot                    # the same for $(DEMO_DIR)

Needs a Chromium: Debian's ``chromium`` package (``apt-get install chromium``), another
``chromium``/``google-chrome`` on PATH, or ``CHROMIUM=/path/to/chrome``. The page is drawn in a
tall window and the empty background below its end is cut off. Offline: the report embeds its
plots, and Chromium's background networking is switched off (this machine refuses it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",  # root in a container
    "--disable-gpu",
    "--hide-scrollbars",
    "--no-first-run",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return env
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def screenshot(page: str, out: str, width: int = 1280, max_height: int = 8000) -> tuple[int, int]:
    """Render ``page`` into ``out`` (PNG) and return its ``(width, height)`` after trimming."""
    from PIL import Image, ImageChops

    browser = find_chromium()
    if browser is None:
        raise FileNotFoundError(
            "no Chromium found (apt-get install chromium, or set CHROMIUM=/path/to/chrome)"
        )
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run(
            [
                browser,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{max_height}",
                f"--screenshot={os.path.abspath(out)}",
                Path(page).resolve().as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    if run.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"{browser} drew no screenshot (exit {run.returncode}): {run.stderr[-2000:]}")
    img = Image.open(out).convert("RGB")
    background = Image.new("RGB", img.size, img.getpixel((img.width - 1, img.height - 1)))
    box = ImageChops.difference(img, background).getbbox()
    bottom = min(img.height, (box[3] if box else img.height) + 32)
    img.crop((0, 0, img.width, bottom)).save(out)
    return img.width, bottom


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("page", help="an HTML file, e.g. demo_out/report.html")
    ap.add_argument("out", help="the PNG to write")
    ap.add_argument("--width", type=int, default=1280)
    args = ap.parse_args(argv)
    try:
        w, h = screenshot(args.page, args.out, args.width)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"screenshot_report: {e}", file=sys.stderr)
        return 1
    print(f"{args.out}: {w}x{h} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
