"""Held-out stage-2 check: box->caption accuracy (colour and shape words match the ground truth)
and caption->box IoU, each beside the baselines a model blind to the image reaches.

    python -m train.stage2_eval EXPORTED_VLM_DIR HELD_OUT_DATASET [--limit 256]

The regions are the held-out dataset's object regions (``a {size} {colour} {texture} {shape} in
the {position}``), shuffled with a fixed seed. Baselines, all from the held-out ground truth:

* ``box_caption_chance``: the best image-blind answer, the most frequent (colour, shape) pair (at
  least the expected agreement of a guess drawn from the pairs' distribution); also per word
  (``colour_chance``, ``shape_chance``).
* ``caption_box_chance_iou``: the mean IoU of a region's box with the box of every other region
  (a guess drawn from the boxes' distribution), or with the mean box if that is higher.
* ``caption_box_text_iou``: what the caption's words alone give: the mean box of the *other*
  held-out regions with the same position and size words (the caption names the grid cell, so a
  model that reads the words and not the image gets this far; above it the image helps).

Each rate comes with its standard error (binomial for accuracies, of the mean for IoUs).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
from collections import Counter
from typing import Any

import torch
from PIL import Image

from engine.synthetic import COLORS, POSITIONS, SHAPES, SIZES
from train.data.regions import RegionData, box_iou, parse_box, prompt_for

Item = tuple[bytes, tuple[float, float, float, float], str]  # image bytes, box, caption


def words(text: str) -> tuple[str | None, str | None]:
    """The first colour word and the first shape word of ``text`` (whole words), or None."""
    toks = "".join(ch if ch.isalpha() else " " for ch in text.lower()).split()
    color = next((t for t in toks if t in COLORS), None)
    shape = next((t for t in toks if t in SHAPES), None)
    return color, shape


def _place(caption: str) -> tuple[str | None, str | None]:
    """(position, size) words of an object caption."""
    t = caption.lower()
    pos = max((p for p in POSITIONS if f"the {p}" in t), key=len, default=None)
    size = next((s for s in SIZES if s in t.split()), None)
    return pos, size


def held_out_regions(dataset: str, limit: int, seed: int = 0) -> list[Item]:
    """Up to ``limit`` object regions (colour + shape captions) of ``dataset``, shuffled by ``seed``."""
    data = RegionData(dataset, None, "gt-regions", None)
    items: list[Item] = []
    for shard in data.shards:
        imgs = data.images(shard)
        for key, meta in data.meta(shard).items():
            for box, cap in meta.regions:
                if cap.startswith("a ") and key in imgs:
                    items.append((imgs[key], box, cap))
    random.Random(seed).shuffle(items)
    return items[:limit]


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / max(n, 1))


def _mean_se(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    m = sum(xs) / n
    var = sum((x - m) ** 2 for x in xs) / max(n - 1, 1)
    return m, math.sqrt(var / n)


def baselines(items: list[Item]) -> dict[str, float]:
    """Image-blind baselines of ``items`` (see the module docstring)."""
    n = len(items)
    pairs = Counter(words(c) for _, _, c in items)
    cols = Counter(words(c)[0] for _, _, c in items)
    shapes = Counter(words(c)[1] for _, _, c in items)

    def blind(counts: Counter) -> float:
        return max(max(counts.values()) / n, sum((k / n) ** 2 for k in counts.values()))

    boxes = [b for _, b, _ in items]
    pair_iou = [box_iou(a, b) for i, a in enumerate(boxes) for j, b in enumerate(boxes) if i != j]
    mean_box = tuple(sum(b[k] for b in boxes) / n for k in range(4))
    mean_iou = sum(box_iou(mean_box, b) for b in boxes) / n
    text_iou = []
    for i, (_, b, c) in enumerate(items):
        same = [bj for j, (_, bj, cj) in enumerate(items) if j != i and _place(cj) == _place(c)]
        guess = tuple(sum(s[k] for s in same) / len(same) for k in range(4)) if same else mean_box
        text_iou.append(box_iou(guess, b))
    return {
        "box_caption_chance": blind(pairs),
        "colour_chance": blind(cols),
        "shape_chance": blind(shapes),
        "caption_box_chance_iou": max(sum(pair_iou) / max(len(pair_iou), 1), mean_iou),
        "caption_box_text_iou": sum(text_iou) / n,
    }


def ask(net: Any, proc: Any, images: list[Image.Image], prompts: list[str], batch: int = 16) -> list[str]:
    """Greedy answers of the VLM to one prompt per image."""
    proc.tokenizer.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(prompts), batch):
        msgs = [
            proc.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": p}]}]
            )
            for p in prompts[i : i + batch]
        ]
        inp = proc(images=images[i : i + batch], text=msgs, padding=True, return_tensors="pt")
        with torch.inference_mode():
            ids = net.generate(
                **inp, max_new_tokens=32, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id
            )
        n = inp["input_ids"].shape[1]
        out += proc.tokenizer.batch_decode(ids[:, n:], skip_special_tokens=True)
    return out


def evaluate_model(
    net: Any, proc: Any, items: list[Item], tasks: tuple[str, ...] = ("box", "caption")
) -> dict:
    """Score a VLM (and its processor) on ``items``: accuracies, IoU, baselines, standard errors."""
    net.eval()
    ims = [Image.open(io.BytesIO(b)).convert("RGB") for b, _, _ in items]
    n = len(items)
    out: dict[str, Any] = {"regions": n, **baselines(items)}
    if "box" in tasks:
        caps = ask(net, proc, ims, [prompt_for("box_caption", box=b) for _, b, _ in items])
        said = [words(p) for p in caps]
        truth = [words(c) for _, _, c in items]
        acc = sum(s == t for s, t in zip(said, truth, strict=True)) / n
        col = sum(s[0] == t[0] for s, t in zip(said, truth, strict=True)) / n
        shp = sum(s[1] == t[1] for s, t in zip(said, truth, strict=True)) / n
        out |= {
            "box_caption_acc": acc,
            "box_caption_acc_se": _se(acc, n),
            "colour_acc": col,
            "colour_acc_se": _se(col, n),
            "shape_acc": shp,
            "shape_acc_se": _se(shp, n),
            "examples": [[p, c] for p, (_, _, c) in zip(caps[:6], items[:6], strict=True)],
        }
    if "caption" in tasks:
        boxes = ask(net, proc, ims, [prompt_for("caption_box", caption=c) for _, _, c in items])
        ious = [box_iou(parse_box(t) or (0, 0, 0, 0), b) for t, (_, b, _) in zip(boxes, items, strict=True)]
        m, se = _mean_se(ious)
        out |= {
            "caption_box_iou": m,
            "caption_box_iou_se": se,
            "parsed_boxes": sum(parse_box(t) is not None for t in boxes) / n,
            "box_examples": [[t, c] for t, (_, _, c) in zip(boxes[:3], items[:3], strict=True)],
        }
    return out


def evaluate(model_dir: str, dataset: str, limit: int = 256, seed: int = 0) -> dict[str, Any]:
    from train.export import load_vlm

    net, proc = load_vlm(model_dir)
    return evaluate_model(net, proc, held_out_regions(dataset, limit, seed))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("dataset")
    ap.add_argument("--limit", type=int, default=256)
    a = ap.parse_args(argv)
    print(json.dumps(evaluate(a.model_dir, a.dataset, a.limit), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
