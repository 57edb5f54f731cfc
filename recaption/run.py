"""The HTTP / hf driver of ``finevit recaption``: every image of a dataset through a captioner.

Driver (:func:`recaption`): takes the layer's lease (one writer per layer, engine/lease.py),
checks the backend (every endpoint must answer), writes ``layer.json``, then spreads the
shards over a few async Ray actors (:class:`ShardWorker`, fractional CPUs) with the one shard
runner (engine/shards.py). One actor runs one asyncio loop with one backend: its shards share
the endpoints' in-flight budget, so the servers stay busy while a shard is read or committed.

One shard (:func:`process_shard`): stream the image tar, prepare images in a thread, ask the
backend for each sample with at most ``window`` prepared requests waiting, then write the
layer shard with the one layer writer (Parquet moved into place, ``_stats.json`` last). A
rerun skips committed layer shards; ``retry_failed`` redoes only the failed rows of committed
shards (marker removed first, so a kill in between leaves the shard to be redone whole).

Several layers in one pass (``recaption.layers``, :func:`recaption_layers`): one lease per
layer, one shard unit per shard listing the layers that want it (:func:`recaption.plan.plan_pass`);
:func:`process_pass` reads and prepares each image once and hands it to every layer's task;
each layer's shard is committed on its own, with its own stats.

Duplicate images across client actors (``clients`` > 1): the driver finds the keys whose image
several shards of the run hold (recaption/dedupe.py, from the shards' sha256) and starts a
:class:`recaption.cache.CacheHub` actor; those samples are claimed there, so each is sent once
whichever actor holds it (within one actor the response cache does it).

Circuit breaker: when the backend raises :class:`CircuitOpen` (no endpoint for
``breaker_outage_s``, or ``breaker_http400`` refusals in a row), the shard is not committed,
the driver stops the workers (shards in flight are not committed either) and reports why; a
rerun redoes those shards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.config import StorageConfig
from engine.layout import Dataset, code_version
from engine.shards import Progress, ShardTask, run_shard_tasks
from engine.stats import LayerStats, Reason, RowStatus
from recaption.backends.base import Backend, BackendError, CircuitOpen
from recaption.budget import ByteBudget
from recaption.cache import CacheHub, CacheStore, ResponseCache, fingerprint
from recaption.config import RecaptionConfig, RecaptionRunConfig
from recaption.plan import (
    RecaptionReport,
    check_or_write_info,
    layer_configs,
    layer_info,
    layer_name,
    make_task,
    plan_pass,
    resolve_prompt,
    retry_extra,
)
from recaption.samples import shard_keys, shard_samples
from recaption.tasks import Metrics, ProposalTask, Sample, Task

PREP_CHUNK = 16

__all__ = ["RecaptionReport", "ShardWorker", "process_pass", "process_shard", "recaption", "recaption_layers"]


@dataclass
class Job:
    """One layer's share of a shard pass: its task, the samples it wants (``None``: all of them,
    a new layer shard; a set: the failed rows of a committed one) and its response cache."""

    task: Task
    only_keys: set[str] | None = None
    cache: ResponseCache | None = None

    def wants(self, key: str) -> bool:
        return self.only_keys is None or key in self.only_keys


async def process_pass(
    dataset: Dataset,
    shard: str,
    cfg: RecaptionConfig,
    jobs: list[Job],
    backend: Backend,
    budget: ByteBudget | None = None,
    hub: Any = None,
    shared: set[str] | frozenset[str] = frozenset(),
) -> list[tuple[list[dict[str, Any]], Metrics]]:
    """Each job's layer rows of one shard (in the shard's order) and what they took, from one
    read and one decode of each image: a sample is handed to every job that wants it at once.
    ``hub`` (a :class:`recaption.cache.CacheHub` actor) answers the samples in ``shared`` (keys
    whose image other shards of the run hold too) across client actors.

    Images are read and prepared in a thread, ``PREP_CHUNK`` at a time; at most ``window``
    prepared samples wait for the backend, and, with ``budget`` (shared by the actor's shards),
    at most its bytes: memory stays bounded whatever the shard and image sizes."""
    loop = asyncio.get_running_loop()
    keys = await loop.run_in_executor(None, shard_keys, dataset, shard)
    only = None if any(j.only_keys is None for j in jobs) else set().union(*(j.only_keys for j in jobs))
    it = shard_samples(dataset, shard, cfg, any(isinstance(j.task, ProposalTask) for j in jobs), only)
    outs: list[dict[str, dict[str, Any]]] = [{} for _ in jobs]
    metrics = [Metrics() for _ in jobs]
    window = asyncio.Semaphore(max(16, backend.capacity))
    pending: set[asyncio.Task] = set()
    tripped: list[CircuitOpen] = []

    async def one(j: int, sample: Sample) -> None:
        task, cache = jobs[j].task, jobs[j].cache
        k = cache.key(sample) if cache is not None else None
        asked = claimed = False  # this sample asks: local waiters (and the hub's) wait for it
        row = None
        try:
            hit = await cache.lookup(k) if k is not None else None
            asked = k is not None and hit is None
            if hit is None and k is not None and hub is not None and sample.key in shared:
                hit = await hub.claim.remote(k)  # another actor's shard holds this image too
                claimed = hit is None
            if hit is not None:
                metrics[j].cache_hits += 1
                row = {**hit, "key": sample.key}
            else:
                row = await task.run(backend, sample, metrics[j])
        except CircuitOpen as e:
            tripped.append(e)
            row = task.failed_row(sample.key, str(e))
            return
        except Exception as e:
            row = task.failed_row(sample.key, f"internal error: {type(e).__name__}: {e}")
        finally:
            if asked and row is not None:
                cache.put(k, row)
            if claimed and row is not None:
                hub.put.remote(k, row)
        outs[j][sample.key] = row

    async def run_sample(sample: Sample, which: list[int], cost: int) -> None:
        try:
            await asyncio.gather(*(one(j, sample) for j in which))
        finally:
            window.release()
            if budget is not None:
                await budget.release(cost)

    def next_chunk() -> list[Sample]:
        chunk = []
        for smp in it:
            chunk.append(smp)
            if len(chunk) >= PREP_CHUNK:
                break
        return chunk

    try:
        while True:
            chunk = await loop.run_in_executor(None, next_chunk)
            if not chunk:
                break
            for smp in chunk:
                which = [j for j, job in enumerate(jobs) if job.wants(smp.key)]
                await window.acquire()
                if tripped:
                    break
                cost = 0
                if budget is not None:  # the JPEG once, the request bodies of every job
                    jpeg = len(smp.image.jpeg) if smp.image is not None else 0
                    cost = sum(jobs[j].task.bytes_estimate(smp) - jpeg for j in which) + jpeg
                    await budget.acquire(cost)
                t = asyncio.ensure_future(run_sample(smp, which, cost))
                pending.add(t)
                t.add_done_callback(pending.discard)
    finally:
        it.close()
    while pending:
        await asyncio.gather(*list(pending))
    if tripped:  # the run stops; this shard is not committed
        raise tripped[0]
    return [([out[k] for k in keys if k in out], m) for out, m in zip(outs, metrics, strict=True)]


async def process_shard(
    dataset: Dataset,
    shard: str,
    cfg: RecaptionConfig,
    task: Task,
    backend: Backend,
    only_keys: set[str] | None = None,
    cache: ResponseCache | None = None,
    budget: ByteBudget | None = None,
) -> tuple[list[dict[str, Any]], Metrics]:
    """:func:`process_pass` for one layer: its rows of one shard and what they took.
    ``only_keys``: caption just these samples (``retry_failed``); the others are not returned."""
    ((rows, metrics),) = await process_pass(
        dataset, shard, cfg, [Job(task, only_keys, cache)], backend, budget
    )
    return rows, metrics


# ---------------------------------------------------------------- worker (a Ray actor)


class LayerOut:
    """What a :class:`ShardWorker` keeps per layer of its pass: the config, task, layer
    directory, run id (staging names) and response cache (with its store across runs)."""

    def __init__(
        self, dataset: Dataset, storage: StorageConfig, cfg: RecaptionConfig, model: str, run_id: str
    ):
        self.cfg = cfg
        self.run_id = run_id
        self.task = make_task(cfg, model)
        self.layer = dataset.layer(layer_name(cfg))
        self.cache = ResponseCache(
            fingerprint(self.task, {"family": cfg.model_family}), boxes=isinstance(self.task, ProposalTask)
        )
        self.cache_store: CacheStore | None = None
        if cfg.persistent_cache:
            from engine.store import Store

            where = cfg.cache_dir or dataset.store.uri("cache/recaption")
            self.cache_store = CacheStore(Store(where, storage).child(self.cache.fp[:32]))
        self.cache_loaded = False

    def redo(self, shard: str) -> tuple[list[dict[str, Any]], LayerStats, set[str]]:
        """A committed shard's rows, its stats and the failed rows a retry redoes (those with an
        image whose failure was not upstream's)."""
        import pyarrow.parquet as pq

        with self.layer.store.open(self.layer.parquet(shard)) as f:
            rows = pq.read_table(f).to_pylist()
        keys = {
            r["key"]
            for r in rows
            if r["status"] != RowStatus.OK
            and Reason.of(r.get("error")) != Reason.UPSTREAM
            and not str(r.get("error")).startswith("image not decodable")
        }
        return rows, self.layer.read_stats(shard), keys


class ShardWorker:
    """One asyncio loop, one backend, several shards at once; each shard read once for every
    layer of the pass (``cfg.layers``, else the one layer of ``cfg``). Used as an async Ray
    actor (``ray.remote(ShardWorker)``) and, in tests, directly. ``run_id``: per layer, or one
    for all."""

    def __init__(
        self,
        root: str,
        storage: StorageConfig,
        cfg: RecaptionConfig,
        model: str,
        run_id: str | list[str] = "run",
        hub: Any = None,
    ) -> None:
        self.dataset = Dataset(root, storage)
        self.hub = hub  # the CacheHub actor shared by the run's client actors (several clients)
        self.cfg = cfg
        self.model = model
        cfgs = layer_configs(cfg)
        ids = [run_id] * len(cfgs) if isinstance(run_id, str) else list(run_id)
        self.outs = [LayerOut(self.dataset, storage, c, model, r) for c, r in zip(cfgs, ids, strict=True)]
        self._backend: Backend | None = None
        self._lock: asyncio.Lock | None = None
        self.budget = ByteBudget(cfg.max_bytes_in_flight)

    async def backend(self) -> Backend:
        from recaption.backends import make_backend

        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._backend is None:
                b = make_backend(self.cfg, self.model)
                await b.start()
                self._backend = b
        return self._backend

    def _extra(self, out: LayerOut, metrics: Metrics, seconds: float, n: int) -> dict[str, Any]:
        extra = {
            "code_version": code_version(),
            "model": self.model,
            "backend": self.cfg.backend,
            "run_id": out.run_id,
            **metrics.as_stats(seconds, n),
            "bytes_in_flight_peak": self.budget.peak,
        }
        describe = getattr(self._backend, "describe", None)
        if describe is not None:  # per-endpoint requests, errors, ejections
            extra["endpoints"] = describe().get("endpoint_stats", {})
        return extra

    @staticmethod
    def _commit(
        out: LayerOut,
        shard: str,
        rows: list[dict[str, Any]],
        started: float,
        extra: dict[str, Any],
        replace: bool = False,
    ) -> LayerStats:
        from engine.layers import write_layer_shard

        with out.layer.store.staging(f"{out.run_id}-{shard}") as staging:
            if replace:
                out.layer.store.rm(out.layer.stats(shard))  # uncommitted while being replaced
            return write_layer_shard(out.layer, shard, rows, out.task.schema, staging, started, extra)

    async def run_pass(
        self, shard: str, wants: list[tuple[int, str]], shared: list[str] | None = None
    ) -> list[dict[str, Any] | None]:
        """Caption ``shard`` for the layers in ``wants`` (``(layer index, "shard" or "retry")``)
        from one read of its images, and commit each layer's shard (its own rows, stats and
        marker). Per entry: ``{"stats": its marker, "usage": this round's requests and
        tokens}``, or None for a retry with no failed row to redo. ``shared``: the keys whose
        image other shards of the run hold too (asked through the hub, when there is one)."""
        started = time.time()
        loop = asyncio.get_running_loop()
        results: list[dict[str, Any] | None] = [None] * len(wants)
        olds: dict[int, tuple[list[dict[str, Any]], LayerStats]] = {}
        jobs: list[tuple[int, int, Job]] = []  # (position in wants, layer index, job)
        for pos, (i, kind) in enumerate(wants):
            out = self.outs[i]
            if kind == "retry":
                rows, stats, redo = await loop.run_in_executor(None, out.redo, shard)
                if not redo:
                    continue
                olds[pos] = (rows, stats)
                jobs.append((pos, i, Job(out.task, redo)))  # a retry asks again: no cache
            else:
                if out.cache_store is not None and not out.cache_loaded:
                    out.cache_loaded = True
                    out.cache.preload(await loop.run_in_executor(None, out.cache_store.load))
                jobs.append((pos, i, Job(out.task, None, out.cache)))
        if not jobs:
            return results
        backend = await self.backend()
        done = await process_pass(
            self.dataset,
            shard,
            self.cfg,
            [j for _, _, j in jobs],
            backend,
            self.budget,
            self.hub,
            frozenset(shared or ()),
        )
        seconds = time.time() - started
        for (pos, i, job), (rows, metrics) in zip(jobs, done, strict=True):
            out = self.outs[i]
            usage = self._extra(out, metrics, seconds, len(rows))
            if job.only_keys is None:
                fresh = out.cache.drain()

                def commit(out=out, rows=rows, usage=usage, fresh=fresh) -> LayerStats:
                    if out.cache_store is not None:  # answers first: a kill in between costs nothing
                        out.cache_store.save(f"{out.run_id}-{shard}", fresh)
                    return self._commit(out, shard, rows, started, usage)

            else:
                old_rows, old_stats = olds[pos]
                new = {r["key"]: r for r in rows}
                merged = [new.get(r["key"], r) for r in old_rows]
                extra = retry_extra(old_stats, usage)
                extra.update(
                    retried_rows=len(job.only_keys),
                    retried_ok=sum(1 for r in rows if r["status"] == RowStatus.OK),
                )

                def commit(out=out, merged=merged, extra=extra) -> LayerStats:
                    return self._commit(out, shard, merged, started, extra, True)

            stats = await loop.run_in_executor(None, commit)
            results[pos] = {"stats": stats.to_dict(), "usage": usage}
        return results

    async def run_shard(self, shard: str) -> dict[str, Any]:
        """Caption a whole shard into the (first) layer and commit it."""
        (res,) = await self.run_pass(shard, [(0, "shard")])
        assert res is not None
        return res

    async def retry_shard(self, shard: str) -> dict[str, Any] | None:
        """Redo the failed rows (with an image) of a committed shard; None if there is none."""
        return (await self.run_pass(shard, [(0, "retry")]))[0]

    async def close(self) -> None:
        if self._backend is not None:
            await self._backend.close()
            self._backend = None


# ---------------------------------------------------------------- driver


async def _check_backend(cfg: RecaptionConfig) -> str:
    """Start the backend once on the driver (endpoints answer, the model exists); its model name."""
    from recaption.backends import make_backend

    if cfg.backend == "hf":
        import os

        if not cfg.model or not os.path.isfile(os.path.join(cfg.model, "config.json")):
            raise BackendError(
                f"--model must be a local model directory with a config.json (got {cfg.model!r})"
            )
        return cfg.model
    b = make_backend(cfg)
    try:
        await b.start()
        return b.model  # type: ignore[attr-defined]
    finally:
        await b.close()


def recaption(
    dataset_root: str,
    run_cfg: RecaptionRunConfig | None = None,
    progress: bool | None = None,
    on_event: Callable[[str], None] | None = None,
) -> RecaptionReport:
    """Caption every committed shard of ``dataset_root`` into a layer; resumable, exactly once.
    (Several layers from one pass, ``recaption.layers``: :func:`recaption_layers`.)"""
    reports = recaption_layers(dataset_root, run_cfg, progress, on_event)
    if len(reports) != 1:
        raise ValueError("recaption.layers names several layers: call recaption_layers()")
    return reports[0]


def recaption_layers(
    dataset_root: str,
    run_cfg: RecaptionRunConfig | None = None,
    progress: bool | None = None,
    on_event: Callable[[str], None] | None = None,
) -> list[RecaptionReport]:
    """Caption every committed shard of ``dataset_root`` into each layer of the pass
    (``recaption.layers``, else the one layer of ``recaption``): each shard's images are read
    and decoded once for all the layers that want it; each layer has its own lease, layer.json,
    commits and ``_stats.json``. One report per layer, in the order of the pass."""
    from engine.lease import Lease

    run_cfg = run_cfg or RecaptionRunConfig()
    cfg = run_cfg.recaption
    say = on_event or (lambda _m: None)
    t0 = time.time()
    storage = run_cfg.storage.resolved()
    dataset = Dataset(dataset_root, storage)
    cfgs = layer_configs(cfg)
    reports = [RecaptionReport(dataset=dataset.root, layer=layer_name(c)) for c in cfgs]
    dataset.manifest  # noqa: B018 - a clear error now if there is no dataset
    for c in cfgs:
        resolve_prompt(c)  # a clear error now if a prompt is unknown
    show = cfg.progress if progress is None else progress
    layers = [dataset.layer(r.layer) for r in reports]
    # the backend answers before anything is written (not even a lease)
    model = asyncio.run(_check_backend(cfg)) if cfg.backend != "vllm" else cfg.model
    with contextlib.ExitStack() as held:
        leases = []
        for layer in layers:
            layer.store.makedirs()
            leases.append(held.enter_context(Lease(layer.store, layer.name, ttl=cfg.lease_ttl)))
            layer.store.clear_staging()  # the lease is ours: no other run is staging in this layer
        if cfg.backend == "vllm":
            from recaption.vllm_driver import run_vllm

            run_vllm(dataset, run_cfg, reports, leases, progress=show, say=say)
        else:
            for c, layer in zip(cfgs, layers, strict=True):
                check_or_write_info(layer, layer_info(c, model))
            todo = plan_pass(dataset, cfgs, reports)
            if todo:
                _run_on_ray(dataset, storage, run_cfg, model, todo, reports, leases, show, say)
    for c, r in zip(cfgs, reports, strict=True):
        if r.shards_waiting:
            say(
                f"{r.layer}: {len(r.shards_waiting)} shard(s) skipped: layer {c.proposals_layer!r} "
                "has not committed them"
            )
        r.seconds = time.time() - t0
    return reports


def _run_on_ray(
    dataset,
    storage,
    run_cfg,
    model,
    todo: list[ShardTask],
    reports: list[RecaptionReport],
    leases: list,
    progress,
    say,
) -> None:
    """Spread the pass's shard units (``ShardTask.payload``: which layers want the shard, see
    :func:`recaption.plan.plan_pass`) over the client actors."""
    import ray

    from engine.runtime import init_ray

    cfg = run_cfg.recaption
    init_ray(run_cfg.ray)
    cpus = max(cfg.client_cpus, 1.0) if cfg.backend == "hf" else cfg.client_cpus
    gpus = 0.0
    if cfg.backend == "hf":
        gpus = cfg.hf.num_gpus if cfg.hf.num_gpus is not None else _default_gpus(cfg)
    n_clients = min(cfg.clients, len(todo))
    hub, shared = None, {}
    if n_clients > 1:  # each actor has its own cache: images that several shards hold meet in a hub
        shared = shared_keys(dataset, [t.shard for t in todo], storage)
        if shared:
            hub = ray.remote(num_cpus=0)(CacheHub).remote(cfg.timeout * (cfg.retries + 2))
    Worker = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(ShardWorker)
    workers = [
        Worker.options(max_concurrency=max(8, cfg.shards_in_flight * 4)).remote(
            dataset.root, storage, cfg, model, [lease.run_id for lease in leases], hub
        )
        for _ in range(n_clients)
    ]
    load = [0] * n_clients
    where: dict[str, int] = {}
    fresh = [t for t in todo if any(kind == "shard" for _, kind in t.payload)]
    total = sum(dataset.shard_stats(t.shard).count for t in fresh)
    name = reports[0].layer + (f" +{len(reports) - 1} layer(s)" if len(reports) > 1 else "")
    bar = Progress(f"recaption {name}", total=total, enabled=progress)
    t0 = time.time()

    def stopped() -> bool:
        return bool(reports[0].stopped) or any(lease.lost for lease in leases)

    def tasks():
        for t in todo:
            if stopped():
                return
            yield t

    def submit(t: ShardTask):
        w = min(range(n_clients), key=load.__getitem__)
        load[w] += 1
        where[t.shard] = w
        return workers[w].run_pass.remote(t.shard, t.payload, shared.get(t.shard))

    def on_done(t: ShardTask, outs: list[dict[str, Any] | None]) -> None:
        w = where.pop(t.shard)
        load[w] -= 1
        images = 0
        for (i, kind), out in zip(t.payload, outs, strict=True):
            if out is None:
                continue
            report = reports[i]
            if out["usage"].get("endpoints"):  # cumulative per client actor: the latest wins
                report.endpoint_snapshots[w] = out["usage"]["endpoints"]
            st = LayerStats.from_dict(out["stats"])
            report.add_usage(out["usage"])
            if kind == "retry":
                report.shards_retried += 1
            else:
                report.shards_written += 1
                images = st.count
            report.add_rows(st.count, st.ok, st.error_reasons)
        dt = max(time.time() - t0, 1e-6)
        bar.update(
            images,
            ok=sum(r.ok for r in reports),
            failed=sum(r.failed for r in reports),
            tok_s=f"{sum(r.completion_tokens for r in reports) / dt:.0f}",
        )

    def on_error(t: ShardTask, e: BaseException) -> None:
        load[where.pop(t.shard)] -= 1
        msgs = [reports[i].shard_failed(t.shard, e) for i, _ in t.payload]
        msg = msgs[0]
        if "circuit breaker" in msg and not reports[0].stopped:
            for r in reports:
                r.stopped = msg
            say(f"stopping: {msg}")
            for w in workers:  # shards in flight elsewhere must not commit either
                ray.kill(w)
        else:
            say(f"shard {t.shard} failed: {msg}")

    try:
        run_shard_tasks(
            tasks(),
            submit,
            on_done,
            max_in_flight=n_clients * cfg.shards_in_flight,
            on_error=on_error,
            progress=bar,
        )
    finally:
        for w in workers:
            with contextlib.suppress(Exception):  # closing is best effort (killed by the breaker)
                ray.get(w.close.remote(), timeout=30)
            ray.kill(w)
        if hub is not None:
            ray.kill(hub)
    for r, lease in zip(reports, leases, strict=True):
        if lease.lost and not r.stopped:
            r.stopped = f"lost the lease of layer {r.layer!r} (another run took it over)"
        elif any(x.lost for x in leases) and not r.stopped:
            r.stopped = "lost the lease of another layer of this pass (another run took it over)"


def shared_keys(dataset: Dataset, shards: list[str], storage: StorageConfig) -> dict[str, list[str]]:
    """Per shard, the keys of its samples whose image another of ``shards`` holds too."""
    from recaption.dedupe import duplicate_groups

    out: dict[str, list[str]] = {}
    for group in duplicate_groups(dataset, shards, storage):
        if len({s for s, _ in group}) > 1:
            for s, k in group:
                out.setdefault(s, []).append(k)
    return out


def _default_gpus(cfg: RecaptionConfig) -> float:
    """One GPU per hf actor when the driver sees CUDA and the device is not forced to cpu."""
    if cfg.hf.device == "cpu":
        return 0.0
    try:
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    except Exception:
        return 0.0
