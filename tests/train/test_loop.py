"""The loop's pieces without a training run: bias init, parameter groups, schedules, the model
library's independence from the trainer, per-dataset normalization, text trimming."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import StorageConfig, load_config
from engine.layout import Dataset
from train.config import CaptionSource, DataConfig, Stage1Config
from train.data.image_stats import STATS_PATH, dataset_image_stats
from train.data.loader import ShardReader, Stage1Loader
from train.data.naflex import grid_for
from train.stage1 import build_model, init_logit_bias, lr_lambda, optimizer_for

REPO = Path(__file__).resolve().parents[2]


def _cfg(*sets: str) -> Stage1Config:
    return load_config(
        REPO / "configs" / "stage1_tiny_cpu.yaml", ["data.dataset=x", "data.tokenizer=y", *sets], Stage1Config
    )


def test_sigmoid_bias_auto_is_minus_log_global_batch() -> None:
    cfg = _cfg("loss.init_logit_bias=auto", "data.max_images=32")
    assert init_logit_bias(cfg, 1) == pytest.approx(-math.log(32))
    assert init_logit_bias(cfg, 4) == pytest.approx(-math.log(128))
    model = build_model(cfg, 64, torch.device("cpu"), world=4)
    assert float(model.logit_bias) == pytest.approx(-math.log(128))
    assert init_logit_bias(_cfg("loss.init_logit_bias=-10"), 8) == -10.0


def test_logit_scale_and_bias_get_their_own_learning_rate() -> None:
    cfg = _cfg("optim.lr=1e-3", "optim.logit_lr_mult=10", "loss.kind=sigmoid")
    model = build_model(cfg, 64, torch.device("cpu"))
    groups = {g["name"]: g for g in optimizer_for(model, cfg).param_groups}
    assert {id(p) for p in groups["logit"]["params"]} == {id(model.logit_scale), id(model.logit_bias)}
    assert groups["logit"]["lr"] == pytest.approx(1e-2) and groups["logit"]["weight_decay"] == 0.0
    assert groups["decay"]["lr"] == pytest.approx(1e-3)
    n = sum(p.numel() for g in groups.values() for p in g["params"])
    assert n == sum(p.numel() for p in model.parameters())  # every parameter in exactly one group


def test_wsd_schedule_is_flat_then_decays() -> None:
    f = lr_lambda(
        _cfg("optim.schedule=wsd", "optim.warmup_steps=10", "optim.decay_fraction=0.2", "loop.steps=100")
    )
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == f(50) == f(80) == 1.0
    assert f(90) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_model_library_imports_without_the_trainer() -> None:
    """train.model + packing + NaFlex load in a fresh interpreter without the loop, optimizer
    set-up, losses, checkpoints or the data loader (as open_clip stands apart from open_clip_train)."""
    code = (
        "import sys, train.model.towers, train.model.attention, train.data.packing, train.data.naflex\n"
        "bad = [m for m in ('train.stage1', 'train.data.loader', 'train.losses', 'train.checkpoint',"
        " 'train.distributed', 'train.metrics', 'engine.layout', 'pyarrow', 'transformers') if m in sys.modules]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_dataset_mean_std_is_measured_once_and_stored(stage1_data, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "ds"
    shutil.copytree(stage1_data.root, root)
    data = DataConfig(dataset=str(root), tokenizer="t", normalize="dataset", stats_samples=10, max_patches=32)
    stats = dataset_image_stats(str(root), StorageConfig(), data, 16)
    # the same numbers straight from the first 10 images, resized as training sees them
    reader = ShardReader(Dataset(str(root)), data, 16, Counter())
    pixels = []
    for rec in reader.scan("00000", lambda _k: 0):
        with Image.open(__import__("io").BytesIO(rec.image)) as im:
            gh, gw = grid_for(rec.width, rec.height, 16, 32)
            pixels.append(
                np.asarray(im.convert("RGB").resize((gw * 16, gh * 16), Image.BICUBIC)).reshape(-1, 3)
            )
        if len(pixels) == 10:
            break
    a = np.concatenate(pixels).astype(np.float64) / 255
    np.testing.assert_allclose(stats["mean"], a.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["std"], a.std(0), atol=1e-5)
    assert stats["mean"][0] > 0.7  # bright synthetic scenes: far from the photo default 0.5
    assert json.loads((root / STATS_PATH).read_text())["mean"] == stats["mean"]


def test_text_is_trimmed_to_the_longest_caption(stage1_data) -> None:
    data = DataConfig(
        dataset=str(stage1_data.root),
        tokenizer=str(stage1_data.tokenizer),
        captions=[CaptionSource(source="alt-text")],  # short alt-texts, far below the context
        max_patches=32,
        seq_len=64,
        rows=2,
        max_images=8,
        shuffle_buffer=8,
        pack_buffer=6,
    )
    b = Stage1Loader(data.dataset, StorageConfig(), data, 16, 256).next()
    longest = int(b["mask_BL"].sum(1).max())
    assert b["tokens_BL"].shape[1] == -(-longest // 8) * 8 < 256
