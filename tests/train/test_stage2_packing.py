"""Packed LM rows (``data.pack``): several samples per row, each attending only to itself, give every
sample the loss it has alone; the loss on the packed batch equals the unpacked one."""

from __future__ import annotations

import io
from collections import Counter

import pytest
import torch
from PIL import Image, ImageDraw

from tests.eval.conftest import TINY_MODEL
from train.data.regions import Sample, collate, pack_rows
from train.model.vlm import (
    REGION_TOKEN,
    FineViTVLMConfig,
    FineViTVLMForConditionalGeneration,
    FineViTVLMProcessor,
)

PRE = {"patch_size": 8, "max_patches": 48, "mean": [0.5] * 3, "std": [0.5] * 3}
MAX_LEN = 224


@pytest.fixture(scope="module")
def vlm(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.eval.conftest import train_tokenizer
    from train.config import ModelConfig
    from train.stage2 import make_tiny_lm

    base = tmp_path_factory.mktemp("pack")
    path = make_tiny_lm(
        str(train_tokenizer(base / "tok", n_scenes=60)), str(base / "lm"), hidden=32, layers=2
    )
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_special_tokens({"additional_special_tokens": [REGION_TOKEN]}, replace_extra_special_tokens=False)
    lm = AutoModelForCausalLM.from_pretrained(path)
    lm.resize_token_embeddings(len(tok))
    torch.manual_seed(0)
    cfg = FineViTVLMConfig(
        vision=ModelConfig.model_validate(TINY_MODEL).model_dump(mode="json"),
        preprocess=PRE,
        lm_config=lm.config.to_dict(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        projector_abs_pos=True,
        region_token=REGION_TOKEN,
        region_token_id=tok.convert_tokens_to_ids(REGION_TOKEN),
    )
    model = FineViTVLMForConditionalGeneration(cfg, language_model=lm).eval()
    return model, FineViTVLMProcessor(tok, PRE, "<image>", REGION_TOKEN)


def scenes() -> tuple[list[Sample], dict[str, bytes]]:
    """Images of different sizes and colours; box, grounding and global prompts of varied length."""
    samples, images = [], {}
    sizes = [(64, 48), (40, 64), (56, 56), (64, 32), (48, 40), (32, 32)]
    colours = ["red", "blue", "green", "yellow", "purple", "orange"]
    for i, ((w, h), colour) in enumerate(zip(sizes, colours, strict=True)):
        key = f"0000{i:05d}"
        im = Image.new("RGB", (w, h), (20 * i, 200 - 30 * i, 90))
        ImageDraw.Draw(im).rectangle([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(250, 40 * i, 10))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        images[key] = buf.getvalue()
        if i % 3 == 0:
            s = Sample(
                key,
                "00000",
                "box_caption",
                "Describe the region <box>(250,250),(750,750)</box>.",
                f"a {colour} square",
            )
        elif i % 3 == 1:
            s = Sample(
                key,
                "00000",
                "caption_box",
                f"Where is a {colour} square? Answer with a box.",
                "<box>(250,250),(750,750)</box>",
            )
        else:
            s = Sample(
                key,
                "00000",
                "global",
                "Describe the image.",
                f"a large {colour} square in the middle. " * (i // 2 + 1),
            )
        samples.append(s)
    return samples, images


def per_sample_ce(model, batch: dict) -> dict[str, float]:
    """Summed next-token cross-entropy on each sample's target tokens, by key."""
    from train.stage2 import model_inputs

    with torch.no_grad():
        logits = model(**model_inputs(batch, torch.device("cpu"))).logits
    labels, owner = batch["labels_BL"][:, 1:], batch["sample_BL"][:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none"
    ) * (labels != -100)
    return {k: float(ce[owner == i].sum()) for i, k in enumerate(batch["keys"])}


def test_first_fit_decreasing_fills_rows_within_capacity() -> None:
    rows = pack_rows([50, 90, 30, 60, 10, 120], 120)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([50, 90, 30, 60, 10, 120][i] for i in r) <= 120 for r in rows)
    assert len(rows) == 3  # 120 | 90+30 | 60+50+10


def test_packed_rows_give_each_sample_its_own_loss(vlm) -> None:
    from train.stage2 import lm_loss

    model, proc = vlm
    samples, images = scenes()
    one = collate(samples, images, proc, MAX_LEN, 64, Counter())
    packed = collate(samples, images, proc, MAX_LEN, 64, Counter(), pack=True)
    assert one["input_ids_BL"].shape[0] == 6 and packed["input_ids_BL"].shape[0] <= 3, packed[
        "input_ids_BL"
    ].shape
    assert packed["real_tokens"] == one["real_tokens"] and packed["padded_tokens"] < one["padded_tokens"]
    assert packed["region_boxes"].shape[0] == one["region_boxes"].shape[0] == 2
    alone = {}
    for s in samples:  # each sample by itself: the reference
        alone |= per_sample_ce(model, collate([s], images, proc, MAX_LEN, 64, Counter()))
    got, unpacked = per_sample_ce(model, packed), per_sample_ce(model, one)
    for k, want in alone.items():
        assert got[k] == pytest.approx(want, rel=0, abs=2e-4), (k, got[k], want)
        assert unpacked[k] == pytest.approx(want, rel=0, abs=2e-4), (k, unpacked[k], want)
    # the training loss (per-sample reductions over packed rows) is the unpacked batch's
    from train.stage2 import model_inputs

    with torch.no_grad():
        lp = model(**model_inputs(packed, torch.device("cpu"))).logits
        lu = model(**model_inputs(one, torch.device("cpu"))).logits
    for reduction in ("token", "sample", "square"):
        torch.testing.assert_close(
            lm_loss(lp, packed["labels_BL"], reduction, packed["sample_BL"]),
            lm_loss(lu, one["labels_BL"], reduction),
            rtol=1e-5,
            atol=1e-5,
        )
