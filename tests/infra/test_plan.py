"""``finevit plan``: the arithmetic redone by hand on a worked example, bad input exits 2 naming the flag."""

from __future__ import annotations

import json

import pytest

from engine.capacity import CapacityError, CapacityInputs, plan
from finevit.cli import main


def test_worked_example_by_hand() -> None:
    # 1e6 images x 300 tokens at 1000 tok/s/GPU = 300,000 GPU-s; / 0.5 efficiency = 600,000 s
    # = 166.67 GPU-hours; on 10 GPUs 16.67 h. Training: 2 epochs x 1e6 / 100 img/s = 20,000 s.
    x = CapacityInputs(
        images=1_000_000,
        gpus=10,
        efficiency=0.5,
        image_bytes=100_000,
        caption_tokens=300,
        caption_tok_s=1000,
        epochs=2,
        train_img_s=100,
        model_params=1e8,
        checkpoints=2,
    )
    g, t = plan(x)
    assert g.gpu_hours == pytest.approx(600_000 / 3600) and g.wall_hours == pytest.approx(60_000 / 3600)
    assert g.s3_read_bytes == 1e11
    assert g.s3_written_bytes == pytest.approx(1e6 * (80 + 300 * 4 * 0.35))
    assert t.gpu_hours == pytest.approx(40_000 / 3600) and t.s3_read_bytes == 2e11
    assert t.s3_written_bytes == 1e8 * 12 * 2


def test_regions_default_to_the_caption_rate() -> None:
    (r,) = plan(
        CapacityInputs(images=100, regions_per_image=4, region_tokens=25, caption_tok_s=10, efficiency=1)
    )
    assert r.gpu_hours == pytest.approx(100 * 4 * 25 / 10 / 3600)


@pytest.mark.parametrize(
    "kw",
    [
        {"images": 0},
        {"images": 5, "efficiency": 0},
        {"images": 5, "caption_tokens": 3},
        {"images": 5, "epochs": 1},
    ],
)
def test_bad_inputs_are_refused(kw) -> None:
    with pytest.raises(CapacityError):
        plan(CapacityInputs(**kw))


def test_cli(capsys) -> None:
    argv = ["plan", "--images", "1e6", "--caption-tokens", "300", "--gpu-throughput", "1000", "--json"]
    assert main([*argv, "--gpus", "10", "--efficiency", "0.5"]) == 0
    (g,) = json.loads(capsys.readouterr().out)
    assert g["stage"] == "recaption (global)" and g["wall_hours"] == pytest.approx(60_000 / 3600)
    assert main(["plan", "--images", "1e6", "--caption-tokens", "300"]) == 2
    assert "--caption-tokens" in capsys.readouterr().err
    assert main(["plan", "--images", "1e6"]) == 2
