"""Fixtures of the recaption tests: small synthetic datasets, the fault-injecting server, a tiny VLM."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.recaption.recap_fault_server import FaultServer
from tests.recaption.recap_helpers import N_IMAGES, SPS


@pytest.fixture(scope="session")
def scenes_master(tmp_path_factory, ray_local) -> Path:
    """A small dataset (24 scenes, 3 shards, with gt-global and gt-regions), built once."""
    from engine.config import FineVitConfig, IngestConfig
    from engine.ingest import ingest

    out = tmp_path_factory.mktemp("recap-master") / "ds"
    cfg = FineVitConfig(ingest=IngestConfig(samples_per_shard=SPS, workers=2))
    ingest(f"synthetic://scenes?n={N_IMAGES}&seed=0&size=96", str(out), cfg, progress=False)
    return out


@pytest.fixture
def scenes(scenes_master, tmp_path) -> Path:
    """A private copy of the small dataset; its second sample is marked as failed at ingest."""
    out = tmp_path / "ds"
    shutil.copytree(scenes_master, out)
    p = out / "shards" / "00000.parquet"
    t = pq.read_table(p)
    rows = t.to_pylist()
    rows[1]["status"], rows[1]["error_message"] = "failed_to_download", "HTTP Error 404"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), p)
    return out


@pytest.fixture
def fault_server() -> Iterator[Callable[..., FaultServer]]:
    started: list[FaultServer] = []

    def make(**kw) -> FaultServer:
        s = FaultServer(**kw).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    from tests.recaption.recap_tiny_vlm import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-vlm") / "tiny-llava")
