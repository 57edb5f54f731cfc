"""Long-caption retrieval (DCI, Urban-1k, ShareGPT4V-1k): one long caption per image, R@1 both ways.

The result states the text length (tokens before truncation, the encoder's context, how many
texts were truncated) and the image resolution, since both change these numbers.
"""

from __future__ import annotations

from typing import Any

from eval.datasets import CaptionSet
from eval.report import TaskResult
from eval.tasks import retrieval


def run(encoder: Any, ds: CaptionSet, batch_size: int = 64, progress: bool = False) -> TaskResult:
    multi = sum(1 for c in ds.captions if len(c) != 1)
    if multi:
        ds.captions = [c[:1] for c in ds.captions]
        ds.notes.append(f"{multi} images had several captions: the first one kept")
    return retrieval.run(encoder, ds, batch_size, progress, ks=(1, 5), task="long-retrieval")
