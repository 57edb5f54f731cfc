"""Image-text alignment: cosine similarity of a FineViT encoder's image and text embeddings.

Score only unless ``min_score`` is given. The encoder comes from ``train.model.encoder``
(``load_encoder(path)`` -> ``encode_image(images)`` / ``encode_text(texts)``, normalized),
the library the eval issue adds; until it has landed, building this filter stops at start-up
with a message saying so. The images of a shard are decoded once, in :meth:`prepare`, in
batches of ``batch_size``.
"""

from __future__ import annotations

import io
import tarfile
from typing import Any

import pyarrow as pa

from engine.config import ConfigError
from filtering.base import Filter, Sample, Verdict

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class AlignmentFilter(Filter):
    name = "alignment"
    needs = "caption"

    def __init__(self, checkpoint: str, min_score: float | None = None, batch_size: int = 32) -> None:
        try:
            from train.model.encoder import load_encoder
        except ImportError:
            raise ConfigError(
                "filter 'alignment' needs train/model/encoder.py (load_encoder), which this build does not "
                "have yet: remove the filter or update"
            ) from None
        self.checkpoint, self.min_score, self.batch_size = checkpoint, min_score, batch_size
        self._load = load_encoder
        self._encoder: Any = None

    def score_columns(self) -> dict[str, pa.DataType]:
        return {"align_score": pa.float32()}

    def prepare(self, shard_tar: Any, samples: list[Sample]) -> None:
        """Score every sample with a caption and an image (``shard_tar``: an open binary file)."""
        import torch
        from PIL import Image

        if self._encoder is None:
            self._encoder = self._load(self.checkpoint).eval()
        want = {s.key: s for s in samples if isinstance(s.caption, str) and s.caption.strip()}
        batch: list[tuple[Sample, Any]] = []

        def flush() -> None:
            if not batch:
                return
            with torch.no_grad():
                im = self._encoder.encode_image([b[1] for b in batch])
                tx = self._encoder.encode_text([b[0].caption for b in batch])
            for (s, _), v in zip(batch, (im * tx).sum(-1).tolist(), strict=True):
                s.cache["align"] = float(v)
            batch.clear()

        with tarfile.open(fileobj=shard_tar, mode="r|*") as tar:
            for m in tar:
                key, _, ext = m.name.rpartition("/")[2].partition(".")
                if m.isfile() and ext.lower() in IMAGE_EXTS and key in want:
                    data = tar.extractfile(m).read()
                    batch.append((want[key], Image.open(io.BytesIO(data)).convert("RGB")))
                    if len(batch) >= self.batch_size:
                        flush()
        flush()

    def check(self, s: Sample) -> Verdict:
        score = s.cache.get("align")
        sc = {"align_score": score}
        if score is None:
            return Verdict(True, None, sc)
        if self.min_score is not None and score < self.min_score:
            return self.drop(f"image-text similarity {score:.3f} < {self.min_score}", sc)
        return Verdict(True, None, sc)
