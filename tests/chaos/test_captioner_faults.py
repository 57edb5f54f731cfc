"""``finevit recaption --backend openai`` against a real captioner on 127.0.0.1 that fails.

The fault-rate sweep: the recaption tests' fault server (tests/recaption/recap_fault_server.py)
fails a fraction (0.1, 0.3, 0.5) of the images, picked by a hash of each request's content,
seeded through the request's ``user`` field (a rerun draws the same images), with 500, 429 + Retry-After and timeouts in equal parts. A
faulted image fails its first two attempts and the client is allowed one retry, so each
faulted image ends failed with the reason and every other image ends ok; then the server is
healthy and ``--retry-failed`` must complete the layer: the same keys, each once, the same
captions as an uninterrupted run against a healthy server.

The restart: the captioner runs in its own process and is killed with SIGKILL once the run
has committed its first shard, then started again on the same port a second later. The client
may not retry (``recaption.retries=0``), so the requests in flight at the kill fail. The run
must end with every image once, ok or failed with a reason (some failed); ``--retry-failed``
completes it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.chaos._chaos import (
    REPO,
    Rows,
    copy_dataset,
    env,
    n_markers,
    read_committed,
    start,
    tally,
    wait_until,
)
from tests.chaos._faults import run_cli
from tests.conftest import free_port
from tests.recaption.recap_fault_server import FaultServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

N, SPS = 24, 6
RATES = (0.1, 0.3, 0.5)
SEED = 17  # sent in each request (the OpenAI "user" field): it changes which images draw a fault


@pytest.fixture(scope="module")
def master(tmp_path_factory, ray_address) -> Path:
    base = tmp_path_factory.mktemp("capfault-master")
    root = base / "ds"
    rc, log, _ = run_cli(
        ["ingest", f"synthetic://scenes?n={N}&seed=3&size=96", str(root)]
        + ["--samples-per-shard", str(SPS), "--no-progress"],
        base / "ingest.log",
    )
    assert rc == 0, log
    return root


def _args(root: Path, url: str, *extra: str) -> list[str]:
    return [
        "recaption",
        str(root),
        "--endpoint",
        url,
        "--layer",
        "recap",
        "--max-in-flight",
        "4",
        "--timeout",
        "1",
        "--no-progress",
        "--set",
        "recaption.retries=1",
        "--set",
        "recaption.backoff_base=0.05",
        "--set",
        "recaption.backoff_max=0.2",
        "--set",
        "recaption.probe_interval=0.5",
        "--set",
        f"recaption.extra_body={{user: chaos-seed-{SEED}}}",
        *extra,
    ]


@pytest.fixture(scope="module")
def clean(master, tmp_path_factory) -> tuple[Rows, float]:
    """One uninterrupted run against a healthy server: the reference and the clean wall time."""
    srv = FaultServer().start()
    try:
        root = copy_dataset(master, tmp_path_factory.mktemp("capfault-clean") / "ds")
        rc, log, wall = run_cli(_args(root, srv.url), root.parent / "clean.log")
        assert rc == 0, log
    finally:
        srv.stop()
    return read_committed(root / "layers" / "recap"), wall


def _layer_stats(root: Path) -> Counter:
    import json

    total: Counter = Counter()
    for p in (root / "layers" / "recap").glob("*_stats.json"):
        st = json.loads(p.read_text())
        total["retries"] += int(st.get("retries") or 0)
        total["requests"] += int(st.get("requests") or 0)
    return total


def _check_once(root: Path, want: set[str]) -> tuple[Rows, tuple[int, int, int, int, int]]:
    got = read_committed(root / "layers" / "recap")
    assert not got.partial, got.partial
    assert not list((root / "layers" / "recap" / ".staging").glob("*"))
    counts = tally(got, want, lambda r: r["status"] != "ok", lambda r: r["error"])
    ok, failed, lost, dup, unacc = counts
    assert (lost, dup, unacc) == (0, 0, 0), counts
    for r in got.rows.values():
        assert r["status"] in ("ok", "failed"), r
        assert (r["status"] == "ok") == (r["error"] is None) == (r["caption"] is not None), r
    return got, counts


def _reasons(got: Rows) -> str:
    kinds = Counter()
    for r in got.rows.values():
        if r["status"] != "ok":
            e = r["error"].lower()
            kinds["timeout" if "timeout" in e or "timed out" in e else e.split(":")[0][:40]] += 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))


@pytest.mark.parametrize("rate", RATES)
def test_fault_rate_sweep(rate, master, clean, tmp_path, chaos_figures) -> None:
    ref, clean_s = clean
    want = set(read_committed(master / "shards", ["key"]).keys)
    assert set(ref.keys) == want and ref.statuses("status") == {"ok": N}
    root = copy_dataset(master, tmp_path / "ds")
    third = rate / 3
    srv = FaultServer(
        plan={"500": third, "429": third, "slow": third},
        transient_attempts=2,  # the first try and the one retry the client is allowed
        slow_s=1.5,  # past the client's 1 s timeout
        retry_after=0.05,
    ).start()
    try:
        rc, log, wall = run_cli(_args(root, srv.url), tmp_path / "faulty.log")
        assert rc == 0, log[-3000:]
        got, (ok, failed, *_) = _check_once(root, want)
        faults = sum(n for mode, n in srv.modes.items() if mode != "ok")
        stats = _layer_stats(root)
        served = ", ".join(f"{m} x{n}" for m, n in sorted(srv.modes.items()) if m != "ok")
        first = (
            f"{ok} ok, {failed} failed ({_reasons(got)}), {stats['retries']} retries; server faults: {served}"
        )
        assert faults > 0 and failed > 0, (srv.modes, first)
        # every faulted image failed, every other one is ok: the rate the server drew
        assert failed == sum(1 for r in got.rows.values() if r["status"] == "failed")
        assert abs(failed / N - rate) <= 0.25, (rate, first)

        srv.plan = {}  # healthy again
        rc, log, wall2 = run_cli(_args(root, srv.url, "--retry-failed"), tmp_path / "retry.log")
        assert rc == 0, log[-3000:]
    finally:
        srv.stop()
    again, (ok2, failed2, *_) = _check_once(root, want)
    assert (ok2, failed2) == (N, 0), _reasons(again)
    assert {k: r["caption"] for k, r in again.rows.items()} == {k: r["caption"] for k, r in ref.rows.items()}
    chaos_figures.add(
        scenario=f"captioner faults: rate {rate} (recaption, openai)",
        trials=1,
        faults=faults,
        ok=ok,
        failed=failed,
        lost=0,
        duplicated=0,
        unaccounted=0,
        wall_s=wall + wall2,
        clean_wall_s=clean_s,
        note=f"{N} images; 500/429/timeout in equal parts, each faulted image faulted twice; "
        f"first run: {first}; --retry-failed: {ok2} ok, captions equal to the clean run's",
    )


# ---------------------------------------------------------------- the captioner killed mid-run


class _Captioner:
    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        f = open(self.log, "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos._faults", "captioner", str(self.port), "0.3"],
            cwd=REPO,
            env=env(),
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        f.close()
        deadline = time.time() + 60
        while time.time() < deadline:
            with contextlib.suppress(OSError):
                import socket

                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            time.sleep(0.05)
        raise AssertionError(f"captioner did not start: {self.log.read_text()}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def test_captioner_killed_and_restarted_mid_run(master, clean, tmp_path, chaos_figures) -> None:
    ref, clean_s = clean
    want = set(read_committed(master / "shards", ["key"]).keys)
    root = copy_dataset(master, tmp_path / "ds")
    layer = root / "layers" / "recap"
    port = free_port()
    cap = _Captioner(port, tmp_path / "captioner.log")
    cap.start()
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        # no client retry here (the sweep covers retries): the requests in flight when the
        # captioner dies fail, and must end failed with their reason, then be redone by --retry-failed
        args = _args(root, url, "--set", "recaption.shards_in_flight=1", "--set", "recaption.retries=0")
        proc = start(args, tmp_path / "run.log")
        assert wait_until(proc, lambda: n_markers(layer) >= 1), proc.text()[-3000:]
        at = n_markers(layer)
        cap.kill()
        time.sleep(1.0)
        cap.start()
        rc, log, _ = proc.wait(400)
        wall = time.time() - t0
        assert rc == 0, log[-3000:]
        assert at < N // SPS, "the kill landed before the run's end"
        got, (ok, failed, *_) = _check_once(root, want)
        retries = _layer_stats(root)["retries"]
        assert failed > 0, "the kill was felt: the requests in flight failed"
        first = f"{ok} ok, {failed} failed ({_reasons(got)}), {retries} retries"
        rc, log, wall2 = run_cli(_args(root, url, "--retry-failed"), tmp_path / "retry.log")
        assert rc == 0, log[-3000:]
    finally:
        cap.kill()
    again, (ok2, failed2, *_) = _check_once(root, want)
    assert (ok2, failed2) == (N, 0), _reasons(again)
    assert {k: r["caption"] for k, r in again.rows.items()} == {k: r["caption"] for k, r in ref.rows.items()}
    chaos_figures.add(
        scenario="captioner killed (SIGKILL) and restarted mid-run (recaption, openai)",
        trials=1,
        faults=1,
        ok=ok,
        failed=failed,
        lost=0,
        duplicated=0,
        unaccounted=0,
        wall_s=wall + wall2,
        clean_wall_s=clean_s,
        note=f"{N} images, {N // SPS} shards; killed after {at} committed shard(s), back 1 s later; "
        f"first run: {first}; --retry-failed: {ok2} ok, captions equal to the clean run's",
    )
