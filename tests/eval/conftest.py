"""Tiny encoders for the eval tests: a BPE tokenizer trained on synthetic dense captions (no ingest)
and a randomly initialized stage-1 model saved as a real DCP checkpoint with its run config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

TINY_MODEL = {
    "vision": {"width": 32, "depth": 2, "heads": 2, "patch_size": 8},
    "text": {"width": 32, "depth": 1, "heads": 2, "context": 64},
    "embed_dim": 32,
}


def train_tokenizer(out: Path, n_scenes: int = 300, vocab: int = 320) -> Path:
    from engine.synthetic import alt_text, dense_caption, make_scene
    from train.tokenizer import train_tokenizer_on

    texts = []
    for i in range(n_scenes):
        s = make_scene(99, i, 64)
        texts += [dense_caption(s), alt_text(s)]
    texts += [f"a photo of a {w}." for w in ("cat", "dog", "car", "red", "blue", "circle", "square")]
    train_tokenizer_on(texts, vocab, str(out))
    return out


def ingest_synthetic(root: Path, n: int, samples_per_shard: int, seed: int = 7, size: int = 64) -> Path:
    """A FineViT dataset of ``n`` synthetic scenes (alt-text, gt-global, gt-regions), shard by shard
    through :func:`engine.ingest.ingest_shard`, the function Ray runs per shard in ``finevit ingest``
    (in this process: no Ray start-up, no workers at the lowest priority on a loaded machine)."""
    from engine.config import FineVitConfig, load_config
    from engine.ingest import ingest_shard
    from engine.layout import Dataset
    from engine.sources.synthetic import SyntheticSource

    sps = samples_per_shard
    cfg = load_config(None, [f"ingest.samples_per_shard={sps}"], FineVitConfig)
    src = SyntheticSource(f"synthetic://scenes?n={n}&seed={seed}&size={size}", cfg)
    ds = Dataset(str(root))
    ds.write_manifest({"name": "scenes", "samples_per_shard": sps, "shard_root": "shards", "sources": []})
    for i, payload in enumerate(src.plan(sps)):
        ingest_shard(src, payload, i, ds.shards, ds.store.child("layers"), cfg.ingest)
    return root


@dataclass
class TinyCkpt:
    run: Path  # the log dir (config.yaml here, checkpoints/step_* below)
    tokenizer: Path
    config: dict


def save_stage1_checkpoint(run: Path, tokenizer: Path, seed: int = 0, write_config: bool = True) -> TinyCkpt:
    """A stage-1 run folder as the trainer leaves it: checkpoints/step_N (DCP + extras + done)."""
    from train import checkpoint as ckpt
    from train.config import Stage1Config
    from train.data.loader import load_tokenizer
    from train.model.towers import Stage1Model

    cfg = {"model": TINY_MODEL, "data": {"tokenizer": str(tokenizer), "max_patches": 48}}
    parsed = Stage1Config.model_validate(cfg)
    torch.manual_seed(seed)
    model = Stage1Model(parsed.model, len(load_tokenizer(str(tokenizer))))
    optim = torch.optim.AdamW(model.parameters())
    ckpt.save(str(run / "checkpoints"), 1, model, optim, {"step": 1})
    if write_config:
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return TinyCkpt(run, tokenizer, cfg)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> TinyCkpt:
    return save_stage1_checkpoint(tmp_path_factory.mktemp("run"), tokenizer_dir)
