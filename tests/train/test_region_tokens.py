"""Region tokens (Ferret's hybrid region representation): the processor puts a ``<region>`` token
after each box of a prompt and says which image and box it is; the model fills it with the box
RoIAligned on that image's patch grid and projected like a 2x2 block."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from train.model.vlm import (
    IMAGE_TOKEN,
    REGION_TOKEN,
    FineViTVLMConfig,
    FineViTVLMForConditionalGeneration,
    FineViTVLMProcessor,
)

PRE = {"patch_size": 8, "max_patches": 64, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    from tests.eval.conftest import train_tokenizer
    from train.stage2 import make_tiny_lm

    base = tmp_path_factory.mktemp("regiontok")
    lm = make_tiny_lm(
        str(train_tokenizer(base / "tok", n_scenes=60)), str(base / "lm"), hidden=16, layers=1, heads=2
    )
    tok = AutoTokenizer.from_pretrained(lm)
    tok.add_special_tokens({"additional_special_tokens": [REGION_TOKEN]}, replace_extra_special_tokens=False)
    return tok


def prompt(proc: FineViTVLMProcessor, text: str) -> str:
    return proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    )


def test_the_processor_marks_each_box_of_an_image_prompt(tokenizer) -> None:
    proc = FineViTVLMProcessor(tokenizer, PRE, IMAGE_TOKEN, REGION_TOKEN)
    rid = tokenizer.convert_tokens_to_ids(REGION_TOKEN)
    ims = [Image.new("RGB", (64, 64)), Image.new("RGB", (64, 32))]
    texts = [
        prompt(proc, "Describe the region <box>(100,200),(500,800)</box>."),
        prompt(proc, "Compare <box>(0,0),(250,250)</box> and <box>(500,500),(1000,1000)</box>."),
    ]
    out = proc(images=ims, text=texts)
    assert (out["input_ids"] == rid).sum(1).tolist() == [1, 2]
    torch.testing.assert_close(
        out["region_boxes"],
        torch.tensor([[0, 0.1, 0.2, 0.5, 0.8], [1, 0, 0, 0.25, 0.25], [1, 0.5, 0.5, 1, 1]]),
    )
    # the token comes right after the box's text
    ids = out["input_ids"][0].tolist()
    before = tokenizer.decode(ids[: ids.index(rid)]).replace(" ", "")
    assert before.endswith("(500,800)</box>")
    # a box without an image before it, and a processor without region tokens: plain text
    plain = proc(text=["Where is <box>(1,2),(3,4)</box>?"])
    assert "region_boxes" not in plain and not (plain["input_ids"] == rid).any()
    off = FineViTVLMProcessor(tokenizer, PRE)(images=ims[:1], text=texts[:1])
    assert "region_boxes" not in off and not (off["input_ids"] == rid).any()


def test_a_box_is_roialigned_to_a_block_the_projector_maps_like_any_other() -> None:
    from train.model.projector import PatchMerger, roi_blocks

    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    x = torch.stack([rows, cols, 2 * rows - cols], -1)  # features linear in the position: bilinear is exact
    # a box on the cells of rows 1-2, cols 2-3 (normalized: y 1/4..3/4, x 2/6..4/6) is those four cells
    box = torch.tensor([[2 / 6, 1 / 4, 4 / 6, 3 / 4]])
    torch.testing.assert_close(roi_blocks(x, box)[0], x[1:3, 2:4])
    # ... and the projector makes of it the merged token of that block (same place, same weights)
    torch.manual_seed(0)
    merger = PatchMerger(3, 8, abs_pos=True)
    rows, cols = torch.meshgrid(torch.arange(6.0), torch.arange(6.0), indexing="ij")
    x6 = torch.stack([rows, cols, 2 * rows - cols], -1)
    centre = torch.tensor([[2 / 6, 2 / 6, 4 / 6, 4 / 6]])  # patches 2-3 x 2-3: merged cell (1, 1) of 3x3
    torch.testing.assert_close(merger.regions(x6, centre)[0], merger(x6)[4])
    # a box elsewhere gives another token
    assert not torch.allclose(merger.regions(x6, box)[0], merger(x6)[4])


def test_region_pixels_read_the_boxs_pixels_and_nothing_outside_it() -> None:
    from train.model.projector import PatchMerger

    torch.manual_seed(0)
    merger = PatchMerger(3, 8, region_pixels=True)
    x6 = torch.randn(6, 6, 3)  # the patch grid: the same in every call below
    box = torch.tensor([[0.25, 0.25, 0.75, 0.75]])
    image = torch.rand(48, 48, 3)
    token = merger.regions(x6, box, image)[0]
    inside, outside = image.clone(), image.clone()
    inside[20:28, 20:28] = 1.0 - inside[20:28, 20:28]  # a small object recoloured inside the box
    outside[:8, :8] = 1.0 - outside[:8, :8]  # the same outside it
    assert not torch.allclose(merger.regions(x6, box, inside)[0], token)
    torch.testing.assert_close(merger.regions(x6, box, outside)[0], token)
    with pytest.raises(ValueError, match="pixels"):
        merger.regions(x6, box)


def test_image_pixels_give_each_image_token_its_own_cells_pixels() -> None:
    """With ``image_pixels`` a merged token reads its cell's pixels: recolouring a few pixels in one
    cell changes that token and no other; without it (or for region tokens without
    ``region_pixels``) the pixels are not read."""
    from train.model.projector import PatchMerger, cell_boxes

    # a 5x6 patch grid: 3x3 merged cells, the last row of cells one patch high
    torch.testing.assert_close(cell_boxes(5, 6)[-1], torch.tensor([4 / 6, 4 / 5, 1.0, 1.0]))
    torch.manual_seed(0)
    merger = PatchMerger(3, 8, image_pixels=True)
    x = torch.randn(5, 6, 3)
    image = torch.rand(40, 48, 3)  # 8-px patches
    tokens = merger(x, image)
    changed = image.clone()
    changed[18:22, 20:24] = 1.0 - changed[18:22, 20:24]  # inside merged cell (1, 1): token 4
    moved = (merger(x, changed) - tokens).abs().amax(dim=1) > 1e-6
    assert moved.tolist() == [i == 4 for i in range(9)]
    with pytest.raises(ValueError, match="pixels"):
        merger(x)
    # region tokens keep to their own flag
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(merger.regions(x, box, image), merger.regions(x, box, changed))
    plain = PatchMerger(3, 8)
    torch.testing.assert_close(plain(x, image), plain(x, changed))


def test_the_model_fills_region_tokens_and_refuses_a_mismatch(tokenizer) -> None:
    from tests.train.test_stage2_optim import LM
    from train.config import ModelConfig

    vision = ModelConfig.model_validate(
        {"vision": {"width": 32, "depth": 1, "heads": 2, "patch_size": 8}}
    ).model_dump(mode="json")
    lm = dict(LM, vocab_size=len(tokenizer))
    cfg = FineViTVLMConfig(
        vision=vision,
        preprocess=PRE,
        lm_config=lm,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        region_token=REGION_TOKEN,
        region_token_id=tokenizer.convert_tokens_to_ids(REGION_TOKEN),
    )
    torch.manual_seed(0)
    model = FineViTVLMForConditionalGeneration(cfg).eval()
    proc = FineViTVLMProcessor(tokenizer, PRE, IMAGE_TOKEN, REGION_TOKEN)
    im = Image.new("RGB", (64, 64), (200, 30, 30))
    im.paste((20, 20, 200), (0, 0, 32, 32))  # a blue top-left quarter on red
    out = proc(images=[im], text=[prompt(proc, "Describe the region <box>(0,0),(500,500)</box>.")])
    with torch.no_grad():
        emb = model.embed(
            out["input_ids"], out["pixel_values"], out["image_grid"], region_boxes=out["region_boxes"]
        )
        from train.model.vlm import pack_padded

        vb, spans = pack_padded(out["pixel_values"], out["image_grid"])
        top_left = model.image_embeds(vb, spans)[0]  # merged cell (0, 0) of the 4x4 merged grid
    at = out["input_ids"][0].tolist().index(cfg.region_token_id)
    # the top-left quarter of a 4x4 merged grid is merged cell (0, 0)... of the 8x8 patch grid,
    # a box of 4x4 patches: RoIAlign to 2x2 bins, not the cell itself -- so compare with the projector
    with torch.no_grad():
        patches = model.patch_grids(vb, spans)[0]
        want = model.projector.regions(patches, torch.tensor([[0.0, 0.0, 0.5, 0.5]]))[0]
    torch.testing.assert_close(emb[0, at], want)
    assert not torch.allclose(emb[0, at], top_left)
    with pytest.raises(ValueError, match="region boxes"):
        model.embed(out["input_ids"], out["pixel_values"], out["image_grid"])
