"""The stage-2 VLM (and the encoder) as ``transformers`` classes: what training runs and what
``finevit export`` writes, so an export loads with ``trust_remote_code=True`` and behaves the same.

* :class:`FineViTVLMForConditionalGeneration`: the stage-1 vision tower (packed, native
  resolution) -> :class:`~train.model.projector.PatchMerger` -> any causal LM built from
  ``config.lm_config`` (``AutoModelForCausalLM``). The prompt's ``<image>`` placeholder is
  expanded by the processor into one image token per merged patch; the LM's embeddings of
  those tokens are replaced by the projected image features, in order.
* :class:`FineViTVLMProcessor`: chat template (image parts -> ``<image>``) + NaFlex patchify
  + tokenizer; ``AutoProcessor`` loads it from an exported folder.
* Region tokens (Ferret's hybrid region representation, when the model has a ``region_token``):
  the processor puts a ``<region>`` token after every ``<box>(x0,y0),(x1,y1)</box>`` of a prompt
  and returns the boxes as ``region_boxes``; the model fills each such token with the box
  RoIAligned on its image's patch grid to a 2x2 block, projected like any block of the grid
  (:meth:`PatchMerger.regions`). The box text says where; the region
  token carries what is there, so "describe this box" does not hinge on the LM learning to turn
  coordinates into an attention query. Prompts stay plain text: an OpenAI-style request with a
  box in its text gets the same tokens as training did.
* :class:`FineViTModel`: the encoder alone (``vision.*`` + ``text.*``) with ``encode_image`` /
  ``encode_text`` like OpenCLIP's models (``AutoModel``).

Legend: T packed vision tokens, R rows, S tokens per row, P patch values (3*p*p), C vision
width, N images, Nmax the largest image's patch count, B sequences, L sequence length.

This file imports the model library only (``train.model.*``, ``train.data.naflex``), never the
trainer: the export copies it with those files and rewrites the imports as relative ones.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BatchFeature,
    PretrainedConfig,
    PreTrainedModel,
)

from train.data.naflex import grid_for, patchify
from train.model.attention import meta_from_segments, packed_attention
from train.model.projector import PatchMerger, merged_tokens
from train.model.rope import rope_2d
from train.model.towers import TextTower, VisionBatch, VisionTower, _init, _run_blocks

IMAGE_TOKEN = "<image>"
REGION_TOKEN = "<region>"
PREPROCESSOR_FILE = "preprocessor_config.json"
# a box on the 0-1000 grid as prompts write it (Qwen2-VL's convention; train.data.regions.box_text)
BOX_RE = re.compile(r"<box>\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*</box>")

# (start token in the packed T axis, grid rows, grid cols) of each image, in prompt order
Span = tuple[int, int, int]


def _ns(d: Any) -> Any:
    """A nested dict as attribute access (the model library reads ``cfg.vision.width``)."""
    if isinstance(d, dict):
        return SimpleNamespace(**{k: _ns(v) for k, v in d.items()})
    return d


def vision_tokens(tower: VisionTower, batch: VisionBatch, layers: Sequence[int] = (-1,)) -> torch.Tensor:
    """The vision tower's patch tokens (no pooling head): ``x_TD``, or ``(T, D * len(layers))``.

    ``layers`` picks what the projector reads, LLaVA's ``vision_feature_layer`` as a list whose
    outputs are concatenated: ``-1`` the last block after the final norm; ``k >= 0`` the output of
    the first ``k`` blocks (``0``: the patch embeddings) under a plain layer norm."""
    x_TD = tower.norm_pre(tower.patch_embed(batch.patches_TP))
    cos, sin = rope_2d(batch.pos_T2, tower.cfg.width // tower.cfg.heads, tower.cfg.rope_theta)
    meta, backend = batch.meta, tower.backend

    def attend(q, k, v):
        return packed_attention(q, k, v, meta, backend)

    if tuple(layers) == (-1,):
        return tower.norm(_run_blocks(tower.blocks, x_TD, cos, sin, attend, tower.checkpointing))
    depth = len(tower.blocks)
    want = sorted({depth if k == -1 else k for k in layers})
    if want[0] < 0 or want[-1] > depth:
        raise ValueError(f"vision feature layers {list(layers)}: each must be -1 or 0..{depth}")
    outs = {0: x_TD}
    for i in range(want[-1]):
        x_TD = _run_blocks(tower.blocks[i : i + 1], x_TD, cos, sin, attend, tower.checkpointing)
        outs[i + 1] = x_TD
    feats = [
        tower.norm(outs[depth]) if k in (-1, depth) else F.layer_norm(outs[k], outs[k].shape[-1:])
        for k in layers
    ]
    return torch.cat(feats, dim=-1)


def pack_padded(
    pixel_values_NnP: torch.Tensor, image_grid_N2: torch.Tensor
) -> tuple[VisionBatch, list[Span]]:
    """One image per row (row length Nmax): the processor's padded ``pixel_values`` as a packed batch."""
    N, S, P = pixel_values_NnP.shape
    dev = pixel_values_NnP.device
    pos_T2 = torch.zeros(N * S, 2, dtype=torch.long, device=dev)
    img_T = torch.full((N * S,), -1, dtype=torch.long, device=dev)
    seg_RS = torch.empty(N, S, dtype=torch.long)
    spans: list[Span] = []
    for b, (gh, gw) in enumerate(image_grid_N2.tolist()):
        n = gh * gw
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        pos_T2[b * S : b * S + n] = torch.stack([rows.reshape(-1), cols.reshape(-1)], 1).to(dev)
        img_T[b * S : b * S + n] = b
        seg_RS[b] = N + b  # the row's padding is its own document
        seg_RS[b, :n] = b
        spans.append((b * S, gh, gw))
    meta = meta_from_segments(seg_RS, max_seqlen=S).to(dev)
    return VisionBatch(pixel_values_NnP.reshape(N * S, P), pos_T2, img_T, meta, N), spans


def boxes_in(text: str) -> list[tuple[float, float, float, float]]:
    """Every ``<box>(x0,y0),(x1,y1)</box>`` of ``text``, normalized, in order."""
    return [tuple(int(g) / 1000 for g in m.groups()) for m in BOX_RE.finditer(text)]  # type: ignore[misc]


def region_features(
    projector: PatchMerger,
    patch_grids: Sequence[torch.Tensor],
    boxes_R5: torch.Tensor,
    pixel_grids: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(R, H)``: one LM token per ``[image, x0, y0, x1, y1]`` row, in order: the box RoIAligned
    on that image's patch grid and projected like a 2x2 block (:meth:`PatchMerger.regions`)."""
    out: list[torch.Tensor | None] = [None] * boxes_R5.shape[0]
    images = boxes_R5[:, 0].long()
    for i in images.unique().tolist():
        rows = (images == i).nonzero().flatten()
        pixels = pixel_grids[i] if pixel_grids is not None else None
        feats = projector.regions(patch_grids[i], boxes_R5[rows, 1:], pixels)
        for r, f in zip(rows.tolist(), feats, strict=True):
            out[r] = f
    return torch.stack(out)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------ the VLM


class FineViTVLMConfig(PretrainedConfig):
    model_type = "finevit_vlm"

    def __init__(
        self,
        vision: dict | None = None,
        preprocess: dict | None = None,
        lm_config: dict | None = None,
        image_token: str = IMAGE_TOKEN,
        image_token_id: int = 0,
        vision_feature_layers: Sequence[int] = (-1,),
        projector_abs_pos: bool = False,
        region_token: str | None = None,
        region_token_id: int | None = None,
        region_pixels: bool = False,
        image_pixels: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vision = vision or {}
        self.preprocess = preprocess or {}
        self.lm_config = lm_config or {}
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.vision_feature_layers = list(vision_feature_layers)
        self.projector_abs_pos = projector_abs_pos
        self.region_token = region_token
        self.region_token_id = region_token_id
        self.region_pixels = region_pixels
        self.image_pixels = image_pixels
        super().__init__(**kwargs)


class FineViTVLMForConditionalGeneration(PreTrainedModel):
    """Vision tower -> projector -> causal LM. ``forward`` returns the LM's output (``loss`` when
    ``labels`` are given: next-token loss on tokens whose label is not -100)."""

    config_class = FineViTVLMConfig
    base_model_prefix = ""
    # training only: keep each image's final patch grid of the last forward in ``final_grids``
    keep_final_grids = False
    final_grids: list[torch.Tensor] = []
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, config: FineViTVLMConfig, language_model: nn.Module | None = None) -> None:
        super().__init__(config)
        model_cfg = _ns(config.vision)
        self.vision = VisionTower(model_cfg, "sdpa_dense")
        # the pooling head and projection are stage 1's: unused here (and never trained)
        self.vision.head.requires_grad_(False)
        self.vision.proj.requires_grad_(False)
        if language_model is None:
            lm_config = dict(config.lm_config)
            lm_config = AutoConfig.for_model(lm_config.pop("model_type"), **lm_config)
            language_model = AutoModelForCausalLM.from_config(lm_config)
        self.language_model = language_model
        hidden = self.language_model.get_input_embeddings().weight.shape[1]
        self.feature_layers = list(getattr(config, "vision_feature_layers", None) or [-1])
        self.projector = PatchMerger(
            model_cfg.vision.width * len(self.feature_layers),
            hidden,
            abs_pos=bool(getattr(config, "projector_abs_pos", False)),
            region_pixels=bool(getattr(config, "region_pixels", False)),
            image_pixels=bool(getattr(config, "image_pixels", False)),
        )
        self.projector.apply(_init)
        self.post_init()
        self.generation_config = self.language_model.generation_config

    def _init_weights(self, module: nn.Module) -> None:
        _init(module)

    def patch_grids(self, vision: VisionBatch, spans: Sequence[Span]) -> list[torch.Tensor]:
        """Each image's vision features (the projector's input) as its patch grid ``(gh, gw, C)``."""
        x_TC = vision_tokens(self.vision, vision, self.feature_layers)
        return [x_TC[t0 : t0 + gh * gw].reshape(gh, gw, -1) for t0, gh, gw in spans]

    def pixel_grids(self, vision: VisionBatch, spans: Sequence[Span]) -> list[torch.Tensor]:
        """Each image's (normalized) pixels as the tower sees them, ``(gh * p, gw * p, 3)``: the
        patches of :func:`~train.data.naflex.patchify` put back in place."""
        p = int(self.config.vision["vision"]["patch_size"])
        out = []
        for t0, gh, gw in spans:
            x = vision.patches_TP[t0 : t0 + gh * gw].reshape(gh, gw, p, p, 3)
            out.append(x.permute(0, 2, 1, 3, 4).reshape(gh * p, gw * p, 3))
        return out

    def image_embeds(self, vision: VisionBatch, spans: Sequence[Span]) -> torch.Tensor:
        """Projected features of every image, concatenated in ``spans`` order: ``(sum M, H)``."""
        pixels = self.pixel_grids(vision, spans) if self.projector.image_pixels else None
        return self._project(self.patch_grids(vision, spans), pixels)

    def _project(
        self, patch_grids: Sequence[torch.Tensor], pixel_grids: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:
        if not patch_grids:
            return self.projector.fc2.weight.new_zeros(0, self.projector.fc2.out_features)
        pixels = pixel_grids if pixel_grids is not None else [None] * len(patch_grids)
        return torch.cat([self.projector(x, p) for x, p in zip(patch_grids, pixels, strict=True)])

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid: torch.Tensor | None = None,
        vision: VisionBatch | None = None,
        spans: Sequence[Span] | None = None,
        region_boxes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """LM input embeddings with the image tokens replaced by the images' features (and region
        tokens by their boxes' features)."""
        embeds_BLH = self.language_model.get_input_embeddings()(input_ids)
        if vision is None and pixel_values is not None:
            vision, spans = pack_padded(pixel_values.to(self.vision.patch_embed.weight.dtype), image_grid)
        is_image_BL = input_ids == self.config.image_token_id
        n_slots = int(is_image_BL.sum())
        rid = getattr(self.config, "region_token_id", None)
        is_region_BL = input_ids == rid if rid is not None else None
        n_regions = int(is_region_BL.sum()) if is_region_BL is not None else 0
        if vision is None:
            if n_slots or n_regions:
                raise ValueError(
                    f"{n_slots} image and {n_regions} region tokens in the prompt but no image given"
                )
            return embeds_BLH
        patch_grids = self.patch_grids(vision, spans)  # once: the image tokens and the region tokens
        if self.keep_final_grids:  # stage 2's regional contrastive term reads them (region_align.py)
            j, C = self.feature_layers.index(-1), self.vision.cfg.width
            self.final_grids = [g[..., j * C : (j + 1) * C] for g in patch_grids]
        # the image as the tower sees it, once, and only when a token reads it: every image token
        # (image_pixels) or the prompt's region tokens (region_pixels)
        reads = self.projector.image_pixels or (n_regions > 0 and self.projector.region_pixels)
        pixels = self.pixel_grids(vision, spans) if reads else None
        feats_MH = self._project(patch_grids, pixels if self.projector.image_pixels else None)
        feats_MH = feats_MH.to(embeds_BLH.dtype)
        if feats_MH.shape[0] != n_slots:
            raise ValueError(
                f"the prompt has {n_slots} image tokens but the images give {feats_MH.shape[0]} features: "
                "build prompts with the processor"
            )
        embeds_BLH = embeds_BLH.masked_scatter(is_image_BL[..., None], feats_MH)
        if n_regions:
            boxes = region_boxes if region_boxes is not None else torch.zeros(0, 5)
            if boxes.shape[0] != n_regions:
                raise ValueError(
                    f"the prompt has {n_regions} region tokens but {boxes.shape[0]} region boxes were given: "
                    "build prompts with the processor"
                )
            regions_RH = region_features(self.projector, patch_grids, boxes, pixels)
            embeds_BLH = embeds_BLH.masked_scatter(is_region_BL[..., None], regions_RH.to(embeds_BLH.dtype))
        return embeds_BLH

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        vision: VisionBatch | None = None,
        spans: Sequence[Span] | None = None,
        region_boxes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        embeds = self.embed(input_ids, pixel_values, image_grid, vision, spans, region_boxes)
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Like ``GenerationMixin.generate`` of a decoder-only model: prompt ids then new ids."""
        embeds = self.embed(input_ids, pixel_values, image_grid, region_boxes=region_boxes)
        new = self.language_model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
        return torch.cat([input_ids, new.to(input_ids.device)], 1)


# ------------------------------------------------------------------------------ the processor


class FineViTVLMProcessor:
    """Chat template + NaFlex patchify + tokenizer, as ``AutoProcessor`` returns for a VLM.

    ``apply_chat_template`` renders image parts as ``<image>`` and text parts as text, then uses
    the tokenizer's chat template; ``__call__`` expands each ``<image>`` into one image token per
    merged patch of that image and returns ``input_ids``, ``attention_mask``, ``pixel_values``
    ``(N, Nmax, P)`` and ``image_grid`` ``(N, 2)``. With a ``region_token``, each box of a prompt
    that has an image gets a region token after it, and ``region_boxes`` ``(R, 5)`` says which
    image (index into the call's images: the last one before the box) and which box.
    """

    def __init__(
        self,
        tokenizer: Any,
        preprocess: dict[str, Any],
        image_token: str = IMAGE_TOKEN,
        region_token: str | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.preprocess = dict(preprocess)
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {image_token!r} token")
        self.region_token = region_token
        if region_token is not None:
            rid = tokenizer.convert_tokens_to_ids(region_token)
            if rid is None or rid == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no {region_token!r} token")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template")

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoProcessor") -> None:
        """transformers calls this on remote-code processors; the export writes the auto_map itself."""

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> FineViTVLMProcessor:
        with open(os.path.join(path, PREPROCESSOR_FILE)) as f:
            pre = json.load(f)
        # the folder's config.json names remote code: pass the caller's trust on to the tokenizer
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=bool(kwargs.get("trust_remote_code")))
        return cls(tok, pre["preprocess"], pre.get("image_token", IMAGE_TOKEN), pre.get("region_token"))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        body = {
            "processor_class": "FineViTVLMProcessor",
            "preprocess": self.preprocess,
            "image_token": self.image_token,
            "region_token": self.region_token,
            # AutoProcessor.from_pretrained(dir, trust_remote_code=True) finds the class here
            "auto_map": {"AutoProcessor": "modeling_finevit.FineViTVLMProcessor"},
        }
        with open(os.path.join(path, PREPROCESSOR_FILE), "w") as f:
            json.dump(body, f, indent=2)

    def to_plain_messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
        out = []
        for m in messages:
            content = m["content"]
            if not isinstance(content, str):
                content = "".join(
                    self.image_token if c.get("type") == "image" else str(c.get("text", "")) for c in content
                )
            out.append({"role": m["role"], "content": content})
        return out

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> Any:
        return self.tokenizer.apply_chat_template(
            self.to_plain_messages(messages), add_generation_prompt=add_generation_prompt, tokenize=tokenize
        )

    def image_inputs(self, images: Sequence[Any]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Per image ``(patches_NP, grid)`` under this processor's NaFlex settings."""
        p = self.preprocess
        patches, grids = [], []
        for im in images:
            grid = grid_for(im.width, im.height, p["patch_size"], p["max_patches"], p.get("upscale", False))
            x_NP, _ = patchify(im, grid, p["patch_size"], tuple(p["mean"]), tuple(p["std"]))
            patches.append(x_NP)
            grids.append(grid)
        return patches, grids

    def expand(self, text: str, grids: Sequence[tuple[int, int]]) -> str:
        """Replace the ``<image>`` placeholders of ``text`` by the images' token runs, in order, and
        put a region token after each box that follows an image (see :meth:`regions`)."""
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(grids):
            raise ValueError(f"{len(parts) - 1} image placeholders for {len(grids)} images")
        out = [parts[0]]
        for (gh, gw), rest in zip(grids, parts[1:], strict=True):
            out.append(self.image_token * merged_tokens(gh, gw))
            if self.region_token is not None:
                rest = BOX_RE.sub(lambda m: m.group(0) + self.region_token, rest)
            out.append(rest)
        return "".join(out)

    def regions(self, text: str, first_image: int = 0) -> list[list[float]]:
        """``[image, x0, y0, x1, y1]`` for each box of ``text`` that :meth:`expand` gives a region
        token: ``image`` is ``first_image`` + the index of the last ``<image>`` before the box."""
        if self.region_token is None:
            return []
        out: list[list[float]] = []
        parts = text.split(self.image_token)
        for i, rest in enumerate(parts[1:]):
            out += [[float(first_image + i), *box] for box in boxes_in(rest)]
        return out

    def __call__(
        self,
        images: Sequence[Any] | None = None,
        text: str | Sequence[str] | None = None,
        padding: bool = True,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        texts = [text] if isinstance(text, str) else list(text or [])
        patches, grids = self.image_inputs(list(images or []))
        at, expanded, regions = 0, [], []
        for t in texts:
            k = t.count(self.image_token)
            expanded.append(self.expand(t, grids[at : at + k]))
            regions += self.regions(t, at)
            at += k
        if at != len(grids):
            raise ValueError(f"{len(grids)} images for {at} image placeholders")
        enc = self.tokenizer(
            expanded, padding=padding, add_special_tokens=False, return_tensors=return_tensors
        )
        data = dict(enc)
        if patches:
            n_max = max(x.shape[0] for x in patches)
            pv = torch.zeros(len(patches), n_max, patches[0].shape[1])
            for i, x in enumerate(patches):
                pv[i, : x.shape[0]] = x
            data["pixel_values"] = pv
            data["image_grid"] = torch.tensor(grids, dtype=torch.long)
        if regions:
            data["region_boxes"] = torch.tensor(regions, dtype=torch.float32)
        return BatchFeature(data)

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)


# -------------------------------------------------------------------------------- the encoder


class FineViTConfig(PretrainedConfig):
    model_type = "finevit"

    def __init__(
        self,
        model: dict | None = None,
        preprocess: dict | None = None,
        vocab_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.model = model or {}
        self.preprocess = preprocess or {}
        self.vocab_size = vocab_size
        super().__init__(**kwargs)


class FineViTModel(PreTrainedModel):
    """The exported encoder for ``AutoModel.from_pretrained(dir, trust_remote_code=True)``.

    Same weights (``vision.*``, ``text.*``) and preprocessing as ``train.model.encoder``'s
    :class:`FineViTEncoder`; the tokenizer is read from ``<dir>/tokenizer`` on first use."""

    config_class = FineViTConfig
    base_model_prefix = ""
    main_input_name = "pixel_values"

    def __init__(self, config: FineViTConfig) -> None:
        super().__init__(config)
        cfg = _ns(config.model)
        self.vision = VisionTower(cfg, "sdpa_dense")
        self.text = TextTower(cfg, config.vocab_size) if config.vocab_size else None
        self._tokenizer = None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        _init(module)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import PreTrainedTokenizerFast

            self._tokenizer = PreTrainedTokenizerFast.from_pretrained(
                os.path.join(self.config._name_or_path, "tokenizer")
            )
        return self._tokenizer

    def _patches(self, images: Sequence[Any]) -> tuple[VisionBatch, list[Span]]:
        p = self.config.preprocess
        items = []
        for im in images:
            grid = grid_for(im.width, im.height, p["patch_size"], p["max_patches"], p.get("upscale", False))
            x_NP, _ = patchify(im, grid, p["patch_size"], tuple(p["mean"]), tuple(p["std"]))
            items.append((x_NP, grid))
        n_max = max(x.shape[0] for x, _ in items)
        pv = torch.zeros(len(items), n_max, items[0][0].shape[1])
        for i, (x, _) in enumerate(items):
            pv[i, : x.shape[0]] = x
        return pack_padded(pv.to(self.device), torch.tensor([g for _, g in items]))

    @torch.no_grad()
    def encode_image(self, images: Sequence[Any], normalize: bool = True) -> torch.Tensor:
        batch, _ = self._patches(images)
        x_TD = vision_tokens(self.vision, batch)
        out = self.vision.proj(self.vision.head(x_TD, batch.img_T, batch.n_images)).float()
        return F.normalize(out, dim=-1) if normalize else out

    @torch.no_grad()
    def patch_features(self, images: Sequence[Any]) -> list[torch.Tensor]:
        batch, spans = self._patches(images)
        x_TD = vision_tokens(self.vision, batch).float()
        return [x_TD[t0 : t0 + gh * gw].reshape(gh, gw, -1) for t0, gh, gw in spans]

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        if self.text is None:
            raise ValueError("this encoder was exported without its text tower")
        L = self.config.preprocess["context"]
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = tok(list(texts), add_special_tokens=True)["input_ids"]
        tokens_NL = torch.full((len(ids), L), pad, dtype=torch.long)
        mask_NL = torch.zeros((len(ids), L), dtype=torch.bool)
        for i, row in enumerate(ids):
            row = row[:L]
            tokens_NL[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask_NL[i, : len(row)] = True
        out = self.text(tokens_NL.to(self.device), mask_NL.to(self.device)).float()
        return F.normalize(out, dim=-1) if normalize else out

    def forward(self, pixel_values: torch.Tensor, image_grid: torch.Tensor) -> torch.Tensor:
        """Image embeddings (unnormalized) of padded ``pixel_values`` ``(N, Nmax, P)``."""
        batch, _ = pack_padded(pixel_values, image_grid)
        x_TD = vision_tokens(self.vision, batch)
        return self.vision.proj(self.vision.head(x_TD, batch.img_T, batch.n_images))
