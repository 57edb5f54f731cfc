"""Helpers of chaos-a's scenarios: the CLI in a process group, kills at observed moments, counts.

A stage runs as ``python -m finevit ...`` in its own session (process group), its output
going to a log file (a pipe nobody reads while we wait would fill and stall it). A kill is
``SIGKILL`` to the whole group: the driver, Ray's raylet and workers, the loader processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "finevit"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **extra}


@dataclass
class Proc:
    popen: subprocess.Popen
    log: Path
    started: float

    def alive(self) -> bool:
        return self.popen.poll() is None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill(self) -> float:
        """SIGKILL the whole group; returns the seconds the run lived."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        return time.time() - self.started

    def wait(self, timeout: float) -> tuple[int, str, float]:
        try:
            rc = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"run did not end in {timeout:.0f} s:\n{self.text()[-3000:]}") from None
        return rc, self.text(), time.time() - self.started


def start(
    args: list[str], log: Path, extra_env: dict[str, str] | None = None, cli: list[str] | None = None
) -> Proc:
    """``args`` of ``python -m finevit`` (or of the command ``cli``) in a session of their own."""
    log.parent.mkdir(parents=True, exist_ok=True)
    f = open(log, "ab")  # noqa: SIM115 - the child holds it; closed with the process
    p = subprocess.Popen(
        [*(CLI if cli is None else cli), *args],
        cwd=REPO,
        env=env(**(extra_env or {})),
        start_new_session=True,
        stdout=f,
        stderr=subprocess.STDOUT,
    )
    f.close()
    return Proc(p, log, time.time())


def run(args: list[str], log: Path, timeout: float = 400, **kw) -> tuple[int, str, float]:
    return start(args, log, **kw).wait(timeout)


def wait_until(proc: Proc, pred: Callable[[], bool], timeout: float = 240) -> bool:
    """Poll ``pred`` while the run lives; True when it held with the run still alive."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.alive():
        if pred():
            return proc.alive()
        time.sleep(0.01)
    return False


def copy_dataset(src: Path, dst: Path) -> Path:
    """A private copy of a module's dataset for one scenario (a local dataset is a folder)."""
    shutil.copytree(src, dst)
    return dst


def n_markers(folder: Path) -> int:
    return len(list(folder.glob("*_stats.json"))) if folder.exists() else 0


def staged(folder: Path) -> bool:
    """Something of a shard is being written (in the folder's staging area)."""
    st = folder / ".staging"
    return st.exists() and any(st.rglob("*"))


WRITTEN = re.compile(r"(\d+) written, (\d+) already committed")


def written_skipped(log: str) -> tuple[int, int]:
    m = WRITTEN.findall(log)
    assert m, log[-3000:]
    return int(m[-1][0]), int(m[-1][1])


@dataclass
class Rows:
    """What a reader sees in a folder of committed shards (``<shard>.parquet`` + marker)."""

    keys: list[str] = field(default_factory=list)
    rows: dict[str, dict] = field(default_factory=dict)
    partial: list[str] = field(default_factory=list)  # committed shards whose parts disagree

    def statuses(self, column: str) -> Counter:
        return Counter(r.get(column) for r in self.rows.values())


def read_committed(folder: Path, columns: list[str] | None = None) -> Rows:
    out = Rows()
    for marker in sorted(folder.glob("*_stats.json")):
        shard = marker.name[: -len("_stats.json")]
        stats = json.loads(marker.read_text())
        parquet = folder / f"{shard}.parquet"
        if not parquet.exists():
            out.partial.append(f"{shard}: marker without parquet")
            continue
        t = pq.read_table(parquet, columns=columns)
        if "count" in stats and stats["count"] != t.num_rows:
            out.partial.append(f"{shard}: {t.num_rows} rows, marker says {stats['count']}")
        tar = folder / f"{shard}.tar"
        if stats.get("bytes") and not tar.exists():  # an image shard's marker names its tar's size
            out.partial.append(f"{shard}: marker without tar")
        elif stats.get("bytes") and tar.stat().st_size != stats["bytes"]:
            out.partial.append(f"{shard}: tar has {tar.stat().st_size} bytes, marker says {stats['bytes']}")
        for r in t.to_pylist():
            out.keys.append(r["key"])
            out.rows[r["key"]] = r
    return out


def tally(got: Rows, want_keys: set[str], failed: Callable[[dict], bool], reason: Callable[[dict], object]):
    """(ok, failed, lost, duplicated, unaccounted) of a run against the keys it should hold."""
    dup = len(got.keys) - len(set(got.keys))
    lost = len(want_keys - set(got.keys))
    extra = len(set(got.keys) - want_keys)
    n_failed = sum(1 for r in got.rows.values() if failed(r))
    no_reason = sum(1 for r in got.rows.values() if failed(r) and not reason(r))
    ok = len(got.rows) - n_failed
    return ok, n_failed, lost, dup, extra + no_reason
