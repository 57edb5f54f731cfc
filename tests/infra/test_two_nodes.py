"""Our commands on a real 2-node Ray cluster on 127.0.0.1 (Ray's ``cluster_utils.Cluster``: a head
and a second raylet, 1 CPU each), joined through ``--ray-address`` as on a real cluster.

The cluster is private to this module: session files in a fresh short temp folder, and Ray's
``write_ray_address`` (which would record it in /tmp/ray/ray_current_cluster, where every other
``ray.init()`` on this machine looks) is replaced for the start-up; checked after it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.recaption.recap_fault_server import FaultServer

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "finevit"]


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[tuple[str, list[str]]]:
    """(GCS address, [head node id, worker node id]) of a private 2-node cluster."""
    import ray._private.utils as ray_utils
    from ray.cluster_utils import Cluster

    for k, v in {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}.items():
        os.environ.setdefault(k, v)
    temp = tempfile.mkdtemp(prefix="fvi", dir="/tmp")  # short: Ray's Unix sockets live under it
    address_file = "/tmp/ray/ray_current_cluster"
    before = Path(address_file).read_text() if os.path.exists(address_file) else None
    real_write = ray_utils.write_ray_address
    ray_utils.write_ray_address = lambda *a, **k: None  # never become other people's default cluster
    cluster = None
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 1, "temp_dir": temp, "include_dashboard": False},
        )
        worker = cluster.add_node(num_cpus=1, temp_dir=temp)
        cluster.wait_for_nodes()
        after = Path(address_file).read_text() if os.path.exists(address_file) else None
        assert after == before and after != cluster.address, "our test cluster registered itself"
        yield cluster.address, [cluster.head_node.node_id, worker.node_id]
    finally:
        ray_utils.write_ray_address = real_write
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _run(args: list[str], address: str, timeout: int = 420) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(
        [*args, "--ray-address", address], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _nodes(folder: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in sorted(folder.glob("*_stats.json")):
        node = json.loads(p.read_text()).get("node")
        out[node] = out.get(node, 0) + 1
    return out


def test_ingest_recaption_and_stage1_use_both_nodes(two_nodes, tmp_path: Path) -> None:
    address, node_ids = two_nodes
    data = tmp_path / "data"
    # 4 shards, one CPU task each: the head runs one, the rest spill to the second raylet
    _run(
        [*CLI, "ingest", "synthetic://scenes?n=16&seed=0&size=96", str(data), "--samples-per-shard", "4"]
        + ["--no-progress"],
        address,
    )
    shards = _nodes(data / "shards")
    assert sum(shards.values()) == 4 and set(shards) == set(node_ids), shards
    assert _nodes(data / "layers" / "gt-global") == shards  # the source's layers: same node as the shard

    server = FaultServer().start()  # every answer ok
    try:
        # two client actors of 1 CPU each: one per node
        _run(
            [*CLI, "recaption", str(data), "--endpoint", server.url, "--clients", "2", "--no-progress"]
            + ["--set", "recaption.client_cpus=1"],
            address,
        )
    finally:
        server.stop()
    layer = _nodes(data / "layers" / "recap-global")
    assert sum(layer.values()) == 4 and set(layer) == set(node_ids), layer

    info = subprocess.run(
        [*CLI, "info", str(data)], cwd=REPO, capture_output=True, text=True, env={**os.environ}
    )
    assert info.returncode == 0 and "2 nodes:" in info.stdout, info.stdout + info.stderr
    for n in node_ids:
        assert n[:8] in info.stdout

    # stage 1 through Ray Train: 2 CPU workers spread over the two nodes, checkpoint written
    tok = tmp_path / "tok"
    subprocess.run(
        [*CLI, "train-tokenizer", str(data), "--layer", "gt-global", "--vocab", "300", str(tok)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    from tests.train.test_stage1 import TINY

    log_dir = tmp_path / "run"
    sets = [*TINY, f"data.tokenizer={tok}", "loop.threads=1", "checkpoint.every=0"]
    r = _run(
        [sys.executable, "-m", "train.launch_ray", "--config", str(REPO / "configs" / "stage1_tiny_cpu.yaml")]
        + ["--dataset", str(data), "--steps", "2", "--log-dir", str(log_dir), "--workers", "2"]
        + ["--placement", "SPREAD"]
        + [a for s in sets for a in ("--set", s)],
        address,
        timeout=540,
    )
    metrics = json.loads(r.stdout.strip().splitlines()[-1])
    assert metrics["steps"] == 2 and sorted(metrics["nodes"]) == sorted(node_ids), metrics
    assert metrics["checkpoint"] and Path(metrics["checkpoint"]).exists(), metrics
    assert (log_dir / "metrics.jsonl").exists()
