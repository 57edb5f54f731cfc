"""Batched embedding with a progress bar; images that fail to decode are counted, not fatal.

An *encoder* is anything with ``encode_image(list[PIL]) -> (N, E)`` and
``encode_text(list[str]) -> (N, E)`` (unit-norm rows): :class:`train.model.encoder.FineViTEncoder`,
:class:`eval.openclip.OpenClipEncoder`. Region tasks also need ``patch_features`` and
``pool_regions``. An encoder may also split ``encode_image`` in two, ``prepare_image(PIL) -> item``
(per image: no model, safe in a worker thread) and ``encode_prepared(list[item]) -> (N, E)``: then
the loader threads prepare the images too, and the main thread only runs the model.

Images are read by :func:`prefetch_images`: a small thread pool decodes (and prepares) the next
batches while the main thread embeds the current one (PIL and torch release the GIL there).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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


LOCAL_READERS = 2  # threads decoding + preparing local images (CPU-bound: about the cores a batch leaves)
REMOTE_READERS = 16  # threads for s3:// images (latency-bound GETs)
BATCHES_AHEAD = 2  # batches read ahead of the one being embedded (bounds memory)


class ImageError(RuntimeError):
    """An image was decoded but could not be prepared for the encoder; the message names it."""


def _open(ref: ImageRef) -> Image.Image | None:
    try:
        return ref.open()
    except Exception:
        return None


def prefetch_images(
    refs: Sequence[ImageRef],
    batch_size: int,
    prepare: Callable[[Image.Image], Any] | None = None,
    workers: int | None = None,
    ahead: int = BATCHES_AHEAD,
) -> Iterator[list[Any]]:
    """The images of ``refs`` in batches of ``batch_size``, in order: each decoded to RGB (None where
    it cannot be read or decoded: counted by the caller, not fatal), then passed through ``prepare``.

    A thread pool (``workers``: :data:`LOCAL_READERS`, or :data:`REMOTE_READERS` when an ``s3://``
    ref is among them) reads the next ``ahead`` batches while the caller works on the one it holds.
    An exception in ``prepare`` is a bug or an image the encoder cannot take, not a bad file: it
    raises :class:`ImageError` naming the image."""
    if batch_size < 1 or ahead < 1:
        raise ValueError(f"batch_size and ahead must be >= 1, got {batch_size} and {ahead}")
    if workers is None:
        remote = any(r.path is not None and r.path.startswith("s3://") for r in refs)
        workers = REMOTE_READERS if remote else LOCAL_READERS

    def load(ref: ImageRef) -> Any:
        im = _open(ref)
        if im is None or prepare is None:
            return im
        try:
            return prepare(im)
        except Exception as e:
            raise ImageError(
                f"{ref.path or ref.name}: preparing the image for the encoder failed: {e}"
            ) from e

    starts = iter(range(0, len(refs), batch_size))
    pending: deque[list[Future]] = deque()
    pool = ThreadPoolExecutor(max(1, min(workers, len(refs))), thread_name_prefix="eval-images")

    def submit_next_batch() -> None:
        i = next(starts, None)
        if i is not None:
            pending.append([pool.submit(load, r) for r in refs[i : i + batch_size]])

    try:
        for _ in range(ahead):
            submit_next_batch()
        while pending:
            batch = [f.result() for f in pending.popleft()]
            submit_next_batch()
            yield batch
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def embed_images(
    encoder: Any, refs: Sequence[ImageRef], batch_size: int = 64, progress: bool = False, desc: str = "images"
) -> tuple[torch.Tensor, list[bool], list[str]]:
    """``(emb_NE for the decodable images, ok per ref, names that failed)``."""
    prepare = getattr(encoder, "prepare_image", None)
    encode = encoder.encode_prepared if prepare is not None else encoder.encode_image
    out, ok, failed = [], [], []
    batches = prefetch_images(refs, batch_size, prepare)
    with _bar(len(refs), desc, progress) as bar:
        for i, items in zip(range(0, len(refs), batch_size), batches, strict=True):
            batch = []
            for ref, item in zip(refs[i : i + batch_size], items, strict=True):
                ok.append(item is not None)
                if item is None:
                    failed.append(ref.name)
                else:
                    batch.append(item)
            if batch:
                out.append(F.normalize(encode(batch).float(), dim=-1))
            bar.update(len(items))
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
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # the buffer, no copy
    return h.hexdigest()[:12]
