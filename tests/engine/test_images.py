"""engine.images: the decode/resize/encode path and its failure reasons."""

from __future__ import annotations

import io
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from engine.config import ImageConfig
from engine.images import ImageError, Img2datasetResizer, ProcessedImage, process_image

try:
    from tests.engine.bad_inputs import (
        EXPECTED_SIZES,
        exif_jpeg,
        make_inputs,
        png_declaring,
        write_bad_inputs,
    )
except ImportError:  # tests/ turned into a package
    from tests.engine.bad_inputs import (
        EXPECTED_SIZES,
        exif_jpeg,
        make_inputs,
        png_declaring,
        write_bad_inputs,
    )

INPUTS = make_inputs()
NAMES = sorted(INPUTS)


def _encode(im: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def _reason(data: bytes, cfg: ImageConfig | None = None) -> str:
    with pytest.raises(ImageError) as exc:
        process_image(data, cfg or ImageConfig())
    return str(exc.value)


@pytest.fixture(scope="module")
def inputs_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    d = tmp_path_factory.mktemp("bad inputs")
    return d, write_bad_inputs(d)


# ---------------------------------------------------------------- the bad-input zoo


def test_zoo_is_small_and_complete(inputs_dir: tuple[Path, dict[str, str | None]]) -> None:
    d, expected = inputs_dir
    assert set(expected) == set(NAMES)
    assert sum((d / n).stat().st_size for n in expected) < 1_000_000
    assert "my photo é.jpg" in expected and "日本語.png" in expected
    failing = {r for r in expected.values() if r}
    assert {"empty file", "not an image", "truncated image", "decompression bomb"} <= failing


@pytest.mark.parametrize("name", NAMES)
def test_zoo_input(name: str, inputs_dir: tuple[Path, dict[str, str | None]]) -> None:
    d, expected = inputs_dir
    data = (d / name).read_bytes()  # through the file system: odd names must round-trip
    reason = expected[name]
    if reason is not None:
        msg = _reason(data)
        assert msg.startswith(reason + ("" if reason == "empty file" else ": ")), msg
        assert "\n" not in msg and len(msg) < 200
        assert _reason(data) == msg  # stable
        return
    out = process_image(data, ImageConfig())
    assert isinstance(out, ProcessedImage)
    assert (out.original_width, out.original_height) == EXPECTED_SIZES[name]
    im = _decode(out.data)
    assert im.format == "JPEG" and im.mode == "RGB"
    assert im.size == (out.width, out.height)
    ow, oh = EXPECTED_SIZES[name]
    if max(ow, oh) <= 1024:
        assert im.size == (ow, oh)  # never upscaled, never resized
    else:
        assert max(im.size) == 1024 and min(im.size) >= 1


def test_specific_reasons() -> None:
    assert _reason(b"") == "empty file"
    assert _reason(INPUTS["page.jpg"][0]) == "not an image: html page"
    assert _reason(INPUTS["notes.png"][0]) == "not an image: text"
    assert _reason(INPUTS["random.bin"][0]) == "not an image: unrecognized format"
    assert _reason(INPUTS["truncated.jpg"][0]) == "truncated image: JPEG data ends early"
    assert _reason(INPUTS["truncated.png"][0]) == "truncated image: PNG data ends early"
    assert _reason(b"<svg xmlns='http://www.w3.org/2000/svg'></svg>") == "not an image: svg"


def test_png_under_jpg_name_is_sniffed() -> None:
    out = process_image(INPUTS["png_named.jpg"][0], ImageConfig(encode_format="png", resize_mode="no"))
    src = _decode(INPUTS["png_named.jpg"][0]).convert("RGB")
    assert np.array_equal(np.asarray(_decode(out.data)), np.asarray(src))


# ---------------------------------------------------------------- decompression bombs


def test_bomb_refused_from_header() -> None:
    assert _reason(png_declaring(40000, 40000)) == (
        "decompression bomb: declared 40000x40000 = 1600000000 pixels > max_pixels 100000000"
    )


def test_bomb_between_pil_warning_and_error_limits() -> None:
    # 144M pixels: above PIL's MAX_IMAGE_PIXELS (warning) but below 2x (error); our limit decides.
    limit_before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters_before = list(warnings.filters)
        msg = _reason(png_declaring(12000, 12000))
        assert list(warnings.filters) == filters_before  # our warning filter did not leak
    assert msg == "decompression bomb: declared 12000x12000 = 144000000 pixels > max_pixels 100000000"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert limit_before == Image.MAX_IMAGE_PIXELS
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_bomb_uses_configured_max_pixels() -> None:
    data = _encode(Image.new("RGB", (20, 10)))
    assert _reason(data, ImageConfig(max_pixels=199)) == (
        "decompression bomb: declared 20x10 = 200 pixels > max_pixels 199"
    )
    assert process_image(data, ImageConfig(max_pixels=200)).width == 20


def test_max_pixels_above_pil_limit_is_honoured() -> None:
    # PIL alone would raise DecompressionBombError; with a higher max_pixels we only identify
    # the header (no decode here, so no 1.6 GB allocation).
    from engine.images import _open

    im = _open(png_declaring(40000, 40000), max_pixels=2_000_000_000)
    assert im.size == (40000, 40000)
    with pytest.raises(ImageError, match=r"^decompression bomb: declared 40000x40000"):
        _open(png_declaring(40000, 40000), max_pixels=1_000_000_000)


# ---------------------------------------------------------------- resize semantics

# (mode, only_if_bigger, source size) -> output size, with image_size=100 (img2dataset semantics)
RESIZE_CASES = [
    ("no", True, (300, 200), (300, 200)),
    ("no", False, (60, 40), (60, 40)),
    ("keep_ratio", True, (300, 200), (150, 100)),
    ("keep_ratio", False, (300, 200), (150, 100)),
    ("keep_ratio", True, (60, 40), (60, 40)),
    ("keep_ratio", False, (60, 40), (150, 100)),
    ("keep_ratio_largest", True, (300, 200), (100, 67)),
    ("keep_ratio_largest", False, (300, 200), (100, 67)),
    ("keep_ratio_largest", True, (60, 40), (60, 40)),
    ("keep_ratio_largest", False, (60, 40), (100, 67)),
    ("keep_ratio_largest", True, (200, 300), (67, 100)),
    ("center_crop", True, (300, 200), (100, 100)),
    ("center_crop", False, (300, 200), (100, 100)),
    ("center_crop", True, (60, 40), (60, 40)),  # img2dataset: small images are not cropped
    ("center_crop", False, (60, 40), (100, 100)),
    ("border", True, (300, 200), (100, 100)),
    ("border", False, (300, 200), (100, 100)),
    ("border", True, (60, 40), (60, 40)),  # img2dataset: small images are not padded
    ("border", False, (60, 40), (100, 100)),
    ("keep_ratio_largest", True, (8000, 2), (100, 1)),  # never a 0-pixel side
    ("keep_ratio", True, (1, 1), (1, 1)),
    ("keep_ratio", False, (1, 1), (100, 100)),
]


@pytest.mark.parametrize(("mode", "only_bigger", "src", "want"), RESIZE_CASES)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_resize_modes(
    mode: str, only_bigger: bool, src: tuple[int, int], want: tuple[int, int], fmt: str
) -> None:
    data = _encode(Image.new("RGB", src, (90, 120, 150)), fmt)
    cfg = ImageConfig(image_size=100, resize_mode=mode, resize_only_if_bigger=only_bigger)
    out = process_image(data, cfg)
    assert (out.width, out.height) == want
    assert (out.original_width, out.original_height) == src
    assert _decode(out.data).size == want


def test_upscale_of_extreme_shape_is_refused_not_allocated() -> None:
    data = _encode(Image.new("RGB", (8000, 2)))
    cfg = ImageConfig(resize_mode="keep_ratio", resize_only_if_bigger=False)  # -> 4096000x1024
    assert _reason(data, cfg) == (
        "resize target too large: 4096000x1024 = 4194304000 pixels > max_pixels 100000000"
    )
    assert process_image(data, ImageConfig(resize_mode="keep_ratio")).width == 8000  # default: kept


@pytest.mark.parametrize("mode", ["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"])
def test_never_upscales_by_default(mode: str) -> None:
    data = _encode(Image.new("RGB", (50, 30), (1, 2, 3)))
    out = process_image(data, ImageConfig(image_size=512, resize_mode=mode))
    assert (out.width, out.height) == (50, 30)


def test_border_pads_with_white() -> None:
    data = _encode(Image.new("RGB", (300, 150), (0, 0, 0)))
    out = process_image(data, ImageConfig(image_size=100, resize_mode="border", encode_format="png"))
    arr = np.asarray(_decode(out.data))
    assert arr.shape == (100, 100, 3)
    assert (arr[:20] == 255).all() and (arr[-20:] == 255).all()  # 25 px bands top and bottom
    assert (arr[30:70] == 0).all()


def test_center_crop_keeps_the_center() -> None:
    im = Image.new("RGB", (300, 100), (255, 0, 0))
    im.paste((0, 255, 0), (100, 0, 200, 100))
    out = process_image(
        _encode(im), ImageConfig(image_size=50, resize_mode="center_crop", encode_format="png")
    )
    arr = np.asarray(_decode(out.data)).astype(int)
    assert arr.shape == (50, 50, 3)
    assert (arr[..., 1] > 200).all() and (arr[..., 0] < 50).all()


def test_jpeg_draft_downscale_is_correct_size_and_content() -> None:
    im = Image.new("RGB", (1600, 1200), (200, 30, 30))
    im.paste((30, 30, 200), (800, 0, 1600, 1200))
    out = process_image(_encode(im, "JPEG", quality=90), ImageConfig(image_size=100))
    arr = np.asarray(_decode(out.data)).astype(int)
    assert arr.shape == (75, 100, 3)
    assert arr[37, 10, 0] > 150 and arr[37, 90, 2] > 150


# ---------------------------------------------------------------- encoding


@pytest.mark.parametrize(("encode_format", "pil_format"), [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")])
@pytest.mark.parametrize("src_mode", ["RGB", "RGBA", "L", "P"])
def test_encode_formats_round_trip(encode_format: str, pil_format: str, src_mode: str) -> None:
    src = Image.new(src_mode, (120, 80))
    cfg = ImageConfig(image_size=60, encode_format=encode_format)
    out = process_image(_encode(src), cfg)
    im = _decode(out.data)
    assert im.format == pil_format
    assert im.mode == "RGB"
    assert im.size == (out.width, out.height) == (60, 40)


def test_encode_quality_is_used() -> None:
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    low = process_image(data, ImageConfig(encode_quality=10)).data
    high = process_image(data, ImageConfig(encode_quality=95)).data
    assert len(low) < len(high) / 2


# ---------------------------------------------------------------- modes


def _pixels(name: str) -> np.ndarray:
    out = process_image(INPUTS[name][0], ImageConfig(resize_mode="no", encode_format="png"))
    im = _decode(out.data)
    assert im.mode == "RGB"
    return np.asarray(im).astype(int)


def test_16bit_png_is_scaled_not_clipped() -> None:
    arr = _pixels("gray16.png")
    row = arr[0, :, 0]
    assert row[0] <= 2 and row[-1] >= 253
    assert 100 < arr.mean() < 155
    assert (np.diff(row) >= 0).all()  # the gradient survives


@pytest.mark.parametrize("dtype", [np.int32, ">u2", "<u2"])
def test_16bit_tiff_variants_scaled(dtype: object) -> None:
    ramp = (np.arange(256, dtype=np.uint32) * 257)[None, :].repeat(4, 0)  # 0..65535
    src = Image.fromarray(ramp.astype(dtype))
    assert src.mode in ("I", "I;16B", "I;16")
    out = process_image(_encode(src, "TIFF"), ImageConfig(resize_mode="no", encode_format="png"))
    row = np.asarray(_decode(out.data))[0, :, 0].astype(int)
    assert np.abs(row - np.arange(256)).max() <= 1


def test_palette_transparency_composited_over_white() -> None:
    arr = _pixels("palette_transparent.png")
    assert (arr[:, :16] == 255).all()  # transparent black -> white
    assert (arr[:, 16:] == [0, 255, 0]).all()


def test_rgba_webp_composited_over_white() -> None:
    arr = _pixels("rgba.webp")
    assert (arr[:, :20] == 255).all()
    assert (arr[:, 20:] == [0, 0, 255]).all()


def test_gray_alpha_composited_over_white() -> None:
    assert (_pixels("gray_alpha.png") == 255).all()


def test_animated_gif_first_frame() -> None:
    arr = _pixels("animated.gif")
    assert (arr[..., 0] > 200).all() and (arr[..., 2] < 50).all()


def test_cmyk_jpeg_to_rgb() -> None:
    arr = _pixels("cmyk.jpg")
    assert arr[..., 0].mean() > 200 and arr[..., 1].mean() < 60 and arr[..., 2].mean() < 60


def test_bilevel_to_rgb() -> None:
    assert (_pixels("bilevel.png") == 255).all()


def test_accepts_bytearray_and_memoryview() -> None:
    data = INPUTS["one_pixel.png"][0]
    assert process_image(bytearray(data), ImageConfig()).width == 1
    assert process_image(memoryview(data), ImageConfig()).width == 1


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pil(orientation: int) -> None:
    data = exif_jpeg(60, 40, orientation)
    out = process_image(data, ImageConfig(resize_mode="no", encode_format="png"))
    want = ImageOps.exif_transpose(_decode(data)).convert("RGB")
    assert (out.original_width, out.original_height) == want.size
    assert np.array_equal(np.asarray(_decode(out.data)), np.asarray(want))


def test_exif_rotation_with_resize() -> None:
    out = process_image(exif_jpeg(60, 40, 6), ImageConfig(image_size=30, encode_format="png"))
    assert (out.original_width, out.original_height) == (40, 60)
    assert (out.width, out.height) == (20, 30)
    arr = np.asarray(_decode(out.data)).astype(int)
    # stored top-left red corner; orientation 6 displays it top-right
    assert arr[2, -3, 0] > 200 and arr[2, 2, 2] > 200


# ---------------------------------------------------------------- robustness


def test_never_crashes_on_mutated_inputs() -> None:
    rnd = random.Random(42)
    cfg = ImageConfig(image_size=32, max_pixels=1_000_000)
    seeds = [INPUTS[n][0] for n in ("my photo é.jpg", "日本語.png", "rgba.webp", "animated.gif")]
    outcomes = {"ok": 0, "error": 0}
    for seed in seeds:
        for _ in range(40):
            buf = bytearray(seed)
            for _ in range(rnd.randint(1, 8)):
                buf[rnd.randrange(len(buf))] = rnd.randrange(256)
            if rnd.random() < 0.3:
                buf = buf[: rnd.randrange(1, len(buf))]
            try:
                process_image(bytes(buf), cfg)
                outcomes["ok"] += 1
            except ImageError as e:
                assert str(e) and "\n" not in str(e)
                outcomes["error"] += 1
    assert outcomes["error"] > 0


# ---------------------------------------------------------------- img2dataset adapter


def test_resizer_success_tuple() -> None:
    resizer = Img2datasetResizer(ImageConfig(image_size=30))
    result = resizer(io.BytesIO(exif_jpeg(60, 40, 6)))
    assert len(result) == 6
    data, w, h, ow, oh, err = result
    assert err is None and isinstance(data, bytes)
    assert (w, h, ow, oh) == (20, 30, 40, 60)
    assert _decode(data).size == (20, 30)


@pytest.mark.parametrize("name", [n for n in NAMES if INPUTS[n][1] is not None])
def test_resizer_failure_tuple(name: str) -> None:
    data, reason = INPUTS[name]
    stream = io.BytesIO(data)
    stream.read()  # a consumed stream is rewound
    result = Img2datasetResizer(ImageConfig())(stream)
    assert result[:5] == (None, None, None, None, None)
    assert isinstance(result[5], str) and result[5].startswith(reason)


def test_resizer_never_raises() -> None:
    class Broken(io.BytesIO):
        def read(self, *args: object) -> bytes:
            raise ConnectionResetError("peer went away")

    resizer = Img2datasetResizer(ImageConfig())
    result = resizer(Broken(b"x"))
    assert result[:5] == (None,) * 5 and "ConnectionResetError" in result[5]
    result = resizer(io.BytesIO(INPUTS["one_pixel.png"][0]), blurring_bbox_list=[[0, 0, 1, 1]])
    assert result == (None, None, None, None, None, "blurring not supported")
