"""Stage 1: contrastive training of the native-resolution ViT and the text tower.

``train_stage1(cfg)`` is the whole run: process group (torchrun env), model, DDP or FSDP2,
AdamW (three parameter groups) + warmup/cosine or warmup-stable-decay, gradient accumulation
(``optim.grad_accum``: each micro-batch its own contrastive batch), an optional EMA of the
weights (``ema.decay``), eval every ``eval.every`` steps, the loader, checkpoints and logs. The
CLI only builds the config. The pieces stage 2 reuses: :func:`train_step` (one
optimizer step with a non-finite guard), :class:`Meter` (throughput window), :func:`lr_lambda`,
:func:`seed_all` and :mod:`train.checkpoint`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from engine.config import redact_secrets
from train import checkpoint as ckpt
from train.config import Stage1Config, check_fits
from train.data.image_stats import resolve_normalization
from train.data.loader import Stage1Loader, load_tokenizer, usable_shards
from train.distributed import init_from_env, is_dist
from train.ema import EMA
from train.losses import sigmoid_loss, softmax_loss
from train.metrics import Logger, peak_tflops, step_flops
from train.model.attention import pick_backend
from train.model.towers import Stage1Model

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
Compute = Callable[[], tuple[torch.Tensor, torch.Tensor]]
LOGIT_PARAMS = ("logit_scale", "logit_bias")


@dataclass
class TrainResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)  # global loss of each step run here (None-free)
    skipped_steps: int = 0
    checkpoint: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rank: int = 0


def lr_lambda(cfg: Stage1Config) -> Callable[[int], float]:
    """Linear warmup, then cosine to ``min_lr_ratio`` or warmup-stable-decay (linear decay at the end)."""
    o, total = cfg.optim, cfg.loop.steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "wsd":
            decay = max(1, round(o.decay_fraction * total))
            left = (total - step) / decay
            return o.min_lr_ratio + (1 - o.min_lr_ratio) * min(1.0, max(0.0, left))
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def init_logit_bias(cfg: Stage1Config, world: int) -> float:
    """The configured sigmoid bias, or for ``auto`` the constant-logit optimum ``-log(global batch)``."""
    b = cfg.loss.init_logit_bias
    return -math.log(max(2, cfg.data.max_images * world)) if b == "auto" else float(b)


def build_model(cfg: Stage1Config, vocab_size: int, device: torch.device, world: int = 1) -> Stage1Model:
    dtype = autocast_dtype(cfg, device)
    backend = pick_backend(cfg.model.attention, device, dtype or torch.float32)
    model = Stage1Model(
        cfg.model,
        cfg.model.text.vocab_size or vocab_size,
        backend,
        cfg.loss.init_logit_scale,
        init_logit_bias(cfg, world),
    ).to(device)
    if cfg.loss.kind == "softmax":
        model.logit_bias.requires_grad_(False)
    model.set_checkpointing(cfg.loop.activation_checkpointing)
    return model


def create_loss(cfg: Stage1Config) -> LossFn:
    """Pick the loss once (OpenCLIP's ``create_loss``): ``f(img_BE, txt_BE, valid_B, scale, bias)``."""
    if cfg.loss.kind == "sigmoid":
        mode = cfg.loss.sigmoid_dist
        return lambda img, txt, valid, scale, bias, **neg: sigmoid_loss(
            img, txt, valid, scale, bias, mode, **neg
        )
    return lambda img, txt, valid, scale, bias, **neg: softmax_loss(img, txt, valid, scale, **neg)


def autocast_dtype(cfg: Stage1Config, device: torch.device) -> torch.dtype | None:
    d = cfg.loop.dtype
    if d == "bfloat16" or (d == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def parallelize(
    model: Stage1Model, mode: str, world: int, device: torch.device, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """DDP, or FSDP2 per block; under FSDP2 with a low-precision ``dtype`` parameters are gathered
    and computed in it while gradients are reduced in fp32 (``MixedPrecisionPolicy``)."""
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none" or world == 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return shard_fsdp(model, dtype)


def shard_fsdp(model: Stage1Model, dtype: torch.dtype | None = None) -> Stage1Model:
    """FSDP2 (``fully_shard``) per transformer block, then the rest as the root group. With a
    low-precision ``dtype`` (bf16 runs): parameters are all-gathered and computed in it while the
    sharded parameters, the optimizer state and the gradient reduction stay fp32.

    Inputs are not cast (``cast_forward_inputs=False``): the loop runs the forward under autocast,
    and a block's float inputs include the RoPE cos/sin, which must stay fp32 (``torch.complex``
    has no bf16; casting them broke the first bf16 FSDP2 step, found by the CPU gloo test)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {}
    if dtype is not None:
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for tower in (model.vision, model.text):
        for blk in tower.blocks:
            fully_shard(blk, **kw)
    fully_shard(model, **kw)
    return model


def param_groups(model: torch.nn.Module, cfg: Stage1Config) -> list[dict[str, Any]]:
    """Weight-decayed matrices, undecayed vectors, and the logit scale/bias at ``lr x logit_lr_mult``."""
    o = cfg.optim
    decay, no_decay, logit = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] in LOGIT_PARAMS:
            logit.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": o.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
        {"params": logit, "weight_decay": 0.0, "lr": o.lr * o.logit_lr_mult, "name": "logit"},
    ]
    return [g for g in groups if g["params"]]


def optimizer_for(model: torch.nn.Module, cfg: Stage1Config) -> torch.optim.Optimizer:
    o = cfg.optim
    return torch.optim.AdamW(param_groups(model, cfg), lr=o.lr, betas=o.betas, eps=o.eps)


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


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@contextlib.contextmanager
def no_grad_sync(net: torch.nn.Module) -> Iterator[None]:
    """Backward without the gradient all-reduce (DDP) / reduce-scatter (FSDP2): for the micro-batches
    of an accumulated step before the last (the last one reduces the sum). A no-op otherwise."""
    if hasattr(net, "no_sync"):  # DDP
        with net.no_sync():
            yield
    elif hasattr(net, "set_requires_gradient_sync"):  # FSDP2
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)
    else:
        yield


def train_step(
    optim: torch.optim.Optimizer,
    params: Iterable[torch.nn.Parameter],
    compute: Compute | Sequence[Compute],
    grad_clip: float,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step: ``compute()`` gives ``(loss_to_backward, global_loss_value)``.

    Gradient accumulation: ``compute`` a sequence of micro-batch computes, each backwarded at once
    (its graph freed) with its loss divided by their number, so the gradient is the mean of the
    micro-batches' gradients, then one clip and one optimizer step. ``no_sync`` (e.g.
    ``lambda: no_grad_sync(net)``) wraps every micro-batch but the last.

    Returns ``(value, grad_norm, skipped)``; ``value`` is the mean of the micro-batches' values. A
    non-finite loss or gradient norm skips the update (every rank sees the same global values, so
    all ranks skip together)."""
    computes = [compute] if callable(compute) else list(compute)
    n = len(computes)
    optim.zero_grad(set_to_none=True)
    values = []
    for i, micro in enumerate(computes):
        ctx = no_sync() if no_sync is not None and i < n - 1 else contextlib.nullcontext()
        with ctx:
            loss, v = micro()
            (loss if n == 1 else loss / n).backward()
        values.append(v.detach())
    value = values[0] if n == 1 else torch.stack(values).mean()
    norm = _full(torch.nn.utils.clip_grad_norm_(list(params), grad_clip or float("inf")))
    skipped = not (torch.isfinite(value) and torch.isfinite(norm))
    if skipped:
        optim.zero_grad(set_to_none=True)
    else:
        optim.step()
    return value, norm, skipped


def contrastive_loss(
    fwd: torch.nn.Module,
    loss_fn: LossFn,
    amp: Callable[[], Any],
    vision: Any,
    tokens_BL: torch.Tensor,
    mask_BL: torch.Tensor,
    valid_B: torch.Tensor,
    out: dict[str, torch.Tensor],
    negatives: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward both towers and the loss; the embeddings and scalars are left in ``out`` for metrics.

    ``negatives``: hard negative captions ``(tokens_BL, mask_BL, valid_B)``, run through the text
    tower in the same forward as the captions (one call, so DDP/FSDP see one forward)."""
    if negatives is None:
        with amp():
            img_BE, txt_BE, scale, bias = fwd(vision, tokens_BL, mask_BL)
        out.update(img_BE=img_BE, txt_BE=txt_BE, scale=scale, bias=bias)
        return loss_fn(img_BE, txt_BE, valid_B, scale, bias)
    neg_BL, neg_mask_BL, neg_valid_B = negatives  # the loader gives them the captions' width
    B = tokens_BL.shape[0]
    both, both_mask = torch.cat([tokens_BL, neg_BL]), torch.cat([mask_BL, neg_mask_BL])
    with amp():
        img_BE, txt_2BE, scale, bias = fwd(vision, both, both_mask)
    txt_BE, neg_BE = txt_2BE[:B], txt_2BE[B:]
    out.update(img_BE=img_BE, txt_BE=txt_BE, scale=scale, bias=bias)
    return loss_fn(img_BE, txt_BE, valid_B, scale, bias, neg_BE=neg_BE, neg_valid_B=neg_valid_B)


class Meter:
    """Sums over a logging window (images, real tokens, token slots, FLOPs, loader wait; one
    ``update`` per micro-batch, ``steps`` counted by the loop) and turns them into rates summed over
    ranks."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.t0 = time.perf_counter()
        self.images = self.tokens = self.slots = self.flops = self.wait = 0.0
        self.steps = 0

    def update(self, images: int, tokens: int, slots: int, flops: float, wait: float) -> None:
        self.images += images
        self.tokens += tokens
        self.slots += slots
        self.flops += flops
        self.wait += wait

    def summary(self, device: torch.device, world: int, peak: float) -> dict[str, float]:
        dt = time.perf_counter() - self.t0
        images, tokens = _sum(self.images, device), _sum(self.tokens, device)
        slots, flops = _sum(self.slots, device), _sum(self.flops, device)
        tflops = flops / dt / 1e12 / world
        return {
            "images_per_s": images / dt,
            "tokens_per_s": tokens / dt,
            "packing_efficiency": tokens / max(slots, 1.0),
            "tflops_per_device": tflops,
            "mfu": tflops / peak,
            "loader_wait_s": _sum(self.wait, device) / world / max(self.steps, 1),
        }


@torch.no_grad()
def batch_top1(img_BE: torch.Tensor, txt_BE: torch.Tensor, valid_B: torch.Tensor) -> float:
    """In-batch image->text top-1 over this rank's real pairs (chance: 1 / images)."""
    n = int(valid_B.sum())
    if n == 0:
        return float("nan")
    sim = img_BE[:n].float() @ txt_BE[:n].float().T
    return (sim.argmax(1) == torch.arange(n, device=sim.device)).float().mean().item()


def tower_grad_norms(model: Stage1Model) -> dict[str, float]:
    out = {}
    for name in ("vision", "text"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.grad is not None]
        if grads:
            out[f"grad_norm_{name}"] = float(_full(torch.nn.utils.get_total_norm(grads)))
    return out


def make_evaluator(
    cfg: Stage1Config,
    net: torch.nn.Module,
    tokenizer: Any,
    amp: Callable[[], Any] = contextlib.nullcontext,
) -> Callable[[int], dict[str, float]]:
    """``f(step) -> {"eval/<task>/<metric>": value}``: ``eval.hooks.periodic_eval`` on a view of the
    live towers (the live weights, not the EMA), under the run's autocast. eval/ is imported here,
    at run time: the loop calls eval, the model library does not. Under FSDP2 the root group is
    gathered around it (every rank must call it, as in a forward)."""
    from eval.hooks import periodic_eval
    from train.model.encoder import encoder_from_model

    enc = encoder_from_model(net, cfg, tokenizer)

    def f(step: int) -> dict[str, float]:
        sharded = hasattr(net, "unshard")
        if sharded:
            net.unshard()
        try:
            with torch.no_grad(), amp():
                return periodic_eval(enc, cfg.eval, step)
        finally:
            if sharded:
                net.reshard()

    return f


def train_stage1(
    cfg: Stage1Config,
    on_event: Callable[[str], None] = print,
    evaluator: Callable[[int], dict[str, float]] | None = None,
) -> TrainResult:
    """Run (or resume) stage 1 as configured; returns what the run did on this rank.

    ``evaluator``: what runs every ``eval.every`` steps and at the end (default:
    :func:`make_evaluator`); its scalars go to the metrics file and TensorBoard."""
    check_fits(cfg)
    rank, world, device = init_from_env()
    with run_folder_lease(cfg.log.dir, rank):
        return _train_stage1(cfg, on_event, evaluator, rank, world, device)


def run_folder_lease(log_dir: str, rank: int) -> contextlib.AbstractContextManager[Any]:
    """One run per run folder: rank 0 holds ``<log.dir>/_lease.json`` while it trains. A second
    run into the same folder would append to the same metrics and overwrite the same
    checkpoints; it is refused with the holder's name. A killed run's lease is taken over."""
    if rank != 0:
        return contextlib.nullcontext()
    from engine.lease import Lease
    from engine.store import Store

    return Lease(Store(log_dir), log_dir, what="run folder")


def _train_stage1(
    cfg: Stage1Config,
    on_event: Callable[[str], None],
    evaluator: Callable[[int], dict[str, float]] | None,
    rank: int,
    world: int,
    device: torch.device,
) -> TrainResult:
    if cfg.loop.threads:
        torch.set_num_threads(cfg.loop.threads)
    seed_all(cfg.loop.seed + rank)
    from engine.layout import Dataset

    usable_shards(Dataset(cfg.data.dataset, cfg.storage), cfg.data)  # fail early with the path named
    patch = cfg.model.vision.patch_size
    cfg = cfg.model_copy(update={"data": resolve_normalization(cfg.data, cfg.storage, patch)})
    d = cfg.data
    tokenizer = load_tokenizer(d.tokenizer)
    torch.manual_seed(cfg.loop.seed)  # same init on every rank
    model = build_model(cfg, len(tokenizer), device, world)
    torch.manual_seed(cfg.loop.seed + rank)
    dtype = autocast_dtype(cfg, device)
    net = parallelize(model, cfg.loop.parallel, world, device, dtype)
    fwd = torch.compile(net) if cfg.loop.compile else net
    optim = optimizer_for(net, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(cfg))
    ema = EMA(model, cfg.ema.decay) if cfg.ema.decay > 0 else None
    loss_fn = create_loss(cfg)
    loader = Stage1Loader(d.dataset, cfg.storage, d, patch, cfg.model.text.context, rank, world)
    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.log.dir, "checkpoints")
    result = TrainResult()
    last, step = ckpt.resume(
        ckpt_dir,
        cfg.checkpoint.resume,
        net,
        optim,
        sched,
        lambda state: loader.load_state_dict(state, cfg.checkpoint.allow_data_change),
        ema,
    )
    if last and rank == 0:
        on_event(f"resumed from {last} at step {step}")
    peak = peak_tflops(device, dtype or torch.float32)
    logger = Logger(
        cfg.log.dir, cfg.log.tensorboard, cfg.log.progress, cfg.loop.steps, enabled=rank == 0, start=step
    )
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        on_event(
            f"stage1: {n_params / 1e6:.2f}M params, backend={model.vision.backend}, world={world}, "
            f"parallel={cfg.loop.parallel}, device={device}, peak={peak:.3g} TFLOP/s, "
            f"mean={d.mean}, std={d.std} ({d.normalize}), grad_accum={cfg.optim.grad_accum}, "
            f"ema={cfg.ema.decay or 'off'}"
        )
    amp = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    if cfg.eval.every and evaluator is None:
        evaluator = make_evaluator(cfg, net, tokenizer, amp)
    params = [p for p in net.parameters() if p.requires_grad]
    bad_in_a_row = 0
    meter = Meter()
    t_start = time.perf_counter()
    stop = min(cfg.loop.steps, cfg.loop.stop_at or cfg.loop.steps)
    while step < stop:
        out: dict[str, torch.Tensor] = {}  # the last micro-batch's embeddings, for batch_top1
        micro = [
            functools.partial(_micro_batch, loader, device, fwd, loss_fn, amp, out, meter, cfg.model)
            for _ in range(cfg.optim.grad_accum)
        ]
        value, norm, skipped = train_step(
            optim, params, micro, cfg.optim.grad_clip, lambda: no_grad_sync(net)
        )
        step += 1
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(max=math.log(100.0))  # a DTensor shard under FSDP2: clamps in place
        if ema is not None and not skipped:
            ema.update(model)
        result.losses.append(float(value))
        if skipped:
            bad_in_a_row += 1
            result.skipped_steps += 1
            logger.log(step, {"skipped": "non-finite loss or gradient", "loss": float(value)})
            if bad_in_a_row >= cfg.loop.max_bad_steps:
                raise FloatingPointError(f"{bad_in_a_row} non-finite steps in a row at step {step}: stopping")
        else:
            bad_in_a_row = 0
        meter.steps += 1
        logger.advance()
        if (step % cfg.log.every == 0 or step == stop) and not skipped:
            top1 = _sum(batch_top1(out["img_BE"], out["txt_BE"], out["valid_B"]), device) / world
            logger.log(
                step,
                {
                    "loss": float(value),
                    "batch_top1": top1,
                    "lr": sched.get_last_lr()[0],
                    **meter.summary(device, world, peak),
                    "logit_scale": out["scale"].detach().exp().item(),
                    "logit_bias": out["bias"].detach().item(),
                    "grad_norm": float(norm),
                    **tower_grad_norms(model),
                },
            )
            meter.reset()
        if evaluator is not None and cfg.eval.every and (step % cfg.eval.every == 0 or step == stop):
            t_eval = time.perf_counter()
            scores = evaluator(step)
            logger.log(step, {**scores, "eval_s": time.perf_counter() - t_eval})
            meter.t0 += time.perf_counter() - t_eval  # eval time is not training throughput
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < stop:
            result.checkpoint = _save(ckpt_dir, step, net, optim, sched, loader, cfg, ema)
    if step > 0 and (not last or step > int(last.rsplit("_", 1)[-1])):
        result.checkpoint = _save(ckpt_dir, step, net, optim, sched, loader, cfg, ema)
    result.steps = step
    result.stats = loader.stats()
    result.seconds = time.perf_counter() - t_start
    result.rank = rank
    if rank == 0:
        on_event(f"stage1 done: {step} steps, data: {result.stats}, checkpoint: {result.checkpoint}")
    logger.close()
    return result


def _micro_batch(
    loader: Stage1Loader,
    device: torch.device,
    fwd: torch.nn.Module,
    loss_fn: LossFn,
    amp: Callable[[], Any],
    out: dict[str, torch.Tensor],
    meter: Meter,
    model_cfg: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch: fetch (timed), forward, loss; counts its work in ``meter``."""
    t_wait = time.perf_counter()
    batch = loader.next()
    wait = time.perf_counter() - t_wait
    vision = batch["vision"].to(device)
    tokens_BL, mask_BL = batch["tokens_BL"].to(device), batch["mask_BL"].to(device)
    valid_B = batch["valid_B"].to(device)
    negatives = None
    if "neg_tokens_BL" in batch:
        negatives = tuple(batch[k].to(device) for k in ("neg_tokens_BL", "neg_mask_BL", "neg_valid_B"))
    loss, value = contrastive_loss(fwd, loss_fn, amp, vision, tokens_BL, mask_BL, valid_B, out, negatives)
    out["valid_B"] = valid_B
    n_img, real = int(valid_B.sum()), int(batch["real_tokens"])
    text_lengths = mask_BL.sum(1).tolist()
    lengths = _image_lengths(vision.img_T, n_img)
    flops = step_flops(model_cfg, real, lengths, sum(text_lengths), text_lengths)
    meter.update(n_img, real, vision.img_T.numel(), flops, wait)
    return loss, value


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
    ema: EMA | None = None,
) -> str:
    extra = {"step": step, "sched": sched.state_dict(), "loader": loader.state_dict()}
    return ckpt.save(
        root,
        step,
        net,
        optim,
        extra,
        keep=cfg.checkpoint.keep,
        config=redact_secrets(cfg.model_dump(mode="json")),  # no S3 credentials in the checkpoint
        ema=ema.state_dict(model_of(net)) if ema is not None else None,
    )


def model_of(net: torch.nn.Module) -> torch.nn.Module:
    return getattr(net, "module", net)
