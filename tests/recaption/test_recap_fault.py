"""The openai backend and the shard pipeline against the fault-injecting server (no Ray workers:
the shard worker is driven directly; Ray only builds the dataset)."""

from __future__ import annotations

import asyncio
import io
import os

import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.config import StorageConfig
from engine.layout import Dataset
from recaption.backends.base import BackendError, CaptionRequest, SamplingParams
from recaption.backends.openai_http import OpenAIBackend
from recaption.config import RecaptionConfig
from recaption.plan import check_or_write_info, layer_info, layer_name
from recaption.run import ShardWorker

TRANSIENT = {"500": 0.1, "503": 0.08, "429": 0.08, "slow": 0.08, "reset": 0.08, "garbage": 0.08}


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i % 256, (i * 7) % 256, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _req(i: int) -> CaptionRequest:
    return CaptionRequest(
        f"k{i}",
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}],
        [_jpeg(i)],
        SamplingParams(32),
    )


# Client timeouts far above a loaded 2-core machine's latency (load ~15 seen here): a test that
# counts requests must not see a retry for an answer that was merely slow to arrive. Tests of
# the timeout path pass their own (below the server's ``slow_s``).
TIMEOUT = 5.0


def _backend(urls, **kw) -> OpenAIBackend:
    kw = {
        "timeout": TIMEOUT,
        "retries": 4,
        "backoff_base": 0.01,
        "backoff_max": 0.05,
        "probe_interval": 0.1,
        **kw,
    }
    return OpenAIBackend(urls, **kw)


async def _run_all(backend: OpenAIBackend, n: int):
    await backend.start()
    try:
        return await asyncio.gather(*(backend.generate(_req(i)) for i in range(n)))
    finally:
        await backend.close()


def test_transient_faults_succeed_on_retry(fault_server):
    srv = fault_server(plan=TRANSIENT, slow_s=3.0, retry_after=0.2)
    results = asyncio.run(_run_all(_backend([srv.url], max_in_flight=8, timeout=2.0), 80))
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert all(r.text.startswith("A large red") for r in results)
    for mode in TRANSIENT:  # every fault was injected at least once ...
        assert srv.modes[mode] > 0, srv.modes
    retried = sum(r.attempts - 1 for r in results)
    assert retried == sum(
        n for m, n in srv.modes.items() if m != "ok"
    )  # ... and each one cost exactly one retry
    # Retry-After was honoured: the retry of a 429'd request came no sooner than it said
    gaps = [t[1] - t[0] for h, t in srv.times.items() if len(t) > 1 and srv._mode(srv.content[h], 1) == "429"]
    assert gaps and min(gaps) >= 0.2 * 0.95


def test_persistent_faults_end_with_a_reason(fault_server):
    srv = fault_server(plan={"503": 0.5}, persistent={"503"})
    results = asyncio.run(_run_all(_backend([srv.url], retries=2, eject_after=1000), 30))
    failed = [r for r in results if not r.ok]
    assert failed and all(
        r.error == "HTTP 503 server error (after 3 attempts)" and r.attempts == 3 for r in failed
    )
    assert all(r.ok for r in results if r not in failed)


def test_unreachable_endpoint_is_a_clear_error_before_any_work(scenes, fault_server):
    import socket

    from recaption.config import RecaptionRunConfig
    from recaption.run import recaption

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    live = fault_server()
    with pytest.raises(BackendError, match=f"unreachable: {dead}"):
        asyncio.run(_run_all(_backend([live.url, dead]), 1))
    cfg = RecaptionRunConfig(recaption=RecaptionConfig(endpoints=[live.url, dead], layer="never"))
    with pytest.raises(BackendError, match="is the server up"):
        recaption(str(scenes), cfg, progress=False)
    assert not (scenes / "layers" / "never").exists()  # nothing was written
    assert sum(live.modes.values()) == 0


def test_bounded_in_flight_and_least_outstanding(fault_server):
    a, b = fault_server(service_s=0.05), fault_server(service_s=0.05)
    backend = _backend([a.url, b.url], max_in_flight=3)
    peak = {"n": 0}

    async def go():
        await backend.start()
        orig = backend.pool.acquire

        async def acquire():
            e = await orig()
            peak["n"] = max(peak["n"], max(x.outstanding for x in backend.pool.endpoints))
            return e

        backend.pool.acquire = acquire
        try:
            return await asyncio.gather(*(backend.generate(_req(i)) for i in range(60)))
        finally:
            await backend.close()

    results = asyncio.run(go())
    assert all(r.ok for r in results)
    assert peak["n"] <= 3
    assert sum(a.modes.values()) + sum(b.modes.values()) == 60
    assert min(sum(a.modes.values()), sum(b.modes.values())) >= 20  # both endpoints carried load


def test_endpoint_restart_and_ejection(fault_server):
    a, b = fault_server(service_s=0.02), fault_server(service_s=0.02)
    backend = _backend(
        [a.url, b.url], max_in_flight=4, eject_after=2, retries=6, backoff_base=0.05, backoff_max=0.2
    )

    async def go():
        await backend.start()
        try:
            first = await asyncio.gather(*(backend.generate(_req(i)) for i in range(20)))
            a.restart(down_s=0.6)
            await asyncio.sleep(0.05)
            second = await asyncio.gather(*(backend.generate(_req(100 + i)) for i in range(80)))
            await asyncio.sleep(0.8)  # a is back: the probe returns it to rotation
            third = await asyncio.gather(*(backend.generate(_req(200 + i)) for i in range(40)))
            return first + second + third, {e.url: e.snapshot() for e in backend.pool.endpoints}
        finally:
            await backend.close()

    results, stats = asyncio.run(go())
    assert all(r.ok for r in results), [r.error for r in results if not r.ok][:3]
    assert stats[a.url]["ejections"] >= 1 and not stats[a.url]["ejected"]
    assert {r.endpoint for r in results[-40:]} == {a.url, b.url}  # back in rotation after its restart


# ---------------------------------------------------------------- shard pipeline


def _cfg(srv, **kw) -> RecaptionConfig:
    base = dict(
        endpoints=[srv.url],
        timeout=TIMEOUT,
        retries=3,
        backoff_base=0.01,
        backoff_max=0.05,
        max_in_flight=8,
        image_max_side=64,
    )
    return RecaptionConfig(**{**base, **kw})


def _run_shards(root, cfg: RecaptionConfig, storage=None, retry=False):
    storage = storage or StorageConfig()
    ds = Dataset(str(root), storage)
    layer = ds.layer(layer_name(cfg))
    check_or_write_info(layer, layer_info(cfg, "fake-vlm"))
    w = ShardWorker(str(root), storage, cfg, "fake-vlm")

    async def go():
        try:
            outs = [await (w.retry_shard(s) if retry else w.run_shard(s)) for s in ds.committed_shards()]
            return [o and {**o["stats"], "_round": o["usage"]} for o in outs]
        finally:
            await w.close()

    return asyncio.run(go()), layer


def _rows(layer, shard="00000"):
    with layer.store.open(layer.parquet(shard)) as f:
        return pq.read_table(f).to_pylist()


def test_global_layer_reasons_raw_and_retry_failed(scenes, fault_server):
    srv = fault_server(
        plan={**TRANSIENT, "empty": 0.08, "refusal": 0.08, "length": 0.08},
        persistent={"empty", "refusal", "length"},
        slow_s=1.0,
        retry_after=0.05,
    )
    stats, layer = _run_shards(scenes, _cfg(srv, layer="cap", timeout=0.5))  # slow_s 1.0 times out
    assert [s["count"] for s in stats] == [8, 8, 8]
    rows = [r for s in layer.committed() for r in _rows(layer, s)]
    assert len(rows) == 24 and len({r["key"] for r in rows}) == 24
    by_err = {r["error"] for r in rows if r["status"] == "failed"}
    assert "image not available (ingest status failed_to_download: HTTP Error 404)" in by_err
    assert by_err - {"image not available (ingest status failed_to_download: HTTP Error 404)"} <= {
        "empty answer (after 4 answers)",
        "refusal (after 4 answers)",
        "truncated (finish_reason=length) (after 4 answers)",
    }
    assert len(by_err) >= 3  # the persistent answer faults did happen
    for r in rows:
        assert r["status"] in ("ok", "failed")
        if r["status"] == "ok":
            assert r["caption"].startswith("A large red") and r["error"] is None and r["model"] == "fake-vlm"
            assert r["prompt_id"] == "dense-v1" and r["finish_reason"] == "stop" and r["n_tokens"] > 0
        else:
            assert r["error"] and r["caption"] is None
            if "refusal" in r["error"]:
                assert r["raw"].startswith("I'm sorry")
    st = stats[0]
    for k in (
        "requests",
        "retries",
        "prompt_tokens",
        "completion_tokens",
        "latency_ms_p50",
        "latency_ms_p95",
        "latency_ms_p99",
        "images_per_s",
        "error_reasons",
    ):
        assert k in st, k
    assert sum(s["retries"] for s in stats) > 0 and sum(s["failed"] for s in stats) == sum(
        1 for r in rows if r["status"] == "failed"
    )

    # --retry-failed: the server is healthy now; every failed row with an image ends ok
    srv.plan, srv.persistent = {}, set()
    retried, _ = _run_shards(scenes, _cfg(srv, layer="cap", timeout=0.5), retry=True)
    assert any(r is not None for r in retried)
    # finding 7: the shard's request and token counts add up over the rounds
    for first, again in zip(stats, retried, strict=True):
        if again is not None:
            assert again["requests"] == first["requests"] + again["_round"]["requests"] > first["requests"]
            assert (
                again["completion_tokens"]
                == first["completion_tokens"] + again["_round"]["completion_tokens"]
            )
            assert again["retry_rounds"] == 1
    rows2 = [r for s in layer.committed() for r in _rows(layer, s)]
    assert [r["key"] for r in rows2] == [r["key"] for r in rows]
    assert [r["error"] for r in rows2 if r["status"] == "failed"] == [
        "image not available (ingest status failed_to_download: HTTP Error 404)"
    ]
    # ok rows of the first run were kept as they were
    assert all(a == b for a, b in zip(rows, rows2, strict=True) if a["status"] == "ok")


@pytest.mark.parametrize("fmt", ["norm1000", "norm1"])
def test_grounded_regions(scenes, fault_server, fmt):
    srv = fault_server(
        plan={"malformed_json": 0.15, "out_of_range": 0.15, "wrong_json": 0.1, "503": 0.1},
        persistent={"malformed_json", "out_of_range", "wrong_json"},
        bbox_format=fmt,
        keep_bodies=True,
    )
    cfg = _cfg(srv, task="regions", region_mode="grounded", bbox_format=fmt, retries=1)
    stats, layer = _run_shards(scenes, cfg)
    rows = [r for s in layer.committed() for r in _rows(layer, s)]
    assert len(rows) == 24
    ok = [r for r in rows if r["status"] == "ok"]
    errs = {r["error"] for r in rows if r["status"] == "failed"}
    assert ok and len(errs) >= 3, errs
    assert {e.split(":")[0] for e in errs} <= {
        "malformed JSON",
        "wrong JSON",
        "invalid boxes",
        "image not available (ingest status failed_to_download",
    }
    for r in ok:
        assert len(r["regions"]) == 2  # the duplicate box was dropped
        c = r["regions"][0]
        assert (c["x0"], c["y0"], c["label"]) == (pytest.approx(0.05), pytest.approx(0.05), "circle")
    assert any(
        r["raw"] and r["raw"].startswith('{"regions": [{"bbox": [10') for r in rows if r["status"] == "failed"
    )
    assert sum(s["dropped_boxes"].get("duplicate", 0) for s in stats) == len(ok)
    rf = srv.bodies[0]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["schema"]["required"] == ["regions"]


@pytest.mark.parametrize("hint", ["coords", "draw", "crop"])
def test_proposals_from_gt_regions(scenes, fault_server, hint):
    srv = fault_server(keep_bodies=True)
    cfg = _cfg(srv, task="regions", region_mode="proposals", box_hint=hint, proposals_layer="gt-regions")
    _, layer = _run_shards(scenes, cfg)
    gt = Dataset(str(scenes)).layer("gt-regions")
    for s in layer.committed():
        mine, truth = _rows(layer, s), _rows(gt, s)
        assert [r["key"] for r in mine] == [r["key"] for r in truth]
        for m, t in zip(mine, truth, strict=True):
            if m["status"] != "ok":
                assert m["error"].startswith("image not available")
                continue
            assert [(r["label"], round(r["x0"], 4)) for r in m["regions"]] == [
                (r["label"], round(r["x0"], 4)) for r in t["regions"]
            ]
            assert all(r["caption"].startswith("A large red") for r in m["regions"])
    n_boxes = sum(
        len(r["regions"])
        for s in gt.committed()
        for r in _rows(gt, s)
        if r["key"] != _rows(gt, "00000")[1]["key"]
    )
    assert len(srv.bodies) == n_boxes  # one request per proposed box
    images = [sum(1 for c in b["messages"][0]["content"] if c["type"] == "image_url") for b in srv.bodies]
    assert set(images) == ({2} if hint == "crop" else {1})
    text = srv.bodies[0]["messages"][0]["content"][-1]["text"]
    assert ("red rectangle" in text) == (hint == "draw") and "[" in text


def test_layer_info_mismatch_is_refused(scenes, fault_server):
    from engine.layout import LayoutError

    srv = fault_server()
    ds = Dataset(str(scenes))
    cfg = _cfg(srv, layer="cap2")
    check_or_write_info(ds.layer("cap2"), layer_info(cfg, "fake-vlm"))
    with pytest.raises(LayoutError, match="prompt_id"):
        check_or_write_info(
            ds.layer("cap2"), layer_info(_cfg(srv, layer="cap2", prompt="short-v1"), "fake-vlm")
        )
    assert os.path.exists(scenes / "layers" / "cap2" / "layer.json")


def test_backend_error_type():
    with pytest.raises(BackendError, match="no endpoint"):
        OpenAIBackend([])


def test_circuit_breaker_stops_the_run_and_commits_nothing(scenes, fault_server):
    """Finding 10: every request refused (HTTP 400): the run stops with a clear message, no
    shard is committed, and a rerun on a healthy fleet redoes them."""
    from engine.layout import Dataset
    from recaption.config import RecaptionRunConfig
    from recaption.run import recaption

    srv = fault_server(plan={"400": 1.0})
    cfg = _cfg(srv, layer="cb", breaker_http400=4)
    rep = recaption(str(scenes), RecaptionRunConfig(recaption=cfg), progress=False)
    assert rep.stopped and "circuit breaker" in rep.stopped and "HTTP 400" in rep.stopped, rep
    assert Dataset(str(scenes)).layer("cb").committed() == []
    srv.plan = {}
    again = recaption(str(scenes), RecaptionRunConfig(recaption=cfg), progress=False)
    assert again.shards_written == 3 and again.stopped is None


def test_circuit_breaker_on_an_outage(fault_server):
    """No endpoint in rotation for breaker_outage_s: the backend raises CircuitOpen (the row is
    not recorded as failed), instead of answering every request with a failure."""
    from recaption.backends.base import CircuitOpen
    from recaption.backends.openai_http import OpenAIBackend

    srv = fault_server()

    async def go():
        b = OpenAIBackend(
            [srv.url],
            timeout=0.5,
            retries=3,
            backoff_base=0.01,
            eject_after=1,
            probe_interval=0.1,
            outage_s=0.5,
        )
        await b.start()
        srv.plan, srv.health_ok = {"500": 1.0}, False
        try:
            with pytest.raises(CircuitOpen, match="circuit breaker: no endpoint"):
                for _ in range(20):
                    await b.generate(_req_for_breaker())
        finally:
            await b.close()

    asyncio.run(go())


def _req_for_breaker():
    from recaption.backends.base import CaptionRequest

    return CaptionRequest("k", [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def _duplicate_image(ds, shard: str = "00002") -> tuple[str, str]:
    """Give the second image of ``shard`` the bytes of the first; returns their keys."""
    import io
    import shutil
    import tarfile

    p = ds / "shards" / f"{shard}.tar"
    out = p.with_suffix(".new")
    first, second = None, None
    with tarfile.open(p) as src, tarfile.open(out, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if m.name.endswith(".jpg"):
                key = m.name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                if first is None:
                    first, first_bytes = key, data
                elif second is None:
                    second, data = key, first_bytes
                    m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    shutil.move(out, p)
    return first, second


def test_response_cache_answers_duplicate_images(scenes, fault_server):
    """Operator feature: an image already answered (same sha256, model, prompt, sampling) is not
    sent again; the hit is counted in _stats.json."""
    srv = fault_server()
    a, b = _duplicate_image(scenes)
    stats, layer = _run_shards(scenes, _cfg(srv, layer="cache"))
    by_shard = {s["shard"]: s for s in stats}
    assert by_shard["00002"]["cache_hits"] == 1 and by_shard["00002"]["requests"] == 7
    assert by_shard["00001"]["cache_hits"] == 0 and by_shard["00001"]["requests"] == 8
    rows = {r["key"]: r for r in _rows(layer, "00002")}
    assert rows[b]["status"] == "ok" and rows[b]["caption"] == rows[a]["caption"]


def test_duplicates_across_client_actors_are_sent_once(scenes, fault_server):
    """With several client actors (each with its own cache), an image that shards on different
    actors hold is sent once: the actors meet in the run's cache hub (the duplicates found
    from the shards' sha256 before the run)."""
    from recaption.config import RecaptionRunConfig
    from recaption.run import recaption
    from tests.recaption.recap_helpers import duplicate_image

    duplicate_image(scenes, "000003", "000014")  # shards 00000 and 00001: two actors
    duplicate_image(scenes, "000003", "000025")
    srv = fault_server(service_s=0.05)
    cfg = _cfg(srv, layer="hub", clients=2, persistent_cache=False, progress=False)
    rep = recaption(str(scenes), RecaptionRunConfig(recaption=cfg), progress=False)
    assert max(srv.seen.values()) == 1, "an image was sent twice"
    assert sum(srv.seen.values()) == rep.requests == 21 and rep.cache_hits == 2 and rep.ok == 23
    rows = {
        r["key"]: r for s in ("00000", "00001", "00002") for r in _rows(Dataset(str(scenes)).layer("hub"), s)
    }
    assert rows["000014"]["caption"] == rows["000025"]["caption"] == rows["000003"]["caption"]


def test_byte_budget_bounds_what_waits_and_flies(scenes, fault_server):
    """Finding 8: the bytes of samples waiting for the backend and of requests in flight are
    bounded by ``max_bytes_in_flight`` (shared by the shards of an actor), not only by a count:
    with room for ~3 samples, a slow server never sees more than that many at once although
    ``max_in_flight`` (64) and three shards at once would allow 23."""
    from recaption.plan import make_task
    from recaption.samples import shard_samples

    srv = fault_server(service_s=0.15)
    probe = _cfg(srv)
    task = make_task(probe, "fake-vlm")
    ds = Dataset(str(scenes))
    costs = [
        task.bytes_estimate(smp)
        for s in ds.committed_shards()
        for smp in shard_samples(ds, s, probe)
        if smp.image is not None
    ]
    limit = 3 * max(costs)
    cfg = _cfg(srv, layer="budget", max_in_flight=64, max_bytes_in_flight=limit)
    check_or_write_info(ds.layer("budget"), layer_info(cfg, "fake-vlm"))
    w = ShardWorker(str(scenes), StorageConfig(), cfg, "fake-vlm")

    async def go():
        try:
            return await asyncio.gather(*(w.run_shard(s) for s in ds.committed_shards()))
        finally:
            await w.close()

    outs = asyncio.run(go())
    assert sum(o["stats"]["ok"] for o in outs) == len(costs)  # every image answered
    assert 0 < w.budget.peak <= limit
    assert 2 <= srv.peak_active <= limit // min(costs), (srv.peak_active, limit, costs)
    assert all(o["stats"]["bytes_in_flight_peak"] <= limit for o in outs)
    # per-endpoint latency percentiles in _stats.json (the server takes 150 ms per request)
    # (cumulative per actor: the snapshot of the shard that finished last has seen every request
    # answered; an earlier shard's snapshot can have every request sent but one still in flight,
    # with as many requests and one ok less: pick by (requests, ok), not by requests alone)
    ep = max((o["stats"]["endpoints"][srv.url] for o in outs), key=lambda e: (e["requests"], e["ok"]))
    assert 150 <= ep["latency_ms_p50"] <= ep["latency_ms_p90"] <= ep["latency_ms_p99"], ep
    assert ep["ok"] == ep["requests"] == len(costs)


def _tree(root) -> dict[str, tuple[int, int]]:
    return {
        os.path.relpath(os.path.join(d, f), root): (
            os.stat(os.path.join(d, f)).st_size,
            os.stat(os.path.join(d, f)).st_mtime_ns,
        )
        for d, _, fs in os.walk(root)
        for f in fs
    } | {os.path.relpath(d, root) + "/": (0, 0) for d, _, _ in os.walk(root)}


def test_dry_run_prints_the_plan_sends_and_writes_nothing(scenes, fault_server):
    """Operator feature: ``--dry-run`` prints shards, images, requests, expected cache hits and
    tokens; no request (not even /v1/models) reaches the server and no file is written."""
    import subprocess

    from tests.recaption.recap_helpers import CLI

    srv = fault_server()
    a, b = _duplicate_image(scenes)
    p = scenes / "shards" / "00002.parquet"  # the index says so too (img2dataset's sha256 column)
    t = pq.read_table(p)
    rows = t.to_pylist()
    sha = {r["key"]: r["sha256"] for r in rows}
    for r in rows:
        if r["key"] == b:
            r["sha256"] = sha[a]
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), p)
    before = _tree(scenes)
    out = subprocess.run(
        [
            *CLI,
            "recaption",
            str(scenes),
            "--endpoint",
            srv.url,
            "--layer",
            "dry",
            "--max-tokens",
            "100",
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    import re

    text = " ".join(re.sub(r"[\u2500-\u257f]", " ", out.stdout).split())
    # 24 images, one failed at ingest, one a duplicate of another: 22 requests, 1 cache hit
    for want in (
        "shards to caption 3",
        "images 23",
        "requests 22",
        "cache hits expected 1",
        "completion tokens max 2200",
    ):
        assert want in text, (want, out.stdout)
    assert srv.gets == 0 and sum(srv.seen.values()) == 0
    assert _tree(scenes) == before


def test_response_cache_persists_across_runs(scenes, fault_server):
    """Operator feature: a second run on a new layer name with the same settings sends 0
    requests: the first run's answers were stored (content-addressed) under the dataset."""
    srv = fault_server()
    first, l1 = _run_shards(scenes, _cfg(srv, layer="p1"))
    sent = sum(srv.seen.values())
    assert sent == 23 and sum(s["requests"] for s in first) == 23
    again, l2 = _run_shards(scenes, _cfg(srv, layer="p2"))
    assert sum(srv.seen.values()) == sent  # nothing reached the server
    assert sum(s["requests"] for s in again) == 0 and sum(s["cache_hits"] for s in again) == 23
    rows1 = [r for s in l1.committed() for r in _rows(l1, s)]
    rows2 = [r for s in l2.committed() for r in _rows(l2, s)]
    assert rows1 == rows2
    # other settings (here max_tokens) are other answers: sent again
    _run_shards(scenes, _cfg(srv, layer="p3", max_tokens=100))
    assert sum(srv.seen.values()) == 2 * sent


def test_one_pass_writes_several_layers(scenes, fault_server, monkeypatch):
    """Operator feature: one read and decode of each image serves several layers (a global
    caption and grounded regions), each committed once with its own rows and stats; a later pass
    with one more layer asks only for that layer and leaves the committed ones alone."""
    import recaption.samples as samples_mod
    from recaption.plan import RecaptionReport, layer_configs, plan_pass

    decoded, tars = [], []
    prepare, tar = samples_mod.prepare, samples_mod.iter_tar_images
    monkeypatch.setattr(samples_mod, "prepare", lambda *a, **k: decoded.append(1) or prepare(*a, **k))
    monkeypatch.setattr(samples_mod, "iter_tar_images", lambda ds, s: tars.append(s) or tar(ds, s))
    srv = fault_server(keep_bodies=True)
    specs = [{"task": "global", "layer": "g"}, {"task": "regions", "layer": "r"}]
    ds = Dataset(str(scenes))

    def run_pass(specs) -> tuple[list, list]:
        cfg = _cfg(srv, layers=specs)
        cfgs = layer_configs(cfg)
        for c in cfgs:
            check_or_write_info(ds.layer(layer_name(c)), layer_info(c, "fake-vlm"))
        reports = [RecaptionReport(dataset=ds.root, layer=layer_name(c)) for c in cfgs]
        todo = plan_pass(ds, cfgs, reports)
        w = ShardWorker(
            str(scenes), StorageConfig(), cfg, "fake-vlm", run_id=[f"run{i}" for i in range(len(cfgs))]
        )

        async def go():
            try:
                return [await w.run_pass(t.shard, t.payload) for t in todo]
            finally:
                await w.close()

        return todo, asyncio.run(go())

    todo, outs = run_pass(specs)
    assert [t.payload for t in todo] == [[(0, "shard"), (1, "shard")]] * 3
    assert len(decoded) == 23 and tars == ["00000", "00001", "00002"]  # once per image, once per tar
    g, r = ds.layer("g"), ds.layer("r")
    assert g.committed() == r.committed() == ["00000", "00001", "00002"]
    grounded = [b for b in srv.bodies if "response_format" in b]
    assert len(grounded) == 23 and len(srv.bodies) == 46  # one request per image per layer
    for (og, orr), s in zip(outs, ["00000", "00001", "00002"], strict=True):
        sg, sr = g.read_stats(s), r.read_stats(s)
        n = 7 if s == "00000" else 8  # one image failed at ingest
        assert (sg.count, sg.ok, sg.extra["requests"], sg.extra["run_id"]) == (8, n, n, "run0")
        assert (sr.count, sr.ok, sr.extra["requests"], sr.extra["run_id"]) == (8, n, n, "run1")
        assert og["stats"]["requests"] == orr["stats"]["requests"] == n
    rows_g = [x for s in g.committed() for x in _rows(g, s)]
    rows_r = [x for s in r.committed() for x in _rows(r, s)]
    assert [x["key"] for x in rows_g] == [x["key"] for x in rows_r] and len({x["key"] for x in rows_g}) == 24
    assert all(x["caption"].startswith("A large red") for x in rows_g if x["status"] == "ok")
    assert all(len(x["regions"]) == 2 for x in rows_r if x["status"] == "ok")
    marks = {p: p.stat().st_mtime_ns for p in (scenes / "layers").glob("[gr]/*_stats.json")}
    # one more layer: only it is asked for; g and r stay as they were
    decoded.clear()
    todo, _ = run_pass([*specs, {"task": "global", "layer": "g2", "prompt": "short-v1"}])
    assert [t.payload for t in todo] == [[(2, "shard")]] * 3 and len(decoded) == 23
    assert len(srv.bodies) == 46 + 23 and ds.layer("g2").committed() == ["00000", "00001", "00002"]
    assert {p: p.stat().st_mtime_ns for p in marks} == marks
