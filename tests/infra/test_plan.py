"""``finevit plan``: the arithmetic redone by hand on a worked example, bad input exits 2 naming the flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.capacity import CapacityError, CapacityInputs, plan
from finevit.cli import main

REPO = Path(__file__).resolve().parents[2]


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
    out = json.loads(capsys.readouterr().out)
    (g,) = out["estimates"]
    assert g["stage"] == "recaption (global)" and g["wall_hours"] == pytest.approx(60_000 / 3600)
    assert out["figures"]["caption_tok_s"] == {"value": 1000, "source": "--gpu-throughput"}
    assert main(["plan", "--images", "1e6", "--caption-tokens", "300", "--no-bench"]) == 2
    assert "--gpu-throughput" in capsys.readouterr().err
    assert main(["plan", "--images", "1e6"]) == 2


def _record(path: Path, device: str, value: float, date: str) -> None:
    from engine.capacity import BenchFigure, record_bench_figure

    fig = BenchFigure("train_img_s", value, "gpu_stage1.py", device, date, "python bench/gpu_stage1.py")
    record_bench_figure(str(path), fig)


def test_plan_reads_the_rates_bench_recorded_and_says_from_where(tmp_path: Path, capsys) -> None:
    results = tmp_path / "results.jsonl"
    _record(results, "NVIDIA H100 80GB HBM3", 900.0, "2026-11-01")
    _record(results, "NVIDIA A100-SXM4-80GB", 400.0, "2026-11-02")
    _record(results, "cpu", 5.0, "2026-11-03")  # never a GPU figure

    def run(*extra: str) -> dict:
        argv = ["plan", "--images", "1e6", "--epochs", "2", "--efficiency", "1", "--json"]
        assert main([*argv, "--bench-results", str(results), *extra]) == 0
        return json.loads(capsys.readouterr().out)

    out = run()  # the latest GPU record
    (t,) = out["estimates"]
    assert t["gpu_hours"] == pytest.approx(2e6 / 400.0 / 3600)
    src = out["figures"]["train_img_s"]["source"]
    assert str(results) in src and "gpu_stage1.py on NVIDIA A100" in src and "2026-11-02" in src
    assert out["figures"]["image_bytes"]["source"] == "default (not measured)"
    out = run("--bench-device", "h100")
    assert out["estimates"][0]["gpu_hours"] == pytest.approx(2e6 / 900.0 / 3600)
    assert "H100" in out["figures"]["train_img_s"]["source"]
    out = run("--train-img-s", "100")  # a flag wins over a record
    assert out["figures"]["train_img_s"] == {"value": 100.0, "source": "--train-img-s"}

    argv = ["plan", "--images", "1e6", "--epochs", "2", "--bench-results", str(results)]
    assert main([*argv, "--bench-device", "B200"]) == 2
    assert "--train-img-s" in (err := capsys.readouterr().err) and "records none" in err and "B200" in err
    assert main([*argv[:-1], str(tmp_path / "nowhere.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    results.write_text(results.read_text() + "{not json\n")
    assert main(argv) == 2
    assert f"{results}:4" in capsys.readouterr().err


def test_gpu_bench_writes_what_plan_reads(tmp_path: Path, capsys) -> None:
    """bench/gpu_stage1.py's record (the writer) read back by `finevit plan` (the reader)."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_stage1", REPO / "bench" / "gpu_stage1.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = argparse.Namespace(width=768, depth=12, context=256, rows=8, seq_len=4096, max_patches=256)
    results = tmp_path / "results.jsonl"
    bench.record_train_rate(812.345, "NVIDIA H200", "flash_varlen", a, path=results)
    capsys.readouterr()
    argv = ["plan", "--images", "1e6", "--epochs", "1", "--json", "--bench-results", str(results)]
    assert main(argv) == 0
    fig = json.loads(capsys.readouterr().out)["figures"]["train_img_s"]
    assert fig["value"] == 812.35 and "NVIDIA H200" in fig["source"] and "flash_varlen" in fig["source"]
