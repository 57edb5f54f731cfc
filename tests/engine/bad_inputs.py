"""Generate a small zoo of awkward image inputs on disk (shared by tests; not a test module).

``write_bad_inputs(dir)`` returns ``{file name: expected reason prefix, or None if it must
succeed}``. ``EXPECTED_SIZES`` gives, for the files that must succeed, the original size a
decoder should report *after* EXIF rotation. Everything is tiny (well under 1 MB in all)
and generated in a few milliseconds; the "bomb" only *declares* 40000x40000 in its header.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# Reason prefixes (see engine/images.py).
EMPTY = "empty file"
NOT_IMAGE = "not an image"
TRUNCATED = "truncated image"
BOMB = "decompression bomb"

# Expected original (width, height) after EXIF rotation, for the inputs that must succeed.
EXPECTED_SIZES: dict[str, tuple[int, int]] = {
    "cmyk.jpg": (64, 48),
    "gray16.png": (64, 32),
    "palette_transparent.png": (32, 32),
    "rgba.webp": (40, 30),
    "animated.gif": (24, 16),
    "exif_rotated_6.jpg": (40, 60),  # stored 60x40, orientation 6 = rotate 90 clockwise
    "one_pixel.png": (1, 1),
    "wide_8000x2.png": (8000, 2),
    "png_named.jpg": (50, 20),
    "my photo é.jpg": (33, 22),
    "日本語.png": (21, 34),
    "bilevel.png": (16, 8),
    "gray_alpha.png": (20, 10),
}


def _gradient_rgb(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None]
    arr = np.stack(
        [np.broadcast_to(x, (h, w)), np.broadcast_to(y, (h, w)), (x + y) / 2 * np.ones((h, w))], -1
    )
    return Image.fromarray(arr.astype(np.uint8))


def _encode(im: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares ``width`` x ``height`` (1-bit gray): a bomb without the bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def exif_jpeg(width: int, height: int, orientation: int) -> bytes:
    """A JPEG stored ``width`` x ``height`` with a red top-left corner and EXIF ``orientation``."""
    im = Image.new("RGB", (width, height), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, width // 3, height // 3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(im, "JPEG", quality=95, exif=exif.tobytes())


def make_inputs() -> dict[str, tuple[bytes, str | None]]:
    """{name: (bytes, expected reason prefix or None)}, without touching the disk."""
    out: dict[str, tuple[bytes, str | None]] = {}

    full_jpeg = _encode(_gradient_rgb(256, 256), "JPEG", quality=90)
    out["truncated.jpg"] = (full_jpeg[: len(full_jpeg) // 2], TRUNCATED)
    noisy = Image.frombytes("RGB", (128, 128), random.Random(1).randbytes(128 * 128 * 3))
    full_png = _encode(noisy, "PNG")
    out["truncated.png"] = (full_png[: len(full_png) // 2], TRUNCATED)
    out["empty.jpg"] = (b"", EMPTY)
    html = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"
    out["page.jpg"] = (html, NOT_IMAGE)
    out["notes.png"] = (b"just some text, not pixels\n" * 4, NOT_IMAGE)
    # Starts with a byte no PIL plugin accepts, then noise.
    out["random.bin"] = (b"\x00\x13\x37" + random.Random(0).randbytes(2048), NOT_IMAGE)
    out["bomb_40000x40000.png"] = (png_declaring(40000, 40000), BOMB)

    cmyk = Image.new("CMYK", (64, 48), (0, 255, 255, 0))  # pure red in CMYK
    out["cmyk.jpg"] = (_encode(cmyk, "JPEG", quality=95), None)

    gray16 = (np.linspace(0, 65535, 64, dtype=np.float64)[None, :] * np.ones((32, 1))).astype(np.uint16)
    out["gray16.png"] = (_encode(Image.fromarray(gray16), "PNG"), None)

    pal = Image.new("P", (32, 32), 0)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))  # index 0 black (transparent), 1 green
    pal.paste(1, (16, 0, 32, 32))
    out["palette_transparent.png"] = (_encode(pal, "PNG", transparency=0), None)

    rgba = Image.new("RGBA", (40, 30), (0, 0, 0, 0))  # left half fully transparent black
    rgba.paste((0, 0, 255, 255), (20, 0, 40, 30))
    out["rgba.webp"] = (_encode(rgba, "WEBP", lossless=True), None)

    frames = [Image.new("RGB", (24, 16), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    out["animated.gif"] = (
        _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0),
        None,
    )

    out["exif_rotated_6.jpg"] = (exif_jpeg(60, 40, 6), None)
    out["one_pixel.png"] = (_encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), None)
    out["wide_8000x2.png"] = (_encode(Image.new("RGB", (8000, 2), (200, 100, 50)), "PNG"), None)
    out["png_named.jpg"] = (_encode(_gradient_rgb(50, 20), "PNG"), None)
    out["my photo é.jpg"] = (_encode(_gradient_rgb(33, 22), "JPEG", quality=90), None)
    out["日本語.png"] = (_encode(_gradient_rgb(21, 34), "PNG"), None)
    out["bilevel.png"] = (_encode(Image.new("1", (16, 8), 1), "PNG"), None)
    gray_alpha = Image.new("LA", (20, 10), (0, 0))
    out["gray_alpha.png"] = (_encode(gray_alpha, "PNG"), None)
    assert set(EXPECTED_SIZES) == {k for k, (_, r) in out.items() if r is None}
    return out


def write_bad_inputs(directory: Path) -> dict[str, str | None]:
    """Write every input under ``directory``; return {file name: reason prefix or None}."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str | None] = {}
    for name, (data, reason) in make_inputs().items():
        (directory / name).write_bytes(data)
        expected[name] = reason
    return expected
