"""OpenCLIP box classification: region features from a tiny OpenCLIP ViT built from its config (no
download), checked against FG-CLIP's recipe written out independently, against the tower's own
pooling (a whole-image box is the image embedding), and end to end through ``finevit eval``.

Needs ``make bench-deps`` (open_clip in ``.bench-deps``); skipped with that reason otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval.roi import normalized_to_grid, roi_align, roi_align_1x1
from eval.tasks.boxcls import region_embeddings
from finevit.cli import main as finevit_cli
from tests.eval.test_tasks import _coco_instances

VISION = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}
TEXT = {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}


@pytest.fixture(scope="module")
def open_clip_ok() -> None:
    from eval.openclip import import_open_clip

    try:
        import_open_clip()
    except ImportError as e:
        pytest.skip(f"open_clip not installed ({e}): run `make bench-deps`")


def _config(tmp_path: Path, name: str, **vision) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"embed_dim": 16, "vision_cfg": {**VISION, **vision}, "text_cfg": TEXT}))
    return path


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 255, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(a)


BOXES = [(0.0, 0.0, 1.0, 1.0), (0.1, 0.2, 0.6, 0.9), (0.5, 0.0, 1.0, 0.5), (0.3, 0.3, 0.4, 0.45)]


@pytest.mark.parametrize("mode", ["fgclip", "final"])
def test_region_features_follow_fgclip_recipe(open_clip_ok, tmp_path: Path, mode: str) -> None:
    """The reference is FG-CLIP's ``get_image_box_roi_features`` written out on the tower's weights:
    hidden states of the penultimate block (captured from the model's own forward), the last block
    with its attention replaced by ``out_proj(v_proj(ln_1(x)))`` (fgclip) or as trained (final),
    ``ln_post`` and ``proj`` per token, RoIAlign 1x1 on the squashed image's grid, L2 norm."""
    from eval.openclip import load_openclip

    enc = load_openclip(f"openclip:{_config(tmp_path, 'tok')}", seed=1, region_mode=mode)
    v = enc.model.visual
    im = _noise((56, 40), 3)  # not square: squashed to 32x32, not cropped
    got = region_embeddings(enc, [im], [BOXES], roi="torch")[0]

    seen = {}
    hooks = [
        v.transformer.resblocks[-2].register_forward_hook(lambda m, i, o: seen.__setitem__("pen", o)),
        v.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("last", o)),
    ]
    with torch.no_grad():
        v(enc.preprocess(im.resize((32, 32), Image.BICUBIC))[None])
        for h in hooks:
            h.remove()
        blk = v.transformer.resblocks[-1]
        if mode == "fgclip":
            x = seen["pen"]
            D = x.shape[-1]
            val = F.linear(blk.ln_1(x), blk.attn.in_proj_weight[2 * D :], blk.attn.in_proj_bias[2 * D :])
            x = x + blk.ls_1(blk.attn.out_proj(val))
            x = x + blk.ls_2(blk.mlp(blk.ln_2(x)))
        else:
            x = seen["last"]
        dense = (v.ln_post(x[:, 1:]) @ v.proj)[0].reshape(4, 4, -1)
    boxes = normalized_to_grid(torch.tensor(BOXES), 4, 4)
    want = F.normalize(roi_align_1x1(dense, boxes), dim=-1)
    assert got.shape == (4, 16)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    if mode == "fgclip":  # the value path is not the last block as trained: the two differ
        final = load_openclip(f"openclip:{_config(tmp_path, 'tok')}", seed=1, region_mode="final")
        assert not torch.allclose(got, region_embeddings(final, [im], [BOXES], roi="torch")[0], atol=1e-3)


@pytest.mark.parametrize("final_ln_after_pool", [False, True])
def test_whole_image_box_is_the_image_embedding(
    open_clip_ok, tmp_path: Path, final_ln_after_pool: bool
) -> None:
    """A mean-pooling tower: RoIAlign 1x1 over the whole grid samples every patch centre once, so
    the region embedding of the whole-image box, pooled as a one-token image, must be the tower's
    own image embedding, with ``ln_post`` before the mean or after it as the tower has it."""
    from eval.openclip import load_openclip

    cfg = _config(tmp_path, "avg", pool_type="avg", final_ln_after_pool=final_ln_after_pool)
    enc = load_openclip(f"openclip:{cfg}", seed=2, region_mode="final")
    ims = [_noise((32, 32), 5), _noise((32, 32), 6)]  # at the input size: squash == resize + crop
    got = torch.cat(region_embeddings(enc, ims, [[(0.0, 0.0, 1.0, 1.0)]] * 2, roi="torch"))
    want = enc.encode_image(ims)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_own_roi_align_agrees_with_torchvision(open_clip_ok) -> None:
    """Ours against torchvision's (OpenCLIP brings it from .bench-deps): its compiled op when it has
    one (then :func:`roi_align` uses it), else its pure-Python reference run eagerly (torchvision
    would ``torch.compile`` it: minutes). Boxes past the grid are clipped by :func:`roi_align`."""
    import importlib

    from eval.roi import roi_backend

    try:
        mod = importlib.import_module("torchvision.ops.roi_align")
    except Exception as e:
        pytest.skip(f"torchvision.ops does not import here ({e})")
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(5, 7, 3, generator=g)
    xy0 = torch.rand(20, 2, generator=g) * torch.tensor([7.0, 5.0])
    wh = torch.rand(20, 2, generator=g) * torch.tensor([7.0, 5.0])
    boxes = torch.cat([xy0, xy0 + wh], 1)
    boxes[0] = torch.tensor([-2.0, -1.0, 9.0, 8.0])  # clipped to the whole grid: the mean of all patches
    ours = roi_align(feat, boxes, "torch")
    assert torch.allclose(ours[0], feat.mean((0, 1)), atol=1e-5)
    clipped = torch.minimum(boxes.clamp(min=0), torch.tensor([7.0, 5.0, 7.0, 5.0]))
    rois = torch.cat([torch.zeros(20, 1), clipped], 1)
    if roi_backend() == "torchvision":
        theirs = roi_align(feat, boxes)
    else:
        ref = getattr(mod._roi_align, "__wrapped__", mod._roi_align)
        theirs = ref(feat.permute(2, 0, 1)[None], rois, 1.0, 1, 1, -1, True)[:, :, 0, 0]
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_cli_boxcls_on_openclip_config(open_clip_ok, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = _coco_instances(tmp_path)
    cfg = _config(tmp_path, "tiny-clip")
    out = tmp_path / "out"
    argv = ["eval", f"openclip:{cfg}", "--task", "boxcls", "--data", str(data), "--templates", "simple"]
    assert finevit_cli([*argv, "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())[0]
    assert row["task"] == "boxcls" and row["n"] == 2 and row["missing_images"] == 1
    assert set(row["metrics"]) >= {"top1", "top5", "mean_per_class_recall"} and row["metrics"]["classes"] == 3
    assert any("value path" in n for n in row["notes"]) and row["settings"]["model"] == "openclip:tiny-clip"
    assert row["settings"]["resolution"] == "32x32 squashed (no crop)"
    assert finevit_cli([*argv, "--region-features", "final", "--out", str(out)]) == 0
    assert any("final tokens" in n for n in json.loads((out / "results.json").read_text())[0]["notes"])
    resnet = tmp_path / "rn.json"
    resnet.write_text(
        json.dumps(
            {
                "embed_dim": 16,
                "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
                "text_cfg": TEXT,
            }
        )
    )
    assert finevit_cli(["eval", f"openclip:{resnet}", "--task", "boxcls", "--data", str(data)]) == 2
    assert "needs a ViT image tower" in capsys.readouterr().err
