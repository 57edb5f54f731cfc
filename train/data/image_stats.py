"""Per-dataset image mean/std: one cheap pass, stored with the dataset, read by recipes.

The default normalization (mean = std = 0.5) suits photos; synthetic scenes average ~0.89, so
with it the image tower starts nearly blind (embeddings at cosine ~0.97). ``data.normalize:
dataset`` measures the mean/std of the first ``data.stats_samples`` usable images (shards in
order, each resized to its NaFlex grid as training sees it) and stores the result at
``<dataset>/stats/image_stats.json``; later runs read it. The images are the dataset's ingested
ones, whatever captions or filters a run trains with: the file is shared by every run on the
dataset (the two arms of a comparison get one normalization), and a filter that keeps few rows
must not decide it. The resolved values are written into
the config (``data.mean`` / ``data.std``) that every checkpoint saves as ``config.json``.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from typing import Any

import numpy as np
from PIL import Image

from engine.config import StorageConfig
from engine.layout import Dataset
from train.config import DataConfig
from train.data.loader import ShardReader
from train.data.naflex import grid_for

STATS_PATH = "stats/image_stats.json"


def measure_image_stats(root: str, storage: StorageConfig, data: DataConfig, patch: int) -> dict[str, Any]:
    """Per-channel mean/std over the pixels of the first ``data.stats_samples`` ingested images."""
    ds = Dataset(root, storage)
    reader = ShardReader(ds, data, patch, Counter())
    total, total_sq, pixels, images = np.zeros(3), np.zeros(3), 0, 0
    for shard in ds.committed_shards():
        for rec in reader.scan(shard, lambda _key: 0, reader.ingested(shard)):
            try:
                with Image.open(io.BytesIO(rec.image)) as im:
                    gh, gw = grid_for(rec.width, rec.height, patch, data.max_patches)
                    a = np.asarray(im.convert("RGB").resize((gw * patch, gh * patch), Image.BICUBIC))
            except Exception:
                continue
            a = a.reshape(-1, 3).astype(np.float64) / 255.0
            total += a.sum(0)
            total_sq += (a * a).sum(0)
            pixels += a.shape[0]
            images += 1
            if images >= data.stats_samples:
                break
        if images >= data.stats_samples:
            break
    if not images:
        raise ValueError(f"no decodable image in {root} to measure data.normalize=dataset on")
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean * mean, 1e-12))
    return {
        "mean": [round(float(x), 6) for x in mean],
        "std": [round(float(x), 6) for x in std],
        "images": images,
        "patch_size": patch,
        "max_patches": data.max_patches,
    }


def dataset_image_stats(root: str, storage: StorageConfig, data: DataConfig, patch: int) -> dict[str, Any]:
    """The stored stats when they were measured the same way, else measure (and store, best effort)."""
    store = Dataset(root, storage).store
    how = {"requested": data.stats_samples, "patch_size": patch, "max_patches": data.max_patches}
    if store.exists(STATS_PATH):
        stats = store.read_json(STATS_PATH)
        if all(stats.get(k) == v for k, v in how.items()):
            return stats
    stats = {**measure_image_stats(root, storage, data, patch), **how}
    with contextlib.suppress(OSError):  # a read-only dataset: measured again next time
        store.write_json(STATS_PATH, stats)
    return stats


def resolve_normalization(data: DataConfig, storage: StorageConfig, patch: int) -> DataConfig:
    """``data`` with ``mean`` / ``std`` filled from the dataset when ``normalize == "dataset"``."""
    if data.normalize != "dataset":
        return data
    stats = dataset_image_stats(data.dataset, storage, data, patch)
    return data.model_copy(update={"mean": tuple(stats["mean"]), "std": tuple(stats["std"])})
