"""Stage 2 names what is in a box of held-out synthetic scenes: a tiny VLM (random stage-1 tower,
random LM, the projector reading the patch embeddings beside the last block, region tokens) trained
in-process on the box->caption task of rendered scenes, then scored by ``train.stage2_eval`` on
scenes of another seed. Its colour+shape accuracy must clear the best image-blind answer (the most
frequent pair) by a margin, and the same model on blank images must not."""

from __future__ import annotations

import collections
import io
import random
from pathlib import Path

import pytest
import torch

SIZE = 64  # px, long side: 8 px patches, objects of 6-20 px


def scene_items(seed: int, n: int) -> list[tuple[bytes, tuple[float, ...], str]]:
    """(PNG bytes, box, caption) of every object region of scenes 0..n-1 of world ``seed``."""
    from engine.synthetic import make_scene, region_annotations, render_scene

    out = []
    for i in range(n):
        scene = make_scene(seed, i, SIZE)
        buf = io.BytesIO()
        render_scene(scene).save(buf, "PNG")
        for r in region_annotations(scene):
            if r["label"] != "text":
                out.append((buf.getvalue(), (r["x0"], r["y0"], r["x1"], r["y1"]), r["caption"]))
    return out


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    reason="box->caption at chance so far: 200 steps gave 0.031 (chance 0.031) under load 10, 227 s; "
    "region_pixels not yet shown to close the gap (README 'Stage 2 and export')",
)
def test_stage2_names_colour_and_shape_in_held_out_scenes(tmp_path: Path) -> None:
    from tests.eval.conftest import TINY_MODEL, save_stage1_checkpoint, train_tokenizer
    from train.data.regions import Sample, collate, prompt_for
    from train.stage2 import Stage2Config, build, lm_loss, make_tiny_lm, param_groups, set_phase
    from train.stage2_eval import evaluate_model
    from train.stage2_sweep import blank

    torch.manual_seed(0)
    torch.set_num_threads(1)
    tok = train_tokenizer(tmp_path / "tok", n_scenes=60)
    run = save_stage1_checkpoint(tmp_path / "stage1", tok).run
    lm = make_tiny_lm(str(tok), str(tmp_path / "lm"), hidden=32, layers=1, heads=2)
    cfg = Stage2Config.model_validate(
        {
            "model": TINY_MODEL,
            "init": {"checkpoint": str(run)},
            "lm": {"path": lm},
            "projector": {"feature_layers": [0, -1], "region_pixels": REGION_PIXELS, "abs_pos": True},
            "data": {"dataset": "unused", "max_patches": 64, "seq_len": 64, "batch": 16, "max_len": 128},
            "optim": {"lr": 5e-3, "weight_decay": 0.0, "vision_lr_mult": 0.3},
        }
    )
    model, proc = build(cfg)
    optim = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr)
    set_phase(model, "all")
    train = scene_items(0, 300)
    rng, stats = random.Random(0), collections.Counter()
    images = {str(i): b for i, (b, _, _) in enumerate(train)}
    for _ in range(STEPS):
        picked = rng.sample(range(len(train)), 16)
        samples = [
            Sample(str(i), "s", "box_caption", prompt_for("box_caption", box=train[i][1]), train[i][2])
            for i in picked
        ]
        b = collate(samples, images, proc, 128, 64, stats, pack=True)
        out = model(
            input_ids=b["input_ids_BL"],
            position_ids=b["position_ids_BL"],
            vision=b["vision"],
            spans=b["spans"],
            region_boxes=b["region_boxes"],
        )
        loss = lm_loss(out.logits, b["labels_BL"], "sample", b["sample_BL"])
        optim.zero_grad()
        loss.backward()
        optim.step()
    held = scene_items(1, 40)
    seen = evaluate_model(model, proc, held, tasks=("box",))
    blind = evaluate_model(model, proc, blank(held), tasks=("box",))
    chance = seen["box_caption_chance"]
    summary = {k: round(seen[k], 3) for k in ("box_caption_acc", "colour_acc", "colour_chance", "shape_acc")}
    summary["blank_colour_acc"] = round(blind["colour_acc"], 3)
    print(summary)
    assert seen["box_caption_acc"] >= chance + 3 * seen["box_caption_acc_se"], (summary, seen["examples"])
    assert blind["box_caption_acc"] < chance + 3 * seen["box_caption_acc_se"], (
        blind["box_caption_acc"],
        summary,
    )


STEPS = 200
REGION_PIXELS = True
