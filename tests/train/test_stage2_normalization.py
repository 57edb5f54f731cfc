"""Stage 2 feeds its vision tower pixels normalized as stage 1 did (the init run's mean/std)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.eval.conftest import save_stage1_checkpoint, train_tokenizer
from train.stage2 import Stage2Config, inherit_normalization


def test_stage2_takes_the_stage1_runs_pixel_statistics(tmp_path: Path) -> None:
    ck = save_stage1_checkpoint(tmp_path / "stage1", train_tokenizer(tmp_path / "tok", n_scenes=40))
    measured = {"normalize": "dataset", "mean": [0.9, 0.8, 0.7], "std": [0.1, 0.2, 0.3]}
    (ck.run / "config.yaml").write_text(
        yaml.safe_dump({**ck.config, "data": {**ck.config["data"], **measured}})
    )
    cfg = Stage2Config.model_validate({"init": {"checkpoint": str(ck.run)}})
    inherit_normalization(cfg)
    assert cfg.data.mean == (0.9, 0.8, 0.7) and cfg.data.std == (0.1, 0.2, 0.3)
    # what the stage-2 recipe sets explicitly wins
    mine = Stage2Config.model_validate(
        {"init": {"checkpoint": str(ck.run)}, "data": {"mean": [0.5, 0.5, 0.5]}}
    )
    inherit_normalization(mine)
    assert mine.data.mean == (0.5, 0.5, 0.5)
    # round trip through the saved stage-2 config keeps them (export and resume read it)
    again = Stage2Config.model_validate_json(cfg.model_dump_json())
    assert again.data.mean == (0.9, 0.8, 0.7)
