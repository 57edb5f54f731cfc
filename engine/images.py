"""Decode, normalise, resize and re-encode one source image (PIL only).

``process_image`` is the single decode path for every source (local files, S3 objects,
URL downloads through img2dataset's ``Downloader`` via ``Img2datasetResizer``). It never
crashes on any input bytes: every failure is an ``ImageError`` whose ``str()`` is a short,
stable, one-line reason that ends up in the shard's ``error_message`` column.

Reasons (prefixes are stable; use them to group failures):

* ``empty file``
* ``not an image: html page | svg | xml | text | unrecognized format``
* ``decompression bomb: declared WxH = N pixels > max_pixels M``
* ``truncated image: <FORMAT> data ends early``
* ``corrupt image: <FORMAT>: <decoder message>``
* ``resize target too large: WxH = N pixels > max_pixels M`` (an upscale of an extreme shape)
* ``unsupported image mode: <mode>``
* ``encode failed: <FORMAT>: <message>``
* ``out of memory: ...``
* ``image processing failed: <ExceptionType>: <message>`` (a bug or an unforeseen input)

Output is always 8-bit RGB: alpha (RGBA, LA, palette transparency, tRNS) is composited
over white, as img2dataset does, so every shard image has the same mode whatever
``encode_format`` is. Resize semantics match img2dataset's ``Resizer`` exactly, including
its quirk that with ``resize_only_if_bigger`` an image already small enough is neither
cropped (``center_crop``) nor padded (``border``).
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import warnings
from dataclasses import dataclass
from struct import error as struct_error
from typing import IO, Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from engine.config import ImageConfig

__all__ = ["ImageError", "Img2datasetResizer", "ProcessedImage", "process_image"]

_WHITE = (255, 255, 255)
_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_ORIENTATION_TAG = 0x0112
# Same table as PIL.ImageOps.exif_transpose; applied after the resize (cheaper on the small image).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_MAX_DETAIL = 160


class ImageError(Exception):
    """A sample-level failure; str(err) is the one-line reason stored in the shard's error_message."""


@dataclass(frozen=True)
class ProcessedImage:
    data: bytes  # encoded in cfg.encode_format
    width: int
    height: int
    original_width: int  # after EXIF rotation
    original_height: int


def _short(msg: object) -> str:
    text = " ".join(str(msg).split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _sniff_non_image(data: bytes) -> str:
    """A short, stable description of bytes PIL could not identify."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<"):
        if b"<html" in head or b"<!doctype html" in head or b"<head" in head or b"<body" in head:
            return "html page"
        if b"<svg" in head:
            return "svg"
        return "xml"
    try:
        text = data[:512].decode("utf-8")
    except UnicodeDecodeError:
        return "unrecognized format"
    if all(c.isprintable() or c in "\t\r\n" for c in text):
        return "text"
    return "unrecognized format"


def _open_unchecked(buf: io.BytesIO) -> ImageFile.ImageFile | None:
    """Identify the image like ``Image.open`` but without PIL's global pixel limit.

    Only used after PIL raised ``DecompressionBombError`` (declared size > 2x its global
    ``MAX_IMAGE_PIXELS``), to learn the declared size for our own check and message, and to
    honour a ``max_pixels`` set above PIL's limit, without touching ``Image.MAX_IMAGE_PIXELS``.
    """
    Image.init()
    prefix = buf.getvalue()[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        ok = True if accept is None else accept(prefix)
        if not ok or isinstance(ok, str):
            continue
        try:
            buf.seek(0)
            return factory(buf, "")
        except (SyntaxError, IndexError, TypeError, ValueError, struct_error, OSError):
            continue
    return None


def _bomb_reason(width: int, height: int, max_pixels: int) -> str:
    return (
        f"decompression bomb: declared {width}x{height} = {width * height} pixels > max_pixels {max_pixels}"
    )


def _open(data: bytes, max_pixels: int) -> ImageFile.ImageFile:
    """Identify the image from its bytes (never the file name) and refuse bombs before decoding."""
    buf = io.BytesIO(data)
    try:
        # PIL warns (DecompressionBombWarning) between its limit and 2x; we apply our own limit.
        # catch_warnings restores the filters on exit; the downloader calls us from one thread.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(buf)
    except UnidentifiedImageError:
        raise ImageError(f"not an image: {_sniff_non_image(data)}") from None
    except Image.DecompressionBombError as e:
        im = _open_unchecked(buf)
        if im is None:
            m = re.search(r"\((\d+) pixels\)", str(e))
            pixels = m.group(1) if m else "?"
            raise ImageError(
                f"decompression bomb: declared {pixels} pixels > max_pixels {max_pixels}"
            ) from None
    except Image.DecompressionBombWarning:  # only if someone made the warning an error elsewhere
        im = _open_unchecked(buf)
        if im is None:
            raise ImageError(f"decompression bomb: declared size > max_pixels {max_pixels}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct_error) as e:
        raise ImageError(f"corrupt image: {_short(e)}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageError(_bomb_reason(w, h, max_pixels))
    if w < 1 or h < 1:
        raise ImageError(f"corrupt image: {im.format}: declared size {w}x{h}")
    return im


def _target_size(w: int, h: int, cfg: ImageConfig) -> tuple[int, int] | None:
    """The resized (w, h) for an image of oriented size (w, h), or None to keep it as is."""
    s = cfg.image_size
    mode = cfg.resize_mode
    if mode == "no":
        return None
    side = min(w, h) if mode in ("keep_ratio", "center_crop") else max(w, h)
    if cfg.resize_only_if_bigger and side <= s:
        return None
    scale = s / side
    return max(1, round(w * scale)), max(1, round(h * scale))


def _to_8bit_gray(im: Image.Image) -> Image.Image:
    """I;16*, I and F images to L, scaled (not clipped) so 16-bit content keeps its look."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = (arr.astype(np.uint32) * 255 + 32767) // 65535
    elif im.mode == "I":
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 255:
            out = arr
        elif lo >= 0 and hi <= 65535:  # a 16-bit source decoded to 32-bit
            out = (arr.astype(np.int64) * 255 + 32767) // 65535
        else:
            out = (arr.astype(np.float64) - lo) * (255.0 / max(hi - lo, 1))
    else:  # F
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0.0 and hi <= 1.0:
            out = arr * 255.0
        elif lo >= 0.0 and hi <= 255.0:
            out = arr
        else:
            out = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def _resizable(im: Image.Image) -> Image.Image:
    """Convert to one of L, RGB, LA, RGBA: modes PIL resamples with a real filter."""
    mode = im.mode
    if "transparency" in im.info and mode in ("P", "L", "RGB", "1"):
        return im.convert("LA" if mode in ("L", "1") else "RGBA")
    if mode in ("RGB", "L", "RGBA", "LA"):
        return im
    if mode == "P":
        return im.convert("RGB")
    if mode == "PA":
        return im.convert("RGBA")
    if mode == "1":
        return im.convert("L")
    if mode in ("La", "RGBa"):
        return im.convert(mode.upper())
    if mode.startswith("I") or mode == "F":
        return _to_8bit_gray(im)
    try:
        return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, ...
    except (ValueError, OSError):
        raise ImageError(f"unsupported image mode: {mode}") from None


def _flatten(im: Image.Image) -> Image.Image:
    """Composite alpha over white and return RGB."""
    if im.mode in ("RGBA", "LA"):
        if im.mode == "LA":
            im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, _WHITE)
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im if im.mode == "RGB" else im.convert("RGB")


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in _TRANSPOSE else 1
    except Exception:  # malformed EXIF is not worth failing the sample for
        return 1


def _decode(im: ImageFile.ImageFile) -> None:
    """Full decode; truncated data is an error (LOAD_TRUNCATED_IMAGES stays untouched)."""
    fmt = im.format or "image"
    try:
        im.load()
    except OSError as e:
        if "truncated" in str(e).lower():
            raise ImageError(f"truncated image: {fmt} data ends early") from None
        raise ImageError(f"corrupt image: {fmt}: {_short(e)}") from None
    except EOFError:
        raise ImageError(f"truncated image: {fmt} data ends early") from None
    except (SyntaxError, ValueError, struct_error, IndexError, TypeError) as e:
        raise ImageError(f"corrupt image: {fmt}: {_short(e)}") from None


def _encode(im: Image.Image, cfg: ImageConfig, icc: bytes | None) -> bytes:
    fmt = _PIL_FORMAT[cfg.encode_format]
    params: dict[str, Any] = {}
    if fmt in ("JPEG", "WEBP"):
        params["quality"] = cfg.encode_quality
    if icc:
        params["icc_profile"] = icc
    out = io.BytesIO()
    try:
        im.save(out, fmt, **params)
    except (OSError, ValueError) as e:
        raise ImageError(f"encode failed: {fmt}: {_short(e)}") from None
    return out.getvalue()


def _process(data: bytes, cfg: ImageConfig) -> ProcessedImage:
    if not data:
        raise ImageError("empty file")
    im = _open(data, cfg.max_pixels)
    w0, h0 = im.size

    # Target computed on the unrotated size; the uniform scale is the same either way.
    target = _target_size(w0, h0, cfg)
    if target is not None and target[0] * target[1] > cfg.max_pixels:  # e.g. upscaling 8000x2 by 512
        n = target[0] * target[1]
        raise ImageError(
            f"resize target too large: {target[0]}x{target[1]} = {n} pixels > max_pixels {cfg.max_pixels}"
        )
    if target is not None and target[0] * target[1] < w0 * h0:
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale; ask only for a size still >= the target.
        scale = max(target[0] / w0, target[1] / h0)
        im.draft(None, (max(1, math.ceil(w0 * scale)), max(1, math.ceil(h0 * scale))))
    _decode(im)

    orientation = _orientation(im)
    swapped = orientation in (5, 6, 7, 8)
    ow, oh = (h0, w0) if swapped else (w0, h0)
    icc = im.info.get("icc_profile")
    icc = icc if isinstance(icc, bytes) and icc[16:20] == b"RGB " else None  # output is RGB

    img: Image.Image = _resizable(im)
    if target is not None and img.size != target:
        if (
            target[0] * target[1] < img.size[0] * img.size[1]
        ):  # downscale: Image.thumbnail's filter and reducing gap
            img = img.resize(target, Image.Resampling.BICUBIC, reducing_gap=2.0)
        else:
            img = img.resize(target, Image.Resampling.LANCZOS)
    if orientation != 1:
        img = img.transpose(_TRANSPOSE[orientation])

    if target is not None:
        s = cfg.image_size
        w, h = img.size
        if cfg.resize_mode == "center_crop" and (w != s or h != s):
            left, top = (w - s) // 2, (h - s) // 2
            img = img.crop((left, top, left + s, top + s))
        elif cfg.resize_mode == "border" and (w != s or h != s):
            img = _flatten(img)
            canvas = Image.new("RGB", (s, s), _WHITE)
            canvas.paste(img, ((s - w) // 2, (s - h) // 2))
            img = canvas
    img = _flatten(img)
    encoded = _encode(img, cfg, icc)
    return ProcessedImage(encoded, img.size[0], img.size[1], ow, oh)


def process_image(data: bytes, cfg: ImageConfig) -> ProcessedImage:
    """Decode ``data`` (any format PIL reads, sniffed from the bytes), apply EXIF orientation,
    normalise to RGB, resize per ``cfg`` and encode as ``cfg.encode_format``.

    Raises ImageError (and nothing else) with a one-line reason.
    """
    try:
        return _process(bytes(data) if not isinstance(data, bytes) else data, cfg)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # e.g. PIL's checks inside crop/seek
        raise ImageError(f"decompression bomb: {_short(e)}") from None
    except MemoryError:
        raise ImageError("out of memory: image too large to decode") from None
    except Exception as e:
        raise ImageError(f"image processing failed: {type(e).__name__}: {_short(e)}") from None


class Img2datasetResizer:
    """Duck-typed stand-in for ``img2dataset.resizer.Resizer`` so its ``Downloader`` decodes
    through ``process_image``. Blurring is not supported (a bbox list is refused per sample,
    as img2dataset does when no blurrer is configured)."""

    def __init__(self, cfg: ImageConfig):
        self.cfg = cfg

    def __call__(
        self, img_stream: IO[bytes], blurring_bbox_list: list | None = None
    ) -> tuple[bytes | None, int | None, int | None, int | None, int | None, str | None]:
        try:
            if blurring_bbox_list is not None:
                return None, None, None, None, None, "blurring not supported"
            with contextlib.suppress(AttributeError, OSError, ValueError):
                img_stream.seek(0)
            out = process_image(img_stream.read(), self.cfg)
            return out.data, out.width, out.height, out.original_width, out.original_height, None
        except ImageError as e:
            return None, None, None, None, None, str(e)
        except Exception as e:
            return None, None, None, None, None, f"image processing failed: {type(e).__name__}: {_short(e)}"
