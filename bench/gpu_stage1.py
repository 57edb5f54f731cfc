"""Stage 1 on a GPU: attention backend agreement in bf16, then ViT-B/16 training throughput + MFU per backend.

Prepared for the ``device`` tool (one H100/H200); runs on a CPU too, where it checks only the
CPU backends and times nothing it cannot (``--quick`` shrinks everything).

    python bench/gpu_stage1.py [--quick] [--steps 20] [--rows 8] [--seq-len 4096]

Part 1, correctness: for every backend available on the device, packed attention over a
realistic document mix in bf16, forward and backward, against a float64 SDPA block-diagonal
reference; prints max abs error and passes when within bf16 tolerance (exits 1 otherwise).
Part 2, speed: a ViT-B/16 vision tower + B text tower (the stage1_vit_b16 recipe), bf16
autocast, SigLIP loss, AdamW; per backend: images/s, tokens/s, TFLOP/s and MFU against the
card's peak (train.metrics.PEAK_TFLOPS). Table (candidate, median, min, max, unit), then the
ratio line: best backend's MFU (target >= 40 % on an H100).
Part 3, FSDP2 mixed precision (``--fsdp``, on by default on CUDA): the best backend again, its
model wrapped by the trainer's own ``train.stage1.shard_fsdp`` (bf16 parameters gathered and
computed, fp32 sharded parameters, optimizer state and gradient reduction), in a process group of
its own (one process: ``torchrun --nproc-per-node N bench/gpu_stage1.py`` shards over N). Checked
first: one step's loss against the unsharded bf16-autocast step from the same weights and batch
(relative difference < 2e-2), then timed like part 2: the ratio line gains ``fsdp-bf16 / plain``.
Part 4, stage 2 (``--stage2``, on by default on CUDA): our VLM (the part-2 vision tower at
``--max-patches``, a random Llama ``--lm-hidden``/``--lm-layers``) on ``collate`` batches of
synthetic scenes, bf16 autocast: images/s, LM tokens/s and the LM's MFU (the trainer's
``mfu_lm``: 3 x ``train.stage2.lm_flops_per_token`` per token); line ``gpu stage2: X % LM MFU``.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from train.config import ModelConfig, TextConfig, VisionConfig
from train.data.naflex import grid_for
from train.data.packing import assemble, plan_rows
from train.losses import sigmoid_loss
from train.metrics import peak_tflops, step_flops
from train.model.attention import BACKENDS, backend_available, meta_from_segments, packed_attention
from train.model.towers import Stage1Model
from train.stage1 import shard_fsdp


def doc_mix(rows: int, seq_len: int, max_patches: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    ratios = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (3, 2), (2, 3)]

    def size() -> int:
        a, b = rng.choice(ratios)
        long = rng.randint(128, 2048)
        w, h = (long, long * b // a) if a >= b else (long * a // b, long)
        gh, gw = grid_for(w, h, 16, max_patches)
        return gh * gw

    pool: list[int] = []

    def refill() -> None:
        while len(pool) < 64:
            pool.append(size())

    return plan_rows(pool, lambda n: n, refill, rows, seq_len, 10_000)


def check_agreement(device: torch.device, rows: int, seq_len: int, heads: int, head_dim: int) -> bool:
    plan = doc_mix(rows, seq_len, 256)
    seg = torch.empty(rows, seq_len, dtype=torch.long)
    doc = 0
    for r, row in enumerate(plan):
        at = 0
        for n in row + [seq_len - sum(row)]:
            seg[r, at : at + n] = doc
            at, doc = at + n, doc + 1
    meta = meta_from_segments(seg, max_seqlen=seq_len)
    T = rows * seq_len
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, heads, head_dim, generator=g, dtype=torch.float64) for _ in range(3))
    dout = torch.randn(T, heads, head_dim, generator=g, dtype=torch.float64)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = packed_attention(*ref_in, meta, "sdpa_dense")
    ref_grads = torch.autograd.grad(ref, ref_in, dout)
    ok = True
    print(f"{'backend':<12}{'fwd max err':>14}{'bwd max err':>14}  result (bf16 vs float64 reference)")
    for name in BACKENDS:
        if not backend_available(name, device):
            print(f"{name:<12}{'-':>14}{'-':>14}  not available on {device.type}")
            continue
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        ins = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
        bwd_err = float("nan")
        try:
            out = packed_attention(*ins, meta.to(device), name)
            grads = torch.autograd.grad(out, ins, dout.to(device, dtype))
            bwd_err = max(
                (a.double().cpu() - b).abs().max().item() for a, b in zip(grads, ref_grads, strict=True)
            )
        except NotImplementedError:  # FlexAttention backward on CPU: check the forward alone
            with torch.no_grad():
                out = packed_attention(*(x.detach() for x in ins), meta.to(device), name)
        fwd_err = (out.detach().double().cpu() - ref.detach()).abs().max().item()
        tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
        good = fwd_err < tol and (bwd_err != bwd_err or bwd_err < tol * 4)
        ok &= good
        print(f"{name:<12}{fwd_err:>14.2e}{bwd_err:>14.2e}  {'ok' if good else 'MISMATCH'}")
    return ok


def bench_backend(
    name: str, device: torch.device, a: argparse.Namespace, fsdp: bool = False
) -> dict[str, list[float]]:
    """Time training steps of ``name``; ``fsdp``: the model sharded by the trainer's FSDP2 with the
    bf16 mixed-precision policy (after a one-step loss check against the plain model)."""
    cfg = ModelConfig(
        vision=VisionConfig(width=a.width, depth=a.depth, heads=a.width // 64),
        text=TextConfig(width=a.width, depth=a.depth, heads=a.width // 64, context=a.context),
        embed_dim=a.width,
        attention=name,
    )
    torch.manual_seed(0)
    model = Stage1Model(cfg, 32000, name).to(device).train()
    plain = copy.deepcopy(model) if fsdp else None
    dtype = torch.bfloat16 if device.type == "cuda" or fsdp else None
    if fsdp:
        shard_fsdp(model, torch.bfloat16)  # what loop.parallel=fsdp does on a bf16 run
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    plan = doc_mix(a.rows, a.seq_len, a.max_patches)
    rows = [
        [
            (
                torch.randn(n, 768),
                torch.stack(torch.meshgrid(torch.arange(1), torch.arange(n), indexing="ij"), -1).reshape(
                    -1, 2
                ),
            )
            for n in row
        ]
        for row in plan
    ]
    n_img = sum(map(len, rows))
    vision, real = assemble(rows, a.seq_len, n_img, 768)
    vision = vision.to(device)
    tokens = torch.randint(4, 32000, (n_img, a.context), device=device)
    mask = torch.ones(n_img, a.context, dtype=torch.bool, device=device)
    valid = torch.ones(n_img, dtype=torch.bool, device=device)
    flops = step_flops(cfg, real, [n for row in plan for n in row], n_img * a.context, [a.context] * n_img)
    peak = peak_tflops(device, dtype or torch.float32)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            img, txt, scale, bias = model(vision, tokens, mask)
        loss, _ = sigmoid_loss(img, txt, valid, scale, bias)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    if plain is not None:  # correctness first: the sharded bf16 step's loss vs the plain bf16 one
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            img, txt, scale, bias = model(vision, tokens, mask)
            got = sigmoid_loss(img, txt, valid, scale, bias)[0]
            img, txt, scale, bias = plain(vision, tokens, mask)
            want = sigmoid_loss(img, txt, valid, scale, bias)[0]
        rel = abs(float(got) - float(want)) / max(abs(float(want)), 1e-6)
        print(f"fsdp-bf16 {name}: loss {float(got):.5f} vs plain {float(want):.5f} (rel {rel:.1e})")
        if rel > 2e-2:
            raise AssertionError(f"fsdp-bf16 loss differs from the plain model by {rel:.1e}")
        del plain

    for _ in range(3):
        step()
    sync()
    out: dict[str, list[float]] = {"images/s": [], "tokens/s": [], "TFLOP/s": [], "MFU %": []}
    for _ in range(a.rounds):
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync()
        dt = (time.perf_counter() - t) / a.steps
        out["images/s"].append(n_img / dt)
        out["tokens/s"].append(real / dt)
        out["TFLOP/s"].append(flops / dt / 1e12)
        out["MFU %"].append(100 * flops / dt / 1e12 / peak)
    return out


def bench_stage2(device: torch.device, a: argparse.Namespace) -> dict[str, list[float]]:
    """Part 4: one stage-2 training step of our VLM (``bench/stage2_throughput.py``'s build: the
    vision tower of part 2 at ``--max-patches``, a random Llama of ``--lm-hidden``/``--lm-layers``,
    ``train.data.regions.collate`` batches of synthetic scenes packed into rows of 4x max_patches),
    bf16 autocast as the trainer runs it; MFU from ``train.stage2.lm_flops_per_token`` (the LM's
    matmuls only, 3x forward for forward + backward: the trainer's ``mfu_lm``)."""
    import math
    import tempfile
    from collections import Counter

    from stage2_throughput import build_ours, scene_batch, train_tokenizer

    from train.data.regions import collate
    from train.stage2 import lm_flops_per_token, lm_loss, make_tiny_lm

    s2 = argparse.Namespace(width=a.width, depth=a.depth, patch=16, max_patches=a.max_patches)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(Path(tmp) / "tok", 1024)
        lm_dir = make_tiny_lm(
            str(tok), str(Path(tmp) / "lm"), "llama", a.lm_hidden, a.lm_layers, a.lm_hidden // 64, 4096
        )
        model, proc = build_ours(s2, lm_dir)
    model.to(device).train()
    side = 16 * math.isqrt(a.max_patches)
    samples, images = scene_batch(a.s2_batch, side + side // 4, seed=7)
    b = collate(samples, images, proc, 4096, 4 * a.max_patches, Counter())
    vision, ids = b["vision"].to(device), b["input_ids_BL"].to(device)
    mask, labels = b["mask_BL"].to(device), b["labels_BL"].to(device)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda"
    )
    dtype = torch.bfloat16
    tokens = int(b["real_tokens"])
    flops = 3 * lm_flops_per_token(model) * tokens
    peak = peak_tflops(device, dtype)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype):
            out = model(
                input_ids=ids,
                attention_mask=mask,
                vision=vision,
                spans=b["spans"],
                region_boxes=b["region_boxes"],
            )
            loss = lm_loss(out.logits, labels, "square")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    sync()
    out: dict[str, list[float]] = {"images/s": [], "LM tokens/s": [], "LM TFLOP/s": [], "MFU (LM) %": []}
    for _ in range(a.rounds):
        t = time.perf_counter()
        for _ in range(a.steps):
            step()
        sync()
        dt = (time.perf_counter() - t) / a.steps
        out["images/s"].append(len(b["spans"]) / dt)
        out["LM tokens/s"].append(tokens / dt)
        out["LM TFLOP/s"].append(flops / dt / 1e12)
        out["MFU (LM) %"].append(100 * flops / dt / 1e12 / peak)
    return out


def init_group(device: torch.device) -> None:
    """A process group for FSDP2: torchrun's, or a one-process one (nccl on CUDA, gloo on CPU)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--max-patches", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--fsdp",
        choices=["auto", "on", "off"],
        default="auto",
        help="part 3, FSDP2 bf16 mixed precision (auto: on CUDA or under torchrun)",
    )
    ap.add_argument(
        "--stage2",
        choices=["auto", "on", "off"],
        default="auto",
        help="part 4, a stage-2 VLM step in bf16 with the LM's MFU (auto: on CUDA)",
    )
    ap.add_argument("--lm-hidden", type=int, default=1024, help="part 4: the Llama's width (heads = /64)")
    ap.add_argument("--lm-layers", type=int, default=12, help="part 4: the Llama's depth")
    ap.add_argument("--s2-batch", type=int, default=64, help="part 4: samples per step")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if a.quick or device.type != "cuda":
        a.width, a.depth, a.context, a.rows, a.seq_len, a.max_patches = 128, 2, 64, 2, 512, 128
        a.steps, a.rounds = 2, 3
        a.lm_hidden, a.lm_layers, a.s2_batch = 64, 2, 4
    print(f"device: {name}, torch {torch.__version__}")
    print("== part 1: backend agreement ==")
    ok = check_agreement(device, 2, min(a.seq_len, 1024), 4, 64)
    if not ok:
        print("backend agreement FAILED: not timing")
        return 1
    print(
        f"== part 2: training step, vision w{a.width}/d{a.depth} + text ctx {a.context}, "
        f"{a.rows} rows x {a.seq_len} tokens =="
    )
    results = {}
    for backend in BACKENDS:
        if not backend_available(backend, device):
            continue
        if backend == "flex" and device.type != "cuda":
            continue  # no backward on CPU
        if backend == "sdpa_dense" and device.type == "cuda" and a.seq_len > 8192:
            continue
        try:
            results[backend] = bench_backend(backend, device, a)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:
            print(f"{backend}: failed: {type(e).__name__}: {str(e)[:200]}")
    fsdp = a.fsdp == "on" or (a.fsdp == "auto" and (device.type == "cuda" or "WORLD_SIZE" in os.environ))
    if fsdp and results:
        best = max(results, key=lambda b: statistics.median(results[b]["MFU %"]))
        print(f"== part 3: FSDP2 bf16 params / fp32 reduce, backend {best} ==")
        init_group(device)
        try:
            results[f"fsdp-bf16 {best}"] = bench_backend(best, device, a, fsdp=True)
        except Exception as e:
            print(f"fsdp-bf16 {best}: failed: {type(e).__name__}: {str(e)[:300]}")
    if a.stage2 == "on" or (a.stage2 == "auto" and device.type == "cuda"):
        print(
            f"== part 4: stage-2 VLM step, bf16, vision w{a.width}/d{a.depth} @ {a.max_patches} patches, "
            f"Llama h{a.lm_hidden}/l{a.lm_layers}, {a.s2_batch} samples =="
        )
        try:
            results["stage2 vlm"] = bench_stage2(device, a)
            print(
                f"gpu stage2: {statistics.median(results['stage2 vlm']['MFU (LM) %']):.1f} % LM MFU on {name}"
            )
        except Exception as e:
            print(f"stage2 vlm: failed: {type(e).__name__}: {str(e)[:300]}")
    print(f"{'candidate':<24}{'median':>12}{'min':>12}{'max':>12}  unit")
    for backend, res in results.items():
        for unit, xs in res.items():
            print(f"{backend:<24}{statistics.median(xs):>12.4g}{min(xs):>12.4g}{max(xs):>12.4g}  {unit}")
    plain = {k: v for k, v in results.items() if not k.startswith(("fsdp", "stage2"))}
    if plain:
        best = max(plain, key=lambda b: statistics.median(results[b]["MFU %"]))
        mfu = statistics.median(results[best]["MFU %"])
        ref = statistics.median(results.get("sdpa_dense", results[best])["images/s"])
        print(
            f"gpu stage1: best backend {best}: {mfu:.1f} % MFU on {name} (target >= 40 % on H100), "
            f"{statistics.median(results[best]['images/s']) / ref:.2f}x sdpa_dense images/s"
            + (
                f", fsdp-bf16 / plain {statistics.median(results[f'fsdp-bf16 {best}']['images/s']) / statistics.median(results[best]['images/s']):.2f}x images/s"
                if f"fsdp-bf16 {best}" in results
                else ""
            )
        )
        if device.type == "cuda" and not a.quick and int(os.environ.get("RANK", "0")) == 0:
            record_train_rate(statistics.median(results[best]["images/s"]), name, best, a)
    return 0


def record_train_rate(
    img_s: float, device_name: str, backend: str, a: argparse.Namespace, path: Path | None = None
) -> None:
    """One GPU's stage-1 images/s into bench/results.jsonl, where `finevit plan` reads it."""
    import datetime

    from engine.capacity import BenchFigure, record_bench_figure

    path = path or Path(__file__).resolve().parent / "results.jsonl"
    fig = BenchFigure(
        figure="train_img_s",
        value=round(img_s, 2),
        bench="gpu_stage1.py",
        device=device_name,
        date=datetime.date.today().isoformat(),
        command=" ".join(["python", "bench/gpu_stage1.py", *sys.argv[1:]]),
        note=f"vision w{a.width}/d{a.depth}, text ctx {a.context}, {a.rows}x{a.seq_len} tokens, "
        f"<= {a.max_patches} patches/image, {backend}, bf16",
    )
    record_bench_figure(str(path), fig)
    print(f"recorded train_img_s = {fig.value} images/s per GPU in {path}")


if __name__ == "__main__":
    raise SystemExit(main())
