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
from train.data.image_stats import STATS_PATH, dataset_image_stats, measure_image_stats
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


def test_dataset_mean_std_ignores_the_runs_captions_and_filters(stage1_data) -> None:
    """One stats file serves every run on a dataset: a run on a caption layer behind a filter that
    kept nothing (the demo's recaption arm at toy size) measures the same images as an alt-text run."""
    root = str(stage1_data.root)
    plain = DataConfig(dataset=root, tokenizer="t", stats_samples=10, max_patches=32)
    other = plain.model_copy(
        update={"captions": [CaptionSource(source="recap-not-written")], "filters": ["filter-not-written"]}
    )
    want = measure_image_stats(root, StorageConfig(), plain, 16)
    assert measure_image_stats(root, StorageConfig(), other, 16) == want


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


def _micro_batch(seed: int, patch: int = 16) -> tuple:
    """A packed micro-batch of random patches: 2 rows x (3 + 2 images), captions of 8 tokens."""
    from train.data.packing import assemble

    g = torch.Generator().manual_seed(seed)
    pos = lambda n: torch.stack(torch.meshgrid(torch.arange(1), torch.arange(n), indexing="ij"), -1)  # noqa: E731
    rows = [
        [(torch.randn(n, 3 * patch * patch, generator=g), pos(n).reshape(-1, 2)) for n in ns]
        for ns in ((5, 6, 4), (9, 7))
    ]
    vision, _ = assemble(rows, 16, 5, 3 * patch * patch)
    tokens = torch.randint(4, 64, (5, 8), generator=g)
    return vision, tokens, torch.ones(5, 8, dtype=torch.bool), torch.ones(5, dtype=torch.bool)


TINY_MODEL = [
    "model.vision.width=32",
    "model.vision.depth=1",
    "model.vision.heads=2",
    "model.text.width=32",
    "model.text.depth=1",
    "model.text.heads=2",
    "model.embed_dim=16",
]


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_grad_accum_steps_once_on_the_mean_of_micro_batch_gradients(kind: str) -> None:
    """Two accumulated micro-batches (each its own contrastive batch) give exactly the mean of the
    two gradients taken separately at the same weights, then exactly one AdamW step with it."""
    import copy
    import functools

    from train.stage1 import create_loss, train_step

    cfg = _cfg(*TINY_MODEL, f"loss.kind={kind}", "optim.grad_clip=0", "optim.grad_accum=2")
    torch.manual_seed(0)
    model = build_model(cfg, 64, torch.device("cpu"))
    ref = copy.deepcopy(model)
    loss_fn = create_loss(cfg)
    batches = [_micro_batch(1), _micro_batch(2)]

    def compute(m: torch.nn.Module, b: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        vision, tokens, mask, valid = b
        img, txt, scale, bias = m(vision, tokens, mask)
        return loss_fn(img, txt, valid, scale, bias)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer_for(model, cfg)
    value, _, skipped = train_step(opt, params, [functools.partial(compute, model, b) for b in batches], 0.0)
    assert not skipped

    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    grads, values = [], []
    for b in batches:  # the reference: each micro-batch's gradient on its own, at the initial weights
        ref.zero_grad(set_to_none=True)
        loss, v = compute(ref, b)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad})
        values.append(v)
    mean = {n: (grads[0][n] + grads[1][n]) / 2 for n in names}
    assert value == (values[0] + values[1]) / 2
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, mean[n]), n  # the accumulated gradient is the mean
    ref_opt = optimizer_for(ref, cfg)
    for n, p in ref.named_parameters():
        if p.requires_grad:
            p.grad = mean[n]
    ref_opt.step()
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), n  # one optimizer step with the mean gradient


def test_ema_update_math_and_state_dict() -> None:
    """ema_k = d * ema_(k-1) + (1 - d) * w_k from ema_0 = w_0, for every parameter; the EMA state dict
    is the model's with parameters averaged and buffers as they are."""
    from train.ema import EMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[1].running_mean.fill_(0.25)
    d = 0.9
    ema = EMA(model, d)
    ws = [model[0].weight.detach().clone().double()]
    for k in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * k)
        ws.append(model[0].weight.detach().clone().double())
        ema.update(model)
    want = d**3 * ws[0] + (1 - d) * (d**2 * ws[1] + d * ws[2] + ws[3])
    torch.testing.assert_close(ema.shadow["0.weight"].double(), want, rtol=1e-6, atol=1e-7)
    sd = ema.state_dict(model)
    assert set(sd) == set(model.state_dict())
    assert torch.equal(sd["0.weight"], ema.shadow["0.weight"])
    assert not torch.equal(sd["0.weight"], model[0].weight)
    assert torch.equal(sd["1.running_mean"], torch.full((4,), 0.25))


def test_train_eval_section_matches_the_eval_hook() -> None:
    """The trainer's ``eval`` section is what ``eval.hooks.periodic_eval`` validates against."""
    from eval.hooks import EvalHookConfig
    from train.config import EvalConfig

    assert EvalConfig().model_dump() == EvalHookConfig().model_dump()
