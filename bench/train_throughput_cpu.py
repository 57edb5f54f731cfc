"""CPU training throughput: our stage 1 model vs OpenCLIP at the same width, depth and tokens.

Both train a SigLIP step (forward, sigmoid loss, backward, AdamW) on 224 px images (196 patch
tokens each; OpenCLIP adds a class token) and captions of ``--context`` tokens, with the same
vision/text width and depth. Ours runs the packed path twice: one image per row (``seq_len=196``,
the same attention work as OpenCLIP) and four images per row (``seq_len=784``, the packing a
native-resolution batch uses), with the backend the trainer picks on CPU (``sdpa_docs``:
attention per image, so a packed row costs what its images cost; before 2026-11-28 this script
used the dense block-diagonal mask, which computes 4x the attention scores at 4 images per row).

OpenCLIP (``open_clip_torch``, bench extra) is configured as its docs show for a custom
``CLIP`` (``vision_cfg``/``text_cfg``, ``init_logit_bias=-10`` and ``SigLipLoss`` for SigLIP).
It imports torchvision; where only a CUDA torchvision wheel exists, install both with
``--no-deps`` (e.g. ``pip install --no-deps --target DIR torchvision open_clip_torch ftfy wcwidth``
and pass ``--deps DIR``): this script puts stand-ins for torchvision's compiled registrations in
``sys.modules`` first (shared/KNOWN-TRAPS.md).

    python bench/train_throughput_cpu.py [--quick] [--deps DIR]

Prints a table (candidate, median, min, max, unit) and the ratio line (target >= 1.0x).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from train.config import ModelConfig, TextConfig, VisionConfig
from train.data.packing import assemble
from train.losses import sigmoid_loss
from train.model.attention import pick_backend
from train.model.towers import Stage1Model

VOCAB = 1024


DEFAULT_DEPS = Path(__file__).resolve().parents[1] / ".bench-deps"  # `make bench-deps` fills it


def import_open_clip(deps: str | None):
    deps = deps or (str(DEFAULT_DEPS) if DEFAULT_DEPS.is_dir() else None)
    if deps:
        sys.path.insert(0, deps)
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules.setdefault(name, types.ModuleType(name))
    try:
        import open_clip
    except ImportError as e:
        raise SystemExit(
            f"OpenCLIP, the anchor, is not importable ({e}): run `make bench-deps` or pass --deps DIR"
        ) from None
    return open_clip


def ours_step(width: int, depth: int, context: int, batch: int, per_row: int):
    cfg = ModelConfig(
        vision=VisionConfig(width=width, depth=depth, heads=width // 64, patch_size=16),
        text=TextConfig(width=width, depth=depth, heads=width // 64, context=context),
        embed_dim=width,
    )
    # the backend the trainer picks on CPU (sdpa_docs: attention per image, no dense row mask)
    model = Stage1Model(cfg, VOCAB, pick_backend("auto", "cpu")).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gh = gw = 14
    pos = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1).reshape(-1, 2)
    rows = [[(torch.randn(gh * gw, 768), pos) for _ in range(per_row)] for _ in range(batch // per_row)]
    vision, _ = assemble(rows, gh * gw * per_row, batch, 768)
    tokens = torch.randint(4, VOCAB, (batch, context))
    mask = torch.ones(batch, context, dtype=torch.bool)
    valid = torch.ones(batch, dtype=torch.bool)

    def step() -> float:
        img, txt, scale, bias = model(vision, tokens, mask)
        loss, _ = sigmoid_loss(img, txt, valid, scale, bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def open_clip_step(open_clip, width: int, depth: int, context: int, batch: int):
    model = open_clip.CLIP(
        embed_dim=width,
        vision_cfg={"image_size": 224, "patch_size": 16, "width": width, "layers": depth, "head_width": 64},
        text_cfg={
            "context_length": context,
            "vocab_size": VOCAB,
            "width": width,
            "layers": depth,
            "heads": width // 64,
        },
        init_logit_bias=-10.0,
        output_dict=True,
    ).train()
    loss_fn = open_clip.loss.SigLipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, 224, 224)
    tokens = torch.randint(4, VOCAB, (batch, context))

    def step() -> float:
        out = model(images, tokens)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--deps", help="a folder holding open_clip_torch + torchvision installed with --target")
    ap.add_argument("--width", type=int, default=192)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    torch.manual_seed(0)
    open_clip = import_open_clip(a.deps)
    rounds, steps = (3, 1) if a.quick else (7, 3)
    if a.quick:  # a smoke run: smaller towers, same comparison
        a.width, a.depth, a.context, a.batch = 128, 2, 128, 8
    cands = {
        "ours (packed, 1 image/row)": ours_step(a.width, a.depth, a.context, a.batch, 1),
        "ours (packed, 4 images/row)": ours_step(a.width, a.depth, a.context, a.batch, 4),
        "open_clip CLIP + SigLipLoss": open_clip_step(open_clip, a.width, a.depth, a.context, a.batch),
    }
    for fn in cands.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):  # A B C A B C ...
        for name, fn in cands.items():
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            rates[name].append(a.batch * steps / (time.perf_counter() - t))
    print(
        f"threads={torch.get_num_threads()} width={a.width} depth={a.depth} context={a.context} "
        f"batch={a.batch} images of 196 tokens, rounds={rounds} x {steps} steps"
    )
    print(f"{'candidate':<32}{'median':>10}{'min':>10}{'max':>10}  unit")
    for name, xs in rates.items():
        print(f"{name:<32}{statistics.median(xs):>10.2f}{min(xs):>10.2f}{max(xs):>10.2f}  images/s")
    toks = 196 + a.context
    for name, xs in rates.items():
        print(
            f"{name:<32}{statistics.median(xs) * toks:>10.0f}{min(xs) * toks:>10.0f}{max(xs) * toks:>10.0f}  tokens/s"
        )
    base = statistics.median(rates["open_clip CLIP + SigLipLoss"])
    one, four = (statistics.median(rates[k]) for k in list(cands)[:2])
    print(
        f"cpu train throughput: {one / base:.2f}x open_clip at equal tokens (1 image/row), "
        f"{four / base:.2f}x with 4 images/row ({one:.1f} / {four:.1f} / {base:.1f} images/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
