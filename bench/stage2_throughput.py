"""CPU stage-2 training throughput: our VLM step vs transformers' LLaVA at the same sizes.

One training step = forward, next-token loss on the target tokens, backward, AdamW, over the
same batch: synthetic scenes (``engine.synthetic``) with a region-caption, grounding or global
caption sample each (the three stage-2 tasks), tokenized by one byte-level BPE trained here.

* ours: ``FineViTVLMForConditionalGeneration`` built as ``train.stage2.build`` builds it
  (random vision tower in place of a stage-1 checkpoint; the LM a tiny Llama from
  ``train.stage2.make_tiny_lm``; ``<image>``/``<region>`` tokens added), batches from
  ``train.data.regions.collate`` (NaFlex at native aspect, ``max_patches``; images packed first
  fit into rows of ``seq_len`` patches; 2x2 merge -> ~``max_patches / 4`` LM tokens per image;
  a region token after each box), loss ``train.stage2.lm_loss`` (``square``, the default).
  Twice: ``seq_len = max_patches`` (one image per row) and ``4 * max_patches`` (the trainer's
  packing; the stage-2 VLM's vision tower attends with the dense block-diagonal mask).
* llava: ``transformers.LlavaForConditionalGeneration`` from a ``LlavaConfig``: a
  ``CLIPVisionConfig`` of the same width, depth, heads, MLP ratio and patch size, the same
  ``LlamaConfig`` as ours, ``vision_feature_layer=-1``, ``vision_feature_select_strategy=default``
  (LLaVA-1.5: the CLS token dropped, one LM token per patch, 2-layer GELU projector). LLaVA's way
  with images: each resized to a fixed square. Twice: at ``patch * sqrt(max_patches)`` px (the
  same vision patches as ours, 4x our LM image tokens) and at half that side (the same LM image
  tokens as ours, a quarter of the vision work). The prompts and targets are ours token for token
  (our image-token run replaced by LLaVA's); the loss is the same ``lm_loss``.

Threads are pinned to 1 (the machine is shared). Inputs are prepared once; only the step is
timed, in wall time and in this process's CPU time (with one thread the CPU time is the step's
own work, so the ratio holds on a loaded machine; the ratio line uses it). Rates: images/s
(= samples/s) and LM tokens/s (every non-padding LM position, image
tokens included: what the trainer logs as ``tokens_per_s``).

    python bench/stage2_throughput.py [--quick] [--batch 8] [--rounds 5] [--steps 2] [--lm-pack-len 512]

A fourth candidate of ours packs the LM rows too (``data.pack``: several samples per row of
``--lm-pack-len`` tokens, positions restarting per sample); its line compares it with the
unpacked LM rows at the same vision packing.

Prints a table (candidate, median, min, max, unit) and the ratio line: ours (trainer packing)
vs LLaVA at the same vision patches, in images/s.
"""

from __future__ import annotations

import argparse
import copy
import io
import math
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

from engine.synthetic import dense_caption, make_scene, region_annotations, render_scene
from train.data.regions import Sample, box_text, collate, prompt_for
from train.model.vlm import (
    IMAGE_TOKEN,
    REGION_TOKEN,
    FineViTVLMConfig,
    FineViTVLMForConditionalGeneration,
    FineViTVLMProcessor,
)
from train.stage2 import lm_loss, load_lm, make_tiny_lm, model_inputs

MEAN = STD = (0.5, 0.5, 0.5)


def train_tokenizer(out: Path, vocab: int) -> Path:
    """The project's byte-level BPE on synthetic captions (dense, alt-text and region captions)."""
    from engine.synthetic import alt_text
    from train.tokenizer import train_tokenizer_on

    texts = []
    for i in range(300):
        s = make_scene(99, i, 64)
        texts += [dense_caption(s), alt_text(s)] + [r["caption"] for r in region_annotations(s)]
    train_tokenizer_on(texts, vocab, str(out))
    return out


def build_ours(a: argparse.Namespace, lm_dir: str) -> tuple[FineViTVLMForConditionalGeneration, Any]:
    """``train.stage2.build`` without the stage-1 checkpoint: the same config, projector and LM."""
    lm, tok = load_lm(lm_dir)
    missing = [t for t in (IMAGE_TOKEN, REGION_TOKEN) if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if len(tok) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tok))
    vision = {
        "vision": {"width": a.width, "depth": a.depth, "heads": a.width // 64, "patch_size": a.patch},
        "text": {"width": a.width, "depth": 1, "heads": a.width // 64, "context": 16},
        "embed_dim": a.width,
    }
    from train.config import ModelConfig

    model_cfg = ModelConfig.model_validate(vision)
    preprocess = {"patch_size": a.patch, "max_patches": a.max_patches, "mean": list(MEAN), "std": list(STD)}
    vcfg = FineViTVLMConfig(
        vision=model_cfg.model_dump(mode="json"),
        preprocess=preprocess,
        lm_config=lm.config.to_dict(),
        image_token=IMAGE_TOKEN,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layers=[-1],
        projector_abs_pos=True,
        region_token=REGION_TOKEN,
        region_token_id=tok.convert_tokens_to_ids(REGION_TOKEN),
    )
    lm_sd = {k: v.clone() for k, v in lm.state_dict().items()}
    model = FineViTVLMForConditionalGeneration(vcfg, language_model=lm)
    model.language_model.load_state_dict(lm_sd)
    return model, FineViTVLMProcessor(tok, preprocess, IMAGE_TOKEN, REGION_TOKEN)


def build_llava(model: FineViTVLMForConditionalGeneration, a: argparse.Namespace, side: int, image_id: int):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = model.vision.cfg
    vision_config = CLIPVisionConfig(
        hidden_size=vc.width,
        num_hidden_layers=vc.depth,
        num_attention_heads=vc.heads,
        intermediate_size=int(vc.width * vc.mlp_ratio),
        image_size=side,
        patch_size=vc.patch_size,
    )
    cfg = LlavaConfig(
        vision_config=vision_config,
        text_config=model.language_model.config,
        image_token_index=image_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).train()


def scene_batch(n: int, size: int, seed: int) -> tuple[list[Sample], dict[str, bytes]]:
    """``n`` synthetic scenes as PNGs, each with one sample of the three stage-2 tasks in turn."""
    samples, images = [], {}
    for i in range(n):
        scene = make_scene(seed, i, size)
        buf = io.BytesIO()
        render_scene(scene).save(buf, "PNG")
        key = f"{seed}-{i}"
        images[key] = buf.getvalue()
        region = region_annotations(scene)[0]
        box = (region["x0"], region["y0"], region["x1"], region["y1"])
        task = ("box_caption", "caption_box", "global")[i % 3]
        if task == "box_caption":
            prompt, target = prompt_for(task, box=box), region["caption"]
        elif task == "caption_box":
            prompt, target = prompt_for(task, caption=region["caption"]), box_text(box)
        else:
            prompt, target = prompt_for(task), dense_caption(scene)
        samples.append(Sample(key, "s", task, prompt, target))
    return samples, images


def llava_inputs(b: dict[str, Any], images: list[Image.Image], side: int, image_id: int, n_img: int):
    """Our batch for LLaVA: the same prompt/target tokens with ``n_img`` image tokens per sample,
    and the images resized to a ``side`` square (normalized as ours)."""
    ids_rows, lab_rows = [], []
    for ids, lab, m in zip(b["input_ids_BL"], b["labels_BL"], b["mask_BL"], strict=True):
        n = int(m.sum())
        ids, lab = ids[:n].tolist(), lab[:n].tolist()
        at = ids.index(image_id)
        end = at + sum(1 for t in ids if t == image_id)
        ids_rows.append(ids[:at] + [image_id] * n_img + ids[end:])
        lab_rows.append(lab[:at] + [-100] * n_img + lab[end:])
    L = max(map(len, ids_rows))
    input_ids = torch.zeros(len(ids_rows), L, dtype=torch.long)
    labels = torch.full((len(ids_rows), L), -100, dtype=torch.long)
    mask = torch.zeros(len(ids_rows), L, dtype=torch.long)
    for r, (ids, lab) in enumerate(zip(ids_rows, lab_rows, strict=True)):
        input_ids[r, : len(ids)], labels[r, : len(lab)], mask[r, : len(ids)] = (
            torch.tensor(ids),
            torch.tensor(lab),
            1,
        )
    px = torch.stack(
        [
            (torch.frombuffer(bytearray(im.resize((side, side), Image.BICUBIC).tobytes()), dtype=torch.uint8))
            .view(side, side, 3)
            .permute(2, 0, 1)
            .float()
            .div(255)
            for im in images
        ]
    )
    px = (px - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return input_ids, mask, labels, px


def ours_step(model, b: dict[str, Any]):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    packed = b["position_ids_BL"] is not None

    def step() -> float:
        out = model(**model_inputs(b, torch.device("cpu")))
        loss = lm_loss(out.logits, b["labels_BL"], "square", b["sample_BL"] if packed else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def llava_step(model, input_ids, mask, labels, px):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> float:
        out = model(input_ids=input_ids, attention_mask=mask, pixel_values=px)
        loss = lm_loss(out.logits, labels, "square")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--width", type=int, default=192, help="vision width (heads = width / 64)")
    ap.add_argument("--depth", type=int, default=6, help="vision depth")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument(
        "--max-patches", type=int, default=196, help="NaFlex budget; LLaVA's square holds as many"
    )
    ap.add_argument("--lm-hidden", type=int, default=256)
    ap.add_argument("--lm-layers", type=int, default=4)
    ap.add_argument("--lm-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--lm-pack-len", type=int, default=512, help="LM row length of the data.pack candidate (max_len)"
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=2, help="steps per timed round")
    a = ap.parse_args()
    if a.quick:  # a smoke run: smaller everything, same comparison
        a.width, a.depth, a.max_patches, a.lm_hidden, a.lm_layers, a.lm_heads = 64, 2, 64, 64, 2, 2
        a.vocab, a.batch, a.rounds, a.steps = 512, 4, 2, 1
    torch.set_num_threads(1)
    torch.manual_seed(0)
    side = a.patch * math.isqrt(a.max_patches)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = train_tokenizer(Path(tmp) / "tok", a.vocab)
        lm_dir = make_tiny_lm(
            str(tok_dir), str(Path(tmp) / "lm"), "llama", a.lm_hidden, a.lm_layers, a.lm_heads, context=2048
        )
        model, proc = build_ours(a, lm_dir)
    model.train()
    samples, images = scene_batch(a.batch, side + side // 4, seed=7)
    stats: Counter = Counter()
    t = time.perf_counter()
    b1 = collate(samples, images, proc, 2048, a.max_patches, stats)
    t_collate = time.perf_counter() - t
    b4 = collate(samples, images, proc, 2048, 4 * a.max_patches, Counter())
    image_id = proc.image_token_id
    pil = [Image.open(io.BytesIO(images[s.key])).convert("RGB") for s in samples]
    n_ours = int((b1["input_ids_BL"] == image_id).sum())
    cands: dict[str, Any] = {}
    tokens: dict[str, int] = {}
    cands["ours (1 image/row)"], tokens["ours (1 image/row)"] = ours_step(model, b1), int(b1["mask_BL"].sum())

    model4 = copy.deepcopy(model)
    cands["ours (packed 4x max_patches)"] = ours_step(model4, b4)
    tokens["ours (packed 4x max_patches)"] = int(b4["mask_BL"].sum())
    # data.pack: the LM rows packed too (several samples per row of lm_pack_len tokens)
    bp = collate(samples, images, proc, a.lm_pack_len, 4 * a.max_patches, Counter(), pack=True)
    cands["ours (+ LM rows packed)"] = ours_step(copy.deepcopy(model), bp)
    tokens["ours (+ LM rows packed)"] = int(bp["mask_BL"].sum())
    padded = {
        "ours (packed 4x max_patches)": b4["padded_tokens"],
        "ours (+ LM rows packed)": bp["padded_tokens"],
    }
    for px_side, label in ((side, f"llava @{side}px (same patches)"), (side // 2, f"llava @{side // 2}px")):
        n_img = (px_side // a.patch) ** 2
        llava = build_llava(model, a, px_side, image_id)
        ids, mask, labels, px = llava_inputs(b1, pil, px_side, image_id, n_img)
        cands[label], tokens[label] = llava_step(llava, ids, mask, labels, px), int(mask.sum())
    lm_params = sum(p.numel() for p in model.language_model.parameters())
    print(
        f"threads={torch.get_num_threads()} vision w{a.width}/d{a.depth}/p{a.patch}, max_patches "
        f"{a.max_patches} (ours NaFlex, {int(b1['patch_tokens'])} real patches in the batch; llava "
        f"{side}px = {(side // a.patch) ** 2}/image), Llama h{a.lm_hidden}/l{a.lm_layers} "
        f"({lm_params / 1e6:.2f}M), vocab {len(proc.tokenizer)}, batch {a.batch}, "
        f"rounds={a.rounds} x {a.steps} steps"
    )
    print(
        "LM tokens per step: "
        + ", ".join(f"{k} {v}" for k, v in tokens.items())
        + f"; ours image tokens {n_ours}, target tokens {int((b1['labels_BL'] != -100).sum())}; "
        f"our collate (decode, patchify, tokenize, pack) {t_collate * 1e3:.0f} ms/batch, not timed below"
    )
    for fn in cands.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {k: [] for k in cands}
    cpu_rates: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(a.rounds):  # A B C D A B C D ...
        for name, fn in cands.items():
            t, c = time.perf_counter(), time.process_time()
            for _ in range(a.steps):
                fn()
            rates[name].append(a.batch * a.steps / (time.perf_counter() - t))
            cpu_rates[name].append(a.batch * a.steps / (time.process_time() - c))
    w = max(map(len, cands)) + 2
    print(f"{'candidate':<{w}}{'median':>10}{'min':>10}{'max':>10}  unit")
    for name, xs in rates.items():
        print(f"{name:<{w}}{statistics.median(xs):>10.2f}{min(xs):>10.2f}{max(xs):>10.2f}  images/s")
    # one thread: CPU seconds of this process are the step's own work, whatever else the machine runs
    for name, xs in cpu_rates.items():
        print(f"{name:<{w}}{statistics.median(xs):>10.2f}{min(xs):>10.2f}{max(xs):>10.2f}  images/cpu-s")
    for name, xs in rates.items():
        k = tokens[name] / a.batch
        print(
            f"{name:<{w}}{statistics.median(xs) * k:>10.0f}{min(xs) * k:>10.0f}{max(xs) * k:>10.0f}  LM tokens/s"
        )
    med = {k: statistics.median(v) for k, v in cpu_rates.items()}
    names = [k for k in cands if k != "ours (+ LM rows packed)"]  # the LLaVA comparison as before
    lp, lu = "ours (+ LM rows packed)", "ours (packed 4x max_patches)"
    print(
        f"data.pack: LM rows packed {med[lp] / med[lu]:.2f}x unpacked in images/cpu-s ({med[lp]:.2f} / "
        f"{med[lu]:.2f}); LM positions computed {padded[lp]} vs {padded[lu]} for {tokens[lu]} real tokens "
        f"({bp['input_ids_BL'].shape[0]} rows of <= {a.lm_pack_len} vs {b4['input_ids_BL'].shape[0]} rows)"
    )
    print(
        f"cpu stage2 throughput (CPU time): ours (packed) {med[names[1]] / med[names[2]]:.2f}x llava at the "
        f"same vision patches, {med[names[1]] / med[names[3]]:.2f}x llava at the same LM image tokens "
        f"({med[names[1]]:.2f} / {med[names[2]]:.2f} / {med[names[3]]:.2f} images/cpu-s; "
        f"1 image/row {med[names[0]] / med[names[2]]:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
