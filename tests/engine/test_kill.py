"""A run killed with SIGKILL at any moment and started again ends with every input exactly once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from engine.layout import Dataset, make_key

pytestmark = pytest.mark.slow

N, SPS = 300, 15
SOURCE = f"synthetic://scenes?n={N}&seed=7&size=160"


def _run(out: Path, **popen) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "finevit",
        "ingest",
        SOURCE,
        str(out),
        "--samples-per-shard",
        str(SPS),
        "--workers",
        "2",
        "--no-progress",
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen
    )


def _committed(out: Path) -> int:
    return len(list((out / "shards").glob("*_stats.json"))) if (out / "shards").exists() else 0


@pytest.mark.parametrize("kill_after_commits", [0, 4])
def test_sigkill_then_rerun_is_exactly_once(tmp_path, kill_after_commits):
    out = tmp_path / "ds"
    proc = _run(out)
    deadline = time.time() + 120
    if kill_after_commits == 0:
        # as soon as the first shard is being staged: mid-write, nothing committed yet
        staging = out / "shards" / ".staging"
        while (
            time.time() < deadline
            and proc.poll() is None
            and not (staging.exists() and any(staging.iterdir()))
        ):
            time.sleep(0.02)
    else:
        while time.time() < deadline and _committed(out) < kill_after_commits and proc.poll() is None:
            time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed: make it longer"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, raylet and every worker at once
    proc.wait()
    n_before = _committed(out)
    assert n_before < N // SPS

    # what a reader sees after the kill is consistent: every committed shard whole
    ds = Dataset(str(out))
    for shard in ds.committed_shards():
        assert pq.read_table(ds.shard_parquet(shard)).num_rows == SPS

    rerun = _run(out)
    log = rerun.communicate(timeout=300)[0].decode()
    assert rerun.returncode == 0, log
    # Ray's raylet and workers die by fate-sharing just after the driver: one may finish a
    # commit in that moment, which is fine. What matters: shards written + skipped = all.
    m = re.search(r"(\d+) written, (\d+) already committed", log)
    assert m, log
    written, skipped = int(m.group(1)), int(m.group(2))
    assert skipped >= n_before and written + skipped == N // SPS, log

    rows = pq.ParquetDataset(sorted(str(p) for p in (out / "shards").glob("*.parquet"))).read()
    keys = rows.column("key").to_pylist()
    assert sorted(keys) == sorted(make_key(s, i, SPS) for s in range(N // SPS) for i in range(SPS))
    assert len(set(keys)) == N
    assert set(rows.column("status").to_pylist()) == {"success"}
    for layer in ("gt-global", "gt-regions"):
        assert len(ds.layer(layer).committed()) == N // SPS
    assert not (out / "shards" / ".staging").exists()

    # a second rerun is a no-op: nothing rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir() if p.is_file()}
    again = _run(out)
    log2 = again.communicate(timeout=300)[0].decode()
    assert again.returncode == 0, log2
    assert f"0 written, {N // SPS} already committed" in log2
    assert {p: p.stat().st_mtime_ns for p in (out / "shards").iterdir() if p.is_file()} == mtimes
