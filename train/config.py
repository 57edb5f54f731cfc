"""Stage 1 config tree: ``model`` / ``data`` / ``optim`` / ``loss`` / ``loop`` / ``ema`` / ``eval`` /
``checkpoint`` / ``log`` + ``storage``.

Loaded with :func:`engine.config.load_config` (``model=Stage1Config``); unknown fields are
errors. :func:`check_fits` stops a config that cannot work at start-up with the reason.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from engine.config import ConfigError, StorageConfig, StrictModel


class VisionConfig(StrictModel):
    width: int = Field(default=768, ge=8)
    depth: int = Field(default=12, ge=1)
    heads: int = Field(default=12, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    patch_size: int = Field(default=16, ge=2)
    rope_theta: float = 100.0


class TextConfig(StrictModel):
    width: int = Field(default=768, ge=8)
    depth: int = Field(default=12, ge=1)
    heads: int = Field(default=12, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    context: int = Field(default=256, ge=8, description="max tokens per caption (256 default, 512 for dense)")
    vocab_size: int | None = Field(default=None, description="default: the tokenizer's size")
    rope_theta: float = 10_000.0
    pool: Literal["mean", "map"] = Field(
        default="mean",
        description="caption pooling: masked mean, or a learned attention probe (MAP) that can weigh "
        "the few words that tell long templated captions apart",
    )


class ModelConfig(StrictModel):
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    embed_dim: int = Field(default=768, ge=8)
    attention: Literal["auto", "flash_attn", "varlen", "flex", "sdpa_docs", "sdpa_dense"] = "auto"


class CaptionSource(StrictModel):
    """A caption source: a caption layer name, or ``alt-text`` for the shard's own ``caption`` column."""

    source: str
    weight: float = Field(default=1.0, gt=0)


class DataConfig(StrictModel):
    dataset: str = Field(default="", description="dataset root: a local path or s3://bucket/prefix")
    captions: list[CaptionSource] = [CaptionSource(source="alt-text")]
    filters: list[str] = Field(default=[], description="filter layers whose keep=false rows are dropped")
    failed_captions: Literal["fallback", "drop"] = Field(
        default="fallback",
        description="a caption layer row that failed: fall back to the other sources (alt-text) or drop "
        "the sample; counted as caption_fallback / dropped_caption_failed",
    )
    tokenizer: str = Field(default="", description="a local tokenizer directory (PreTrainedTokenizerFast)")
    max_patches: int = Field(default=256, ge=1, description="NaFlex patch budget per image")
    seq_len: int = Field(default=1024, ge=1, description="tokens per packed sequence")
    rows: int = Field(default=8, ge=1, description="packed sequences per step per rank")
    max_images: int = Field(default=64, ge=1, description="images per step per rank (text batch, padded)")
    shuffle_buffer: int = Field(default=256, ge=1)
    pack_buffer: int = Field(default=64, ge=1, description="images the packer chooses from")
    workers: int = Field(default=0, ge=0, description="DataLoader worker processes per rank")
    seed: int = 0
    normalize: Literal["fixed", "dataset"] = Field(
        default="fixed",
        description="image mean/std: fixed (data.mean/std) or the dataset's own, measured once on "
        "data.stats_samples images and stored at <dataset>/stats/image_stats.json",
    )
    hard_negatives: bool = Field(
        default=False,
        description="add one rule-based hard negative caption per image (an attribute word replaced or "
        "two swapped; train/data/negatives.py) beside the batch's texts in the loss",
    )
    hard_negative_words: str | None = Field(
        default=None, description="a YAML/JSON file {class: [words]} replacing the built-in word classes"
    )
    stats_samples: int = Field(default=512, ge=1, description="images the dataset mean/std is measured on")
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


class OptimConfig(StrictModel):
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = Field(default=100, ge=0)
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    grad_clip: float = Field(default=1.0, ge=0, description="0 turns clipping off")
    schedule: Literal["cosine", "wsd"] = Field(
        default="cosine",
        description="cosine to min_lr_ratio over loop.steps, or warmup-stable-decay (a linear decay over "
        "the last decay_fraction of loop.steps; the stable phase can be extended by raising loop.steps)",
    )
    decay_fraction: float = Field(default=0.2, gt=0, le=1, description="wsd: share of steps that decay")
    logit_lr_mult: float = Field(
        default=1.0, gt=0, description="learning-rate multiplier of the logit scale and bias (own group)"
    )
    grad_accum: int = Field(
        default=1,
        ge=1,
        description="micro-batches per optimizer step. Each micro-batch is its own contrastive batch "
        "(data.max_images x world images, as OpenCLIP's --accum-freq without its feature cache): the "
        "step's gradient is the mean of the micro-batches' gradients, so it is the gradient of a bigger "
        "batch of samples, not of a bigger contrastive batch (negatives stay per micro-batch)",
    )


class LossConfig(StrictModel):
    kind: Literal["sigmoid", "softmax"] = "sigmoid"
    sigmoid_dist: Literal["all_gather", "ring"] = "all_gather"
    init_logit_scale: float = Field(default=2.302585, description="log(10), SigLIP's init")
    init_logit_bias: float | Literal["auto"] = Field(
        default="auto",
        description="sigmoid bias init; auto: -log(global batch) (data.max_images x world), the "
        "constant-logit optimum (-10 suits ~22k images per batch, not a few dozen)",
    )


class LoopConfig(StrictModel):
    steps: int = Field(default=1000, ge=1)
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="autocast; auto: bf16 on CUDA"
    )
    activation_checkpointing: bool = False
    compile: bool = False
    seed: int = 0
    stop_at: int | None = Field(
        default=None,
        ge=1,
        description="stop (with a checkpoint) after this step; "
        "the schedule still spans loop.steps: for job slots shorter than the run",
    )
    threads: int | None = Field(default=None, ge=1, description="torch threads per process")
    max_bad_steps: int = Field(default=20, ge=1, description="consecutive NaN/Inf steps before stopping")


class EMAConfig(StrictModel):
    decay: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description="EMA of the weights after each optimizer step, ema = decay*ema + (1-decay)*w; "
        "0: off. Saved in each checkpoint as step_<N>/ema/ (a checkpoint of its own that eval and "
        "export load, or pick with --ema) and resumed exactly",
    )


class EvalConfig(StrictModel):
    """Eval during training (``eval.hooks.periodic_eval``, which takes this section as it is)."""

    every: int = Field(default=0, ge=0, description="steps between evals (and one at the end); 0: off")
    finegrained: str = Field(
        default="synthetic://scenes?n=32&seed=1000&size=128",
        description="held-out synthetic scenes ('' to skip); train on another seed",
    )
    negatives: int = Field(default=3, ge=1)
    zeroshot: str = Field(default="", description="zero-shot set (ImageFolder, CSV or JSON); '' to skip")
    zeroshot_format: str = "auto"
    templates: str = "ensemble"
    batch_size: int = Field(default=64, ge=1)


class CheckpointConfig(StrictModel):
    dir: str = Field(default="", description="checkpoint folder; empty: <log.dir>/checkpoints")
    every: int = Field(default=0, ge=0, description="steps between checkpoints; 0: only at the end")
    resume: bool = True
    keep: int = Field(default=2, ge=1)
    allow_data_change: bool = Field(
        default=False,
        description="resume even if the data plan (shards, data config, world, workers) changed: "
        "warns and starts a fresh epoch instead of refusing",
    )


class LogConfig(StrictModel):
    dir: str = "runs/stage1"
    every: int = Field(default=10, ge=1)
    tensorboard: bool = True
    progress: bool = True


class Stage1Config(StrictModel):
    storage: StorageConfig = StorageConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    loss: LossConfig = LossConfig()
    loop: LoopConfig = LoopConfig()
    ema: EMAConfig = EMAConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()


def check_fits(cfg: Stage1Config) -> None:
    """Raise :class:`ConfigError` naming the field when the config cannot work."""
    d, v, t = cfg.data, cfg.model.vision, cfg.model.text
    problems = []
    if d.max_patches > d.seq_len:
        problems.append(
            f"data.max_patches ({d.max_patches}) > data.seq_len ({d.seq_len}): an image cannot fit a sequence"
        )
    if d.max_images < d.rows:
        problems.append(
            f"data.max_images ({d.max_images}) < data.rows ({d.rows}): some rows could hold no image"
        )
    for name, tower in (("vision", v), ("text", t)):
        if tower.width % tower.heads:
            problems.append(f"model.{name}.width ({tower.width}) is not divisible by heads ({tower.heads})")
    if (v.width // v.heads) % 4:
        problems.append(f"model.vision head size ({v.width // v.heads}) must be divisible by 4 for 2D RoPE")
    if (t.width // t.heads) % 2:
        problems.append(f"model.text head size ({t.width // t.heads}) must be even for RoPE")
    if not d.dataset:
        problems.append("data.dataset is empty: give a dataset root (local path or s3://...)")
    if not d.tokenizer:
        problems.append(
            "data.tokenizer is empty: train one with `finevit train-tokenizer` or give a local directory"
        )
    if d.hard_negative_words:
        from train.data.negatives import word_classes

        try:
            word_classes(d.hard_negative_words)
        except (OSError, ValueError) as e:  # else the loader fails on it mid-run
            problems.append(f"data.hard_negative_words: {e}")
    if problems:
        raise ConfigError("config cannot fit:\n  " + "\n  ".join(problems))
