"""Slow: a tiny stage-1 checkpoint trained on synthetic scenes, evaluated through `finevit eval`:
the fine-grained suite per attribute beats a randomly initialized encoder by a clear margin; the
FineViT-dataset formats (a caption layer for retrieval, a region layer for boxcls) run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from finevit.cli import main as finevit_cli

REPO = Path(__file__).resolve().parents[2]
# The tiny recipe as documented in its header (512 scenes, 800 steps: softmax loss 3.25 -> ~2.1, about
# 3 minutes on 2 quiet cores). On the shared machine under load (~7 s/step) it did not fit the
# session: 120 steps of a smaller model left the loss at chance (2.94 -> 2.99), hence the full recipe.
N_TRAIN = 512
STEPS = 800
pytestmark = pytest.mark.timeout(3600)
SETS = [
    "data.workers=0",
    "checkpoint.every=0",
    "log.every=100",
    "log.progress=false",
    "loop.threads=1",  # two OpenMP threads per process spin on a loaded machine
]
HELD_OUT = "synthetic://scenes?n=48&seed=1000&size=128"


def _train(base: Path, n_train: int, steps: int) -> tuple[Path, list[str], Path]:
    data = base / "scenes"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "finevit",
            "ingest",
            f"synthetic://scenes?n={n_train}&seed=0&size=128",
            str(data),
            "--samples-per-shard",
            "64",
            "--no-progress",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    tok = base / "tok"
    assert (
        finevit_cli(["train-tokenizer", str(data), "--layer", "gt-global", "--vocab", "1024", str(tok)]) == 0
    )
    sets = [*SETS, f"data.tokenizer={tok}"]
    flags = ["--config", str(REPO / "configs" / "stage1_tiny_cpu.yaml")] + [
        a for s in sets for a in ("--set", s)
    ]
    run = base / "run"
    argv = ["train", "stage1", "--dataset", str(data), "--steps", str(steps), "--log-dir", str(run), *flags]
    assert finevit_cli(argv) == 0
    return run, flags, data


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Path]:
    return _train(tmp_path_factory.mktemp("trained"), N_TRAIN, STEPS)


# The formats test checks that each FineViT-dataset layer runs through its task, not learning (that
# is test_trained_beats_random_on_finegrained's job), so a short run is enough and keeps CI fast.
N_FORMATS, STEPS_FORMATS = 64, 20


@pytest.fixture(scope="module")
def briefly_trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Path]:
    return _train(tmp_path_factory.mktemp("brief"), N_FORMATS, STEPS_FORMATS)


def _means(metrics: dict) -> float:
    return (metrics["t2i_mean"] + metrics["i2t_mean"]) / 2


@pytest.mark.slow
def test_trained_beats_random_on_finegrained(trained, tmp_path: Path) -> None:
    from eval.run import evaluate
    from train.model.encoder import FineViTEncoder, load_encoder

    run, flags, _ = trained
    out = tmp_path / "out"
    assert (
        finevit_cli(
            ["eval", str(run), "--task", "finegrained", "--data", HELD_OUT, "--out", str(out), *flags]
        )
        == 0
    )
    row = json.loads((out / "results.json").read_text())[0]
    for attr in ("colour", "shape", "position", "count", "word"):
        assert attr in row["metrics"] and row["metrics"][attr]["n"] > 0
    assert "| finegrained | " in (out / "results.md").read_text()
    trained_enc = load_encoder(run, flags[1], flags[3::2])
    random_enc = FineViTEncoder(trained_enc.model_cfg, None, trained_enc.preprocess, trained_enc.tokenizer)
    rnd = evaluate(random_enc, "finegrained", HELD_OUT).metrics
    ours = row["metrics"]
    print("trained", ours, "\nrandom", rnd)
    # fractions: measured 0.340 trained vs 0.235 random (mean of t2i and i2t), count t2i 0.77 vs 0.23
    # (2026-11-28, under load); the tiny recipe learns counts first, the other attributes later
    assert _means(ours) > _means(rnd) + 0.05, (ours, rnd)
    assert ours["count"]["t2i"] > rnd["count"]["t2i"] + 0.25, (ours["count"], rnd["count"])


@pytest.mark.slow
def test_finevit_dataset_formats(briefly_trained, tmp_path: Path) -> None:
    from eval.run import evaluate
    from train.model.encoder import load_encoder

    run, flags, data = briefly_trained
    enc = load_encoder(run, flags[1], flags[3::2])
    rt = evaluate(enc, "retrieval", str(data), "finevit", layers=["gt-global", "alt-text"])
    assert rt.n == N_FORMATS and rt.metrics["texts"] == 2 * N_FORMATS
    lr = evaluate(enc, "long-retrieval", str(data), "finevit", layers=["gt-global"])
    assert lr.n == N_FORMATS and 0.0 <= lr.metrics["t2i_R@1"] <= 1.0
    bx = evaluate(enc, "boxcls", str(data), "finevit", layers=["gt-regions"], templates="shapes")
    assert bx.metrics["classes"] == 9  # eight shapes + "text"
    assert bx.n > N_FORMATS
