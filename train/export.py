"""``finevit export CKPT OUT_DIR --part encoder|vlm``: checkpoints in the formats users load.

* ``encoder`` (from a stage-1 or a stage-2 checkpoint): ``model.safetensors`` + ``encoder.json``
  (preprocessing: patch size, patch budget, mean/std, text context) + ``tokenizer/``, which
  :func:`train.model.encoder.load_encoder` reads, plus ``config.json`` with an ``auto_map`` and the
  modeling files, so ``transformers.AutoModel.from_pretrained(OUT_DIR, trust_remote_code=True)``
  gives a model with ``encode_image`` / ``encode_text`` / ``patch_features``. From a stage-2
  checkpoint the vision tower is the stage-2 one (the sharper encoder); the text tower is stage 1's,
  or stage 2's when its regional contrastive term (``loss.region_contrast``) trained it.
* ``vlm`` (from a stage-2 checkpoint): ``config.json`` (``auto_map`` for ``AutoConfig``,
  ``AutoModelForImageTextToText``, ``AutoProcessor``), ``model.safetensors``, the tokenizer with its
  chat template, ``preprocessor_config.json``, ``generation_config.json`` and the modeling files:
  what ``finevit serve-captioner`` and the ``hf`` recaption backend load.

The modeling files are the model library's own sources (``train/model/vlm.py`` as
``modeling_finevit.py`` and the files it imports), copied with their ``train.*`` imports made
relative: the export runs the same code as training, with no trainer import.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from engine.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
MODELING = "modeling_finevit"
# exported name -> source file (all under the repo); vlm.py imports the others
SOURCES = {
    f"{MODELING}.py": "train/model/vlm.py",
    "towers.py": "train/model/towers.py",
    "attention.py": "train/model/attention.py",
    "blocks.py": "train/model/blocks.py",
    "rope.py": "train/model/rope.py",
    "projector.py": "train/model/projector.py",
    "naflex.py": "train/data/naflex.py",
}
_IMPORT = re.compile(r"^from train\.(?:model|data)\.(\w+) import", re.M)
_CONFIG_IMPORT = re.compile(r"^from train\.config import [^\n]+\n", re.M)


class ExportError(ConfigError):
    """The checkpoint cannot be exported as asked; the message says why."""


def write_modeling_files(out: Path) -> None:
    """Copy the model library into ``out`` with relative imports (transformers' remote code)."""
    for name, src in SOURCES.items():
        text = (REPO / src).read_text()
        text = _CONFIG_IMPORT.sub("", text)
        text = _IMPORT.sub(r"from .\1 import", text)
        if "from train" in text or "import train" in text:
            raise ExportError(f"{src} imports the trainer: it cannot be exported")
        (out / name).write_text(text)


def _is_stage2(path: str) -> bool:
    from train.model.encoder import resolve_checkpoint

    step = resolve_checkpoint(path)
    return any((p / "stage2_config.json").is_file() for p in [step, *list(step.parents)[:3]])


def export_encoder(ckpt: str, out: str, config: str | None = None, overrides: list[str] | None = None) -> str:
    from train.model.encoder import load_encoder
    from train.model.vlm import FineViTConfig

    if _is_stage2(ckpt):
        from train.model.encoder import find_run_config, resolve_checkpoint
        from train.stage2 import load_stage2

        model, _, cfg = load_stage2(ckpt)
        init = resolve_checkpoint(cfg.init.checkpoint)
        if config is None and find_run_config(init) is None:
            # stage 1 left no run config: the stage-2 recipe's model and preprocessing (vision only)
            d = cfg.data
            config = {
                "model": cfg.model.model_dump(mode="json"),
                "data": {"max_patches": d.max_patches, "mean": list(d.mean), "std": list(d.std)},
            }
        enc = load_encoder(init, config=config, overrides=overrides)
        enc.vision.load_state_dict(model.vision.state_dict())
        # the tower last trained at stage 2's resolution: it is read at that one
        enc.preprocess = dataclasses.replace(
            enc.preprocess, max_patches=cfg.data.max_patches, upscale=cfg.data.upscale
        )
        aligner = getattr(model, "region_align", None)
        if aligner is not None and enc.text is not None:  # stage 2 trained the text tower too
            enc.text.load_state_dict(aligner.text.state_dict())
    else:
        enc = load_encoder(ckpt, config=config, overrides=overrides)
    o = Path(out)
    enc.save(o)
    meta = json.loads((o / "encoder.json").read_text())
    hf = FineViTConfig(
        model=meta["model"],
        preprocess=meta["preprocess"],
        vocab_size=meta["vocab_size"],
        architectures=["FineViTModel"],
        auto_map={"AutoConfig": f"{MODELING}.FineViTConfig", "AutoModel": f"{MODELING}.FineViTModel"},
    )
    hf.save_pretrained(o)
    write_modeling_files(o)
    return str(o)


def export_vlm(ckpt: str, out: str) -> str:
    from safetensors.torch import save_file

    from train.stage2 import load_stage2

    if not _is_stage2(ckpt):
        raise ExportError(f"{ckpt} is not a stage-2 checkpoint (no stage2_config.json): --part vlm needs one")
    model, processor, _ = load_stage2(ckpt)
    o = Path(out)
    o.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    cfg.architectures = ["FineViTVLMForConditionalGeneration"]
    cfg.auto_map = {
        "AutoConfig": f"{MODELING}.FineViTVLMConfig",
        "AutoModelForImageTextToText": f"{MODELING}.FineViTVLMForConditionalGeneration",
        "AutoModel": f"{MODELING}.FineViTVLMForConditionalGeneration",
        "AutoProcessor": f"{MODELING}.FineViTVLMProcessor",
    }
    cfg.save_pretrained(o)
    model.generation_config.save_pretrained(o)
    # the regional contrastive term's text tower is the encoder's (--part encoder), not the VLM's
    state: dict[str, Any] = {
        k: v.detach().cpu().clone().contiguous()
        for k, v in model.state_dict().items()
        if not k.startswith("region_align.")
    }
    save_file(state, str(o / "model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(o)
    write_modeling_files(o)
    return str(o)


def export(ckpt: str, out: str, part: str = "encoder", config: str | None = None) -> str:
    if part == "encoder":
        return export_encoder(ckpt, out, config)
    if part == "vlm":
        return export_vlm(ckpt, out)
    raise ExportError(f"--part must be encoder or vlm, got {part!r}")


def load_vlm(path: str, device: str = "cpu") -> tuple[Any, Any]:
    """An exported VLM through the transformers Auto classes (as serve-captioner loads it)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    net = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    return net.to(device).eval(), proc
