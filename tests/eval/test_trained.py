"""Slow: a tiny stage-1 checkpoint trained on synthetic scenes, evaluated through `finevit eval`:
the fine-grained suite per attribute beats a randomly initialized encoder by a clear margin; the
FineViT-dataset formats (a caption layer for retrieval, a region layer for boxcls) run end to end.

One training serves both tests. It is the tiny recipe (configs/stage1_tiny_cpu.yaml) made cheap
per step, not shorter: 64-pixel scenes (at most 16 patches each, the 128-pixel recipe's 64), rows
of 128 tokens, a 128-token text context, dense captions only (the recipe mixes in 20 % alt-text,
which says nothing about any attribute), lr 2e-3 with a 30-step warm-up. The data is written in
this process by the function Ray runs per shard in `finevit ingest` (no Ray start-up). 64-pixel
cells hold no rendered words (engine/synthetic.py drops them), so the held-out scenes are 64-pixel
too and the suite reports four attributes (colour, shape, position, count) and no `word`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finevit.cli import main as finevit_cli
from tests.eval.conftest import ingest_synthetic

REPO = Path(__file__).resolve().parents[2]
N_TRAIN, SIZE, STEPS = 256, 64, 300
pytestmark = pytest.mark.timeout(1800)
SETS = [
    "data.workers=0",
    "checkpoint.every=0",
    "log.every=50",
    "log.progress=false",
    "loop.threads=1",  # two OpenMP threads per process spin on a loaded machine
    "data.captions=[{source: gt-global, weight: 1.0}]",
    "data.max_patches=16",
    "data.seq_len=128",
    "model.text.context=128",
    "optim.lr=2.0e-3",
    "optim.warmup_steps=30",
]
HELD_OUT = f"synthetic://scenes?n=48&seed=1000&size={SIZE}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], Path]:
    base = tmp_path_factory.mktemp("trained")
    data = ingest_synthetic(base / "scenes", N_TRAIN, 64, seed=0, size=SIZE)
    tok = base / "tok"
    assert (
        finevit_cli(["train-tokenizer", str(data), "--layer", "gt-global", "--vocab", "1024", str(tok)]) == 0
    )
    sets = [*SETS, f"data.tokenizer={tok}"]
    flags = ["--config", str(REPO / "configs" / "stage1_tiny_cpu.yaml")] + [
        a for s in sets for a in ("--set", s)
    ]
    run = base / "run"
    argv = ["train", "stage1", "--dataset", str(data), "--steps", str(STEPS), "--log-dir", str(run), *flags]
    assert finevit_cli(argv) == 0
    return run, flags, data


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
    for attr in ("colour", "shape", "position", "count"):
        assert attr in row["metrics"] and row["metrics"][attr]["n"] > 0
    assert "word" not in row["metrics"]  # no words in 64-pixel scenes
    assert "| finegrained | " in (out / "results.md").read_text()
    trained_enc = load_encoder(run, flags[1], flags[3::2])
    random_enc = FineViTEncoder(trained_enc.model_cfg, None, trained_enc.preprocess, trained_enc.tokenizer)
    rnd = evaluate(random_enc, "finegrained", HELD_OUT).metrics
    ours = row["metrics"]
    print("trained", ours, "\nrandom", rnd)
    # fractions, mean of t2i and i2t: measured 0.315 trained vs 0.195 and 0.224 random (two random
    # inits), count t2i 0.60 vs 0.15 and 0.21 (2026-11-28, under load; 300 steps, loss 3.76 -> 1.69,
    # the same in both runs); the tiny recipe learns counts first. The random init evaluated as
    # "trained" fails the first assert (0.203 vs 0.203 + 0.05).
    assert _means(ours) > _means(rnd) + 0.05, (ours, rnd)
    assert ours["count"]["t2i"] > rnd["count"]["t2i"] + 0.25, (ours["count"], rnd["count"])


@pytest.mark.slow
def test_finevit_dataset_formats(trained) -> None:
    """Each FineViT-dataset layer runs through its task (formats, not learning: that is the test above)."""
    from eval.run import evaluate
    from train.model.encoder import load_encoder

    run, flags, data = trained
    enc = load_encoder(run, flags[1], flags[3::2])
    rt = evaluate(enc, "retrieval", str(data), "finevit", layers=["gt-global", "alt-text"])
    assert rt.n == N_TRAIN and rt.metrics["texts"] == 2 * N_TRAIN
    lr = evaluate(enc, "long-retrieval", str(data), "finevit", layers=["gt-global"])
    assert lr.n == N_TRAIN and 0.0 <= lr.metrics["t2i_R@1"] <= 1.0
    bx = evaluate(enc, "boxcls", str(data), "finevit", layers=["gt-regions"], templates="shapes")
    assert bx.metrics["classes"] == 8  # eight shapes (no "text": 64-pixel cells hold no words)
    assert bx.n > N_TRAIN
