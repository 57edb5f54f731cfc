"""Zero-shot classification: template-ensemble class embeddings; top-1, top-5, mean per-class recall."""

from __future__ import annotations

import time
from typing import Any

import torch

from eval.datasets import ClassificationSet
from eval.embed import embed_images, embed_texts, require_text
from eval.metrics import class_embeddings, classification_metrics
from eval.report import TaskResult


def run(
    encoder: Any,
    ds: ClassificationSet,
    templates: list[str],
    batch_size: int = 64,
    progress: bool = False,
) -> TaskResult:
    require_text(encoder, "zeroshot")
    t0 = time.perf_counter()
    classes_CE = class_embeddings(
        lambda texts: embed_texts(encoder, texts, 256, progress, "class texts"), ds.classnames, templates
    )
    img_NE, ok, failed = embed_images(encoder, ds.images, batch_size, progress, "zeroshot images")
    target_N = torch.tensor([y for y, good in zip(ds.labels, ok, strict=True) if good], dtype=torch.long)
    metrics = classification_metrics(img_NE @ classes_CE.T, target_N) if len(target_N) else {}
    return TaskResult(
        "zeroshot",
        ds.source,
        ds.split,
        len(target_N),
        {**metrics, "classes": len(ds.classnames)},
        missing_images=ds.missing,
        missing_examples=ds.missing_examples,
        unreadable_images=len(failed),
        seconds=time.perf_counter() - t0,
    )
