"""One synthetic dataset (3 shards x 16 scenes, gt-global captions) + a BPE tokenizer per session."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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
