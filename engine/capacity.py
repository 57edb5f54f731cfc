"""Capacity planning: GPU-hours, wall time and S3 bytes of a run, from per-GPU figures you measured.

Nothing here is a guess about hardware: every rate is an input (a ``bench/`` result or a
short run on one GPU of the target fleet). The arithmetic is deliberately plain so that a
reader can redo it by hand::

    tokens                = images x tokens per caption         (regions: x regions per image)
    GPU-seconds           = tokens / (tokens/s per GPU)          (training: samples / (images/s per GPU))
    GPU-hours (planned)   = GPU-seconds / efficiency / 3600      (efficiency: retries, stragglers,
                                                                  start-up, idle tails; 0 < e <= 1)
    wall hours            = GPU-hours / GPUs
    S3 written            = images x bytes per row of the output (layers: Parquet, after zstd)
    S3 read               = what the stage reads (image shards for captioning, shards x epochs
                            for training)

``plan(CapacityInputs(...))`` returns one :class:`StageEstimate` per stage that has inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

# A caption layer row: the text (bytes per token, before compression) + fixed columns
# (key, model, prompt_id, n_tokens, finish_reason, latency_ms, status): about 80 bytes.
LAYER_ROW_OVERHEAD = 80
# A region: 4 float32 box coordinates + a label.
REGION_OVERHEAD = 16 + 12
# AdamW in fp32: weights (4) + two moments (8) per parameter.
CHECKPOINT_BYTES_PER_PARAM = 12


class CapacityError(ValueError):
    """An input out of range; the message names it."""


@dataclass
class CapacityInputs:
    images: int  # images in the dataset (committed, successful)
    gpus: int = 8  # GPUs working on each stage (wall time = GPU-hours / gpus)
    efficiency: float = 0.8  # fraction of the measured rate a long run keeps
    image_bytes: float = 150_000  # average stored bytes per image in the shards (tar)
    # global recaption
    caption_tokens: float = 0.0  # generated tokens per global caption (0: no global recaption)
    caption_tok_s: float = 0.0  # generated tokens/s per GPU, measured at serving batch size
    # region recaption
    regions_per_image: float = 0.0
    region_tokens: float = 0.0  # generated tokens per region caption
    region_tok_s: float = 0.0  # generated tokens/s per GPU (default: caption_tok_s)
    # stage 1
    epochs: float = 0.0  # passes over the images (0: no training)
    train_img_s: float = 0.0  # stage-1 images/s per GPU, measured with the recipe you will run
    model_params: float = 0.0  # parameters, for checkpoint bytes
    checkpoints: int = 3  # checkpoints kept (checkpoint.keep)
    compression: float = 0.35  # zstd ratio on caption text
    bytes_per_token: float = 4.0  # caption text bytes per generated token
    gpu_hour_price: float = 0.0  # optional: cost per GPU-hour
    notes: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Refuse what cannot be planned: one error naming the input."""
        positive = {"images", "gpus"}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                continue
            if v < 0 or (f.name in positive and v <= 0):
                raise CapacityError(f"{f.name} must be {'> 0' if f.name in positive else '>= 0'}, got {v}")
        if not 0 < self.efficiency <= 1:
            raise CapacityError(f"efficiency must be in (0, 1], got {self.efficiency}")
        if self.caption_tokens and not self.caption_tok_s:
            raise CapacityError("caption_tokens given without caption_tok_s (tokens/s per GPU)")
        if self.regions_per_image and self.region_tokens and not (self.region_tok_s or self.caption_tok_s):
            raise CapacityError("region captions given without region_tok_s (or caption_tok_s)")
        if self.epochs and not self.train_img_s:
            raise CapacityError("epochs given without train_img_s (stage-1 images/s per GPU)")


@dataclass
class StageEstimate:
    stage: str
    work: str  # what is counted, e.g. "1.2e+10 tokens"
    gpu_hours: float
    wall_hours: float
    s3_read_bytes: float
    s3_written_bytes: float
    cost: float | None = None


def _estimate(name: str, work: str, gpu_seconds: float, read: float, written: float, x: CapacityInputs):
    gpu_hours = gpu_seconds / x.efficiency / 3600
    cost = gpu_hours * x.gpu_hour_price if x.gpu_hour_price else None
    return StageEstimate(name, work, gpu_hours, gpu_hours / x.gpus, read, written, cost)


def plan(x: CapacityInputs) -> list[StageEstimate]:
    """One estimate per stage that has inputs (global recaption, region recaption, stage 1)."""
    x.check()
    shard_bytes = x.images * x.image_bytes
    out = []
    if x.caption_tokens:
        tokens = x.images * x.caption_tokens
        row = LAYER_ROW_OVERHEAD + x.caption_tokens * x.bytes_per_token * x.compression
        out.append(
            _estimate(
                "recaption (global)",
                f"{tokens:.3g} tokens",
                tokens / x.caption_tok_s,
                shard_bytes,
                x.images * row,
                x,
            )
        )
    if x.regions_per_image and x.region_tokens:
        tokens = x.images * x.regions_per_image * x.region_tokens
        rate = x.region_tok_s or x.caption_tok_s
        per_region = REGION_OVERHEAD + x.region_tokens * x.bytes_per_token * x.compression
        row = LAYER_ROW_OVERHEAD + x.regions_per_image * per_region
        out.append(
            _estimate(
                "recaption (regions)", f"{tokens:.3g} tokens", tokens / rate, shard_bytes, x.images * row, x
            )
        )
    if x.epochs:
        samples = x.images * x.epochs
        ckpt = x.model_params * CHECKPOINT_BYTES_PER_PARAM * x.checkpoints
        out.append(
            _estimate(
                "train stage 1",
                f"{samples:.3g} samples",
                samples / x.train_img_s,
                shard_bytes * x.epochs,
                ckpt,
                x,
            )
        )
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} PB"  # pragma: no cover


def human_hours(h: float) -> str:
    if h < 1:
        return f"{h * 60:.3g} min"
    if h < 48:
        return f"{h:.3g} h"
    return f"{h / 24:.3g} days"


# ------------------------------------------------------------------ measured figures from bench/

# The CapacityInputs fields a benchmark can measure, and what each means (the unit it is in).
BENCH_FIGURES = {
    "caption_tok_s": "generated tokens/s per GPU, global captions",
    "region_tok_s": "generated tokens/s per GPU, region captions",
    "train_img_s": "stage-1 images/s per GPU",
    "image_bytes": "stored bytes per image in the shards",
}


@dataclass
class BenchFigure:
    """One measured figure, as a benchmark recorded it (one JSON line of ``bench/results.jsonl``)."""

    figure: str  # a key of BENCH_FIGURES
    value: float
    bench: str  # the script, e.g. "gpu_stage1.py"
    device: str  # the GPU's name (torch.cuda.get_device_name) or "cpu"
    date: str  # ISO date of the run
    command: str  # how to rerun it
    note: str = ""  # what was measured (model size, backend, ...)

    def source(self, path: str) -> str:
        """Where the figure came from, in one line."""
        note = f", {self.note}" if self.note else ""
        return f"{path}: {self.bench} on {self.device}, {self.date}{note} (`{self.command}`)"


def record_bench_figure(path: str, fig: BenchFigure) -> None:
    """Append one figure to a results file (benchmarks call this; ``finevit plan`` reads it)."""
    if fig.figure not in BENCH_FIGURES:
        raise CapacityError(f"figure must be one of {sorted(BENCH_FIGURES)}, got {fig.figure!r}")
    import json
    from dataclasses import asdict

    with open(path, "a") as f:
        f.write(json.dumps(asdict(fig)) + "\n")


def read_bench_figures(path: str, device: str = "") -> dict[str, BenchFigure]:
    """The latest figure of each kind in a results file (later lines win), from runs whose device
    name contains ``device`` (case-insensitive; "" takes any GPU). CPU runs never count: plan is
    about GPUs. A missing file reads as no figures; a malformed line is an error naming it."""
    import json
    import os

    out: dict[str, BenchFigure] = {}
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                fig = BenchFigure(**json.loads(line))
                value = float(fig.value)
            except (ValueError, TypeError) as e:
                raise CapacityError(f"{path}:{n}: not a bench figure ({e})") from None
            if fig.figure not in BENCH_FIGURES or value <= 0:
                raise CapacityError(
                    f"{path}:{n}: figure {fig.figure!r} = {fig.value!r} is not a known figure > 0"
                )
            if fig.device.lower() == "cpu" or device.lower() not in fig.device.lower():
                continue
            fig.value = value
            out[fig.figure] = fig
    return out
