"""Fine-grained synthetic suite: retrieval among hard negatives that differ in exactly one attribute.

Held-out scenes ``make_scene(seed, i, size, grid)`` (train on another seed) are rebuilt from seed and
index (engine/synthetic.py); for each attribute, ``negatives`` perturbed copies of the scene
(:func:`engine.synthetic.perturb`, seeds 0..k-1, duplicates dropped) give hard negative images
(rendered) and captions (:func:`engine.synthetic.dense_caption`, same sentence templates, so only
the attribute's words differ).

Per attribute and scene: text->image is right when the true caption scores the true image above
every negative image; image->text when the true image scores the true caption above every
negative caption (strictly: a tie is wrong). Chance is ``1 / (1 + negatives)``.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from eval.embed import embed_texts, require_text
from eval.report import TaskResult

# attribute -> the perturbation of engine.synthetic that changes exactly it
ATTRIBUTES: dict[str, str] = {
    "colour": "recolor",
    "shape": "shape",
    "position": "move",
    "count": "count",
    "word": "word",
}


def build(
    seed: int, n: int, size: int, negatives: int, attributes: list[str], grid: int = 3
) -> list[dict[str, Any]]:
    """Items ``{attribute, scene, pos: (image, caption), negs: [(image, caption)]}``."""
    from engine.synthetic import applicable_perturbations, dense_caption, make_scene, perturb, render_scene

    items = []
    for i in range(n):
        scene = make_scene(seed, i, size, grid)
        caption, image = dense_caption(scene), None
        kinds = applicable_perturbations(scene)
        for attr in attributes:
            kind = ATTRIBUTES[attr]
            if kind not in kinds:
                continue
            negs, seen = [], {caption}
            for j in range(negatives):
                neg = perturb(scene, kind, seed=j)
                text = dense_caption(neg)
                if text in seen:
                    continue
                seen.add(text)
                negs.append((render_scene(neg), text))
            if not negs:
                continue
            image = image or render_scene(scene)
            items.append({"attribute": attr, "scene": i, "pos": (image, caption), "negs": negs})
    return items


def run(
    encoder: Any,
    seed: int = 1000,
    n: int = 64,
    size: int = 128,
    negatives: int = 3,
    attributes: list[str] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    grid: int = 3,
) -> TaskResult:
    require_text(encoder, "finegrained")
    attributes = attributes or list(ATTRIBUTES)
    unknown = [a for a in attributes if a not in ATTRIBUTES]
    if unknown:
        raise ValueError(f"finegrained: unknown attribute(s) {unknown}; expected some of {list(ATTRIBUTES)}")
    t0 = time.perf_counter()
    items = build(seed, n, size, negatives, attributes, grid)
    # one embedding per distinct image object and caption
    images, texts = [], []
    img_id: dict[int, int] = {}
    txt_id: dict[str, int] = {}
    for it in items:
        for im, tx in [it["pos"], *it["negs"]]:
            if id(im) not in img_id:
                img_id[id(im)] = len(images)
                images.append(im)
            if tx not in txt_id:
                txt_id[tx] = len(texts)
                texts.append(tx)
    from tqdm import tqdm

    embs = []
    for i in tqdm(
        range(0, len(images), batch_size), desc="finegrained images", disable=not progress, leave=False
    ):
        embs.append(encoder.encode_image(images[i : i + batch_size]).float())
    img_E = torch.nn.functional.normalize(torch.cat(embs), dim=-1)
    txt_E = embed_texts(encoder, texts, 256, progress, "finegrained texts")
    per: dict[str, dict[str, float]] = {}
    chance: list[float] = []
    for attr in attributes:
        t2i, i2t, k = [], [], 0
        for it in (x for x in items if x["attribute"] == attr):
            pi, pt = img_id[id(it["pos"][0])], txt_id[it["pos"][1]]
            ni = torch.tensor([img_id[id(im)] for im, _ in it["negs"]])
            nt = torch.tensor([txt_id[tx] for _, tx in it["negs"]])
            s_pos = float(img_E[pi] @ txt_E[pt])
            t2i.append(s_pos > float((txt_E[pt] @ img_E[ni].T).max()))
            i2t.append(s_pos > float((img_E[pi] @ txt_E[nt].T).max()))
            chance.append(1 / (1 + len(it["negs"])))
            k += 1
        if k:
            per[attr] = {"t2i": sum(t2i) / k, "i2t": sum(i2t) / k, "n": k}
    metrics: dict[str, Any] = {
        "t2i_mean": sum(v["t2i"] for v in per.values()) / max(len(per), 1),
        "i2t_mean": sum(v["i2t"] for v in per.values()) / max(len(per), 1),
        "chance": sum(chance) / max(len(chance), 1),
    }
    metrics.update(per)
    from engine.synthetic import world_query

    return TaskResult(
        "finegrained",
        f"synthetic://scenes?n={n}&{world_query(seed, size, grid)}",
        f"held-out seed {seed}",
        n,
        metrics,
        settings={"negatives": negatives, "text_lengths": _lengths(encoder, texts)},
        notes=[f"{len(items)} (scene, attribute) items, {len(images)} images, {len(texts)} captions"],
        seconds=time.perf_counter() - t0,
    )


def _lengths(encoder: Any, texts: list[str]) -> dict[str, Any]:
    from eval.embed import text_length_stats

    return text_length_stats(encoder, texts)
