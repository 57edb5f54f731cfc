"""The CLI: bad input stops with a one-line message naming what is wrong, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from finevit.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finevit", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, needle",
    [
        (
            ["ingest", "synthetic://scenes?n=5", "OUT", "--set", "ingest.samples_per_shard=-1"],
            "ingest.samples_per_shard",
        ),
        (["ingest", "synthetic://scenes?n=5", "OUT", "--set", "ingest.bogus=1"], "ingest.bogus"),
        (["ingest", "synthetic://scenes?n=0", "OUT"], "parameter 'n'"),
        (["ingest", "synthetic://cubes?n=3", "OUT"], "cubes"),
        (["ingest", "/no/such/folder", "OUT"], "/no/such/folder does not exist"),
        (["info", "/no/such/dataset"], "dataset.json not found"),
    ],
)
def test_bad_input_is_one_clear_line(args, needle, tmp_path, capsys):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_config_file_error_names_field(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("ingest:\n  image:\n    resize_mode: squash\n")
    assert main(["ingest", "synthetic://scenes?n=2", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "ingest.image.resize_mode" in capsys.readouterr().err


def test_choices_come_from_the_config():
    """``--resize-mode``/``--encode-format`` accept exactly what the config's Literals allow."""
    from typing import get_args

    from engine.config import ImageConfig
    from finevit.cli import build_parser
    from finevit.common import literal_choices

    ingest = build_parser()._subparsers._group_actions[0].choices["ingest"]
    by_flag = {a.option_strings[0]: a.choices for a in ingest._actions if a.option_strings}
    for flag, field in (("--resize-mode", "resize_mode"), ("--encode-format", "encode_format")):
        allowed = list(get_args(ImageConfig.model_fields[field].annotation))
        assert list(by_flag[flag]) == allowed == literal_choices(ImageConfig, field)
    with pytest.raises(TypeError, match="not a Literal"):
        literal_choices(ImageConfig, "image_size")


def test_train_takes_no_ray_address(capsys):
    """Stage 1 runs under torchrun: a --ray-address it would drop is refused, not ignored."""
    with pytest.raises(SystemExit) as e:
        main(["train", "stage1", "--ray-address", "ray://x:10001"])
    assert e.value.code == 2 and "--ray-address" in capsys.readouterr().err


@pytest.mark.slow
def test_ingest_and_info_end_to_end(tmp_path):
    out = tmp_path / "ds"
    r = run_cli(
        "ingest",
        "synthetic://scenes?n=12&seed=0&size=96",
        str(out),
        "--samples-per-shard",
        "5",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr
    assert "12  ok 12  failed 0" in r.stdout
    r = run_cli("info", str(out))
    assert r.returncode == 0 and "3 committed" in r.stdout and "gt-global" in r.stdout
