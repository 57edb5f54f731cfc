"""Recaption throughput against a latency-simulating OpenAI-compatible server.

    python bench/recaption_throughput.py            # ~3 minutes on 2 cores
    python bench/recaption_throughput.py --quick    # smoke run, under a minute

The server (a subprocess, so it has its own core) answers every chat completion after a fixed
service time S with at most C requests in service per endpoint (more wait in its queue, as
in vLLM), with a realistic answer (~120 tokens, usage filled). Ideal throughput = E * C / S.

Candidates, on the same server and the same images (JPEG, 256 px, base64 data URLs):
* ours (client): recaption.backends.openai_http.OpenAIBackend, requests pre-built, run
  alternately with the baseline; client CPU per request = this process's CPU time / requests
  (base64 + JSON + HTTP; image encoding excluded: it is done before the timer starts).
* ours (engine): the whole `recaption()` on Ray over an ingested dataset: tar read, decode,
  downscale, JPEG, HTTP, Parquet layer commits.
* baseline: Ray Data LLM's HttpRequestProcessorConfig (ray.data.llm imports here without vllm),
  configured as its docs show (url, headers, batch_size, concurrency = a fixed pool of 2 actors,
  no qps cap), preprocess building the same chat payload. It is slow, so it gets fewer images.
Scaling: ours (client) with 1, 2 and 4 endpoints.

    python bench/recaption_throughput.py --rss [--quick]   # finding 8: peak RSS, ~2 minutes

Peak RSS of one client (the shard worker a Ray actor runs, driven in a fresh process so its
``ru_maxrss`` is its own) against a slow server (service 0.5 s, capacity C), the client
allowed 4x C requests in flight, over N and 4N large images (1024 px scenes), with the byte
budget off (``max_bytes_in_flight`` = 1 TiB: only the count bounds) and on (64 MiB).
Bounded memory means the peak does not grow with N and stays near the budget.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ANSWER = (
    "The image shows a large red striped circle in the top left, two small blue dotted squares in the bottom "
    "right, and a green triangle in the centre with the word 'delta' written in white inside it. The circle "
    "is above the triangle and left of the squares. The background is a smooth grey gradient, lighter at the "
    "top. There are four objects in total: one circle, one triangle and two squares. "
) * 1


# ---------------------------------------------------------------- the simulated server (subprocess)


def serve(ports: list[int], service_s: float, capacity: int) -> None:
    from aiohttp import web

    async def main() -> None:
        runners = []
        for port in ports:
            sem = asyncio.Semaphore(capacity)

            async def chat(request: web.Request, sem=sem) -> web.Response:
                body = await request.read()
                model = json.loads(body).get("model", "sim")
                async with sem:
                    await asyncio.sleep(service_s)
                return web.json_response(
                    {
                        "id": "chatcmpl-sim",
                        "object": "chat.completion",
                        "model": model,
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": ANSWER},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 600, "completion_tokens": 120, "total_tokens": 720},
                    }
                )

            async def models(request: web.Request) -> web.Response:
                return web.json_response({"object": "list", "data": [{"id": "sim-vlm", "object": "model"}]})

            app = web.Application(client_max_size=2**26)
            app.router.add_post("/v1/chat/completions", chat)
            app.router.add_get("/v1/models", models)
            app.router.add_get("/health", lambda r: web.Response(text="ok"))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
            runners.append(runner)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    def __init__(self, n: int, service_s: float, capacity: int) -> None:
        self.ports = free_ports(n)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--serve",
                ",".join(map(str, self.ports)),
                "--service-s",
                str(service_s),
                "--capacity",
                str(capacity),
            ],
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout.readline().strip() == b"ready"
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------- inputs


def make_images(n: int, side: int = 256, seed: int = 0) -> list[bytes]:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (side, side), tuple(rng.randrange(256) for _ in range(3)))
        d = ImageDraw.Draw(im)
        for _ in range(4):
            x, y = rng.randrange(side - 40), rng.randrange(side - 40)
            d.ellipse([x, y, x + 40, y + 40], fill=tuple(rng.randrange(256) for _ in range(3)))
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


PROMPT = "Describe this image densely and exactly."


# ---------------------------------------------------------------- candidates


def run_ours(urls: list[str], images: list[bytes], in_flight: int) -> tuple[float, float, int]:
    """(req/s, client CPU ms per request, failures)."""
    from recaption.backends.base import CaptionRequest, SamplingParams
    from recaption.backends.openai_http import OpenAIBackend

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    reqs = [CaptionRequest(str(i), msgs, [img], SamplingParams(256)) for i, img in enumerate(images)]

    async def go():
        b = OpenAIBackend(urls, max_in_flight=in_flight, timeout=60, retries=2)
        await b.start()
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            res = await asyncio.gather(*(b.generate(r) for r in reqs))
            return time.perf_counter() - t0, time.process_time() - c0, sum(not r.ok for r in res)
        finally:
            await b.close()

    wall, cpu, failed = asyncio.run(go())
    return len(reqs) / wall, cpu / len(reqs) * 1000, failed


def run_ray_http(url: str, images: list[bytes], concurrency: int, batch_size: int) -> float:
    import base64

    import ray
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    config = HttpRequestProcessorConfig(
        url=f"{url}/v1/chat/completions",
        headers={"Content-Type": "application/json"},
        concurrency=concurrency,
        batch_size=batch_size,
    )

    def pre(row):
        return {
            "payload": {
                "model": "sim-vlm",
                "max_tokens": 256,
                "temperature": 0.0,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/jpeg;base64," + row["b64"]},
                            },
                            {"type": "text", "text": PROMPT},
                        ],
                    }
                ],
            }
        }

    def post(row):
        return {"text": row["http_response"]["choices"][0]["message"]["content"]}

    processor = build_processor(config, preprocess=pre, postprocess=post)
    ds = ray.data.from_items([{"b64": base64.b64encode(img).decode()} for img in images])
    t0 = time.perf_counter()
    n = processor(ds).count()
    wall = time.perf_counter() - t0
    assert n == len(images)
    return n / wall


def run_engine(urls: list[str], n: int, in_flight: int, work: str) -> float:
    from engine.config import FineVitConfig, IngestConfig
    from engine.ingest import ingest
    from recaption.config import RecaptionConfig, RecaptionRunConfig
    from recaption.run import recaption

    ds = os.path.join(work, "ds")
    if not os.path.exists(os.path.join(ds, "dataset.json")):
        ingest(
            f"synthetic://scenes?n={n}&seed=0&size=256",
            ds,
            FineVitConfig(ingest=IngestConfig(samples_per_shard=250)),
            progress=False,
        )
    layer = f"bench-{time.time_ns()}"
    cfg = RecaptionRunConfig(
        recaption=RecaptionConfig(
            endpoints=urls,
            layer=layer,
            max_in_flight=in_flight,
            max_tokens=256,
            image_max_side=256,
            progress=False,
            shards_in_flight=4,
            persistent_cache=False,  # each run must send its requests
        )
    )
    rep = recaption(ds, cfg, progress=False)
    assert rep.ok == n, rep
    # the engine's time from the first request to the last commit: recaption() also checks the
    # endpoints and starts its actor first, which a long run amortizes
    import pyarrow as pa  # noqa: F401

    from engine.layout import Dataset

    lay = Dataset(ds).layer(layer)
    stats = [lay.store.read_json(lay.stats(s)) for s in lay.committed()]
    span = max(s["end_time"] for s in stats) - min(s["start_time"] for s in stats)
    return n / span


def engine_suite(urls: list[str], n: int, in_flight: int, capacity: int, service_s: float, work: str) -> None:
    """Issue 10's engine numbers: the whole engine on ``n`` images vs the server's ideal; a
    rerun with identical settings (requests sent); a dataset with 20 % duplicate images
    (requests sent vs unique images). Prints one line per measurement."""
    from engine.config import FineVitConfig, IngestConfig
    from engine.ingest import ingest
    from engine.layout import Dataset
    from recaption.config import RecaptionConfig, RecaptionRunConfig
    from recaption.run import recaption

    ideal = len(urls) * capacity / service_s
    ds = os.path.join(work, "ds")
    ingest(
        f"synthetic://scenes?n={n}&seed=0&size=256",
        ds,
        FineVitConfig(ingest=IngestConfig(samples_per_shard=250)),
        progress=False,
    )

    def cfg(layer: str, **kw) -> RecaptionRunConfig:
        return RecaptionRunConfig(
            recaption=RecaptionConfig(
                endpoints=urls,
                layer=layer,
                max_in_flight=in_flight,
                max_tokens=256,
                image_max_side=256,
                progress=False,
                shards_in_flight=4,
                persistent_cache=False,
                **kw,
            )
        )

    rep = recaption(ds, cfg("eng"), progress=False)
    assert rep.ok == n, rep
    lay = Dataset(ds).layer("eng")
    stats = [lay.read_stats(s) for s in lay.committed()]
    span = max(s.end_time for s in stats) - min(s.start_time for s in stats)
    print(
        f"engine: {n} images in {span:.1f} s = {n / span:.1f} img/s; ideal {ideal:.1f} -> {n / span / ideal:.3f} of ideal"
    )
    again = recaption(ds, cfg("eng"), progress=False)
    print(f"rerun, identical settings: {again.requests} requests, {again.shards_skipped} shards skipped")

    # 20 % duplicates: a folder where every fifth image repeats an earlier one
    folder = os.path.join(work, "dups")
    os.makedirs(folder, exist_ok=True)
    images = make_images(n - n // 5, seed=1)
    for i in range(n):
        data = images[i - (i // 5) - 1] if i % 5 == 4 else images[i - i // 5]
        with open(os.path.join(folder, f"{i:06d}.jpg"), "wb") as f:
            f.write(data)
    ds2 = os.path.join(work, "ds-dups")
    ingest(folder, ds2, FineVitConfig(ingest=IngestConfig(samples_per_shard=250)), progress=False)
    d = recaption(ds2, cfg("dup"), progress=False)
    print(
        f"20 % duplicate images: {d.requests} requests for {d.count} images ({d.cache_hits} cache hits); "
        f"{1 - d.requests / d.count:.3f} fewer requests than images"
    )


# ---------------------------------------------------------------- peak RSS (finding 8)


def rss_child(ds: str, urls: list[str], n: int, in_flight: int, budget: int, layer: str) -> None:
    """Run the shard worker in this process over the first ``n`` images; print its peak RSS (MiB)."""
    import resource

    from engine.config import StorageConfig
    from engine.layout import Dataset
    from recaption.config import RecaptionConfig
    from recaption.plan import check_or_write_info, layer_info, select_shards
    from recaption.run import ShardWorker

    cfg = RecaptionConfig(
        endpoints=urls,
        layer=layer,
        max_in_flight=in_flight,
        max_bytes_in_flight=budget,
        max_tokens=256,
        image_max_side=1024,
        shards_in_flight=4,
        limit=n,
        timeout=600,
        progress=False,
        persistent_cache=False,
    )
    dataset = Dataset(ds)
    check_or_write_info(dataset.layer(layer), layer_info(cfg, "sim-vlm"))
    shards = select_shards(dataset, cfg)
    w = ShardWorker(ds, StorageConfig(), cfg, "sim-vlm")

    async def go() -> int:
        sem = asyncio.Semaphore(cfg.shards_in_flight)

        async def one(s: str) -> int:
            async with sem:
                return (await w.run_shard(s))["stats"]["ok"]

        try:
            return sum(await asyncio.gather(*(one(s) for s in shards)))
        finally:
            await w.close()

    ok = asyncio.run(go())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"ok": ok, "peak_rss_mib": peak, "budget_peak_mib": w.budget.peak / 2**20}))


def rss_suite(quick: bool) -> None:
    from engine.config import FineVitConfig, IngestConfig
    from engine.ingest import ingest

    S, C = 0.5, 16
    n = 64 if quick else 256
    in_flight = 4 * C  # 4x the server's capacity
    srv = Server(1, S, C)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="fvbench-rss-") as work:
            ds = os.path.join(work, "ds")
            ingest(
                f"synthetic://scenes?n={4 * n}&seed=0&size=1024",
                ds,
                FineVitConfig(ingest=IngestConfig(samples_per_shard=n // 4)),
                progress=False,
            )
            for budget, label in ((2**40, "count only"), (64 * 2**20, "64 MiB budget")):
                for k in (n, 4 * n):
                    out = subprocess.run(
                        [
                            sys.executable,
                            __file__,
                            "--rss-child",
                            json.dumps([ds, srv.urls, k, in_flight, budget, f"rss-{budget}-{k}"]),
                        ],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    assert r["ok"] == k, r
                    rows.append((label, k, r["peak_rss_mib"], r["budget_peak_mib"]))
    finally:
        srv.close()
    print(
        f"server: service {S * 1000:.0f} ms, capacity {C}; client in flight {in_flight} (4x), 4 shards at once"
    )
    print(f"{'bound':16s} {'images':>7s} {'peak RSS MiB':>13s} {'bytes held peak MiB':>20s}")
    for label, k, rss, held in rows:
        print(f"{label:16s} {k:7d} {rss:13.1f} {held:20.1f}")
    by = {(lb, k): rss for lb, k, rss, _ in rows}
    print(
        f"rss: peak RSS at 4N/N images: count only {by[('count only', 4 * n)] / by[('count only', n)]:.2f}x, "
        f"64 MiB budget {by[('64 MiB budget', 4 * n)] / by[('64 MiB budget', n)]:.2f}x; "
        f"budget/count-only at 4N {by[('64 MiB budget', 4 * n)] / by[('count only', 4 * n)]:.2f}"
    )


# ---------------------------------------------------------------- main


def table(rows: list[tuple[str, list[float], str]]) -> None:
    print(f"{'candidate':44s} {'median':>9s} {'min':>9s} {'max':>9s}  unit")
    for name, vals, unit in rows:
        print(f"{name:44s} {statistics.median(vals):9.1f} {min(vals):9.1f} {max(vals):9.1f}  {unit}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--service-s", type=float, default=0.2)
    ap.add_argument("--capacity", type=int, default=32)
    ap.add_argument("--n", type=int, default=None, help="images per run of ours")
    ap.add_argument("--serve")
    ap.add_argument(
        "--engine-suite", action="store_true", help="issue 10's engine numbers only (see engine_suite)"
    )
    ap.add_argument("--rss", action="store_true", help="finding 8: peak RSS at 4x capacity, N vs 4N images")
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        return rss_child(*json.loads(args.rss_child))
    if args.serve:
        return serve([int(p) for p in args.serve.split(",")], args.service_s, args.capacity)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    S, C = args.service_s, args.capacity
    n = args.n or (400 if args.quick else 2000)
    n_base = 96 if args.quick else 160
    repeats = 1 if args.quick else 3
    in_flight = C + max(2, C // 4)  # a few more than capacity keep the server's queue non-empty
    images = make_images(n)
    ideal = C / S
    print(
        f"server: service {S * 1000:.0f} ms, capacity {C} per endpoint -> ideal {ideal:.1f} req/s per endpoint; "
        f"{n} images ({statistics.mean(map(len, images)) / 1024:.1f} KiB JPEG each); client in flight {in_flight}/endpoint"
    )

    import ray

    from engine.config import RayConfig
    from engine.runtime import init_ray

    init_ray(RayConfig(num_cpus=2, temp_dir=tempfile.mkdtemp(prefix="fvbench-", dir="/tmp")))
    if args.rss:
        rss_suite(args.quick)
        return
    if args.engine_suite:
        srv = Server(1, S, C)
        try:
            with tempfile.TemporaryDirectory(prefix="fvbench-eng-") as work:
                engine_suite(srv.urls, args.n or 5000, in_flight, C, S, work)
        finally:
            srv.close()
        return
    srv = Server(1, S, C)
    rows, ours, cpu, base = [], [], [], []
    try:
        run_ours(srv.urls, images[:200], in_flight)  # warm-up
        for _ in range(repeats):  # A B A B ...
            rps, ms, failed = run_ours(srv.urls, images, in_flight)
            assert failed == 0
            ours.append(rps)
            cpu.append(ms)
            base.append(run_ray_http(srv.urls[0], images[:n_base], concurrency=2, batch_size=16))
        with tempfile.TemporaryDirectory(prefix="fvbench-ds-") as work:
            eng = [run_engine(srv.urls, n, in_flight, work) for _ in range(1 if args.quick else 2)]
    finally:
        srv.close()
    rows += [
        ("ideal (C / S)", [ideal], "req/s"),
        ("ours: OpenAIBackend, 1 endpoint", ours, "req/s"),
        ("ours: recaption() engine on Ray, 1 endpoint", eng, "img/s"),
        ("ray.data.llm HttpRequestProcessor (2 actors)", base, "req/s"),
        ("ours: client CPU per request", cpu, "ms"),
    ]
    scale = {}
    for e in (1, 2, 4):
        s = Server(e, S, C)
        try:
            run_ours(s.urls, images[:200], in_flight)
            scale[e] = [
                run_ours(
                    s.urls,
                    images if e == 1 else images * (e // 2 + 1) if not args.quick else images,
                    in_flight,
                )[0]
                for _ in range(1 if args.quick else 2)
            ]
        finally:
            s.close()
        rows.append((f"ours: {e} endpoint(s), ideal {e * ideal:.0f}", scale[e], "req/s"))
    table(rows)
    for e, v in scale.items():
        print(
            f"scaling: {e} endpoint(s) {statistics.median(v):.1f} req/s = {statistics.median(v) / (e * ideal):.2f} of ideal"
        )
    print(
        f"recaption: {statistics.median(ours) / ideal:.2f} of ideal ({statistics.median(ours):.1f} / {ideal:.1f} req/s), "
        f"engine {statistics.median(eng) / ideal:.2f} of ideal, "
        f"{statistics.median(ours) / statistics.median(base):.1f}x ray.data.llm http, "
        f"client CPU {statistics.median(cpu):.2f} ms/request"
    )
    ray.shutdown()


if __name__ == "__main__":
    main()
