"""The image loader of eval (``eval.embed.prefetch_images``): threads decode and prepare the next
batches while the caller embeds one; batches come in order, bounded ahead, errors name the image."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.datasets import ImageRef
from eval.embed import ImageError, embed_images, prefetch_images


def _images(folder: Path, n: int, corrupt: tuple[int, ...] = ()) -> list[ImageRef]:
    """``n`` small PNGs of distinct colours; the indices in ``corrupt`` are not images at all."""
    folder.mkdir(parents=True, exist_ok=True)
    refs = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        if i in corrupt:
            p.write_bytes(b"not an image")
        else:
            Image.new("RGB", (20 + i, 16), (10 * i, 255 - 10 * i, 7 * i)).save(p)
        refs.append(ImageRef(p.name, str(p)))
    return refs


def test_batches_come_in_order_with_unreadable_images_as_none(tmp_path: Path) -> None:
    refs = _images(tmp_path, 8, corrupt=(3,))

    def slow_first(im: Image.Image) -> tuple[int, tuple[int, int, int]]:
        i = im.size[0] - 20
        time.sleep(0.01 * (8 - i))  # later images finish first: order must come from refs, not timing
        return i, im.getpixel((0, 0))

    got = list(prefetch_images(refs, batch_size=3, prepare=slow_first, workers=4))
    want = [
        [(0, (0, 255, 0)), (1, (10, 245, 7)), (2, (20, 235, 14))],
        [None, (4, (40, 215, 28)), (5, (50, 205, 35))],
        [(6, (60, 195, 42)), (7, (70, 185, 49))],
    ]
    assert got == want


def test_reads_ahead_of_the_caller_and_no_further(tmp_path: Path) -> None:
    refs = _images(tmp_path, 5)
    loaded: list[int] = []
    two_ahead = threading.Event()

    def record(im: Image.Image) -> int:
        loaded.append(im.size[0] - 20)
        if {1, 2} <= set(loaded):
            two_ahead.set()
        return im.size[0] - 20

    batches = prefetch_images(refs, batch_size=1, prepare=record, workers=2, ahead=2)
    assert next(batches) == [0]
    # while the caller holds batch 0, the loader reads batches 1 and 2 by itself ...
    assert two_ahead.wait(5), f"the loader did not read ahead: loaded {loaded}"
    time.sleep(0.2)
    # ... and nothing beyond them (memory stays bounded)
    assert sorted(loaded) == [0, 1, 2]
    assert [b for b in batches] == [[1], [2], [3], [4]]


def test_an_error_while_preparing_names_the_image(tmp_path: Path) -> None:
    refs = _images(tmp_path, 6)

    def fails_on_four(im: Image.Image) -> Image.Image:
        if im.size[0] == 24:
            raise ValueError("cannot take this one")
        return im

    with pytest.raises(ImageError, match=r"004\.png: preparing the image .* cannot take this one"):
        for _ in prefetch_images(refs, batch_size=2, prepare=fails_on_four):
            pass


def _tiny_openclip(tmp_path: Path, text_cfg: dict):
    """A tiny random OpenCLIP model built from a config the test writes (skips without open_clip)."""
    from eval.openclip import import_open_clip, load_openclip

    try:
        import_open_clip()
    except ImportError as e:
        pytest.skip(f"open_clip not installed ({e}): run `make bench-deps`")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
        "text_cfg": {"vocab_size": 49408, "width": 16, **text_cfg},
    }
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    return load_openclip(f"openclip:{tmp_path / 'tiny.json'}")


def test_openclip_prepared_batches_embed_as_its_preprocess(tmp_path: Path) -> None:
    """OpenCLIP images are prepared in the loader threads and normalized per batch: the embeddings
    are bitwise those of OpenCLIP's own preprocess + encode_image."""
    enc = _tiny_openclip(tmp_path, {"context_length": 8, "heads": 1, "layers": 1})
    refs = _images(tmp_path / "img", 5)
    emb, ok, failed = embed_images(enc, refs, batch_size=2)
    want = []
    with torch.no_grad():  # the same batches of 2 (a batch's size changes the matmul's last bits)
        for i in range(0, 5, 2):
            x = torch.stack([enc.preprocess(r.open()) for r in refs[i : i + 2]])
            e = F.normalize(enc.model.encode_image(x).float(), dim=-1)  # encode_image's unit rows
            want.append(F.normalize(e, dim=-1))  # embed_images normalizes every encoder's output
    assert ok == [True] * 5 and failed == []
    assert torch.equal(emb, torch.cat(want))


def test_openclip_text_tower_runs_only_to_the_last_pooled_token(tmp_path: Path) -> None:
    """OpenCLIP's text tower is causal and pools the end token: ours runs it only up to the batch's
    last end token and gets OpenCLIP's features; a tower that pools another way runs whole."""
    enc = _tiny_openclip(tmp_path, {"context_length": 32, "heads": 2, "layers": 2})
    m = enc.model
    seen: list[int] = []
    m.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[1]))
    tokens = enc.tokenizer(["a cat", "a photo of a large red striped circle on grass", "dog"])
    last_end = int(tokens.argmax(dim=-1).max())  # the end token has the largest id
    with torch.no_grad():
        want = m.encode_text(tokens)
        got = enc.encode_tokens(tokens)
        assert seen == [32, last_end + 1] and last_end + 1 < 32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        m.text_pool_type = "last"  # the last position sees the padding: no trimming
        assert torch.equal(enc.encode_tokens(tokens), m.encode_text(tokens)) and seen[-2:] == [32, 32]
