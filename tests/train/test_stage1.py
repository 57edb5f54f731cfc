"""The stage 1 loop: config checks, the CLI, loss falls, exact resume; torchrun DDP and FSDP2 (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from finevit.cli import main as finevit_cli
from train.config import Stage1Config, check_fits

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "model.vision.width=32",
    "model.vision.depth=2",
    "model.vision.heads=2",
    "model.text.width=32",
    "model.text.depth=1",
    "model.text.heads=2",
    "model.text.context=96",
    "model.embed_dim=32",
    "data.max_patches=32",
    "data.seq_len=64",
    "data.rows=2",
    "data.max_images=8",
    "data.shuffle_buffer=16",
    "data.pack_buffer=8",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "log.every=1",
    "log.progress=false",
]


def _args(ds, log_dir: Path, steps: int, *extra: str) -> list[str]:
    sets = [*TINY, f"data.tokenizer={ds.tokenizer}", *extra]
    return [
        "train",
        "stage1",
        "--config",
        str(REPO / "configs" / "stage1_tiny_cpu.yaml"),
        "--dataset",
        str(ds.root),
        "--steps",
        str(steps),
        "--log-dir",
        str(log_dir),
    ] + [a for s in sets for a in ("--set", s)]


def _losses(log_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_config_that_cannot_fit_stops_with_reason() -> None:
    cfg = load_config(
        REPO / "configs" / "stage1_tiny_cpu.yaml",
        ["data.dataset=x", "data.tokenizer=y", "data.max_patches=512"],
        Stage1Config,
    )
    with pytest.raises(ConfigError, match=r"data.max_patches \(512\) > data.seq_len"):
        check_fits(cfg)
    with pytest.raises(ConfigError, match="model.vision.widht"):
        load_config(None, ["model.vision.widht=3"], Stage1Config)


@pytest.mark.parametrize("recipe", ["stage1_tiny_cpu", "stage1_vit_b16", "stage1_vit_l16", "stage1_vit_0p9b"])
def test_recipes_load(recipe: str) -> None:
    cfg = load_config(
        REPO / "configs" / f"{recipe}.yaml", ["data.dataset=x", "data.tokenizer=y"], Stage1Config
    )
    check_fits(cfg)
    assert (REPO / "configs" / f"{recipe}.yaml").read_text().startswith("#")


def test_train_resume_reproduces_uninterrupted_losses(stage1_data, tmp_path: Path) -> None:
    full = tmp_path / "full"
    assert finevit_cli(_args(stage1_data, full, 6, "data.workers=1")) == 0
    want = _losses(full)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    assert (full / "checkpoints" / "step_00000006" / "done").exists()

    part = tmp_path / "part"
    assert finevit_cli(_args(stage1_data, part, 6, "data.workers=1", "loop.stop_at=3")) == 0  # "killed" at 3
    assert finevit_cli(_args(stage1_data, part, 6, "data.workers=1")) == 0
    got = _losses(part)
    assert [got[s] for s in range(1, 7)] == [want[s] for s in range(1, 7)]  # bit-exact


def test_optimizer_makes_progress(stage1_data, tmp_path: Path) -> None:
    """The loop updates what it should: the sigmoid loss falls from its init (~10) within 30 steps.
    (Learning to match scenes takes the recipe's hundreds of steps; see configs/stage1_tiny_cpu.yaml.)"""
    log = tmp_path / "fall"
    assert finevit_cli(_args(stage1_data, log, 30, "optim.lr=2e-3", "loss.kind=sigmoid")) == 0
    losses = _losses(log)
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in range(26, 31)) / 5
    assert last < 0.6 * first, (first, last)


def _torchrun(ds, log_dir: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "finevit",
            *_args(ds, log_dir, steps, *extra),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
def test_torchrun_ddp_and_fsdp_agree_and_fsdp_resumes(stage1_data, tmp_path: Path) -> None:
    ddp = tmp_path / "ddp"
    r = _torchrun(stage1_data, ddp, 3, "loop.parallel=ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    fsdp = tmp_path / "fsdp"
    r = _torchrun(stage1_data, fsdp, 3, "loop.parallel=fsdp", "loop.stop_at=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(stage1_data, fsdp, 3, "loop.parallel=fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    want, got = _losses(ddp), _losses(fsdp)
    for s in range(1, 4):
        assert got[s] == pytest.approx(want[s], rel=1e-4, abs=1e-5), (s, got, want)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_non_finite_step_is_skipped_and_logged(stage1_data, tmp_path: Path, monkeypatch) -> None:
    import torch

    from train import stage1

    real = stage1.sigmoid_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        loss, value = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            return loss * float("nan"), value * float("nan")
        return loss, value

    monkeypatch.setattr(stage1, "sigmoid_loss", flaky)
    sets = [
        *TINY,
        f"data.tokenizer={stage1_data.tokenizer}",
        f"data.dataset={stage1_data.root}",
        "loss.kind=sigmoid",
        "loop.steps=3",
        f"log.dir={tmp_path}",
        "log.tensorboard=false",
    ]
    cfg = load_config(REPO / "configs" / "stage1_tiny_cpu.yaml", sets, Stage1Config)
    result = stage1.train_stage1(cfg, on_event=lambda m: None)
    assert result.steps == 3 and result.skipped_steps == 1
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "skipped" in r] == [2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "skipped" not in r)
