"""Stage-2 options side by side: each variant (a recipe + ``--set`` overrides) trained in turn, then
scored on held-out scenes by :mod:`train.stage2_eval` (and once more with every image blanked, which
says how much of the score comes from the pixels).

    python -m train.stage2_sweep --config configs/stage2_tiny_cpu.yaml --init STAGE1_RUN --lm LM_DIR \\
        --dataset SCENES --held-out HELD_OUT --out /tmp/sweep \\
        --variant base= --variant layers0=projector.feature_layers=[0,-1] ...

A variant is ``NAME=OVERRIDE[;OVERRIDE...]``. One row per variant: wall seconds, last loss,
box->caption accuracy (colour+shape, colour, shape), caption->box IoU, with standard errors, and
the same model's box->caption accuracy on blank images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from PIL import Image


def blank(items: list) -> list:
    """The items with every image replaced by a plain grey one of the same size (bytes re-encoded)."""
    import io

    out = []
    for b, box, cap in items:
        with Image.open(io.BytesIO(b)) as im:
            size = im.size
        buf = io.BytesIO()
        Image.new("RGB", size, (200, 200, 200)).save(buf, "PNG")
        out.append((buf.getvalue(), box, cap))
    return out


def run_variant(name: str, sets: list[str], a: argparse.Namespace) -> dict:
    from engine.config import load_config
    from train.stage2 import Stage2Config, load_stage2, train_stage2
    from train.stage2_eval import evaluate_model, held_out_regions

    log_dir = str(Path(a.out) / name)
    base = [
        f"init.checkpoint={a.init}",
        f"lm.path={a.lm}",
        f"data.dataset={a.dataset}",
        f"log.dir={log_dir}",
        "loop.threads=1",
        "log.progress=false",
    ]
    if a.steps:
        base.append(f"loop.steps={a.steps}")
    cfg = load_config(a.config, base + sets, Stage2Config)
    t0 = time.perf_counter()
    res = train_stage2(cfg, on_event=lambda m: print(f"[{name}] {m}", file=sys.stderr, flush=True))
    secs = time.perf_counter() - t0
    model, proc, _ = load_stage2(log_dir)
    items = held_out_regions(a.held_out, a.limit)
    row = {"variant": name, "sets": sets, "seconds": round(secs, 1), "steps": res.steps}
    row["last_loss"] = round(sum(res.losses[-20:]) / max(len(res.losses[-20:]), 1), 3)
    row |= evaluate_model(model, proc, items)
    blind = evaluate_model(model, proc, blank(items), tasks=("box",))
    row |= {"blank_box_caption_acc": blind["box_caption_acc"], "blank_colour_acc": blind["colour_acc"]}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/stage2_tiny_cpu.yaml")
    ap.add_argument("--init", required=True)
    ap.add_argument("--lm", required=True)
    ap.add_argument("--dataset", required=True)
    ap.add_argument("--held-out", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=0)
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--variant", action="append", default=[], help="NAME=OVERRIDE[;OVERRIDE...]")
    a = ap.parse_args(argv)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for v in a.variant or ["base="]:
        name, _, rest = v.partition("=")
        sets = [s for s in rest.split(";") if s]
        row = run_variant(name, sets, a)
        rows.append(row)
        with open(Path(a.out) / "sweep.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    keys = ("box_caption_acc", "colour_acc", "shape_acc", "caption_box_iou", "blank_box_caption_acc")
    print(f"{'variant':16} {'s':>6} {'loss':>6} " + " ".join(f"{k:>12.12}" for k in keys))
    for r in rows:
        print(
            f"{r['variant']:16} {r['seconds']:6.0f} {r['last_loss']:6.3f} "
            + " ".join(f"{r[k]:12.3f}" for k in keys)
        )
    r = rows[0]
    print(
        f"chance: box->caption {r['box_caption_chance']:.3f} (colour {r['colour_chance']:.3f}, shape "
        f"{r['shape_chance']:.3f}), caption->box IoU {r['caption_box_chance_iou']:.3f} (words only "
        f"{r['caption_box_text_iou']:.3f}); {r['regions']} held-out regions"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
