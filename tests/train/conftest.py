"""One synthetic dataset (3 shards x 16 scenes, gt-global captions) + a BPE tokenizer per session."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stage1Data:
    root: Path
    tokenizer: Path


def finevit_cli(argv: list[str]) -> int:
    from finevit import cli

    return cli.main(argv)


@pytest.fixture(scope="session")
def stage1_data(tmp_path_factory: pytest.TempPathFactory) -> Stage1Data:
    base = tmp_path_factory.mktemp("stage1")
    root = base / "scenes"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "finevit",
            "ingest",
            "synthetic://scenes?n=48&seed=0&size=128",
            str(root),
            "--samples-per-shard",
            "16",
            "--no-progress",
        ],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    tok = base / "tok"
    assert (
        finevit_cli(["train-tokenizer", str(root), "--layer", "gt-global", "--vocab", "384", str(tok)]) == 0
    )
    return Stage1Data(root, tok)


def tiny_stage2_config(base: Path, **sections: dict) -> Any:
    """An in-process stage-2 config on a random tiny stage-1 checkpoint and a tiny LM, both built
    under ``base`` with a small tokenizer: images of up to 16 patches, batches of 16 samples.
    ``sections`` replace whole config sections (``optim``, ``loss``, ...)."""
    from tests.eval.conftest import TINY_MODEL, save_stage1_checkpoint, train_tokenizer
    from train.stage2 import Stage2Config, make_tiny_lm

    tok = train_tokenizer(base / "tok", n_scenes=60)
    run = save_stage1_checkpoint(base / "stage1", tok).run
    lm = make_tiny_lm(str(tok), str(base / "lm"), hidden=32, layers=1, heads=2)
    return Stage2Config.model_validate(
        {
            "model": TINY_MODEL,
            "init": {"checkpoint": str(run)},
            "lm": {"path": lm},
            "data": {"dataset": "unused", "max_patches": 16, "seq_len": 64, "batch": 16, "max_len": 96},
            **sections,
        }
    )
