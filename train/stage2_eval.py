"""Held-out stage-2 check: box->caption accuracy (colour and shape words match the ground truth)
and caption->box IoU, each beside a chance baseline (the ground truth of another region).

    python -m train.stage2_eval EXPORTED_VLM_DIR HELD_OUT_DATASET [--limit 64]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys

import torch
from PIL import Image

from engine.synthetic import COLORS, SHAPES
from train.data.regions import RegionData, box_iou, parse_box, prompt_for


def _words(text: str) -> tuple[str | None, str | None]:
    t = text.lower()
    color = next((c for c in COLORS if c in t.split() or f" {c} " in f" {t} "), None)
    shape = next((s for s in SHAPES if s in t), None)
    return color, shape


def evaluate(model_dir: str, dataset: str, limit: int = 64, seed: int = 0) -> dict[str, float]:
    from train.export import load_vlm

    net, proc = load_vlm(model_dir)
    proc.tokenizer.padding_side = "left"
    data = RegionData(dataset, None, "gt-regions", None)
    items = []
    for shard in data.shards:
        imgs = data.images(shard)
        for key, meta in data.meta(shard).items():
            for box, cap in meta.regions:
                if cap.startswith("a ") and key in imgs:  # object regions (colour + shape words)
                    items.append((imgs[key], box, cap))
    random.Random(seed).shuffle(items)
    items = items[:limit]
    ims = [Image.open(io.BytesIO(b)).convert("RGB") for b, _, _ in items]

    def ask(prompts: list[str]) -> list[str]:
        out = []
        for i in range(0, len(prompts), 8):
            msgs = [
                proc.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
                )
                for p in prompts[i : i + 8]
            ]
            inp = proc(images=ims[i : i + 8], text=msgs, padding=True, return_tensors="pt")
            with torch.inference_mode():
                ids = net.generate(
                    **inp, max_new_tokens=32, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id
                )
            n = inp["input_ids"].shape[1]
            out += proc.tokenizer.batch_decode(ids[:, n:], skip_special_tokens=True)
        return out

    caps = ask([prompt_for("box_caption", box=b) for _, b, _ in items])
    boxes = ask([prompt_for("caption_box", caption=c) for _, _, c in items])
    other = items[1:] + items[:1]
    acc = sum(_words(p) == _words(c) for p, (_, _, c) in zip(caps, items, strict=True)) / len(items)
    chance_acc = sum(_words(o[2]) == _words(c) for o, (_, _, c) in zip(other, items, strict=True)) / len(
        items
    )
    ious = [box_iou(parse_box(t) or (0, 0, 0, 0), b) for t, (_, b, _) in zip(boxes, items, strict=True)]
    chance_iou = [box_iou(o[1], b) for o, (_, b, _) in zip(other, items, strict=True)]
    return {
        "regions": len(items),
        "box_caption_acc": acc,
        "box_caption_chance": chance_acc,
        "caption_box_iou": sum(ious) / len(ious),
        "caption_box_chance_iou": sum(chance_iou) / len(chance_iou),
        "parsed_boxes": sum(parse_box(t) is not None for t in boxes) / len(boxes),
        "example": caps[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("dataset")
    ap.add_argument("--limit", type=int, default=64)
    a = ap.parse_args(argv)
    print(json.dumps(evaluate(a.model_dir, a.dataset, a.limit), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
