"""Stage 2 learns to look: a tiny VLM (random stage-1 tower, random LM) trained in-process on
images whose two halves have different colours, asked for the colour of one half by its box. The
answer is in the pixels of that box only: a model blind to the image (projected features zeroed by
hand) stays near chance, 14/48 against 1/4 of the colours; the whole path (processor, collate,
vision tower, projector, region tokens, LM, loss) gets above 0.8 in 120 steps."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 150, 50), "blue": (30, 70, 220), "yellow": (240, 210, 0)}
HALVES = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0)}


def make(rng: random.Random) -> tuple[bytes, tuple[float, ...], str]:
    a, b = rng.sample(sorted(COLOURS), 2)
    im = Image.new("RGB", (32, 32), COLOURS[a])
    im.paste(COLOURS[b], (16, 0, 32, 32))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    side = rng.choice(sorted(HALVES))
    return buf.getvalue(), HALVES[side], a if side == "left" else b


@pytest.mark.slow
def test_stage2_learns_the_colour_in_a_box(tmp_path: Path) -> None:
    from tests.train.conftest import tiny_stage2_config
    from train.data.regions import Sample, collate, prompt_for
    from train.stage2 import build, lm_loss, param_groups, set_phase

    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = tiny_stage2_config(tmp_path, optim={"lr": 3e-3, "weight_decay": 0.0, "vision_lr_mult": 0.3})
    model, proc = build(cfg)
    optim = torch.optim.AdamW(param_groups(model, cfg.optim), lr=cfg.optim.lr)
    set_phase(model, "all")
    rng, stats = random.Random(0), __import__("collections").Counter()
    for step in range(120):
        images, samples = {}, []
        for i in range(16):
            png, box, colour = make(rng)
            images[f"{step}-{i}"] = png
            samples.append(
                Sample(f"{step}-{i}", "s", "box_caption", prompt_for("box_caption", box=box), colour)
            )
        b = collate(samples, images, proc, 96, 64, stats)
        out = model(
            input_ids=b["input_ids_BL"], vision=b["vision"], spans=b["spans"], region_boxes=b["region_boxes"]
        )
        loss = lm_loss(out.logits, b["labels_BL"], "sample")
        optim.zero_grad()
        loss.backward()
        optim.step()
    model.eval()
    proc.tokenizer.padding_side = "left"
    held = [make(random.Random(1000 + i)) for i in range(48)]
    texts = [
        proc.apply_chat_template(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image"},
                        {"type": "text", "text": prompt_for("box_caption", box=box)},
                    ],
                }
            ]
        )
        for _, box, _ in held
    ]
    inp = proc(images=[Image.open(io.BytesIO(p)) for p, _, _ in held], text=texts, padding=True)
    with torch.no_grad():
        ids = model.generate(
            **inp, max_new_tokens=6, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id
        )
    said = proc.tokenizer.batch_decode(ids[:, inp["input_ids"].shape[1] :], skip_special_tokens=True)
    right = sum(s.strip().startswith(c) for s, (_, _, c) in zip(said, held, strict=True))
    assert right / len(held) >= 0.8, (right, said[:6], [c for _, _, c in held[:6]])
