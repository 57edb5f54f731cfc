"""OpenCLIP models on the same harness: local weights or a model built from its config.

OpenCLIP imports torchvision, whose wheels here are CUDA builds that fail to import beside torch
CPU; ``make bench-deps`` installs open_clip (and torchvision, clip_benchmark) with ``--no-deps``
into ``.bench-deps`` and :func:`import_open_clip` puts empty stand-ins for torchvision's compiled
registrations in ``sys.modules`` first (shared/KNOWN-TRAPS.md). OpenCLIP uses only torchvision's
pure-Python transforms, so images are preprocessed exactly as OpenCLIP does (resize + centre crop).

Model specs: ``openclip:NAME`` (a built-in architecture, e.g. ``ViT-B-32``, with ``weights`` a
local ``.pt``/``.safetensors`` file, or random init without), or ``openclip:/path/cfg.json`` (an
OpenCLIP model config: ``embed_dim``, ``vision_cfg``, ``text_cfg``).
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

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

    def __init__(self, model: Any, preprocess: Any, tokenizer: Any, name: str) -> None:
        self.model, self.preprocess, self.tokenizer, self.name = model.eval(), preprocess, tokenizer, name

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

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image.Image], normalize: bool = True) -> torch.Tensor:
        x = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        out = self.model.encode_image(x).float()
        return (F.normalize(out, dim=-1) if normalize else out).cpu()

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        out = self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float()
        return (F.normalize(out, dim=-1) if normalize else out).cpu()

    def text_lengths(self, texts: Sequence[str]) -> list[int]:
        enc = getattr(self.tokenizer, "encode", None)
        if enc is None:
            return []
        return [len(enc(t)) + 2 for t in texts]  # + start/end tokens


def load_openclip(
    spec: str, weights: str | None = None, deps: str | None = None, seed: int = 0
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
    return OpenClipEncoder(model, preprocess, open_clip.get_tokenizer(name), f"openclip:{name}")
