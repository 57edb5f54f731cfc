"""Image-text alignment: cosine similarity of a FineViT encoder's image and text embeddings.

Score only unless ``min_score`` or ``drop_percentile`` is given:

- ``min_score``: drop below a fixed cosine similarity; the scores are computed in the filter
  pass itself, shard by shard (:meth:`AlignmentFilter.prepare`);
- ``drop_percentile: p``: drop the lowest ``p`` % of the whole layer. That needs every score
  before any shard is filtered, so it runs in two passes like the duplicate filters:
  pass 1 writes a score layer (``align-<caption layer>-<checkpoint digest>``: ``key,
  align_score, status, error``, one committed shard per image shard, reused by later runs);
  on the driver, DuckDB takes the cut over all of its shards (:func:`alignment_cut`:
  ``quantile_cont``, i.e. linear interpolation); pass 2 reads each shard's scores back and
  drops those strictly below the cut. A killed run resumes: committed score shards are kept,
  the cut is recomputed from them (deterministic) and only uncommitted filter shards are redone.
  A new checkpoint saved at the same path needs the old score layer removed (its
  ``layer.json`` names the checkpoint).

The encoder comes from ``train.model.encoder``
(``load_encoder(path)`` -> ``encode_image(images)`` / ``encode_text(texts)``, normalized),
the library the eval issue adds; until it has landed, building this filter stops at start-up
with a message saying so. The images of a shard are decoded once, in :meth:`prepare`, in
batches of ``batch_size``.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from typing import Any

import pyarrow as pa

from engine.schemas import SIGNATURE_BASE_SCHEMA as SIG_BASE
from filtering.base import Filter, Sample, Verdict

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
ALIGN_SCHEMA = pa.schema([SIG_BASE.field(0), pa.field("align_score", pa.float32()), *list(SIG_BASE)[1:]])


class AlignmentFilter(Filter):
    name = "alignment"
    needs = "caption"

    def __init__(
        self,
        checkpoint: str,
        min_score: float | None = None,
        batch_size: int = 32,
        drop_percentile: float | None = None,
    ) -> None:
        from train.model.encoder import load_encoder
        self.checkpoint, self.min_score, self.batch_size = checkpoint, min_score, batch_size
        self.drop_percentile = drop_percentile
        self.cut: float | None = None  # the global cut of drop_percentile, set by the runner
        self._load = load_encoder
        self._encoder: Any = None

    def layer_name(self, caption_layer: str) -> str:
        """The score layer of ``drop_percentile`` mode: one per caption layer and checkpoint path."""
        digest = hashlib.sha1(os.path.abspath(self.checkpoint).encode()).hexdigest()[:10]
        return f"align-{caption_layer}-{digest}"

    def score_rows(self, shard_tar: Any, samples: list[Sample]) -> list[dict[str, Any]]:
        """The score layer rows of one shard (pass 1 of ``drop_percentile``)."""
        from filtering.text import caption_problem

        self.prepare(shard_tar, samples)
        rows = []
        for s in samples:
            score = s.cache.get("align")
            why = caption_problem(s) or ("image not available" if score is None else None)
            rows.append(
                {"key": s.key, "align_score": score, "status": "failed" if why else "ok", "error": why}
            )
        return rows

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
        if self.cut is not None and score < self.cut:
            return self.drop(
                f"image-text similarity {score:.3f} in the lowest {self.drop_percentile:g} % (< {self.cut:.3f})",
                sc,
            )
        return Verdict(True, None, sc)


def alignment_cut(con: Any, files: list[str], percentile: float) -> float | None:
    """The ``percentile``-th percentile of the ok scores in the score layer ``files`` (every
    shard at once: the cut is global), or None when nothing was scored."""
    if not files:
        return None
    from filtering.dedup import _list

    row = con.execute(
        f"SELECT quantile_cont(align_score, {float(percentile) / 100!r}) "
        f"FROM read_parquet({_list(files)}) WHERE status = 'ok' AND align_score IS NOT NULL"
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])
