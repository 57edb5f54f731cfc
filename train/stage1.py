"""Stage 1: contrastive training of the native-resolution ViT and the text tower.

``train_stage1(cfg)`` is the whole run: process group (torchrun env), model, DDP or FSDP2,
AdamW + warmup/cosine, the loader, checkpoints and logs. The CLI only builds the config.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from train import checkpoint as ckpt
from train.config import Stage1Config, check_fits
from train.data.loader import Stage1Loader, load_tokenizer, usable_shards
from train.distributed import init_from_env, is_dist
from train.losses import sigmoid_loss, softmax_loss
from train.metrics import Logger, peak_tflops, step_flops
from train.model.attention import pick_backend
from train.model.towers import Stage1Model


@dataclass
class TrainResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # global loss of each step run here (None-free)
    skipped_steps: int = 0
    checkpoint: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rank: int = 0


def lr_lambda(cfg: Stage1Config):
    o, total = cfg.optim, cfg.loop.steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def build_model(cfg: Stage1Config, vocab_size: int, device: torch.device) -> Stage1Model:
    dtype = autocast_dtype(cfg, device)
    backend = pick_backend(cfg.model.attention, device, dtype or torch.float32)
    model = Stage1Model(
        cfg.model,
        cfg.model.text.vocab_size or vocab_size,
        backend,
        cfg.loss.init_logit_scale,
        cfg.loss.init_logit_bias,
    ).to(device)
    if cfg.loss.kind == "softmax":
        model.logit_bias.requires_grad_(False)
    model.set_checkpointing(cfg.loop.activation_checkpointing)
    return model


def autocast_dtype(cfg: Stage1Config, device: torch.device) -> torch.dtype | None:
    d = cfg.loop.dtype
    if d == "bfloat16" or (d == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def parallelize(model: Stage1Model, mode: str, world: int, device: torch.device) -> torch.nn.Module:
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none" or world == 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for tower in (model.vision, model.text):
        for blk in tower.blocks:
            fully_shard(blk)
    fully_shard(model)
    return model


def optimizer_for(model: torch.nn.Module, cfg: Stage1Config) -> torch.optim.Optimizer:
    o = cfg.optim
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _sum(x: float, device: torch.device) -> float:
    if not is_dist():
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def train_stage1(cfg: Stage1Config, on_event=print) -> TrainResult:
    """Run (or resume) stage 1 as configured; returns what the run did on this rank."""
    check_fits(cfg)
    rank, world, device = init_from_env()
    if cfg.loop.threads:
        torch.set_num_threads(cfg.loop.threads)
    seed_all(cfg.loop.seed + rank)
    d = cfg.data
    from engine.layout import Dataset

    usable_shards(Dataset(d.dataset, cfg.storage), d)  # fail early with the path named
    tokenizer = load_tokenizer(d.tokenizer)
    torch.manual_seed(cfg.loop.seed)  # same init on every rank
    model = build_model(cfg, len(tokenizer), device)
    torch.manual_seed(cfg.loop.seed + rank)
    net = parallelize(model, cfg.loop.parallel, world, device)
    fwd = torch.compile(net) if cfg.loop.compile else net
    optim = optimizer_for(net, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg))
    loader = Stage1Loader(
        d.dataset, cfg.storage, d, cfg.model.vision.patch_size, cfg.model.text.context, rank, world
    )
    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.log.dir, "checkpoints")
    step = 0
    result = TrainResult()
    last = ckpt.latest(ckpt_dir) if cfg.checkpoint.resume else None
    if last:
        extra = ckpt.load(last, net, optim)
        sched.load_state_dict(extra["sched"])
        loader.load_state_dict(extra["loader"], cfg.checkpoint.allow_data_change)
        step = int(extra["step"])
        if rank == 0:
            on_event(f"resumed from {last} at step {step}")
    dtype = autocast_dtype(cfg, device)
    peak = peak_tflops(device, dtype or torch.float32)
    logger = Logger(
        cfg.log.dir, cfg.log.tensorboard, cfg.log.progress, cfg.loop.steps, enabled=rank == 0, start=step
    )
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        on_event(
            f"stage1: {n_params / 1e6:.2f}M params, backend={model.vision.backend}, world={world}, "
            f"parallel={cfg.loop.parallel}, device={device}, peak={peak:.3g} TFLOP/s"
        )
    bad_in_a_row = 0
    window = {"t": time.perf_counter(), "images": 0.0, "tokens": 0.0, "slots": 0.0, "flops": 0.0, "steps": 0}
    t_start = time.perf_counter()
    stop = min(cfg.loop.steps, cfg.loop.stop_at or cfg.loop.steps)
    while step < stop:
        batch = loader.next()
        vision = batch["vision"].to(device)
        tokens_BL, mask_BL = batch["tokens_BL"].to(device), batch["mask_BL"].to(device)
        valid_B = batch["valid_B"].to(device)
        amp = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with amp:
            img_BE, txt_BE, logit_scale, logit_bias = fwd(vision, tokens_BL, mask_BL)
        if cfg.loss.kind == "sigmoid":
            loss, value = sigmoid_loss(
                img_BE, txt_BE, valid_B, logit_scale, logit_bias, cfg.loss.sigmoid_dist
            )
        else:
            loss, value = softmax_loss(img_BE, txt_BE, valid_B, logit_scale)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.optim.grad_clip or float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        step += 1
        skipped = not (torch.isfinite(value) and torch.isfinite(norm))
        if skipped:
            # every rank sees the same global loss and grad norm, so all skip together
            bad_in_a_row += 1
            result.skipped_steps += 1
            optim.zero_grad(set_to_none=True)
            sched.step()
            logger.log(step, {"skipped": "non-finite loss or gradient", "loss": float(value)})
            if bad_in_a_row >= cfg.loop.max_bad_steps:
                raise FloatingPointError(f"{bad_in_a_row} non-finite steps in a row at step {step}: stopping")
        else:
            bad_in_a_row = 0
            optim.step()
            sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))  # a DTensor shard under FSDP2: clamps in place
        result.losses.append(float(value))
        n_img = int(valid_B.sum())
        real = int(batch["real_tokens"])
        text_lengths = mask_BL.sum(1).tolist()
        flops = step_flops(
            cfg.model, real, _image_lengths(vision.img_T, n_img), sum(text_lengths), text_lengths
        )
        window["images"] += n_img
        window["tokens"] += real
        window["slots"] += vision.img_T.numel()
        window["flops"] += flops
        window["steps"] += 1
        logger.advance()
        if (step % cfg.log.every == 0 or step == stop) and not skipped:
            dt = time.perf_counter() - window["t"]
            images, tokens = _sum(window["images"], device), _sum(window["tokens"], device)
            slots, flops_all = _sum(window["slots"], device), _sum(window["flops"], device)
            tflops = flops_all / dt / 1e12 / world
            logger.log(
                step,
                {
                    "loss": float(value),
                    "lr": sched.get_last_lr()[0],
                    "images_per_s": images / dt,
                    "tokens_per_s": tokens / dt,
                    "packing_efficiency": tokens / max(slots, 1.0),
                    "tflops_per_device": tflops,
                    "mfu": tflops / peak,
                    "logit_scale": logit_scale.detach().exp().item(),
                    "logit_bias": logit_bias.detach().item(),
                    "grad_norm": float(norm),
                },
            )
            window = {
                "t": time.perf_counter(),
                "images": 0.0,
                "tokens": 0.0,
                "slots": 0.0,
                "flops": 0.0,
                "steps": 0,
            }
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < stop:
            result.checkpoint = _save(ckpt_dir, step, net, optim, sched, loader, cfg)
    if step > 0 and (not last or step > int(last.rsplit("_", 1)[-1])):
        result.checkpoint = _save(ckpt_dir, step, net, optim, sched, loader, cfg)
    result.steps = step
    result.stats = loader.stats()
    result.seconds = time.perf_counter() - t_start
    result.rank = rank
    if rank == 0:
        on_event(f"stage1 done: {step} steps, data: {result.stats}, checkpoint: {result.checkpoint}")
    logger.close()
    return result


def _image_lengths(img_T: torch.Tensor, n_images: int) -> list[int]:
    keep = img_T[img_T >= 0]
    return torch.bincount(keep, minlength=n_images)[:n_images].tolist() if keep.numel() else []


def _save(
    root: str,
    step: int,
    net: torch.nn.Module,
    optim: torch.optim.Optimizer,
    sched: Any,
    loader: Stage1Loader,
    cfg: Stage1Config,
) -> str:
    extra = {"step": step, "sched": sched.state_dict(), "loader": loader.state_dict()}
    return ckpt.save(root, step, net, optim, extra, keep=cfg.checkpoint.keep)
