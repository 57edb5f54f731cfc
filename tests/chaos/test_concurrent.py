"""Two runs of one stage on one output: the second is refused naming the holder; a dead run's
lease is taken over and the rerun completes exactly once.

For each stage (ingest into one OUTPUT, recaption into one layer, filter into one layer,
stage-1 training into one run folder): run A starts and takes the lease, and is frozen (SIGSTOP: a stalled
writer, its lease still fresh); run B on the same output exits 2 with a message that names A
(its pid); A is killed with SIGKILL, leaving its lease behind. The lease
is then made to look like a run on another node (its pid cannot be checked from here): while
its heartbeat is fresh a run is refused naming that node; once it has expired, the rerun takes
it over and ends with every sample once (and for training, the same losses). A lease of a dead
process on this machine is taken over at once (the kill -9 suite's reruns do exactly that).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from tests.chaos._chaos import n_markers, read_committed, run, start, wait_until
from tests.filtering.conftest import default_phash_layer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # minutes each on a loaded 2-core machine

LEASE = "_lease.json"


def _refused_naming(args: list[str], log: Path, holder: str) -> str:
    rc, text, _ = run(args, log, timeout=120)
    assert rc == 2, text[-3000:]
    assert "is being written by" in text and holder in text, text[-3000:]
    return text


def _as_if_on_another_node(lease: Path, *, expired: bool) -> str:
    cur = json.loads(lease.read_text())
    cur["host"], cur["pid"] = "node-b", 1
    cur["owner"] = "chaos@node-b pid 1"
    now = time.time()
    cur["heartbeat"], cur["expires"] = (now - 300, now - 180) if expired else (now, now + 120)
    lease.write_text(json.dumps(cur))
    return cur["owner"]


def _contend(args: list[str], lease: Path, tmp: Path, ready) -> tuple[str, float, float]:
    """A holds the lease, B is refused naming A, A is killed, a fresh lease of another node
    refuses, an expired one is taken over. Returns the completing run's (log, seconds) and how
    long the refusal took."""
    a = start(args, tmp / "a.log")
    assert wait_until(a, lambda: lease.exists() and ready()), a.text()[-3000:]
    # freeze A where it stands (a stalled writer: its lease is still fresh), so that B's start-up
    # time under load cannot let A finish first
    os.killpg(a.popen.pid, signal.SIGSTOP)
    t = time.time()
    _refused_naming(args, tmp / "b.log", f"pid {a.popen.pid}")
    refused_s = time.time() - t
    a.kill()
    assert lease.exists(), "a killed run leaves its lease (nobody released it)"
    other = _as_if_on_another_node(lease, expired=False)
    _refused_naming(args, tmp / "c.log", other)
    _as_if_on_another_node(lease, expired=True)
    rc, log, secs = run(args, tmp / "d.log")
    assert rc == 0, log[-4000:]
    assert not lease.exists(), "the lease is released at the end"
    return log, secs, refused_s


# ---------------------------------------------------------------- ingest into one OUTPUT

N_INGEST = 48
SRC = f"synthetic://scenes?n={N_INGEST}&seed=3&size=384"


def test_two_ingests_into_one_output(tmp_path, chaos_figures) -> None:
    out = tmp_path / "ds"
    args = ["ingest", SRC, str(out), "--samples-per-shard", "4", "--workers", "1", "--no-progress"]
    log, secs, refused_s = _contend(args, out / LEASE, tmp_path, lambda: n_markers(out / "shards") >= 1)
    got = read_committed(out / "shards", ["key", "status", "error_message"])
    assert not got.partial and len(got.keys) == len(set(got.keys)) == N_INGEST
    chaos_figures.add(
        scenario="concurrent runs: ingest into one OUTPUT",
        trials=1,
        faults=3,
        ok=sum(r["status"] == "success" for r in got.rows.values()),
        failed=sum(r["status"] != "success" for r in got.rows.values()),
        lost=N_INGEST - len(set(got.keys)),
        duplicated=len(got.keys) - len(set(got.keys)),
        unaccounted=0,
        wall_s=secs,
        note=f"2nd run refused in {refused_s:.1f} s naming the holder; fresh lease of another node "
        "refused; expired lease taken over",
    )


# ---------------------------------------------------------------- recaption into one layer


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("chaos-conc")
    root = base / "ds"
    rc, log, _ = run(
        ["ingest", "synthetic://scenes?n=32&seed=0&size=128", str(root), "--samples-per-shard", "4"],
        base / "ingest.log",
    )
    assert rc == 0, log
    return root


def test_two_recaptions_into_one_layer(small_ds, tmp_path, chaos_figures) -> None:
    from tests.recaption.recap_fault_server import FaultServer

    root = tmp_path / "ds"
    shutil.copytree(small_ds, root)
    layer = root / "layers" / "recap"
    srv = FaultServer(service_s=0.1).start()
    try:
        args = ["recaption", str(root), "--endpoint", srv.url, "--layer", "recap", "--max-in-flight", "1"]
        args += ["--no-progress", "--set", "recaption.shards_in_flight=1"]
        log, secs, refused_s = _contend(args, layer / LEASE, tmp_path, lambda: sum(srv.modes.values()) > 0)
    finally:
        srv.stop()
    got = read_committed(layer, ["key", "status", "error"])
    keys = set(read_committed(root / "shards", ["key"]).keys)
    assert not got.partial and sorted(got.keys) == sorted(keys)
    assert all(r["status"] == "ok" for r in got.rows.values())
    chaos_figures.add(
        scenario="concurrent runs: recaption into one layer",
        trials=1,
        faults=3,
        ok=len(got.rows),
        failed=0,
        lost=len(keys - set(got.keys)),
        duplicated=len(got.keys) - len(set(got.keys)),
        unaccounted=0,
        wall_s=secs,
        note=f"2nd run refused in {refused_s:.1f} s naming the holder; fresh lease of another node "
        "refused; expired lease taken over",
    )


# ---------------------------------------------------------------- filter into one layer


def test_two_filters_into_one_layer(small_ds, tmp_path, chaos_figures) -> None:
    root = tmp_path / "ds"
    shutil.copytree(small_ds, root)
    layer = root / "layers" / "flt"
    args = ["filter", str(root), "--layer", "flt", "--on", "gt-global", "--workers", "1", "--no-progress"]
    log, secs, refused_s = _contend(
        args, layer / LEASE, tmp_path, lambda: n_markers(root / "layers" / default_phash_layer()) >= 1
    )
    got = read_committed(layer, ["key", "keep", "reasons"])
    keys = set(read_committed(root / "shards", ["key"]).keys)
    assert not got.partial and sorted(got.keys) == sorted(keys)
    chaos_figures.add(
        scenario="concurrent runs: filter into one layer",
        trials=1,
        faults=3,
        ok=len(got.rows),
        failed=0,
        lost=len(keys - set(got.keys)),
        duplicated=len(got.keys) - len(set(got.keys)),
        unaccounted=0,
        wall_s=secs,
        note=f"2nd run refused in {refused_s:.1f} s naming the holder; fresh lease of another node "
        "refused; expired lease taken over",
    )


# ---------------------------------------------------------------- training into one run folder

STEPS = 10


def test_two_trainings_into_one_run_folder(small_ds, tmp_path, chaos_figures) -> None:
    from tests.chaos.test_kill9 import _metric_rows, _train_args

    tok = tmp_path / "tok"
    rc, log, _ = run(
        ["train-tokenizer", str(small_ds), "--layer", "gt-global", "--vocab", "384", str(tok)],
        tmp_path / "tok.log",
    )
    assert rc == 0, log
    run_dir = tmp_path / "run"
    args = _train_args(small_ds, tok, run_dir, steps=STEPS)
    log, secs, refused_s = _contend(
        args, run_dir / LEASE, tmp_path, lambda: any(run_dir.glob("checkpoints/step_*/done"))
    )
    assert "resumed from" in log, log[-3000:]
    rows = [r for r in _metric_rows(run_dir) if "loss" in r]
    steps = {r["step"] for r in rows}
    assert steps == set(range(1, STEPS + 1))
    chaos_figures.add(
        scenario="concurrent runs: stage-1 training into one run folder",
        trials=1,
        faults=3,
        ok=len(steps),
        failed=0,
        lost=STEPS - len(steps),
        duplicated=0,
        unaccounted=0,
        wall_s=secs,
        note=f"units: steps; 2nd run refused in {refused_s:.1f} s naming the holder; the expired lease "
        "taken over and the run resumed",
    )
