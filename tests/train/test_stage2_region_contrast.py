"""Stage 2's regional contrastive term (``loss.region_contrast``) trains the path box classification
reads: a box RoIAligned on the final patch tokens, pooled by stage 1's head + projection, against
the text tower's embedding of a label text. Images have two halves of different colours; each half
is a region captioned with its colour. Scored as box classification is (the exported encoder's
``pool_regions`` against ``encode_text`` of "a {colour} region"): with the term the halves are
named right for most held-out boxes; with the LM loss alone (the same steps) they stay near chance,
since nothing else trains the head, the projection or the text tower."""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 150, 50), "blue": (30, 70, 220), "yellow": (240, 210, 0)}
HALVES = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0)}
STEPS = 100


def make(rng: random.Random) -> tuple[bytes, list[tuple[tuple[float, ...], str]]]:
    a, b = rng.sample(sorted(COLOURS), 2)
    im = Image.new("RGB", (32, 32), COLOURS[a])
    im.paste(COLOURS[b], (16, 0, 32, 32))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue(), [(HALVES["left"], a), (HALVES["right"], b)]


def caption(colour: str) -> str:
    return f"a {colour} region"


def train_and_score(tmp_path: Path, weight: float) -> float:
    """Box-classification top-1 of held-out halves after STEPS stage-2 steps."""
    from eval.tasks.boxcls import region_embeddings
    from tests.train.conftest import tiny_stage2_config
    from train.data.regions import Sample, collate, prompt_for
    from train.model.encoder import load_encoder
    from train.stage2 import build, lm_loss, param_groups, region_terms, set_phase

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = tiny_stage2_config(
        tmp_path,
        optim={"lr": 3e-3, "weight_decay": 0.0, "vision_lr_mult": 0.3, "align_lr_mult": 1.0},
        loss={"region_contrast": 1.0},
    )
    model, proc = build(cfg)  # the aligner is built either way; weight 0 trains the LM loss alone
    optim = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr)
    set_phase(model, "all")
    model.keep_final_grids = True
    rng, stats = random.Random(0), Counter()
    for step in range(STEPS):
        images, samples = {}, []
        for i in range(16):
            png, regions = make(rng)
            box, colour = regions[rng.randrange(2)]
            images[f"{step}-{i}"] = png
            regs = tuple((b, caption(c)) for b, c in regions)
            prompt = prompt_for("box_caption", box=box)
            samples.append(Sample(f"{step}-{i}", "s", "box_caption", prompt, colour, regions=regs))
        b = collate(samples, images, proc, 96, 64, stats)
        out = model(
            input_ids=b["input_ids_BL"], vision=b["vision"], spans=b["spans"], region_boxes=b["region_boxes"]
        )
        loss = lm_loss(out.logits, b["labels_BL"], "sample")
        if weight:
            loss = (
                loss + weight * region_terms(model, model.region_align, b, torch.device("cpu"), cfg.loss)[0]
            )
        optim.zero_grad()
        loss.backward()
        optim.step()
    # score through the encoder a user gets: stage 1's encoder with stage 2's towers put in
    enc = load_encoder(cfg.init.checkpoint)
    enc.vision.load_state_dict(model.vision.state_dict())
    enc.text.load_state_dict(model.region_align.text.state_dict())
    labels = sorted(COLOURS)
    text_CE = enc.encode_text([caption(c) for c in labels])
    held = [make(random.Random(1000 + i)) for i in range(24)]
    embs = region_embeddings(
        enc, [Image.open(io.BytesIO(png)) for png, _ in held], [[b for b, _ in regs] for _, regs in held]
    )
    said = [labels[int(i)] for e in embs for i in (e @ text_CE.T).argmax(1)]
    truth = [c for _, regs in held for _, c in regs]
    return sum(a == b for a, b in zip(said, truth, strict=True)) / len(truth)


@pytest.mark.slow
def test_region_contrast_trains_the_box_classification_path(tmp_path: Path) -> None:
    with_term = train_and_score(tmp_path / "on", 1.0)
    lm_only = train_and_score(tmp_path / "off", 0.0)
    assert with_term >= 0.8, (with_term, lm_only)
    assert lm_only <= 0.5, (with_term, lm_only)


@pytest.mark.parametrize(
    "over, field",
    [
        ({"projector": {"feature_layers": [0]}}, "projector.feature_layers"),
        ({"loop": {"parallel": "ddp"}}, "loop.parallel"),
    ],
)
def test_region_contrast_that_cannot_run_stops_at_start_naming_the_field(over: dict, field: str) -> None:
    from engine.config import ConfigError
    from train.stage2 import Stage2Config, check_fits

    base = {"data": {"dataset": "d"}, "init": {"checkpoint": "c"}, "lm": {"path": "l"}}
    check_fits(Stage2Config.model_validate({**base, **over}))  # fine without the term
    cfg = Stage2Config.model_validate({**base, **over, "loss": {"region_contrast": 1.0}})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_fits(cfg)


@pytest.mark.parametrize(
    "loss, field",
    [
        ({"region_hard_negatives": 1.0}, "loss.region_hard_negatives"),
        (
            {"region_contrast": 1.0, "region_hard_negatives": 1.0, "hard_negative_classes": ["fruit"]},
            "loss.hard_negative_classes",
        ),
        (
            {"region_contrast": 1.0, "region_hard_negatives": 1.0, "hard_negative_words": "/no/such.yaml"},
            "loss.hard_negative_words",
        ),
    ],
)
def test_region_hard_negatives_that_cannot_run_stop_at_start_naming_the_field(loss: dict, field: str) -> None:
    from engine.config import ConfigError
    from train.stage2 import Stage2Config, check_fits

    base = {"data": {"dataset": "d"}, "init": {"checkpoint": "c"}, "lm": {"path": "l"}}
    check_fits(
        Stage2Config.model_validate({**base, "loss": {"region_contrast": 1.0, "region_hard_negatives": 1.0}})
    )
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_fits(Stage2Config.model_validate({**base, "loss": loss}))


def test_global_term_embeds_an_image_as_stage_1_does(tmp_path: Path) -> None:
    """``loss.global_contrast`` pools each image's final patch grid with stage 1's head and
    projection: before stage 2 trains, its embedding of an image is the stage-1 encoder's."""
    from tests.train.conftest import tiny_stage2_config
    from train.data.regions import Sample, collate, prompt_for
    from train.model.encoder import load_encoder
    from train.model.region_align import image_embeddings
    from train.stage2 import build

    torch.manual_seed(0)
    cfg = tiny_stage2_config(tmp_path, loss={"region_contrast": 1.0, "global_contrast": 1.0})
    model, proc = build(cfg)
    model.keep_final_grids = True
    rng, images, samples = random.Random(0), {}, []
    for i in range(6):
        png, regions = make(rng)
        images[f"k{i}"] = png
        regs = tuple((b, caption(c)) for b, c in regions)
        samples.append(Sample(f"k{i}", "s", "global", prompt_for("global"), "two halves", regions=regs))
    b = collate(samples, images, proc, 96, 64, Counter())
    with torch.no_grad():
        model(
            input_ids=b["input_ids_BL"], vision=b["vision"], spans=b["spans"], region_boxes=b["region_boxes"]
        )
        got = image_embeddings(model.vision, model.final_grids)
        want = load_encoder(cfg.init.checkpoint).encode_image(
            [Image.open(io.BytesIO(images[k])) for k in b["keys"]]
        )
    torch.testing.assert_close(got, torch.nn.functional.normalize(want.float(), dim=-1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "loss, data, field",
    [
        ({"global_contrast": 1.0}, {}, "loss.region_contrast"),
        (
            {"region_contrast": 1.0, "global_contrast": 1.0},
            {"global_layer": "", "tasks": [{"task": "box_caption"}]},
            "loss.global_contrast needs the global captions: data.global_layer",
        ),
    ],
)
def test_global_term_without_what_it_needs_stops_at_start_naming_the_field(
    loss: dict, data: dict, field: str
) -> None:
    from engine.config import ConfigError
    from train.stage2 import Stage2Config, check_fits

    base = {"init": {"checkpoint": "c"}, "lm": {"path": "l"}}
    cfg = Stage2Config.model_validate({**base, "data": {"dataset": "d", **data}, "loss": loss})
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        check_fits(cfg)
