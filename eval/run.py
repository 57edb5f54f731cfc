"""One entry point: load a model (ours or OpenCLIP), load the data, run a task, fill the settings.

enc = load_model("runs/stage1_tiny")                     # or "openclip:ViT-B-32", weights=...
result = evaluate(enc, "zeroshot", "/data/imagenet-val", templates="ensemble")
eval.report.write([result], "out/")
"""

from __future__ import annotations

from typing import Any

from eval import datasets
from eval.embed import encoder_hash
from eval.report import TaskResult
from eval.templates import load_templates

TASKS = ("zeroshot", "retrieval", "long-retrieval", "boxcls", "finegrained")


def load_model(
    spec: str,
    config: str | None = None,
    overrides: list[str] | None = None,
    tokenizer: str | None = None,
    max_patches: int | None = None,
    weights: str | None = None,
    device: str = "cpu",
    region_features: str = "fgclip",
) -> Any:
    """``openclip:...`` -> :class:`eval.openclip.OpenClipEncoder`; else a FineViT checkpoint or export.

    ``region_features`` (OpenCLIP only, boxcls): ``fgclip`` or ``final``, see eval/openclip.py."""
    if spec.startswith("openclip:"):
        from eval.openclip import load_openclip

        return load_openclip(spec, weights, region_mode=region_features).to(device)
    from train.model.encoder import load_encoder

    return load_encoder(spec, config, overrides, tokenizer, max_patches, device)


def _resolution(encoder: Any) -> str:
    s = encoder.settings()
    return str(s.get("resolution") or s)


def evaluate(
    encoder: Any,
    task: str,
    data: str,
    fmt: str = "auto",
    images: str | None = None,
    split: str = "test",
    layers: list[str] | None = None,
    templates: str = "ensemble",
    dci_text: str = "short+extra",
    limit: int | None = None,
    negatives: int = 3,
    batch_size: int = 64,
    progress: bool = False,
    checkpoint_hash: str | None = None,
    storage: Any = None,
) -> TaskResult:
    """Run ``task`` on ``data``; see eval/datasets.py for formats and ``finevit eval --help``.

    ``data`` and ``images`` may be ``s3://`` URIs, reached with ``storage`` (an
    :class:`engine.config.StorageConfig`; None: the environment and boto3's chain)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    tname, tlist = load_templates(templates) if task in ("zeroshot", "boxcls") else ("-", [])
    if task == "zeroshot":
        from eval.tasks import zeroshot

        result = zeroshot.run(
            encoder, datasets.load_classification(data, fmt, images, storage), tlist, batch_size, progress
        )
    elif task in ("retrieval", "long-retrieval"):
        ds = datasets.load_captions(data, fmt, images, split, layers, dci_text, limit, storage)
        if task == "retrieval":
            from eval.tasks import retrieval

            result = retrieval.run(encoder, ds, batch_size, progress)
        else:
            from eval.tasks import long_retrieval

            result = long_retrieval.run(encoder, ds, batch_size, progress)
    elif task == "boxcls":
        from eval.tasks import boxcls

        layer = (layers or ["gt-regions"])[0]
        result = boxcls.run(
            encoder, datasets.load_boxes(data, fmt, images, layer, storage), tlist, batch_size, progress
        )
    else:
        from engine.synthetic import parse_synthetic_uri
        from eval.tasks import finegrained

        try:
            p = parse_synthetic_uri(data)
        except ValueError as e:
            raise datasets.FormatError(
                f"finegrained --data: {e} (e.g. synthetic://scenes?n=64&seed=1000&size=128)"
            ) from None
        result = finegrained.run(
            encoder, p["seed"], p["n"], p["size"], negatives, None, batch_size, progress, p["grid"]
        )
    s = encoder.settings()
    lengths = result.settings.get("text_lengths") or {}
    text = f"<= {s.get('text_context')} tokens" if s.get("text_context") else "-"
    if lengths:
        text += f" (mean {lengths['text_tokens_mean']}, max {lengths['text_tokens_max']}, {lengths['texts_truncated']} truncated)"
    result.settings.update(
        {
            "resolution": result.settings.get("resolution") or _resolution(encoder),
            "text": text,
            "templates": f"{tname} ({len(tlist)})" if tlist else "-",
            "checkpoint": checkpoint_hash or encoder_hash(encoder),
            "model": getattr(encoder, "checkpoint", None) or s.get("model") or type(encoder).__name__,
        }
    )
    return result
