"""``finevit filter`` killed with SIGKILL mid-run and started again: every shard once, same verdicts."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.filtering.conftest import default_phash_layer, read_filter_layer
from tests.filtering.test_filter_e2e import check_planted

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def _run(root: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "finevit", "filter", str(root), "--layer", "flt", "--on", "recap"]
    cmd += ["--workers", "1", "--no-progress"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


@pytest.mark.parametrize("kill_at", ["signatures", "filter"])
def test_sigkill_then_rerun_is_exactly_once(planted, tmp_path, kill_at) -> None:
    root = tmp_path / "ds"
    shutil.copytree(planted.root, root, ignore=shutil.ignore_patterns("flt*", "phash-*", "minhash-*"))
    proc = _run(root)
    watch = default_phash_layer() if kill_at == "signatures" else "flt"
    deadline = time.time() + 240
    while (
        time.time() < deadline
        and proc.poll() is None
        and not list((root / "layers").glob(f"{watch}/*_stats.json"))
    ):
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, raylet and every worker at once
    proc.wait()
    n_before = len(list((root / "layers").glob("flt/*_stats.json")))
    assert n_before < 4

    rerun = _run(root)
    log = rerun.communicate(timeout=400)[0].decode()
    assert rerun.returncode == 0, log
    m = re.search(r"(\d+) written, (\d+) already committed", log)
    assert m, log
    assert int(m.group(1)) + int(m.group(2)) == 4 and int(m.group(2)) >= n_before, log
    check_planted(str(root))  # each key once, the same verdicts as an uninterrupted run
    assert len(read_filter_layer(str(root), "flt")) == 30
    assert not list((root / "layers").glob("*/.staging/*"))
