"""Box classification (FG-CLIP's COCO protocol): per ground-truth box, RoIAlign (1x1) over the
encoder's patch grid, pooled into the joint space, classified against the label names' template
ensemble embeddings; top-1 / top-5 over boxes."""

from __future__ import annotations

import time
from typing import Any

import torch

from eval.datasets import BoxSet
from eval.embed import TaskError, embed_texts, prefetch_images, require_text
from eval.metrics import class_embeddings, classification_metrics
from eval.report import TaskResult
from eval.roi import normalized_to_grid, roi_align, roi_backend

FINEVIT_PROTOCOL = (
    "the encoder's own resolution (settings.resolution: native, or upscaled where its preprocess "
    "says so); RoIAlign 1x1 over the final patch tokens, pooled by the MAP head + proj"
)


def region_embeddings(
    encoder: Any,
    images: list,
    boxes: list[list[tuple[float, float, float, float]]],
    roi: str = "auto",
) -> list[torch.Tensor]:
    """Per image, ``(B, E)`` unit-norm region embeddings of its normalized boxes."""
    grids = encoder.patch_features(images)
    out = []
    for grid_HWC, bxs in zip(grids, boxes, strict=True):
        H, W, _ = grid_HWC.shape
        feats = roi_align(grid_HWC, normalized_to_grid(torch.tensor(bxs, dtype=torch.float32), H, W), roi)
        out.append(encoder.pool_regions(feats))
    return out


def run(
    encoder: Any,
    ds: BoxSet,
    templates: list[str],
    batch_size: int = 32,
    progress: bool = False,
) -> TaskResult:
    require_text(encoder, "boxcls")
    if not (hasattr(encoder, "patch_features") and hasattr(encoder, "pool_regions")):
        raise TaskError(f"boxcls needs patch_features + pool_regions, which {type(encoder).__name__} lacks")
    from tqdm import tqdm

    t0 = time.perf_counter()
    classes_CE = class_embeddings(
        lambda texts: embed_texts(encoder, texts, 256, progress, "label texts"), ds.classnames, templates
    )
    regions, targets, failed = [], [], []
    starts = range(0, len(ds.images), batch_size)
    batches = prefetch_images(ds.images, batch_size)
    for i, batch in tqdm(
        zip(starts, batches, strict=True),
        total=len(starts),
        desc="boxcls images",
        disable=not progress,
        leave=False,
    ):
        ims, bxs, lbs = [], [], []
        for j, im in zip(range(i, i + len(batch)), batch, strict=True):
            if im is None:
                failed.append(ds.images[j].name)
                continue
            ims.append(im)
            bxs.append(ds.boxes[j])
            lbs.extend(ds.labels[j])
        if ims:
            regions.extend(region_embeddings(encoder, ims, bxs))
            targets.extend(lbs)
    reg_BE = torch.cat(regions) if regions else torch.zeros(0, classes_CE.shape[1])
    target_B = torch.tensor(targets, dtype=torch.long)
    metrics: dict[str, Any] = classification_metrics(reg_BE @ classes_CE.T, target_B) if targets else {}
    metrics["classes"] = len(ds.classnames)
    region_res = getattr(encoder, "region_resolution", None)  # OpenCLIP: squashed, not centre-cropped
    return TaskResult(
        "boxcls",
        ds.source,
        ds.split,
        len(targets),
        metrics,
        settings={"resolution": region_res} if region_res else {},
        missing_images=ds.missing,
        missing_examples=ds.missing_examples,
        unreadable_images=len(failed),
        notes=[
            "n counts boxes; region: " + getattr(encoder, "region_protocol", FINEVIT_PROTOCOL),
            f"RoIAlign: {roi_backend()}",
        ],
        seconds=time.perf_counter() - t0,
    )
