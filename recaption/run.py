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
from typing import Any

from engine.config import StorageConfig
from engine.layout import Dataset, code_version
from engine.shards import Progress, ShardTask, run_shard_tasks
from engine.stats import LayerStats, Reason, RowStatus
from recaption.backends.base import Backend, BackendError, CircuitOpen
from recaption.budget import ByteBudget
from recaption.cache import CacheStore, ResponseCache, fingerprint
from recaption.config import RecaptionConfig, RecaptionRunConfig
from recaption.plan import (
    RecaptionReport,
    check_or_write_info,
    layer_info,
    layer_name,
    make_task,
    plan_tasks,
    resolve_prompt,
    retry_extra,
)
from recaption.samples import shard_keys, shard_samples
from recaption.tasks import Metrics, ProposalTask, Sample, Task

PREP_CHUNK = 16

__all__ = ["RecaptionReport", "ShardWorker", "process_shard", "recaption"]


async def process_shard(
    dataset: Dataset,
    shard: str,
    cfg: RecaptionConfig,
    task: Task,
    backend: Backend,
    only_keys: set[str] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    cache: ResponseCache | None = None,
    budget: ByteBudget | None = None,
) -> tuple[list[dict[str, Any]], Metrics]:
    """The layer rows of one shard (in the shard's order) and what it took. ``only_keys``:
    caption just these samples (``retry_failed``); rows of the others are not returned.

    Images are read and prepared in a thread, ``PREP_CHUNK`` at a time; at most ``window``
    prepared samples wait for the backend, and, with ``budget`` (shared by the actor's shards),
    at most its bytes: memory stays bounded whatever the shard and image sizes."""
    loop = asyncio.get_running_loop()
    keys = await loop.run_in_executor(None, shard_keys, dataset, shard)
    it = shard_samples(dataset, shard, cfg, isinstance(task, ProposalTask), only_keys)
    out: dict[str, dict[str, Any]] = {}
    metrics = Metrics()
    window = asyncio.Semaphore(max(16, backend.capacity))
    pending: set[asyncio.Task] = set()
    tripped: list[CircuitOpen] = []

    async def run_one(sample: Sample, cost: int) -> None:
        k = cache.key(sample) if cache is not None else None
        try:
            hit = await cache.lookup(k) if k is not None else None
            if hit is not None:
                metrics.cache_hits += 1
                row = {**hit, "key": sample.key}
            else:
                row = await task.run(backend, sample, metrics)
                if k is not None:
                    cache.put(k, row)
        except CircuitOpen as e:
            if k is not None:
                cache.put(k, task.failed_row(sample.key, str(e)))
            tripped.append(e)
            return
        except Exception as e:
            row = task.failed_row(sample.key, f"internal error: {type(e).__name__}: {e}")
        finally:
            window.release()
            if budget is not None:
                await budget.release(cost)
        out[sample.key] = row
        if on_row is not None:
            on_row(row)

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
                await window.acquire()
                if tripped:
                    break
                cost = task.bytes_estimate(smp) if budget is not None else 0
                if budget is not None:
                    await budget.acquire(cost)
                t = asyncio.ensure_future(run_one(smp, cost))
                pending.add(t)
                t.add_done_callback(pending.discard)
    finally:
        it.close()
    while pending:
        await asyncio.gather(*list(pending))
    if tripped:  # the run stops; this shard is not committed
        raise tripped[0]
    return [out[k] for k in keys if k in out], metrics


# ---------------------------------------------------------------- worker (a Ray actor)


class ShardWorker:
    """One asyncio loop, one backend, several shards at once. Used as an async Ray actor
    (``ray.remote(ShardWorker)``) and, in tests, directly."""

    def __init__(
        self, root: str, storage: StorageConfig, cfg: RecaptionConfig, model: str, run_id: str = "run"
    ) -> None:
        self.dataset = Dataset(root, storage)
        self.cfg = cfg
        self.model = model
        self.run_id = run_id
        self.task = make_task(cfg, model)
        self.layer = self.dataset.layer(layer_name(cfg))
        self._backend: Backend | None = None
        self._lock: asyncio.Lock | None = None
        self.cache = ResponseCache(fingerprint(self.task, {"family": cfg.model_family}))
        self.budget = ByteBudget(cfg.max_bytes_in_flight)
        self.cache_store: CacheStore | None = None
        if cfg.persistent_cache:
            from engine.store import Store

            where = cfg.cache_dir or self.dataset.store.uri("cache/recaption")
            self.cache_store = CacheStore(Store(where, storage).child(self.cache.fp[:32]))
        self._cache_loaded = False

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

    def _extra(self, metrics: Metrics, seconds: float, n: int) -> dict[str, Any]:
        extra = {
            "code_version": code_version(),
            "model": self.model,
            "backend": self.cfg.backend,
            "run_id": self.run_id,
            **metrics.as_stats(seconds, n),
            "bytes_in_flight_peak": self.budget.peak,
        }
        describe = getattr(self._backend, "describe", None)
        if describe is not None:  # per-endpoint requests, errors, ejections
            extra["endpoints"] = describe().get("endpoint_stats", {})
        return extra

    def _commit(
        self,
        shard: str,
        rows: list[dict[str, Any]],
        started: float,
        extra: dict[str, Any],
        replace: bool = False,
    ) -> LayerStats:
        from engine.layers import write_layer_shard

        with self.layer.store.staging(f"{self.run_id}-{shard}") as staging:
            if replace:
                self.layer.store.rm(self.layer.stats(shard))  # uncommitted while being replaced
            return write_layer_shard(self.layer, shard, rows, self.task.schema, staging, started, extra)

    async def run_shard(self, shard: str) -> dict[str, Any]:
        """Caption a whole shard and commit it. Returns ``{"stats": its marker, "usage": this
        round's requests and tokens}``."""
        started = time.time()
        backend = await self.backend()
        loop = asyncio.get_running_loop()
        if self.cache_store is not None and not self._cache_loaded:
            self._cache_loaded = True
            self.cache.preload(await loop.run_in_executor(None, self.cache_store.load))
        rows, metrics = await process_shard(
            self.dataset, shard, self.cfg, self.task, backend, cache=self.cache, budget=self.budget
        )
        extra = self._extra(metrics, time.time() - started, len(rows))
        fresh = self.cache.drain()

        def commit() -> LayerStats:
            if self.cache_store is not None:  # answers first: a kill in between costs nothing
                self.cache_store.save(f"{self.run_id}-{shard}", fresh)
            return self._commit(shard, rows, started, extra)

        stats = await loop.run_in_executor(None, commit)
        return {"stats": stats.to_dict(), "usage": extra}

    async def retry_shard(self, shard: str) -> dict[str, Any] | None:
        """Redo the failed rows (with an image) of a committed shard; None if there is none."""
        import pyarrow.parquet as pq

        started = time.time()
        loop = asyncio.get_running_loop()

        def read_old():
            with self.layer.store.open(self.layer.parquet(shard)) as f:
                return pq.read_table(f).to_pylist(), self.layer.read_stats(shard)

        old_rows, old_stats = await loop.run_in_executor(None, read_old)
        redo = {
            r["key"]
            for r in old_rows
            if r["status"] != RowStatus.OK
            and Reason.of(r.get("error")) != Reason.UPSTREAM
            and not str(r.get("error")).startswith("image not decodable")
        }
        if not redo:
            return None
        backend = await self.backend()
        new_rows, metrics = await process_shard(
            self.dataset, shard, self.cfg, self.task, backend, only_keys=redo, budget=self.budget
        )
        new = {r["key"]: r for r in new_rows}
        rows = [new.get(r["key"], r) for r in old_rows]
        usage = self._extra(metrics, time.time() - started, len(new_rows))
        extra = retry_extra(old_stats, usage)
        extra.update(
            retried_rows=len(redo), retried_ok=sum(1 for r in new_rows if r["status"] == RowStatus.OK)
        )
        stats = await loop.run_in_executor(None, lambda: self._commit(shard, rows, started, extra, True))
        return {"stats": stats.to_dict(), "usage": usage}

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
    """Caption every committed shard of ``dataset_root`` into a layer; resumable, exactly once."""
    from engine.lease import Lease

    run_cfg = run_cfg or RecaptionRunConfig()
    cfg = run_cfg.recaption
    say = on_event or (lambda _m: None)
    t0 = time.time()
    storage = run_cfg.storage.resolved()
    dataset = Dataset(dataset_root, storage)
    name = layer_name(cfg)
    report = RecaptionReport(dataset=dataset.root, layer=name)
    dataset.manifest  # noqa: B018 - a clear error now if there is no dataset
    resolve_prompt(cfg)  # a clear error now if the prompt is unknown
    show = cfg.progress if progress is None else progress
    layer = dataset.layer(name)
    # the backend answers before anything is written (not even the lease)
    model = asyncio.run(_check_backend(cfg)) if cfg.backend != "vllm" else cfg.model
    layer.store.makedirs()
    with Lease(layer.store, name, ttl=cfg.lease_ttl) as lease:
        layer.store.clear_staging()  # the lease is ours: no other run is staging in this layer
        if cfg.backend == "vllm":
            from recaption.vllm_driver import run_vllm

            run_vllm(dataset, run_cfg, report, lease, progress=show, say=say)
        else:
            check_or_write_info(layer, layer_info(cfg, model))
            todo = plan_tasks(dataset, cfg, report)
            if todo:
                _run_on_ray(dataset, storage, run_cfg, model, todo, report, lease, show, say)
    if report.shards_waiting:
        say(
            f"{len(report.shards_waiting)} shard(s) skipped: layer {cfg.proposals_layer!r} has not committed them"
        )
    report.seconds = time.time() - t0
    return report


def _run_on_ray(
    dataset, storage, run_cfg, model, todo: list[ShardTask], report, lease, progress, say
) -> None:
    import ray

    from engine.runtime import init_ray

    cfg = run_cfg.recaption
    init_ray(run_cfg.ray)
    cpus = max(cfg.client_cpus, 1.0) if cfg.backend == "hf" else cfg.client_cpus
    gpus = 0.0
    if cfg.backend == "hf":
        gpus = cfg.hf.num_gpus if cfg.hf.num_gpus is not None else _default_gpus(cfg)
    n_clients = min(cfg.clients, len(todo))
    Worker = ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=0)(ShardWorker)
    workers = [
        Worker.options(max_concurrency=max(8, cfg.shards_in_flight * 4)).remote(
            dataset.root, storage, cfg, model, lease.run_id
        )
        for _ in range(n_clients)
    ]
    load = [0] * n_clients
    where: dict[str, int] = {}
    total = sum(dataset.shard_stats(t.shard).count for t in todo if t.kind == "shard")
    bar = Progress(f"recaption {report.layer}", total=total, enabled=progress)
    t0 = time.time()

    def tasks():
        for t in todo:
            if report.stopped or lease.lost:
                return
            yield t

    def submit(t: ShardTask):
        w = min(range(n_clients), key=load.__getitem__)
        load[w] += 1
        where[t.shard] = w
        return (workers[w].retry_shard if t.kind == "retry" else workers[w].run_shard).remote(t.shard)

    def on_done(t: ShardTask, out: dict[str, Any] | None) -> None:
        w = where.pop(t.shard)
        load[w] -= 1
        if out is None:
            return
        if out["usage"].get("endpoints"):  # cumulative per client actor: the latest wins
            report.endpoint_snapshots[w] = out["usage"]["endpoints"]
        st = LayerStats.from_dict(out["stats"])
        report.add_usage(out["usage"])
        if t.kind == "retry":
            report.shards_retried += 1
        else:
            report.shards_written += 1
        report.add_rows(st.count, st.ok, st.error_reasons)
        dt = max(time.time() - t0, 1e-6)
        bar.update(
            st.count if t.kind == "shard" else 0,
            ok=report.ok,
            failed=report.failed,
            tok_s=f"{report.completion_tokens / dt:.0f}",
        )

    def on_error(t: ShardTask, e: BaseException) -> None:
        load[where.pop(t.shard)] -= 1
        msg = report.shard_failed(t.shard, e)
        if "circuit breaker" in msg and not report.stopped:
            report.stopped = msg
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
    if lease.lost and not report.stopped:
        report.stopped = f"lost the lease of layer {report.layer!r} (another run took it over)"


def _default_gpus(cfg: RecaptionConfig) -> float:
    """One GPU per hf actor when the driver sees CUDA and the device is not forced to cpu."""
    if cfg.hf.device == "cpu":
        return 0.0
    try:
        import torch

        return 1.0 if torch.cuda.is_available() else 0.0
    except Exception:
        return 0.0
