"""End to end on Ray: local disk and s3:// (moto), the CLI, and SIGKILL + rerun = exactly once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pyarrow.parquet as pq
import pytest

from engine.layers import read_layer
from engine.layout import Dataset
from recaption.config import RecaptionConfig, RecaptionRunConfig
from recaption.run import recaption
from tests.recaption.recap_helpers import CLI, N_IMAGES

pytestmark = pytest.mark.slow


def _keys(root) -> list[str]:
    ds = Dataset(str(root))
    return [
        k
        for s in ds.committed_shards()
        for k in pq.read_table(ds.shard_parquet(s), columns=["key"]).column("key").to_pylist()
    ]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_recaption_on_ray(scenes, fault_server, s3, where):
    srv = fault_server(plan={"503": 0.1, "429": 0.1, "reset": 0.05}, retry_after=0.05)
    storage = s3.storage if where == "s3" else None
    root = s3.upload_dir(scenes, "ds") if where == "s3" else str(scenes)
    cfg = RecaptionRunConfig(
        recaption=RecaptionConfig(
            endpoints=[srv.url], layer="recap", timeout=5, backoff_base=0.01, clients=2, shards_in_flight=1
        )
    )
    if storage is not None:
        cfg = cfg.model_copy(update={"storage": storage})
    report = recaption(root, cfg, progress=False)
    assert (report.shards_written, report.count, report.ok) == (3, N_IMAGES, N_IMAGES - 1)
    assert report.requests > N_IMAGES - 1 and report.retries > 0
    assert report.reasons == {"image not available (ingest status failed_to_download: HTTP Error 404)": 1}
    t = read_layer(root, "recap", storage)
    assert sorted(t.column("key").to_pylist()) == sorted(_keys(scenes))
    ds = Dataset(root, storage)
    info = ds.layer("recap").info()
    assert (
        info["model"] == "fake-vlm"
        and info["prompt_id"] == "dense-v1"
        and "Describe this image" in info["prompt_text"]
    )
    # a rerun skips everything and sends nothing
    before = sum(srv.modes.values())
    again = recaption(root, cfg, progress=False)
    assert (again.shards_written, again.shards_skipped) == (0, 3) and sum(srv.modes.values()) == before


def _cli(root, srv, *extra) -> subprocess.Popen:
    cmd = [
        *CLI,
        "recaption",
        str(root),
        "--endpoint",
        srv.url,
        "--layer",
        "recap",
        "--no-progress",
        "--max-in-flight",
        "2",
        "--timeout",
        "10",
        *extra,
    ]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


@pytest.mark.parametrize("kill_after_commits", [0, 1])
def test_sigkill_then_rerun_is_exactly_once(scenes, fault_server, kill_after_commits):
    srv = fault_server(service_s=0.25)
    layer_dir = scenes / "layers" / "recap"
    proc = _cli(scenes, srv, "--set", "recaption.shards_in_flight=1")
    deadline = time.time() + 120

    def committed() -> int:
        return len(list(layer_dir.glob("*_stats.json"))) if layer_dir.exists() else 0

    while time.time() < deadline and proc.poll() is None:
        if (kill_after_commits == 0 and sum(srv.modes.values()) > 0) or (
            kill_after_commits and committed() >= kill_after_commits
        ):
            break
        time.sleep(0.02)
    assert proc.poll() is None, (
        "the run finished before it could be killed: " + proc.stdout.read().decode()[-2000:]
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = committed()
    assert n_before < 3
    for p in layer_dir.glob("*_stats.json"):  # what a reader sees is whole
        assert pq.read_table(str(p).replace("_stats.json", ".parquet")).num_rows == 8

    srv.service_s = 0.0
    rerun = _cli(scenes, srv)
    log = rerun.communicate(timeout=300)[0].decode()
    assert rerun.returncode == 0, log
    m = re.search(r"(\d+) written, (\d+) already committed", log)
    assert m, log
    assert int(m.group(1)) + int(m.group(2)) == 3 and int(m.group(2)) >= n_before, log
    t = read_layer(str(scenes), "recap")
    keys = t.column("key").to_pylist()
    assert sorted(keys) == sorted(_keys(scenes)) and len(set(keys)) == N_IMAGES
    assert t.column("status").to_pylist().count("ok") == N_IMAGES - 1
    assert not list((layer_dir / ".staging").glob("*")) if (layer_dir / ".staging").exists() else True


def test_cli_unreachable_endpoint_exits_2(scenes):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run(
        [*CLI, "recaption", str(scenes), "--endpoint", f"http://127.0.0.1:{port}", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "unreachable" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _run_cli(root, srv, *extra) -> str:
    cmd = [*CLI, "recaption", str(root), "--endpoint", srv.url, "--no-progress", "--shards", "00001", *extra]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", r.stdout).split())  # the table's words


def _files(d) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()} if d.exists() else set()


def test_cli_cache_dir_and_no_persistent_cache(scenes, fault_server, tmp_path):
    """``--cache-dir DIR`` keeps the answers in DIR (not under the dataset) and a later run on
    another layer reuses them (0 requests); ``--no-persistent-cache`` neither reads nor writes it."""
    srv = fault_server()
    cache = tmp_path / "answers"
    _run_cli(scenes, srv, "--layer", "c1", "--cache-dir", str(cache))
    sent = sum(srv.seen.values())
    stored = _files(cache)
    assert sent == 8 and stored and all(f.endswith(".json.gz") for f in stored), stored
    assert not (scenes / "cache").exists()  # not the default place
    out = _run_cli(scenes, srv, "--layer", "c2", "--cache-dir", str(cache))
    assert sum(srv.seen.values()) == sent and "cache hits 8" in out, out
    _run_cli(scenes, srv, "--layer", "c3", "--cache-dir", str(cache), "--no-persistent-cache")
    assert sum(srv.seen.values()) == 2 * sent  # not read ...
    assert _files(cache) == stored and not (scenes / "cache").exists()  # ... nor written


def test_cli_several_layers_in_one_pass(scenes, fault_server):
    """``--task global --task regions`` writes two layers from one pass, each with its own
    layer.json, commits and stats, and prints a summary per layer."""
    srv = fault_server(keep_bodies=True)
    out = _run_cli(scenes, srv, "--task", "global", "--task", "regions", "--layer", "g", "--layer", "r")
    ds = Dataset(str(scenes))
    for name, kind in (("g", "caption"), ("r", "regions")):
        layer = ds.layer(name)
        assert layer.committed() == ["00001"] and layer.info()["kind"] == kind
        st = layer.read_stats("00001")
        assert (st.count, st.ok, st.extra["requests"]) == (8, 8, 8), st
        assert f"layer {name} shards 1 written" in out, out
    assert len(srv.bodies) == 16 and sum("response_format" in b for b in srv.bodies) == 8
