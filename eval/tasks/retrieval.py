"""Image-text retrieval R@1/5/10 both ways, several captions per image (COCO/Flickr protocol)."""

from __future__ import annotations

import time
from typing import Any

import torch

from eval.datasets import CaptionSet
from eval.embed import embed_images, embed_texts, require_text, text_length_stats
from eval.metrics import retrieval_metrics
from eval.report import TaskResult


def run(
    encoder: Any,
    ds: CaptionSet,
    batch_size: int = 64,
    progress: bool = False,
    ks: tuple[int, ...] = (1, 5, 10),
    task: str = "retrieval",
) -> TaskResult:
    require_text(encoder, task)
    t0 = time.perf_counter()
    img_NE, ok, failed = embed_images(encoder, ds.images, batch_size, progress, f"{task} images")
    caps = [c for c, good in zip(ds.captions, ok, strict=True) if good]
    texts = [t for cs in caps for t in cs]
    text_image_M = torch.tensor([i for i, cs in enumerate(caps) for _ in cs], dtype=torch.long)
    txt_ME = embed_texts(encoder, texts, 256, progress, f"{task} texts")
    metrics: dict[str, Any] = retrieval_metrics(img_NE, txt_ME, text_image_M, ks) if texts else {}
    metrics["texts"] = len(texts)
    lengths = text_length_stats(encoder, texts)
    return TaskResult(
        task,
        ds.source,
        ds.split,
        len(caps),
        metrics,
        settings={"text_lengths": lengths} if lengths else {},
        missing_images=ds.missing,
        missing_examples=ds.missing_examples,
        unreadable_images=len(failed),
        notes=list(ds.notes),
        seconds=time.perf_counter() - t0,
    )
