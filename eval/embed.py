"""Batched embedding with a progress bar; images that fail to decode are counted, not fatal.

An *encoder* is anything with ``encode_image(list[PIL]) -> (N, E)`` and
``encode_text(list[str]) -> (N, E)`` (unit-norm rows): :class:`train.model.encoder.FineViTEncoder`,
:class:`eval.openclip.OpenClipEncoder`. Region tasks also need ``patch_features`` and
``pool_regions``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from eval.datasets import ImageRef


class TaskError(ValueError):
    """The encoder or the data cannot run this task; the message says why."""


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="img" if "image" in desc else "txt", disable=not progress, leave=False
    )


REMOTE_READERS = 16  # images of one batch read at once from S3 (latency-bound GETs)


def _open(ref: ImageRef) -> Image.Image | None:
    try:
        return ref.open()
    except Exception:
        return None


def open_images(refs: Sequence[ImageRef]) -> list[Image.Image | None]:
    """Decoded RGB images (None where a ref cannot be read or decoded), in order; remote refs
    (``s3://``) are fetched by a small thread pool, local ones in this thread."""
    if any(r.path is not None and r.path.startswith("s3://") for r in refs):
        with ThreadPoolExecutor(min(REMOTE_READERS, len(refs))) as pool:
            return list(pool.map(_open, refs))
    return [_open(r) for r in refs]


def embed_images(
    encoder: Any, refs: Sequence[ImageRef], batch_size: int = 64, progress: bool = False, desc: str = "images"
) -> tuple[torch.Tensor, list[bool], list[str]]:
    """``(emb_NE for the decodable images, ok per ref, names that failed)``."""
    out, ok, failed = [], [], []
    with _bar(len(refs), desc, progress) as bar:
        for i in range(0, len(refs), batch_size):
            batch = []
            for ref, im in zip(refs[i : i + batch_size], open_images(refs[i : i + batch_size]), strict=True):
                ok.append(im is not None)
                if im is None:
                    failed.append(ref.name)
                else:
                    batch.append(im)
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
