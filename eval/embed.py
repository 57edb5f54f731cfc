"""Batched embedding with a progress bar; images that fail to decode are counted, not fatal.

An *encoder* is anything with ``encode_image(list[PIL]) -> (N, E)`` and
``encode_text(list[str]) -> (N, E)`` (unit-norm rows): :class:`train.model.encoder.FineViTEncoder`,
:class:`eval.openclip.OpenClipEncoder`. Region tasks also need ``patch_features`` and
``pool_regions``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from eval.datasets import ImageRef


class TaskError(ValueError):
    """The encoder or the data cannot run this task; the message says why."""


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="img" if "image" in desc else "txt", disable=not progress, leave=False
    )


def embed_images(
    encoder: Any, refs: Sequence[ImageRef], batch_size: int = 64, progress: bool = False, desc: str = "images"
) -> tuple[torch.Tensor, list[bool], list[str]]:
    """``(emb_NE for the decodable images, ok per ref, names that failed)``."""
    out, ok, failed = [], [], []
    with _bar(len(refs), desc, progress) as bar:
        for i in range(0, len(refs), batch_size):
            batch = []
            for ref in refs[i : i + batch_size]:
                try:
                    batch.append(ref.open())
                    ok.append(True)
                except Exception:
                    ok.append(False)
                    failed.append(ref.name)
            if batch:
                out.append(F.normalize(encoder.encode_image(batch).float(), dim=-1))
            bar.update(len(refs[i : i + batch_size]))
    emb = torch.cat(out) if out else torch.zeros(0, 1)
    return emb, ok, failed


def embed_texts(
    encoder: Any, texts: Sequence[str], batch_size: int = 256, progress: bool = False, desc: str = "texts"
) -> torch.Tensor:
    require_text(encoder)
    out = []
    with _bar(len(texts), desc, progress) as bar:
        for i in range(0, len(texts), batch_size):
            out.append(F.normalize(encoder.encode_text(list(texts[i : i + batch_size])).float(), dim=-1))
            bar.update(len(texts[i : i + batch_size]))
    return torch.cat(out) if out else torch.zeros(0, 1)


def require_text(encoder: Any, task: str = "this task") -> None:
    if not getattr(encoder, "has_text", True):
        raise TaskError(
            f"{task} needs a text tower, but this encoder is vision-only (no text.* weights or no "
            "tokenizer): use a stage-1 checkpoint or an export that kept the text tower"
        )


def text_length_stats(encoder: Any, texts: Sequence[str]) -> dict[str, Any]:
    """Token counts before truncation vs the encoder's text context."""
    lengths_fn = getattr(encoder, "text_lengths", None)
    if lengths_fn is None or not texts:
        return {}
    n = lengths_fn(list(texts))
    ctx = encoder.settings().get("text_context")
    return {
        "text_tokens_mean": round(sum(n) / len(n), 1),
        "text_tokens_max": max(n),
        "text_context": ctx,
        "texts_truncated": sum(1 for x in n if ctx and x > ctx),
    }


def encoder_hash(encoder: Any) -> str:
    """12 hex digits of sha256 over the weights (names, shapes, bytes): which checkpoint gave a row."""
    module = getattr(encoder, "model", encoder)
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]
