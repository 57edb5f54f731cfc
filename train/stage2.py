"""Stage 2: align the stage-1 encoder with a causal LM on region and global captions.

``train_stage2(cfg)`` is the whole run: the stage-1 vision tower (``init.checkpoint``, its shapes
checked against ``model``), the projector, the LM from a local directory (``lm.path``), the
schedule's phases (which parts train), AdamW + warmup/cosine, the loader
(:mod:`train.data.regions`), DCP checkpoints with exact resume, DDP, NaN guard, logs with
tokens/s and MFU. The CLI only builds the config. Under torchrun: DDP, or FSDP2 with
``loop.parallel=fsdp`` (per vision block and per LM decoder layer).

Schedule: ``schedule`` is a list of phases ``{until: STEP, train: projector|encoder|lm|all}``:
``projector`` trains the projector only; ``encoder`` the vision tower + projector with the LM
frozen; ``lm`` the projector + LM with the vision tower frozen (LLaVA's second stage); ``all``
everything. All parameters stay in the optimizer (frozen ones get no gradient, so AdamW leaves
them alone), which keeps the optimizer state and checkpoints one shape.

LoRA (``lm.lora.r > 0``, through ``peft``): the LM's linear layers named in
``lm.lora.target_modules`` get adapters and the LM's own weights never train; phases ``lm`` and
``all`` train the adapters where they would train the LM (``all``: adapters + projector + vision
tower at its multiplier). Checkpoints hold the adapters beside the frozen base (one DCP state, so
resume is as exact as without); :func:`load_stage2` merges them (``merge_and_unload``), so the
exported VLM is a plain LM of the base architecture that loads with transformers alone.

Learning rates per part: ``optim.lr`` times ``optim.vision_lr_mult`` / ``projector_lr_mult`` /
``lm_lr_mult``. The vision tower's default is 0.1: at the LM's rate a trained encoder collapses
within a few hundred steps (every patch token the same vector), and the LM then has nothing to
read (Qwen2-VL and LLaVA-OneVision also train the ViT at a fraction of the LM's rate).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from engine.config import ConfigError, StorageConfig, StrictModel, redact_secrets
from train import checkpoint as ckpt
from train.config import CheckpointConfig, LogConfig, LoopConfig, ModelConfig, OptimConfig
from train.data.regions import TASKS, Stage2Loader
from train.distributed import init_from_env, is_dist
from train.metrics import Logger, peak_tflops
from train.model.attention import pick_backend
from train.model.region_align import RegionAligner, region_embeddings
from train.model.vlm import (
    IMAGE_TOKEN,
    REGION_TOKEN,
    FineViTVLMConfig,
    FineViTVLMForConditionalGeneration,
    FineViTVLMProcessor,
)


class TaskWeight(StrictModel):
    task: Literal["box_caption", "caption_box", "global"]
    weight: float = Field(default=1.0, gt=0)


class Stage2Data(StrictModel):
    dataset: str = Field(default="", description="dataset root: a local path or s3://bucket/prefix")
    regions_layer: str = Field(default="gt-regions", description="a regions layer (gt-regions, recaption)")
    global_layer: str = Field(default="gt-global", description="a global caption layer; '' for none")
    tasks: list[TaskWeight] = [
        TaskWeight(task="box_caption", weight=0.4),
        TaskWeight(task="caption_box", weight=0.4),
        TaskWeight(task="global", weight=0.2),
    ]
    max_patches: int = Field(default=256, ge=1, description="NaFlex patch budget per image")
    upscale: bool = Field(
        default=False,
        description="scale images smaller than max_patches up to fill it (SigLIP 2's NaFlex), so stage 2 "
        "sees each image with more patches than stage 1 did (progressive resolution); the exported "
        "encoder keeps the setting",
    )
    seq_len: int = Field(default=1024, ge=1, description="vision tokens per packed row")
    batch: int = Field(default=8, ge=1, description="samples (image + prompt + target) per step per rank")
    max_len: int = Field(default=0, ge=0, description="LM tokens per sample; 0: the LM's context")
    pack: bool = Field(
        default=False,
        description="several samples per LM row of max_len tokens (first fit), each attending only to "
        "itself (positions restart per sample: transformers' block-causal mask, or varlen with "
        "flash-attention); off: one sample per row, padded to the longest",
    )
    seed: int = 0
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


class InitConfig(StrictModel):
    checkpoint: str = Field(default="", description="a stage-1 step folder, checkpoints folder or log dir")


class LoRAConfig(StrictModel):
    r: int = Field(
        default=0,
        ge=0,
        description="LoRA rank on the LM (peft); 0: no LoRA, phases lm/all train the LM itself",
    )
    alpha: float = Field(default=16.0, gt=0, description="LoRA scaling numerator (peft's lora_alpha)")
    dropout: float = Field(default=0.0, ge=0, lt=1, description="dropout on the LoRA branch's input")
    target_modules: list[str] = Field(
        default=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="LM linear layers that get adapters, by module name (Llama/Qwen2 names by default)",
    )


class LMConfig(StrictModel):
    path: str = Field(
        default="", description="a local causal-LM directory (AutoModelForCausalLM + tokenizer)"
    )
    lora: LoRAConfig = LoRAConfig()
    attention: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        default="auto",
        description="the LM's attention (transformers' attn_implementation); auto: flash_attention_2 "
        "when flash-attn is installed and CUDA is there (packed rows then run varlen), else sdpa",
    )


class Phase(StrictModel):
    until: int = Field(ge=1, description="this phase runs until this step (exclusive of later phases)")
    train: Literal["projector", "encoder", "lm", "all"]


class ProjectorConfig(StrictModel):
    feature_layers: list[int] = Field(
        default=[-1],
        min_length=1,
        description="vision blocks whose patch tokens the projector reads, concatenated (LLaVA's "
        "vision_feature_layer): -1 the last block after the final norm, k >= 0 the output of the first "
        "k blocks (0: the patch embeddings)",
    )
    region_tokens: bool = Field(
        default=True,
        description="Ferret's region representation: a <region> token after each box of a prompt, "
        "filled with the box RoIAligned on the patch grid and projected like a 2x2 block (train/model/vlm.py)",
    )
    region_pixels: bool = Field(
        default=False,
        description="region tokens also read the box's pixels (a 4x4 grid of mean colours, RoIAligned "
        "on the image the tower sees): at 16-px patches a small object's colour is blurred into its "
        "patches' embeddings (train/model/projector.py)",
    )
    image_pixels: bool = Field(
        default=False,
        description="the image's tokens also read their merged cell's pixels (the same 4x4 mean "
        "colours and map as region_pixels): a tiny captioner then names the colours of objects "
        "that its tower blurs (train/model/projector.py)",
    )
    abs_pos: bool = Field(
        default=True,
        description="add each merged token's place in the image (fractions of height and width): the "
        "encoder's RoPE is relative, so without it the LM cannot tell where an image token sits",
    )


class Stage2Loss(StrictModel):
    reduction: Literal["token", "sample", "square"] = Field(
        default="square",
        description="how target tokens are averaged: 'token' (every token of the batch alike: long "
        "global captions drown short region captions), 'sample' (each sample's mean, then the mean over "
        "samples), 'square' (InternVL 2.5's square averaging: a sample's tokens weigh 1/sqrt(length))",
    )
    region_contrast: float = Field(
        default=0.0,
        ge=0,
        description="weight of FG-CLIP's regional contrastive term beside the LM loss (0: off): every "
        "region of the step's images, RoIAligned 1x1 on the final patch tokens and pooled by stage 1's "
        "head + projection, against its caption under stage 1's text tower (both trained, with the "
        "temperature, at optim.align_lr_mult) -- the path box classification reads "
        "(train/model/region_align.py)",
    )
    global_contrast: float = Field(
        default=0.0,
        ge=0,
        description="with loss.region_contrast: weight of FG-CLIP's global term beside it -- each image of "
        "the step, pooled whole by stage 1's head + projection, against its global caption under the same "
        "text tower -- so the tower learning the regions' short captions keeps the long ones (without it, "
        "the demo's held-out fine-grained R@1 fell from 35.0 to 26.1 in stage 2)",
    )
    region_hard_negatives: float = Field(
        default=0.0,
        ge=0,
        description="with loss.region_contrast: weight of FG-CLIP's region hard-negative term -- each "
        "region against its caption and every caption made from it by replacing its word of a class in "
        "loss.hard_negative_classes with another word of that class (train/data/negatives.py). The "
        "batch's contrast tells regions apart by colour and place and leaves shape untrained",
    )
    hard_negative_classes: list[str] = Field(
        default=["shape"], description="word classes whose words loss.region_hard_negatives replaces"
    )
    hard_negative_words: str | None = Field(
        default=None, description="a YAML/JSON file {class: [words]} replacing the built-in word classes"
    )


class Stage2Optim(OptimConfig):
    vision_lr_mult: float = Field(
        default=0.1, ge=0, description="the vision tower's learning rate as a multiple of optim.lr"
    )
    projector_lr_mult: float = Field(default=1.0, ge=0, description="the projector's multiple of optim.lr")
    lm_lr_mult: float = Field(default=1.0, ge=0, description="the language model's multiple of optim.lr")
    align_lr_mult: float = Field(
        default=0.1,
        ge=0,
        description="with loss.region_contrast: the multiple of optim.lr of the text tower, the "
        "temperature and the vision tower's pooling head + projection",
    )


class Stage2Config(StrictModel):
    storage: StorageConfig = StorageConfig()
    model: ModelConfig = ModelConfig()
    init: InitConfig = InitConfig()
    lm: LMConfig = LMConfig()
    projector: ProjectorConfig = ProjectorConfig()
    data: Stage2Data = Stage2Data()
    schedule: list[Phase] = [Phase(until=10**9, train="projector")]
    optim: Stage2Optim = Stage2Optim()
    loss: Stage2Loss = Stage2Loss()
    loop: LoopConfig = LoopConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig(dir="runs/stage2")


def check_fits(cfg: Stage2Config) -> None:
    d, problems = cfg.data, []
    if not d.dataset:
        problems.append("data.dataset is empty: give a dataset root")
    if not cfg.init.checkpoint:
        problems.append("init.checkpoint is empty: give a stage-1 checkpoint with --init")
    if not cfg.lm.path:
        problems.append("lm.path is empty: give a local causal-LM directory")
    if d.max_patches > d.seq_len:
        problems.append(f"data.max_patches ({d.max_patches}) > data.seq_len ({d.seq_len})")
    if not d.tasks:
        problems.append("data.tasks is empty")
    depth = cfg.model.vision.depth
    bad = [k for k in cfg.projector.feature_layers if not (k == -1 or 0 <= k <= depth)]
    if bad:
        problems.append(f"projector.feature_layers {bad}: each must be -1 or 0..{depth} (model.vision.depth)")
    if any(t.task == "global" for t in d.tasks) and not d.global_layer:
        problems.append("data.tasks has 'global' but data.global_layer is empty")
    if cfg.loss.global_contrast and not cfg.loss.region_contrast:
        problems.append("loss.global_contrast is the regional term's companion: set loss.region_contrast too")
    if cfg.loss.global_contrast and not d.global_layer:
        problems.append("loss.global_contrast needs the global captions: data.global_layer is empty")
    if cfg.loss.region_hard_negatives:
        if not cfg.loss.region_contrast:
            problems.append(
                "loss.region_hard_negatives trains the regional term's path: set loss.region_contrast too"
            )
        from train.data.negatives import word_classes

        try:
            known = word_classes(cfg.loss.hard_negative_words)
        except (OSError, ValueError) as e:
            problems.append(f"loss.hard_negative_words: {e}")
        else:
            unknown = [c for c in cfg.loss.hard_negative_classes if c not in known]
            if unknown or not cfg.loss.hard_negative_classes:
                problems.append(
                    f"loss.hard_negative_classes {cfg.loss.hard_negative_classes}: each must be one of {sorted(known)}"
                )
    if cfg.loss.region_contrast:
        if -1 not in cfg.projector.feature_layers:
            problems.append(
                "loss.region_contrast reads the final patch tokens: projector.feature_layers must include -1"
            )
        if cfg.loop.parallel in ("ddp", "fsdp") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            problems.append(
                "loss.region_contrast runs in one process for now: use loop.parallel none, one rank"
            )
    if problems:
        raise ConfigError("config cannot fit:\n  " + "\n  ".join(problems))


# ------------------------------------------------------------------------------ building


def lm_attention(choice: str = "auto") -> str:
    """The LM's ``attn_implementation``: ``auto`` is the top of the ladder this machine has."""
    if choice != "auto":
        return choice
    import importlib.util

    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_lm(path: str, attention: str = "auto") -> tuple[Any, Any]:
    """``(causal LM, tokenizer)`` from a local directory; clear errors for what is missing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"lm.path: {path} is not a model directory (no config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ConfigError(f"lm.path: no tokenizer in {path}: {type(e).__name__}: {e}") from None
    if not getattr(tok, "chat_template", None):
        raise ConfigError(
            f"lm.path: the tokenizer in {path} has no chat template (tokenizer.chat_template): "
            "stage 2 builds its prompts with it"
        )
    if tok.eos_token_id is None:
        raise ConfigError(f"lm.path: the tokenizer in {path} has no EOS token")
    try:
        lm = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation=lm_attention(attention)
        )
    except Exception as e:
        raise ConfigError(f"lm.path: cannot load a causal LM from {path}: {type(e).__name__}: {e}") from None
    return lm, tok


def stage1_vision_state(step_dir: str, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The ``vision.*`` weights of a stage-1 DCP checkpoint, after checking every shape against the
    recipe's ``model`` (a mismatch stops here, naming the tensors and the fields to fix)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from train.model.towers import VisionTower

    want = {f"vision.{k}": v for k, v in VisionTower(model_cfg).state_dict().items()}
    meta = dcp.FileSystemReader(step_dir).read_metadata().state_dict_metadata
    have = {k[len("model.") :]: v for k, v in meta.items() if k.startswith("model.vision.")}
    problems = []
    for k, v in want.items():
        if k not in have:
            problems.append(f"{k} missing in the checkpoint")
        elif tuple(have[k].size) != tuple(v.shape):
            problems.append(f"{k}: {tuple(have[k].size)} in the checkpoint, {tuple(v.shape)} from the recipe")
    problems += [f"{k} in the checkpoint, not in the recipe" for k in have if k not in want]
    if problems:
        raise ConfigError(
            f"the stage-1 checkpoint {step_dir} does not match model.vision of the recipe "
            f"(width {model_cfg.vision.width}, depth {model_cfg.vision.depth}, patch_size "
            f"{model_cfg.vision.patch_size}, mlp_ratio {model_cfg.vision.mlp_ratio}): "
            + "; ".join(problems[:3])
            + (f"; ... {len(problems) - 3} more" if len(problems) > 3 else "")
        )
    state = {"model": {k: torch.empty_like(v) for k, v in want.items()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=step_dir)
    return {k[len("vision.") :]: v for k, v in state["model"].items()}


def inherit_normalization(cfg: Stage2Config) -> None:
    """Feed the vision tower pixels normalized as in stage 1: the init run's mean/std (e.g. the
    dataset statistics of ``data.normalize: dataset``) unless ``data.mean``/``data.std`` are set
    here. Pixels normalized otherwise reach the tower at a quarter of the contrast it learned on."""
    from train.model.encoder import resolve_checkpoint, run_pixel_stats

    if {"mean", "std"} & cfg.data.model_fields_set or not cfg.init.checkpoint:
        return
    stats = run_pixel_stats(resolve_checkpoint(cfg.init.checkpoint))
    if stats is not None:
        cfg.data.mean, cfg.data.std = stats


def build(cfg: Stage2Config) -> tuple[FineViTVLMForConditionalGeneration, FineViTVLMProcessor]:
    """The VLM (stage-1 vision weights, fresh projector, the LM's weights) and its processor."""
    from train.model.encoder import resolve_checkpoint

    step_dir = str(resolve_checkpoint(cfg.init.checkpoint))
    vision_sd = stage1_vision_state(step_dir, cfg.model)
    lm, tok = load_lm(cfg.lm.path, cfg.lm.attention)
    wanted = [IMAGE_TOKEN] + ([REGION_TOKEN] if cfg.projector.region_tokens else [])
    missing = [t for t in wanted if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if len(tok) > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(len(tok))
    d = cfg.data
    preprocess = {
        "patch_size": cfg.model.vision.patch_size,
        "max_patches": d.max_patches,
        "upscale": d.upscale,
        "mean": list(d.mean),
        "std": list(d.std),
    }
    lm_config = lm.config.to_dict()
    vcfg = FineViTVLMConfig(
        vision=cfg.model.model_dump(mode="json"),
        preprocess=preprocess,
        lm_config=lm_config,
        image_token=IMAGE_TOKEN,
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layers=cfg.projector.feature_layers,
        projector_abs_pos=cfg.projector.abs_pos,
        region_token=REGION_TOKEN if cfg.projector.region_tokens else None,
        region_token_id=tok.convert_tokens_to_ids(REGION_TOKEN) if cfg.projector.region_tokens else None,
        region_pixels=cfg.projector.region_pixels and cfg.projector.region_tokens,
        image_pixels=cfg.projector.image_pixels,
    )
    lm_sd = {k: v.clone() for k, v in lm.state_dict().items()}
    model = FineViTVLMForConditionalGeneration(vcfg, language_model=lm)
    model.language_model.load_state_dict(lm_sd)  # whatever post_init touched: the LM's own weights
    model.vision.load_state_dict(vision_sd)
    if cfg.loss.region_contrast:
        model.region_align = region_aligner(step_dir, cfg)
    if cfg.lm.lora.r:
        add_lora(model, cfg.lm.lora)
    region = REGION_TOKEN if cfg.projector.region_tokens else None
    return model, FineViTVLMProcessor(tok, preprocess, IMAGE_TOKEN, region)


def region_aligner(step_dir: str, cfg: Stage2Config) -> RegionAligner:
    """The regional contrastive term's module: the stage-1 run's text tower, tokenizer and
    temperature (the run config beside the checkpoint names the tokenizer)."""
    from train.model.encoder import EncoderError, load_stage1_text

    try:
        text, tokenizer, context, scale = load_stage1_text(step_dir)
    except EncoderError as e:
        raise ConfigError(f"loss.region_contrast needs the stage-1 text tower and tokenizer: {e}") from None
    aligner = RegionAligner(text, scale)
    aligner.tokenizer, aligner.context = tokenizer, context
    return aligner


def add_lora(model: FineViTVLMForConditionalGeneration, lora: LoRAConfig) -> None:
    """Wrap the VLM's LM in peft LoRA adapters (in place): B starts at zero, so the model's output is
    unchanged until the adapters train; the base weights are frozen for good."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("lm.lora.r > 0 needs peft: pip install peft (a dependency of finevit)") from None
    lm = model.language_model
    names = {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise ConfigError(
            f"lm.lora.target_modules {missing}: no linear layer of that name in the LM "
            f"({type(lm).__name__}: {sorted(names)})"
        )
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )
    model.language_model = get_peft_model(lm, config)


def has_lora(model: FineViTVLMForConditionalGeneration) -> bool:
    return any("lora_" in n for n, _ in model.language_model.named_parameters())


def merge_lora(model: FineViTVLMForConditionalGeneration) -> FineViTVLMForConditionalGeneration:
    """Fold the LoRA adapters into the LM's weights (``merge_and_unload``): a plain LM again."""
    if has_lora(model):
        model.language_model = model.language_model.merge_and_unload()
    return model


def set_phase(model: FineViTVLMForConditionalGeneration, train: str) -> None:
    model.projector.requires_grad_(True)
    enc = train in ("encoder", "all")
    align = getattr(model, "region_align", None)
    for name, p in model.vision.named_parameters():
        p.requires_grad_(enc and (align is not None or not name.startswith(("head.", "proj."))))
    if align is not None:  # the regional term trains with the encoder
        align.requires_grad_(enc)
    lm_on, lora = train in ("lm", "all"), has_lora(model)
    for name, p in model.language_model.named_parameters():
        p.requires_grad_(lm_on and (not lora or "lora_" in name))


def param_groups(model: FineViTVLMForConditionalGeneration, o: Stage2Optim) -> list[dict[str, Any]]:
    """AdamW groups: each part (vision, projector, LM) at its own rate, biases and norms undecayed.
    The stage-1 pooling head and projection are left out (the LM loss never uses them), unless
    the regional contrastive term trains them (with the text tower, at ``align_lr_mult``)."""
    pooled = ("vision.head.", "vision.proj.")
    parts: tuple[tuple[tuple[str, ...], float], ...] = (
        (("vision.",), o.vision_lr_mult),
        (("projector.",), o.projector_lr_mult),
        (("language_model.",), o.lm_lr_mult),
    )
    if getattr(model, "region_align", None) is not None:
        parts += (((*pooled, "region_align."), o.align_lr_mult),)
    groups = []
    for prefixes, mult in parts:
        params = [
            p
            for n, p in model.named_parameters()
            if n.startswith(prefixes) and (prefixes[0] in pooled or not n.startswith(pooled))
        ]
        for decayed in (True, False):
            ps = [p for p in params if (p.ndim >= 2) == decayed]
            if ps:
                wd = o.weight_decay if decayed else 0.0
                part = prefixes[-1][:-1]
                groups.append({"params": ps, "lr": o.lr * mult, "weight_decay": wd, "part": part})
    return groups


def lm_loss(
    logits_BLV: torch.Tensor,
    labels_BL: torch.Tensor,
    reduction: str,
    sample_BL: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy on the target tokens (labels != -100), averaged as ``reduction``
    says (see :class:`Stage2Loss`). A sample is a row, or with ``sample_BL`` (packed rows: each
    token's sample, -1 on padding) the tokens of one sample id."""
    logits, labels = logits_BLV[:, :-1].float(), labels_BL[:, 1:]
    mask = labels != -100
    ce_BL = (
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1), reduction="none"
        ).view_as(labels)
        * mask
    )
    if reduction == "token":
        return ce_BL.sum() / mask.sum().clamp(min=1)
    if sample_BL is None:
        n_B, sum_B = mask.sum(1), ce_BL.sum(1)
    else:  # B indexes samples from here on
        owner = torch.where(mask, sample_BL[:, 1:], 0).reshape(-1)
        n = int(sample_BL.max()) + 1
        n_B = torch.zeros(n, dtype=torch.long, device=owner.device).index_add_(
            0, owner, mask.reshape(-1).long()
        )
        sum_B = ce_BL.new_zeros(n).index_add_(0, owner, ce_BL.reshape(-1))
    has = n_B > 0
    w_B = torch.where(
        has, 1.0 / (n_B.clamp(min=1) if reduction == "sample" else n_B.clamp(min=1).sqrt()), 0.0
    )
    # square: weights normalized over the batch's tokens so the scale matches 'token'
    per_B = sum_B * w_B
    norm = has.sum() if reduction == "sample" else (n_B * w_B).sum()
    return per_B.sum() / norm.clamp(min=1)


def parallelize(
    model: FineViTVLMForConditionalGeneration,
    mode: str,
    world: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """``loop.parallel`` as in stage 1: DDP (``auto`` with several ranks), or FSDP2 per vision block
    and per LM decoder layer (the LM's ``_no_split_modules``), then the rest as the root group;
    under FSDP2 with a bf16 ``dtype`` parameters are gathered and computed in bf16 while the
    sharded parameters, optimizer state and gradient reduction stay fp32."""
    if mode == "auto":
        mode = "ddp" if world > 1 else "none"
    if mode == "none" or world == 1:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True,  # frozen phases and the unused pooling head
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw: dict[str, Any] = {}
    if dtype is not None:  # inputs not cast: the vision tower's RoPE cos/sin must stay fp32 (stage 1)
        kw["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    lm = model.language_model
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # under LoRA: the LM inside peft
    layer_types = set(getattr(base, "_no_split_modules", None) or [])
    for blk in model.vision.blocks:
        fully_shard(blk, **kw)
    for m in lm.modules():
        if type(m).__name__ in layer_types:
            fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model


def region_terms(
    model: FineViTVLMForConditionalGeneration,
    aligner: RegionAligner,
    batch: dict[str, Any],
    device: torch.device,
    loss: Stage2Loss,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The regional contrastive loss of a batch whose forward just ran (it kept the final grids),
    and with ``loss.region_hard_negatives`` the hard-negative loss on the same region embeddings
    (None when off, or when no region caption has a word of ``loss.hard_negative_classes``)."""
    captions = batch["image_region_captions"]
    img_RE = region_embeddings(model.vision, model.final_grids, batch["image_regions"].to(device))
    tokens_RL, mask_RL = _caption_tokens(aligner, captions, device)
    contrast = aligner.contrast(img_RE, tokens_RL, mask_RL)
    if not loss.region_hard_negatives:
        return contrast, None
    from train.data.negatives import replacements

    texts, owner, keep = [], [], []
    for i, caption in enumerate(captions):
        negatives = replacements(caption, loss.hard_negative_classes, loss.hard_negative_words)
        if negatives:
            texts += [caption, *negatives]
            owner += [len(keep)] * (1 + len(negatives))
            keep.append(i)
    if not keep:
        return contrast, None
    tokens_NL, mask_NL = _caption_tokens(aligner, texts, device)
    owner_N = torch.tensor(owner, dtype=torch.long, device=device)
    return contrast, aligner.hard_negative_loss(img_RE[keep], tokens_NL, mask_NL, owner_N)


def global_term(
    model: FineViTVLMForConditionalGeneration,
    aligner: RegionAligner,
    batch: dict[str, Any],
    device: torch.device,
) -> torch.Tensor | None:
    """The global contrastive loss of a batch whose forward just ran: each sample's image against
    its global caption (None when fewer than two of the step's images have one)."""
    captions = batch["image_captions"]
    have = [i for i, c in enumerate(captions) if c]
    if len(have) < 2:
        return None
    tokens_BL, mask_BL = _caption_tokens(aligner, [captions[i] for i in have], device)
    return aligner.global_loss(model.vision, [model.final_grids[i] for i in have], tokens_BL, mask_BL)


def _caption_tokens(
    aligner: RegionAligner, texts: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, mask)`` of texts under the stage-1 tokenizer, cut to the longest of them (not the
    whole context)."""
    from train.data.loader import tokenize

    tokens_NL, mask_NL, _ = tokenize(aligner.tokenizer, texts, aligner.context, len(texts))
    width = max(int(mask_NL.sum(1).max()), 1)
    return tokens_NL[:, :width].to(device), mask_NL[:, :width].to(device)


def model_inputs(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The VLM's keyword arguments for a loader batch. Packed rows pass position ids that restart
    with each sample and no 2D mask: transformers then builds the block-causal mask (or runs
    varlen flash-attention), so a sample never sees its row neighbours."""
    packed = batch.get("position_ids_BL") is not None
    return {
        "input_ids": batch["input_ids_BL"].to(device),
        "attention_mask": None if packed else batch["mask_BL"].to(device),
        "position_ids": batch["position_ids_BL"].to(device) if packed else None,
        "vision": batch["vision"].to(device),
        "spans": batch["spans"],
        "region_boxes": batch["region_boxes"],
        "use_cache": False,
    }


def phase_at(cfg: Stage2Config, step: int) -> str:
    for ph in cfg.schedule:
        if step < ph.until:
            return ph.train
    return cfg.schedule[-1].train


def lm_flops_per_token(model: FineViTVLMForConditionalGeneration) -> float:
    """Forward FLOPs per token of the LM (2 x its matmul parameters, embeddings not counted)."""
    n = sum(
        p.numel()
        for name, p in model.language_model.named_parameters()
        if p.ndim == 2 and "embed" not in name
    )
    return 2.0 * n


# ---------------------------------------------------------------------------------- the loop


@dataclass
class Stage2Result:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    skipped_steps: int = 0
    checkpoint: str | None = None
    stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rank: int = 0
    tokens_per_s: float = 0.0
    model: Any = None  # the trained VLM (this rank's module: DDP's replica, FSDP2's shards)


def _lr_lambda(cfg: Stage2Config):
    o, total = cfg.optim, cfg.loop.steps

    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def train_stage2(cfg: Stage2Config, on_event=print) -> Stage2Result:
    """Run (or resume) stage 2 as configured; returns what the run did on this rank."""
    from train.stage1 import seed_all

    check_fits(cfg)
    rank, world, device = init_from_env()
    if cfg.loop.threads:
        torch.set_num_threads(cfg.loop.threads)
    torch.manual_seed(cfg.loop.seed)  # same projector init on every rank
    inherit_normalization(cfg)
    model, processor = build(cfg)
    model.to(device)
    dtype = (
        torch.bfloat16
        if (cfg.loop.dtype == "bfloat16" or (cfg.loop.dtype == "auto" and device.type == "cuda"))
        else None
    )
    # packed rows of images: per-image attention (stage 1's ladder), not the dense block mask the
    # model is built with for single images (17 % of a CPU step, bench/stage2_throughput.py)
    model.vision.backend = pick_backend(cfg.model.attention, device, dtype or torch.float32)
    if cfg.loop.activation_checkpointing:  # recompute each vision block and LM layer in backward
        model.vision.checkpointing = True
        model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    seed_all(cfg.loop.seed + rank)
    net = parallelize(model, cfg.loop.parallel, world, device, dtype)
    o = cfg.optim
    optim = torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=o.betas, eps=o.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(cfg))
    d = cfg.data
    max_len = d.max_len or int(getattr(model.language_model.config, "max_position_embeddings", 2048))
    loader = Stage2Loader(
        d.dataset,
        cfg.storage,
        d.regions_layer,
        d.global_layer or None,
        [(t.task, t.weight) for t in d.tasks],
        processor,
        d.batch,
        max_len,
        d.seq_len,
        d.seed,
        rank,
        world,
        d.pack,
    )
    ckpt_dir = cfg.checkpoint.dir or os.path.join(cfg.log.dir, "checkpoints")
    result = Stage2Result()
    if cfg.checkpoint.resume:
        match_optimizer_state(model, ckpt.latest(ckpt_dir))
    last, step = ckpt.resume(ckpt_dir, cfg.checkpoint.resume, net, optim, sched, loader.load_state_dict)
    if last and rank == 0:
        on_event(f"resumed from {last} at step {step}")
    peak = peak_tflops(device, dtype or torch.float32)
    logger = Logger(
        cfg.log.dir, cfg.log.tensorboard, cfg.log.progress, cfg.loop.steps, enabled=rank == 0, start=step
    )
    lm_fpt = lm_flops_per_token(model)
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        on_event(
            f"stage2: {n_params / 1e6:.2f}M params (LM {type(model.language_model).__name__}, "
            f"attention {model.language_model.config._attn_implementation}), "
            f"vision attention={model.vision.backend}, world={world}, "
            f"device={device}, max_len={max_len}, peak={peak:.3g} TFLOP/s"
        )
    aligner: RegionAligner | None = getattr(model, "region_align", None)
    model.keep_final_grids = aligner is not None
    bad_in_a_row = 0
    window = {"t": time.perf_counter(), "tokens": 0.0, "target": 0.0, "samples": 0.0, "flops": 0.0}
    t_start, all_tokens = time.perf_counter(), 0
    stop = min(cfg.loop.steps, cfg.loop.stop_at or cfg.loop.steps)
    phase = None
    while step < stop:
        if phase_at(cfg, step) != phase:
            phase = phase_at(cfg, step)
            set_phase(model, phase)
            if rank == 0:
                on_event(f"step {step}: phase {phase!r}")
        batch = loader.next()
        amp = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
        with amp:
            out = net(**model_inputs(batch, device))
            sample_BL = batch["sample_BL"].to(device) if d.pack else None
            loss = lm_loss(out.logits, batch["labels_BL"].to(device), cfg.loss.reduction, sample_BL)
            lm_value, region_loss, global_loss, hard_loss = loss.detach().float(), None, None, None
            # the terms train the encoder side (head, projection) and the text tower: only in
            # the phases that train the encoder
            if aligner is not None and phase in ("encoder", "all"):
                if batch["image_region_captions"]:
                    region_loss, hard_loss = region_terms(model, aligner, batch, device, cfg.loss)
                    loss = loss + cfg.loss.region_contrast * region_loss
                    if hard_loss is not None:
                        loss = loss + cfg.loss.region_hard_negatives * hard_loss
                if cfg.loss.global_contrast:
                    global_loss = global_term(model, aligner, batch, device)
                    if global_loss is not None:
                        loss = loss + cfg.loss.global_contrast * global_loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.grad is not None], cfg.optim.grad_clip or float("inf")
        )
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the ranks' shards
            norm = norm.full_tensor()
        value = loss.detach().float()
        if is_dist():
            import torch.distributed as dist

            both = torch.stack([value, norm.float()])
            dist.all_reduce(both)
            value, norm = both[0] / world, both[1] / world  # the same norm on every rank
        step += 1
        if not (torch.isfinite(value) and torch.isfinite(norm)):
            bad_in_a_row += 1
            result.skipped_steps += 1
            optim.zero_grad(set_to_none=True)
            sched.step()
            logger.log(step, {"skipped": "non-finite loss or gradient", "loss": float(value)})
            if bad_in_a_row >= cfg.loop.max_bad_steps:
                raise FloatingPointError(f"{bad_in_a_row} non-finite steps in a row at step {step}: stopping")
            continue
        bad_in_a_row = 0
        optim.step()
        sched.step()
        result.losses.append(float(value))
        tokens = batch["real_tokens"]
        all_tokens += tokens
        window["tokens"] += tokens
        window["target"] += int((batch["labels_BL"] != -100).sum())
        window["samples"] += len(batch["spans"])
        window["flops"] += 3 * lm_fpt * tokens
        logger.advance()
        if step % cfg.log.every == 0 or step == stop:
            dt = time.perf_counter() - window["t"]
            tflops = window["flops"] / dt / 1e12
            logger.log(
                step,
                {
                    "loss": float(value),
                    "lr": cfg.optim.lr * sched.lr_lambdas[0](sched.last_epoch),  # the base rate
                    "phase": phase,
                    "tokens_per_s": window["tokens"] / dt,
                    "target_tokens_per_s": window["target"] / dt,
                    "samples_per_s": window["samples"] / dt,
                    "lm_tflops_per_device": tflops,
                    "mfu_lm": tflops / peak,
                    "grad_norm": float(norm),
                    **(
                        {"lm_loss": float(lm_value), "region_loss": float(region_loss.detach())}
                        if region_loss is not None
                        else {}
                    ),
                    **({"global_loss": float(global_loss.detach())} if global_loss is not None else {}),
                    **({"hard_negative_loss": float(hard_loss.detach())} if hard_loss is not None else {}),
                },
            )
            window = {"t": time.perf_counter(), "tokens": 0.0, "target": 0.0, "samples": 0.0, "flops": 0.0}
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < stop:
            result.checkpoint = _save(ckpt_dir, step, net, optim, sched, loader, cfg)
    if step > 0 and (not last or step > int(last.rsplit("_", 1)[-1])):
        result.checkpoint = _save(ckpt_dir, step, net, optim, sched, loader, cfg)
    result.steps = step
    result.stats = loader.stats()
    result.seconds = time.perf_counter() - t_start
    result.tokens_per_s = all_tokens / max(result.seconds, 1e-9)
    result.rank = rank
    result.model = model
    if rank == 0:
        on_event(f"stage2 done: {step} steps, data: {result.stats}, checkpoint: {result.checkpoint}")
    logger.close()
    return result


def match_optimizer_state(model: torch.nn.Module, step_dir: str | None) -> None:
    """Before resuming from ``step_dir``: trainable exactly the parameters that have optimizer state
    there. DCP's loader first makes state for every trainable parameter and then wants each one in
    the checkpoint, so a run stopped in an early phase (projector only) could not resume with all
    parameters trainable. The loop sets the resumed step's phase right after."""
    if not step_dir:
        return
    import torch.distributed.checkpoint as dcp

    meta = dcp.FileSystemReader(step_dir).read_metadata().state_dict_metadata
    have = {k[len("optim.state.") :].rsplit(".", 1)[0] for k in meta if k.startswith("optim.state.")}
    for name, p in model.named_parameters():
        p.requires_grad_(name in have)


def _save(
    root: str, step: int, net: Any, optim: Any, sched: Any, loader: Stage2Loader, cfg: Stage2Config
) -> str:
    extra = {"step": step, "sched": sched.state_dict(), "loader": loader.state_dict()}
    path = ckpt.save(root, step, net, optim, extra, keep=cfg.checkpoint.keep)
    if ckpt.rank() == 0:
        # the run's config beside the checkpoints: export rebuilds the model from it
        with open(os.path.join(os.path.dirname(path), "stage2_config.json"), "w") as f:
            json.dump(redact_secrets(cfg.model_dump(mode="json")), f, indent=2)  # no credentials
    return path


def load_stage2(
    path: str, merge: bool = True
) -> tuple[FineViTVLMForConditionalGeneration, FineViTVLMProcessor, Stage2Config]:
    """Rebuild a trained stage-2 model from a checkpoint (step folder, checkpoints folder or log dir).
    LoRA adapters are merged into the LM unless ``merge`` is False (then the model is as trained)."""
    import torch.distributed.checkpoint as dcp

    from train.model.encoder import resolve_checkpoint

    step_dir = resolve_checkpoint(path)
    cfg_path = next(
        (
            p / "stage2_config.json"
            for p in [step_dir, *list(step_dir.parents)[:3]]
            if (p / "stage2_config.json").is_file()
        ),
        None,
    )
    if cfg_path is None:
        raise ConfigError(f"no stage2_config.json beside {step_dir}: not a stage-2 checkpoint")
    raw = json.loads(cfg_path.read_text())
    # runs from before the projector section was trained without its additions: build them so
    raw.setdefault("projector", {"feature_layers": [-1], "abs_pos": False, "region_tokens": False})
    cfg = Stage2Config.model_validate(raw)
    model, processor = build(cfg)
    state = {"model": model.state_dict()}
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(step_dir))
    model.load_state_dict(state["model"])
    if merge:
        merge_lora(model)
    return model.eval(), processor, cfg


def make_tiny_lm(
    tokenizer_dir: str,
    out: str,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    context: int = 256,
) -> str:
    """A tiny random causal LM (Llama or Qwen2 config) with the project's tokenizer, a chat template
    and the ``<image>`` token: for tests and the tiny recipe (no download)."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.chat_template = (
        "{% for m in messages %}{{ bos_token }}{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}"
    )
    kw = dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    config = AutoConfig.for_model(arch, **kw)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


TASK_NAMES = TASKS
