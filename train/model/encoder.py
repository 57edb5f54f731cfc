"""The FineViT encoder as a library: images and texts in, unit-norm embeddings out.

Shared by eval, the alignment filter and stage-2 export. It carries its own preprocessing
(patch size, patch budget, mean/std, text context) and imports nothing of the training loop,
optimizer or loader: a :class:`FineViTEncoder` is built from ``(model config, state dict,
preprocessing, tokenizer)`` alone.

    enc = load_encoder("runs/stage1_tiny")           # a log dir, checkpoints dir, step dir or export
    img_NE = enc.encode_image([pil, ...])            # unit-norm, float32, on the CPU
    txt_NE = enc.encode_text(["a red circle", ...])
    grids = enc.patch_features([pil, ...])           # per image (h, w, C) after the last norm
    reg_NE = enc.encode_regions(grids, boxes)        # RoIAlign 1x1 + the pooling head + projection

Legend: N images or texts, E embedding size, C vision width, T packed tokens, S tokens per row,
P patch values (3*p*p), L text context.

Inference packing: one image per row (row length = the batch's longest grid), the rest of a row
is padding that attends only to itself, so an image's embedding never depends on its
neighbours (the packed-model test in tests/train/test_model.py shows the same for training).

Where the settings come from, for a stage-1 checkpoint: the model config and the tokenizer path
from the run's config (``config.json`` / ``config.yaml`` in the step folder or a parent, written
by the trainer, or given here), mean/std from ``data.mean`` / ``data.std`` of that config when
present, else 0.5/0.5 (what stage 1 used before normalization was recorded).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from train.config import ModelConfig
from train.data.naflex import grid_for, patchify
from train.model.attention import meta_from_segments, packed_attention
from train.model.rope import rope_2d
from train.model.towers import TextTower, VisionBatch, VisionTower, _init, _run_blocks

ENCODER_JSON = "encoder.json"  # an exported encoder folder: this file + weights + tokenizer/
WEIGHTS = "model.safetensors"
CONFIG_NAMES = ("config.json", "config.yaml", "stage1_config.json", "stage1_config.yaml")


class EncoderError(ValueError):
    """The encoder cannot do what was asked (no text tower, no config, bad folder); the message says why."""


@dataclass(frozen=True)
class Preprocess:
    """Everything that turns a PIL image / a string into model input."""

    patch_size: int = 16
    max_patches: int = 256
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    context: int = 256
    upscale: bool = False  # small images scaled up to fill max_patches (train/data/naflex.py)

    def describe(self) -> str:
        return f"patch {self.patch_size}, <= {self.max_patches} patches, text <= {self.context} tokens"


class FineViTEncoder(nn.Module):
    """Vision tower (+ text tower and tokenizer when given) with their preprocessing.

    ``state_dict`` uses the stage-1 model's names (``vision.*``, ``text.*``; other keys such as
    ``logit_scale`` are ignored). Without ``text.*`` weights or without a tokenizer the encoder
    is vision-only and :meth:`encode_text` raises :class:`EncoderError`.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        state_dict: dict[str, torch.Tensor] | None,
        preprocess: Preprocess,
        tokenizer: Any = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        self.model_cfg, self.preprocess = model_cfg, preprocess
        if model_cfg.vision.patch_size != preprocess.patch_size:
            raise EncoderError(
                f"preprocess.patch_size ({preprocess.patch_size}) != model.vision.patch_size "
                f"({model_cfg.vision.patch_size})"
            )
        self.vision = VisionTower(model_cfg, "sdpa_dense")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = _load_tokenizer(str(tokenizer))
        self.tokenizer = tokenizer
        sd = state_dict or {}
        has_text_weights = state_dict is None or any(k.startswith("text.") for k in sd)
        self.text: TextTower | None = None
        if tokenizer is not None and has_text_weights:
            vocab = vocab_size or model_cfg.text.vocab_size or len(tokenizer)
            self.text = TextTower(model_cfg, vocab)
        self.apply(_init)
        if state_dict is not None:
            own = self.state_dict()
            missing = [k for k in own if k not in sd]
            if missing:
                raise EncoderError(f"state dict lacks {len(missing)} weights, e.g. {missing[:3]}")
            self.load_state_dict({k: sd[k] for k in own})
        self.eval()

    # ---- properties ----------------------------------------------------------------------
    @property
    def has_text(self) -> bool:
        return self.text is not None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def embed_dim(self) -> int:
        return self.model_cfg.embed_dim

    def settings(self) -> dict[str, Any]:
        """What changes results, for result tables."""
        p = self.preprocess
        return {
            "patch_size": p.patch_size,
            "max_patches": p.max_patches,
            "resolution": f"{'upscaled to' if p.upscale else 'native,'} <= {p.max_patches} patches of {p.patch_size}px "
            f"(~{int(p.max_patches**0.5 * p.patch_size)}px square)",
            "text_context": p.context if self.has_text else None,
            "mean": list(p.mean),
            "std": list(p.std),
        }

    def with_max_patches(self, max_patches: int) -> FineViTEncoder:
        """The same weights with another patch budget (shares parameters)."""
        new = FineViTEncoder.__new__(FineViTEncoder)
        nn.Module.__init__(new)
        new.model_cfg, new.tokenizer = self.model_cfg, self.tokenizer
        new.preprocess = Preprocess(**{**asdict(self.preprocess), "max_patches": int(max_patches)})
        new.vision, new.text = self.vision, self.text
        new.train(self.training)
        return new

    # ---- images ----------------------------------------------------------------------------
    def _pack(self, images: Sequence[Image.Image]) -> tuple[VisionBatch, list[tuple[int, int]]]:
        p = self.preprocess
        items, grids = [], []
        for im in images:
            grid = grid_for(im.width, im.height, p.patch_size, p.max_patches, p.upscale)
            items.append(patchify(im, grid, p.patch_size, p.mean, p.std))
            grids.append(grid)
        B, S = len(items), max(x[0].shape[0] for x in items)
        P = 3 * p.patch_size**2
        patches_TP = torch.zeros(B * S, P)
        pos_T2 = torch.zeros(B * S, 2, dtype=torch.long)
        img_T = torch.full((B * S,), -1, dtype=torch.long)
        seg_RS = torch.empty(B, S, dtype=torch.long)
        for b, (patches_NP, pos_N2) in enumerate(items):
            n = patches_NP.shape[0]
            patches_TP[b * S : b * S + n] = patches_NP
            pos_T2[b * S : b * S + n] = pos_N2
            img_T[b * S : b * S + n] = b
            seg_RS[b] = B + b  # the row's padding: its own document
            seg_RS[b, :n] = b
        meta = meta_from_segments(seg_RS, max_seqlen=S)
        return VisionBatch(patches_TP, pos_T2, img_T, meta, B), grids

    def _tokens(self, batch: VisionBatch) -> torch.Tensor:
        """The vision tower up to (and including) its final norm: x_TD."""
        v = self.vision
        x_TD = v.norm_pre(v.patch_embed(batch.patches_TP))
        cos, sin = rope_2d(batch.pos_T2, v.cfg.width // v.cfg.heads, v.cfg.rope_theta)
        meta = batch.meta

        def attend(q, k, w):
            return packed_attention(q, k, w, meta, v.backend)

        return v.norm(_run_blocks(v.blocks, x_TD, cos, sin, attend, False))

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image.Image], normalize: bool = True) -> torch.Tensor:
        """``(N, E)`` float32 embeddings on the CPU (unit norm when ``normalize``)."""
        if not images:
            return torch.zeros(0, self.embed_dim)
        batch, _ = self._pack(images)
        batch = batch.to(self.device)
        x_TD = self._tokens(batch)
        out = self.vision.proj(self.vision.head(x_TD, batch.img_T, batch.n_images)).float()
        return (F.normalize(out, dim=-1) if normalize else out).cpu()

    @torch.no_grad()
    def patch_features(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Per image, the final-norm patch tokens as a ``(h, w, C)`` grid (h, w: its NaFlex grid)."""
        if not images:
            return []
        batch, grids = self._pack(images)
        batch = batch.to(self.device)
        x_TD = self._tokens(batch).float()
        S = batch.meta.seg_RS.shape[1]
        return [x_TD[b * S : b * S + gh * gw].reshape(gh, gw, -1).cpu() for b, (gh, gw) in enumerate(grids)]

    @torch.no_grad()
    def pool_regions(self, feats_NC: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Region features (e.g. RoIAlign 1x1 of :meth:`patch_features`) into the joint space.

        Each region is pooled as a one-token image: the MAP head's attention over a single token
        is the identity, so this is the head's value path + MLP, then the projection."""
        N = feats_NC.shape[0]
        if N == 0:
            return torch.zeros(0, self.embed_dim)
        x = feats_NC.to(self.device, torch.float32)
        seg = torch.arange(N, device=x.device)
        out = self.vision.proj(self.vision.head(x, seg, N)).float()
        return (F.normalize(out, dim=-1) if normalize else out).cpu()

    # ---- texts -------------------------------------------------------------------------------
    def require_text(self, why: str = "this task") -> None:
        if not self.has_text:
            raise EncoderError(
                f"{why} needs a text tower, but this encoder is vision-only (no text.* weights or no "
                "tokenizer in the checkpoint): use a stage-1 checkpoint or an export that kept the text tower"
            )

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``(tokens_NL, mask_NL, lengths)``; ``lengths`` are before truncation to the context."""
        self.require_text("encode_text")
        L = self.preprocess.context
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"] if texts else []
        tokens_NL = torch.full((len(ids), L), pad, dtype=torch.long)
        mask_NL = torch.zeros((len(ids), L), dtype=torch.bool)
        lengths = []
        for i, row in enumerate(ids):
            lengths.append(len(row))
            row = row[:L]
            tokens_NL[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask_NL[i, : len(row)] = True
        return tokens_NL, mask_NL, lengths

    def text_lengths(self, texts: Sequence[str]) -> list[int]:
        """Token counts (before truncation) of ``texts`` under this encoder's tokenizer."""
        self.require_text("text_lengths")
        return [len(r) for r in self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]]

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """``(N, E)`` float32 embeddings on the CPU; texts longer than the context are truncated."""
        self.require_text("encode_text")
        if not texts:
            return torch.zeros(0, self.embed_dim)
        tokens_NL, mask_NL, _ = self.tokenize(texts)
        out = self.text(tokens_NL.to(self.device), mask_NL.to(self.device)).float()
        return (F.normalize(out, dim=-1) if normalize else out).cpu()

    # ---- saving (an exported folder) -----------------------------------------------------------
    def save(self, out: str | os.PathLike) -> str:
        """Write ``encoder.json`` + ``model.safetensors`` (+ ``tokenizer/``): :func:`load_encoder` reads it."""
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, out / WEIGHTS)
        meta = {
            "format": "finevit-encoder",
            "version": 1,
            "model": self.model_cfg.model_dump(mode="json"),
            "preprocess": asdict(self.preprocess),
            "vocab_size": self.text.embed.num_embeddings if self.text is not None else None,
            "tokenizer": "tokenizer" if self.tokenizer is not None else None,
        }
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out / "tokenizer"))
        (out / ENCODER_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        return str(out)


# ------------------------------------------------------------------------------------- loading


def _load_tokenizer(path: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as e:
        raise EncoderError(f"cannot load a tokenizer from {path!r}: {e}") from None


def _read_config_file(path: Path) -> dict[str, Any]:
    import yaml

    text = path.read_text()
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise EncoderError(f"{path}: expected a mapping (the stage-1 config tree)")
    return data


def find_run_config(step_dir: Path) -> Path | None:
    """The run's config saved beside a checkpoint: in the step folder or up to three parents."""
    for d in [step_dir, *list(step_dir.parents)[:3]]:
        for name in CONFIG_NAMES:
            if (d / name).is_file():
                return d / name
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A committed stage-1 step folder from a step folder, a checkpoints folder or a run's log folder."""
    p = Path(path)
    if not p.exists():
        raise EncoderError(f"checkpoint not found: {p}")
    if (p / ".metadata").is_file():
        return p
    for root in (p, p / "checkpoints"):
        if root.is_dir():
            done = sorted(
                n.name for n in root.iterdir() if n.name.startswith("step_") and (n / "done").is_file()
            )
            if done:
                return root / done[-1]
    raise EncoderError(
        f"{p} is not a FineViT encoder: expected an exported folder ({ENCODER_JSON}), a stage-1 step "
        "folder (DCP .metadata), or a folder holding committed step_* checkpoints"
    )


def _dcp_model_state(step_dir: Path, names: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load only the model tensors ``names`` (stage-1 names) from a DCP checkpoint (no optimizer)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    state = {"model": {k: torch.empty_like(v) for k, v in names.items()}}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(step_dir))
    return state["model"]


def load_encoder(
    path: str | os.PathLike,
    config: str | os.PathLike | dict[str, Any] | Any | None = None,
    overrides: list[str] | None = None,
    tokenizer: str | None = None,
    max_patches: int | None = None,
    device: str | torch.device = "cpu",
) -> FineViTEncoder:
    """Load an encoder from an exported folder or a stage-1 checkpoint (step / checkpoints / log dir).

    For a stage-1 checkpoint the run config is found beside it (see :func:`find_run_config`) or
    given as ``config`` (a YAML/JSON path, a dict or a ``Stage1Config``) with ``overrides``
    (``--set`` strings). ``tokenizer`` overrides the config's ``data.tokenizer``; ``max_patches``
    the patch budget (default: the training budget).
    """
    p = Path(path)
    if (p / ENCODER_JSON).is_file():
        enc = _load_exported(p, tokenizer)
    else:
        enc = _load_stage1(p, config, overrides, tokenizer)
    if max_patches:
        enc = enc.with_max_patches(max_patches)
    return enc.to(device)


def _load_exported(p: Path, tokenizer: str | None) -> FineViTEncoder:
    from safetensors.torch import load_file

    meta = json.loads((p / ENCODER_JSON).read_text())
    for field in ("model", "preprocess"):
        if field not in meta:
            raise EncoderError(f"{p / ENCODER_JSON}: missing field {field!r}")
    pre = meta["preprocess"]
    pre = Preprocess(**{**pre, "mean": tuple(pre["mean"]), "std": tuple(pre["std"])})
    tok = tokenizer or (str(p / meta["tokenizer"]) if meta.get("tokenizer") else None)
    weights = p / meta.get("weights", WEIGHTS)
    if not weights.is_file():
        raise EncoderError(f"{p}: weights file {weights.name} not found")
    return FineViTEncoder(
        ModelConfig.model_validate(meta["model"]),
        load_file(str(weights)),
        pre,
        tok,
        meta.get("vocab_size"),
    )


def _stage1_config(step: Path, config: Any, overrides: list[str] | None) -> tuple[Any, str]:
    from engine.config import apply_overrides
    from train.config import Stage1Config

    if isinstance(config, Stage1Config):
        data, origin = config.model_dump(mode="json"), "given config"
    elif isinstance(config, dict):
        data, origin = dict(config), "given config"
    elif config is not None:
        data, origin = _read_config_file(Path(config)), str(config)
    else:
        found = find_run_config(step)
        if found is None:
            raise EncoderError(
                f"no run config found beside {step} (looked for {', '.join(CONFIG_NAMES)} there and in "
                "3 parents): pass the stage-1 recipe with --config (and the --set overrides used to train)"
            )
        data, origin = _read_config_file(found), str(found)
    if overrides:
        data = apply_overrides(data, overrides)
    try:
        cfg = Stage1Config.model_validate(data)
    except Exception as e:
        raise EncoderError(f"{origin}: not a stage-1 config: {e}") from None
    explicit = any(o.split("=", 1)[0].strip() in ("data.mean", "data.std") for o in overrides or [])
    if config is not None and cfg.data.normalize == "dataset" and not explicit:
        # a recipe holds no dataset statistics: the run resolved them and wrote them beside the
        # checkpoint; preprocessing with the recipe's placeholder mean/std would blind the encoder
        stats = run_pixel_stats(step)
        if stats is None:
            raise EncoderError(
                f"{origin}: data.normalize=dataset, but no run config beside {step} holds the mean/std "
                "the run measured: evaluate the run folder without --config, or --set data.mean/data.std"
            )
        cfg.data.mean, cfg.data.std = stats
    return cfg, origin


def run_pixel_stats(step: Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``(mean, std)`` a stage-1 run trained with, from the run config beside ``step``, or None."""
    found = find_run_config(step)
    run = _read_config_file(found).get("data", {}) if found else {}
    if "mean" not in run or "std" not in run:
        return None
    return tuple(run["mean"]), tuple(run["std"])


def _load_stage1(p: Path, config: Any, overrides: list[str] | None, tokenizer: str | None) -> FineViTEncoder:
    step = resolve_checkpoint(p)
    cfg, _ = _stage1_config(step, config, overrides)
    tok_path = tokenizer or cfg.data.tokenizer
    tok = _load_tokenizer(tok_path) if tok_path else None
    pre = Preprocess(
        patch_size=cfg.model.vision.patch_size,
        max_patches=cfg.data.max_patches,
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
        context=cfg.model.text.context,
    )
    shell = FineViTEncoder(cfg.model, None, pre, tok)
    sd = _dcp_model_state(step, shell.state_dict())
    shell.load_state_dict(sd)
    shell.checkpoint = str(step)
    return shell


def load_stage1_text(path: str | os.PathLike) -> tuple[TextTower, Any, int, float]:
    """A stage-1 run's text side only: ``(text tower, tokenizer, context, logit_scale)``, read from
    the checkpoint without its vision tower (stage 2 has loaded that already)."""
    step = resolve_checkpoint(path)
    cfg, origin = _stage1_config(step, None, None)
    if not cfg.data.tokenizer:
        raise EncoderError(f"{origin} names no data.tokenizer: the text tower of {step} cannot be used")
    tok = _load_tokenizer(cfg.data.tokenizer)
    text = TextTower(cfg.model, cfg.model.text.vocab_size or len(tok))
    names = {f"text.{k}": v for k, v in text.state_dict().items()} | {"logit_scale": torch.zeros(1)}
    sd = _dcp_model_state(step, names)
    text.load_state_dict({k[len("text.") :]: v for k, v in sd.items() if k.startswith("text.")})
    return text, tok, cfg.model.text.context, float(sd["logit_scale"][0])


def encoder_from_model(model: nn.Module, cfg: Any, tokenizer: Any) -> FineViTEncoder:
    """A view of a live stage-1 model (``model.vision`` / ``model.text`` shared, not copied) with the
    run's preprocessing: for evaluating during training (``eval.hooks.periodic_eval``).

    ``cfg``: the run's ``Stage1Config``. Under FSDP2 the towers' parameters are sharded: every rank
    must call the encoder together (as in a forward pass)."""
    model = getattr(model, "module", model)  # DDP
    pre = Preprocess(
        patch_size=cfg.model.vision.patch_size,
        max_patches=cfg.data.max_patches,
        mean=tuple(cfg.data.mean),
        std=tuple(cfg.data.std),
        context=cfg.model.text.context,
    )
    enc = FineViTEncoder.__new__(FineViTEncoder)
    nn.Module.__init__(enc)
    enc.model_cfg, enc.preprocess, enc.tokenizer = cfg.model, pre, tokenizer
    enc.vision, enc.text = model.vision, model.text
    return enc


def random_encoder(
    model_cfg: ModelConfig, preprocess: Preprocess, tokenizer: Any, seed: int = 0
) -> FineViTEncoder:
    """A randomly initialized encoder (the trainer's init): the floor a trained one must beat."""
    torch.manual_seed(seed)
    return FineViTEncoder(model_cfg, None, preprocess, tokenizer)
