"""OpenCLIP models on the same harness: local weights or a model built from its config.

OpenCLIP imports torchvision, whose wheels here are CUDA builds that fail to import beside torch
CPU; ``make bench-deps`` installs open_clip (and torchvision, clip_benchmark) with ``--no-deps``
into ``.bench-deps`` and :func:`import_open_clip` puts empty stand-ins for torchvision's compiled
registrations in ``sys.modules`` first (shared/KNOWN-TRAPS.md). OpenCLIP uses only torchvision's
pure-Python transforms, so images are preprocessed exactly as OpenCLIP does (resize + centre crop).

Model specs: ``openclip:NAME`` (a built-in architecture, e.g. ``ViT-B-32``, with ``weights`` a
local ``.pt``/``.safetensors`` file, or random init without), or ``openclip:/path/cfg.json`` (an
OpenCLIP model config: ``embed_dim``, ``vision_cfg``, ``text_cfg``).

Region features (``boxcls``, ViT image towers only), FG-CLIP's COCO box protocol: the image is
squashed to the model's input size (no crop, so every box stays in view), and
:meth:`OpenClipEncoder.patch_features` gives the patch tokens as an ``(h, w, C)`` grid; the task
RoIAligns each box (1x1) and :meth:`OpenClipEncoder.pool_regions` pools the region feature as a
one-token image through the tower's own head (``ln_post`` where the tower puts it, the attention
pooler if any, ``proj``), as our encoder pools through its MAP head. ``region_mode``:

- ``fgclip`` (default): FG-CLIP's dense features: the last block runs on each token alone, so its
  attention is the value path (FG-CLIP's ``forward_without_attn``: MaskCLIP's trick, because a
  CLIP's last-layer attention spreads global content over every patch token);
- ``final``: the tokens the tower's head sees (all blocks as trained), like our encoder.

RoIAlign is linear and ``ln_post`` per token comes first, so RoIAlign-then-``proj`` is FG-CLIP's
``proj``-then-RoIAlign.
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eval.embed import TaskError

REGION_MODES = ("fgclip", "final")

DEFAULT_DEPS = Path(__file__).resolve().parents[1] / ".bench-deps"
_STANDINS = ("torchvision._meta_registrations", "torchvision._autograd_registrations")


def import_open_clip(deps: str | os.PathLike | None = None) -> Any:
    """Import open_clip (from ``deps`` or ``.bench-deps`` when present); a clear error when absent."""
    for d in (deps, os.environ.get("FINEVIT_BENCH_DEPS"), DEFAULT_DEPS):
        if d and Path(d).is_dir() and str(d) not in sys.path:
            sys.path.append(str(d))
            break
    for name in _STANDINS:
        sys.modules.setdefault(name, types.ModuleType(name))
    try:
        import open_clip
    except Exception as e:
        raise ImportError(f"OpenCLIP is not importable ({e}): run `make bench-deps`") from None
    return open_clip


class OpenClipEncoder:
    """``encode_image(list[PIL])`` / ``encode_text(list[str])`` over an OpenCLIP model, fp32."""

    has_text = True

    def __init__(
        self, model: Any, preprocess: Any, tokenizer: Any, name: str, region_mode: str = "fgclip"
    ) -> None:
        if region_mode not in REGION_MODES:
            raise ValueError(f"OpenCLIP region features must be one of {REGION_MODES}, got {region_mode!r}")
        self.model, self.preprocess, self.tokenizer, self.name = model.eval(), preprocess, tokenizer, name
        self.region_mode = region_mode
        self._pixel_steps, self._mean_1C11, self._std_1C11 = _split_preprocess(preprocess)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> OpenClipEncoder:
        self.model.to(device)
        return self

    def eval(self) -> OpenClipEncoder:
        self.model.eval()
        return self

    def settings(self) -> dict[str, Any]:
        size = self.model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        ctx = getattr(self.tokenizer, "context_length", None)
        return {"resolution": f"{size}px centre crop", "text_context": ctx, "model": self.name}

    def encode_image(self, images: Sequence[Image.Image], normalize: bool = True) -> torch.Tensor:
        return self.encode_prepared([self.prepare_image(im) for im in images], normalize)

    def prepare_image(self, image: Image.Image) -> torch.Tensor:
        """One image as OpenCLIP's ``preprocess`` makes it, for :meth:`encode_prepared`; eval's
        loader threads run it. When ``preprocess`` ends in ToTensor + Normalize (OpenCLIP's own do),
        this stops before those two: the ``(C, H, W)`` uint8 pixels, which :meth:`encode_prepared`
        turns to floats and normalizes for the whole batch at once (the same float operations, so
        bitwise the same input, in one pass instead of five tensor copies per image)."""
        if self._pixel_steps is None:
            return self.preprocess(image)
        for step in self._pixel_steps:
            image = step(image)
        if image.mode != "RGB":
            raise ValueError(f"preprocess gave a {image.mode} image where RGB was expected")
        return torch.from_numpy(np.array(image, np.uint8)).permute(2, 0, 1)

    @torch.no_grad()
    def encode_prepared(self, items: Sequence[torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """``(N, E)`` embeddings of images given as :meth:`prepare_image` returns them."""
        x = torch.stack(list(items))
        if self._pixel_steps is not None:  # ToTensor's ``float().div(255)``, then Normalize's ops
            x = x.float().div_(255).sub_(self._mean_1C11).div_(self._std_1C11)
        out = self.model.encode_image(x.to(self.device)).float()
        return (F.normalize(out, dim=-1) if normalize else out).cpu()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        out = self.encode_tokens(self.tokenizer(list(texts)).to(self.device)).float()
        return (F.normalize(out, dim=-1) if normalize else out).cpu()

    @torch.no_grad()
    def encode_tokens(self, tokens_NL: torch.Tensor) -> torch.Tensor:
        """``model.encode_text(tokens_NL)``, run only up to the batch's last pooled position where that
        gives the same features: a ``CLIP`` text tower with a causal mask that pools one token
        (``argmax``: the end token, or ``eos``). Position i then sees positions <= i only, so the
        padding after every row's pooled token changes nothing it returns, and the tower runs on
        ~12 positions of a short caption instead of all 77 (a ~6x cheaper text tower on
        zero-shot templates and COCO-length captions). Any other text tower runs whole."""
        m = self.model
        L = _pooled_length(m, tokens_NL)
        if L is None or tokens_NL.shape[1] <= L:
            return m.encode_text(tokens_NL)
        from open_clip.transformer import text_global_pool

        tokens_NL = tokens_NL[:, :L]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens_NL).to(cast_dtype) + m.positional_embedding[:L].to(cast_dtype)
        x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask[:L, :L]))
        x = text_global_pool(x, tokens_NL, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        if m.text_projection is not None:
            x = (
                m.text_projection(x)
                if isinstance(m.text_projection, torch.nn.Linear)
                else x @ m.text_projection
            )
        return x

    # ---- regions (boxcls) ----------------------------------------------------------------------
    def _vit(self) -> Any:
        v = self.model.visual
        if not all(hasattr(v, a) for a in ("_embeds", "transformer", "grid_size", "ln_post")):
            raise TaskError(
                f"boxcls on OpenCLIP needs a ViT image tower with a patch grid; {self.name} has "
                f"{type(v).__name__}"
            )
        return v

    @property
    def region_resolution(self) -> str:
        h, w = self._vit().image_size
        return f"{w}x{h} squashed (no crop)"

    @property
    def region_protocol(self) -> str:
        h, w = self._vit().image_size
        feats = (
            "last block's value path (FG-CLIP dense features)"
            if self.region_mode == "fgclip"
            else "final tokens"
        )
        return f"image squashed to {w}x{h}; RoIAlign 1x1 over the {feats}, pooled by the tower's head + proj"

    @torch.no_grad()
    def patch_features(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """Per image, the patch tokens of the squashed image as an ``(h, w, C)`` grid (see the module doc)."""
        if not images:
            return []
        v = self._vit()
        H, W = v.image_size
        x = torch.stack([self.preprocess(im.resize((W, H), Image.BICUBIC)) for im in images])
        x = v._embeds(x.to(self.device, next(v.parameters()).dtype))
        t = v.transformer
        blocks = list(t.resblocks)
        if self.region_mode == "fgclip":
            blocks, last = blocks[:-1], blocks[-1]
        if not t.batch_first:
            x = x.transpose(0, 1)
        for blk in blocks:
            x = blk(x)
        if not t.batch_first:
            x = x.transpose(0, 1)
        if self.region_mode == "fgclip":
            # every token a one-token sequence: attention over one key is its value path
            B, L, D = x.shape
            x = last(x.reshape(B * L, 1, D) if t.batch_first else x.reshape(1, B * L, D)).reshape(B, L, D)
        x = x[:, 1:]  # drop the class token (OpenCLIP's one prefix token)
        if v.attn_pool is None and not v.final_ln_after_pool:
            x = v.ln_post(x)  # the tower norms every token before it pools: do the same before RoIAlign
        gh, gw = v.grid_size
        return [g.reshape(gh, gw, -1).float().cpu() for g in x]

    @torch.no_grad()
    def pool_regions(self, feats_NC: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Region features (RoIAlign of :meth:`patch_features`) into the joint space, each pooled as a
        one-token image through the tower's head: the attention pooler (over one token: its value
        path) or ``ln_post`` where the tower applies it after pooling, then ``proj``."""
        v = self._vit()
        if feats_NC.shape[0] == 0:
            return torch.zeros(0, v.output_dim)
        x = feats_NC.to(self.device, next(v.parameters()).dtype)
        if v.attn_pool is not None:
            x, _ = v._pool(x[:, None, :])
        elif v.final_ln_after_pool:
            x = v.ln_post(x)
        if v.proj is not None:
            x = x @ v.proj
        x = x.float()
        return (F.normalize(x, dim=-1) if normalize else x).cpu()

    def text_lengths(self, texts: Sequence[str]) -> list[int]:
        enc = getattr(self.tokenizer, "encode", None)
        if enc is None:
            return []
        return [len(enc(t)) + 2 for t in texts]  # + start/end tokens


def _pooled_length(model: Any, tokens_NL: torch.Tensor) -> int | None:
    """1 + the last position any row pools, where trimming the padding after it is exact (see
    :meth:`OpenClipEncoder.encode_tokens`); None where it is not known to be."""
    if type(model).__name__ != "CLIP" or tokens_NL.numel() == 0:
        return None
    mask = getattr(model, "attn_mask", None)
    pool = getattr(model, "text_pool_type", None)
    if mask is None or mask.shape[-1] != tokens_NL.shape[1] or not hasattr(model, "positional_embedding"):
        return None
    if not bool(torch.equal(mask.isneginf(), torch.ones_like(mask, dtype=torch.bool).triu(1))):
        return None  # not a causal mask: every position may see the padding
    if pool == "argmax":
        idx = tokens_NL.argmax(dim=-1)
    elif pool == "eos" and getattr(model, "text_eos_id", None) is not None:
        idx = (tokens_NL == model.text_eos_id).int().argmax(dim=-1)
    else:
        return None
    return int(idx.max()) + 1


def _split_preprocess(preprocess: Any) -> tuple[list[Any] | None, torch.Tensor | None, torch.Tensor | None]:
    """``(the PIL steps, mean_1C11, std_1C11)`` when ``preprocess`` is a Compose that ends in
    ToTensor (or OpenCLIP's MaybeToTensor) + Normalize; ``(None, None, None)`` for anything else."""
    steps = list(getattr(preprocess, "transforms", []))
    if len(steps) < 2 or type(steps[-1]).__name__ != "Normalize":
        return None, None, None
    if type(steps[-2]).__name__ not in ("ToTensor", "MaybeToTensor"):
        return None, None, None
    norm = steps[-1]
    mean = torch.as_tensor(norm.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(norm.std, dtype=torch.float32).view(1, -1, 1, 1)
    return steps[:-2], mean, std


def load_openclip(
    spec: str,
    weights: str | None = None,
    deps: str | None = None,
    seed: int = 0,
    region_mode: str = "fgclip",
) -> OpenClipEncoder:
    """An :class:`OpenClipEncoder` from ``openclip:NAME`` or ``openclip:/path/config.json``."""
    open_clip = import_open_clip(deps)
    target = spec.split(":", 1)[1] if spec.startswith("openclip:") else spec
    torch.manual_seed(seed)
    if target.endswith(".json"):
        cfg = json.loads(Path(target).read_text())
        for key in ("embed_dim", "vision_cfg", "text_cfg"):
            if key not in cfg:
                raise ValueError(f"{target}: OpenCLIP model config lacks field {key!r}")
        name = Path(target).stem
        open_clip.factory._MODEL_CONFIGS[name] = cfg
    else:
        name = target
        if name not in open_clip.list_models():
            raise ValueError(f"unknown OpenCLIP model {name!r} (see open_clip.list_models())")
    if weights and not Path(weights).is_file():
        raise FileNotFoundError(weights)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=weights or None)
    tokenizer = open_clip.get_tokenizer(name)
    return OpenClipEncoder(model, preprocess, tokenizer, f"openclip:{name}", region_mode)
