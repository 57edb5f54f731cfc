"""``finevit recaption``: every image of a dataset through a captioner, written as a layer.

Driver: checks the backend (every endpoint must answer) before any work, writes
``layer.json``, then keeps ``clients x shards_in_flight`` shards in flight on a few async
Ray actors (:class:`ShardWorker`, fractional CPUs). One actor runs one asyncio loop with
one backend: its shards share the endpoints' in-flight budget, so the servers stay busy
while a shard is read, prepared or committed.

One shard (:func:`process_shard`): stream the image tar, prepare images in a thread
(decode, downscale, JPEG), ask the backend for each sample with at most ``window``
prepared requests waiting, then write the layer shard with the one layer writer
(Parquet moved into place, ``_stats.json`` last). A rerun skips committed layer shards;
``retry_failed`` redoes only the failed rows of committed shards (marker removed first,
so a kill in between leaves the shard to be redone whole).

Samples whose image failed ingest keep their row (layers stay aligned with the image
shard): ``status=failed``, ``error="image not available (ingest status ...)"``; they are
counted in ``error_reasons`` and never sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from engine.config import StorageConfig
from engine.layout import Dataset, LayerDir, LayoutError, code_version
from engine.schemas import LAYER_OK, STATUS_SUCCESS
from recaption.backends.base import Backend, BackendError, SamplingParams
from recaption.config import RecaptionConfig, RecaptionRunConfig
from recaption.images import prepare
from recaption.prompts import DEFAULTS, Prompt, load_prompt
from recaption.tasks import GlobalTask, GroundedTask, Metrics, ProposalTask, Sample, Task, TaskSettings

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
PREP_CHUNK = 16


@dataclass
class RecaptionReport:
    dataset: str
    layer: str
    shards_planned: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    shards_retried: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)
    shards_waiting: list[str] = field(default_factory=list)  # proposals not committed yet
    count: int = 0
    ok: int = 0
    reasons: Counter = field(default_factory=Counter)
    requests: int = 0
    retries: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return self.count - self.ok

    @property
    def images_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def add(self, stats: dict[str, Any], count_rows: int | None = None) -> None:
        self.count += int(stats.get("count", 0)) if count_rows is None else count_rows
        self.ok += int(stats.get("ok", 0))
        self.reasons.update({k: int(v) for k, v in (stats.get("error_reasons") or {}).items()})
        self.requests += int(stats.get("requests", 0))
        self.retries += int(stats.get("retries", 0))
        self.completion_tokens += int(stats.get("completion_tokens", 0))


# ---------------------------------------------------------------- what to run


def resolve_prompt(cfg: RecaptionConfig) -> Prompt:
    default = DEFAULTS["global"] if cfg.task == "global" else DEFAULTS[cfg.region_mode]
    return load_prompt(cfg.prompt or default)


def layer_name(cfg: RecaptionConfig) -> str:
    return cfg.layer or (f"recap-{cfg.task}" if cfg.task == "global" else f"recap-regions-{cfg.region_mode}")


def make_task(cfg: RecaptionConfig, model: str) -> Task:
    s = TaskSettings(
        model=model,
        sampling=SamplingParams(cfg.max_tokens, cfg.temperature, cfg.top_p),
        retries=cfg.retries,
        keep_truncated=cfg.keep_truncated,
        bbox_format=cfg.bbox_format,
        box_hint=cfg.box_hint,
        min_box_area=cfg.min_box_area,
        dedup_iou=cfg.dedup_iou,
        max_regions=cfg.max_regions,
        jpeg_quality=cfg.jpeg_quality,
    )
    prompt = resolve_prompt(cfg)
    if cfg.task == "global":
        return GlobalTask(prompt, s)
    return GroundedTask(prompt, s) if cfg.region_mode == "grounded" else ProposalTask(prompt, s)


def layer_info(cfg: RecaptionConfig, model: str) -> dict[str, Any]:
    p = resolve_prompt(cfg)
    info = {
        "kind": "caption" if cfg.task == "global" else "regions",
        "stage": "recaption",
        "task": cfg.task,
        "backend": cfg.backend,
        "model": model,
        "prompt_id": p.id,
        "prompt_text": p.text,
        "sampling": {"max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p},
        "keep_truncated": cfg.keep_truncated,
        "image_max_side": cfg.image_max_side,
        "extra_columns": ["raw"],
    }
    if cfg.task == "regions":
        info.update(region_mode=cfg.region_mode, bbox_format=cfg.bbox_format)
        if cfg.region_mode == "proposals":
            info.update(proposals_layer=cfg.proposals_layer, box_hint=cfg.box_hint)
    return info


_MUST_MATCH = (
    "task",
    "model",
    "prompt_id",
    "prompt_text",
    "sampling",
    "region_mode",
    "bbox_format",
    "proposals_layer",
    "box_hint",
    "keep_truncated",
)


def check_or_write_info(layer: LayerDir, info: dict[str, Any]) -> None:
    old = layer.info()
    if old is None:
        layer.write_info(info)
        return
    diff = [k for k in _MUST_MATCH if old.get(k) != info.get(k)]
    if diff:
        k = diff[0]
        raise LayoutError(
            f"layer {layer.name!r} was written with {k}={old.get(k)!r}; this run has {k}={info.get(k)!r}. "
            "A layer holds one model and one prompt: choose another --layer name"
        )


# ---------------------------------------------------------------- one shard


def _shard_rows(dataset: Dataset, shard: str) -> list[dict[str, Any]]:
    with dataset.shards.open(f"{shard}.parquet") as f:
        table = pq.read_table(f, columns=["key", "status", "error_message"])
    return table.to_pylist()


def _iter_tar_images(dataset: Dataset, shard: str) -> Iterator[tuple[str, bytes]]:
    """``(key, image bytes)`` streamed from the shard's tar (one member in memory at a time)."""
    with dataset.shards.open(f"{shard}.tar") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            base, dot, ext = m.name.rpartition(".")
            if dot and f".{ext.lower()}" in IMAGE_EXTS:
                data = tar.extractfile(m)
                if data is not None:
                    yield base.rsplit("/", 1)[-1], data.read()


def _proposals(dataset: Dataset, cfg: RecaptionConfig, shard: str) -> dict[str, dict[str, Any]]:
    layer = dataset.layer(cfg.proposals_layer)
    with layer.store.open(layer.parquet(shard)) as f:
        rows = pq.read_table(f).to_pylist()
    return {r["key"]: r for r in rows}


def _unavailable(row: dict[str, Any]) -> str:
    msg = row.get("error_message")
    return f"image not available (ingest status {row.get('status')}" + (f": {msg})" if msg else ")")


def shard_samples(
    dataset: Dataset, shard: str, cfg: RecaptionConfig, task: Task, only_keys: set[str] | None = None
) -> Iterator[Sample]:
    """The samples of one shard, streamed: first those without an image (ingest failed; they
    become failed rows), then the images of the tar in its order, each prepared (decoded,
    downscaled, JPEG) and, in proposals mode, with its boxes."""
    rows = _shard_rows(dataset, shard)
    by_key = {r["key"]: r for r in rows if only_keys is None or r["key"] in only_keys}
    props = _proposals(dataset, cfg, shard) if isinstance(task, ProposalTask) else None
    seen: set[str] = set()

    def sample_for(key: str, data: bytes | None) -> Sample:
        row = by_key[key]
        if row["status"] != STATUS_SUCCESS:
            return Sample(key, None, _unavailable(row))
        if data is None:
            return Sample(key, None, "image not available (missing from the shard tar)")
        try:
            image = prepare(data, cfg.image_max_side, cfg.jpeg_quality)
        except Exception as e:
            return Sample(key, None, f"image not decodable: {type(e).__name__}: {e}")
        smp = Sample(key, image)
        if props is not None:
            p = props.get(key)
            if p is None:
                smp.proposals_error = f"no row in proposals layer {cfg.proposals_layer!r}"
            elif p.get("status") != LAYER_OK:
                smp.proposals_error = f"proposals failed in layer {cfg.proposals_layer!r}: {p.get('error')}"
            else:
                smp.proposals = list(p.get("regions") or [])
        return smp

    for key, r in by_key.items():
        if r["status"] != STATUS_SUCCESS:
            seen.add(key)
            yield sample_for(key, None)
    if len(seen) < len(by_key):
        for key, data in _iter_tar_images(dataset, shard):
            if key in by_key and key not in seen:
                seen.add(key)
                yield sample_for(key, data)
    for key in by_key:
        if key not in seen:
            yield sample_for(key, None)


def shard_keys(dataset: Dataset, shard: str) -> list[str]:
    return [r["key"] for r in _shard_rows(dataset, shard)]


async def process_shard(
    dataset: Dataset,
    shard: str,
    cfg: RecaptionConfig,
    task: Task,
    backend: Backend,
    only_keys: set[str] | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[list[dict[str, Any]], Metrics]:
    """The layer rows of one shard (in the shard's order) and what it took. ``only_keys``:
    caption just these samples (``retry_failed``); rows of the others are not returned.

    Images are read and prepared in a thread, ``PREP_CHUNK`` at a time; at most ``window``
    prepared samples wait for the backend, which bounds memory whatever the shard size."""
    loop = asyncio.get_running_loop()
    keys = await loop.run_in_executor(None, shard_keys, dataset, shard)
    it = shard_samples(dataset, shard, cfg, task, only_keys)
    out: dict[str, dict[str, Any]] = {}
    metrics = Metrics()
    window = asyncio.Semaphore(max(16, backend.capacity))
    pending: set[asyncio.Task] = set()

    async def run_one(sample: Sample) -> None:
        try:
            row = await task.run(backend, sample, metrics)
        except Exception as e:
            row = task.failed_row(sample.key, f"internal error: {type(e).__name__}: {e}")
        finally:
            window.release()
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
                t = asyncio.ensure_future(run_one(smp))
                pending.add(t)
                t.add_done_callback(pending.discard)
    finally:
        it.close()
    while pending:
        await asyncio.gather(*list(pending))
    return [out[k] for k in keys if k in out], metrics


# ---------------------------------------------------------------- worker (a Ray actor)


class ShardWorker:
    """One asyncio loop, one backend, several shards at once. Used as an async Ray actor
    (``ray.remote(ShardWorker)``) and, in tests, directly."""

    def __init__(self, root: str, storage: StorageConfig, cfg: RecaptionConfig, model: str) -> None:
        self.dataset = Dataset(root, storage)
        self.cfg = cfg
        self.model = model
        self.task = make_task(cfg, model)
        self.layer = self.dataset.layer(layer_name(cfg))
        self._backend: Backend | None = None
        self._lock: asyncio.Lock | None = None

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

    async def run_shard(self, shard: str) -> dict[str, Any]:
        """Caption a whole shard and commit it. Returns its stats."""
        from engine.layers import write_layer_shard

        started = time.time()
        backend = await self.backend()
        rows, metrics = await process_shard(self.dataset, shard, self.cfg, self.task, backend)
        extra = {
            "code_version": code_version(),
            "model": self.model,
            "backend": self.cfg.backend,
            **metrics.as_stats(time.time() - started, len(rows)),
        }

        def commit() -> dict[str, Any]:
            with self.layer.store.staging(f"recap-{shard}") as staging:
                return write_layer_shard(
                    self.layer, shard, rows, self.task.schema, staging, started, extra
                ).to_dict()

        return await asyncio.get_running_loop().run_in_executor(None, commit)

    async def retry_shard(self, shard: str) -> dict[str, Any] | None:
        """Redo the failed rows (with an image) of a committed shard; None if there is none."""
        from engine.layers import write_layer_shard

        started = time.time()
        loop = asyncio.get_running_loop()

        def read_old():
            with self.layer.store.open(self.layer.parquet(shard)) as f:
                return pq.read_table(f).to_pylist(), self.layer.store.read_json(self.layer.stats(shard))

        old_rows, old_stats = await loop.run_in_executor(None, read_old)
        redo = {
            r["key"]
            for r in old_rows
            if r["status"] != LAYER_OK and not str(r.get("error") or "").startswith("image not")
        }
        if not redo:
            return None
        backend = await self.backend()
        new_rows, metrics = await process_shard(
            self.dataset, shard, self.cfg, self.task, backend, only_keys=redo
        )
        new = {r["key"]: r for r in new_rows}
        rows = [new.get(r["key"], r) for r in old_rows]
        extra = {
            "code_version": code_version(),
            "model": self.model,
            "backend": self.cfg.backend,
            **metrics.as_stats(time.time() - started, len(new_rows)),
            "retried_rows": len(redo),
            "retried_ok": sum(1 for r in new_rows if r["status"] == LAYER_OK),
            "retry_rounds": int(old_stats.get("retry_rounds", 0)) + 1,
        }

        def commit() -> dict[str, Any]:
            with self.layer.store.staging(f"retry-{shard}") as staging:
                self.layer.store.rm(self.layer.stats(shard))  # uncommitted while being replaced
                return write_layer_shard(
                    self.layer, shard, rows, self.task.schema, staging, started, extra
                ).to_dict()

        stats = await loop.run_in_executor(None, commit)
        stats["_retried_rows"] = len(redo)
        return stats

    async def close(self) -> None:
        if self._backend is not None:
            await self._backend.close()
            self._backend = None


# ---------------------------------------------------------------- driver


def _fresh(store) -> None:
    """Forget s3fs's cached listings: other processes (the workers) commit layer shards."""
    if not store.is_local:
        store.fs.invalidate_cache()


def _select_shards(dataset: Dataset, cfg: RecaptionConfig) -> list[str]:
    committed = dataset.committed_shards()
    if cfg.shards:
        want = {int(s) for s in cfg.shards if s.strip().isdigit()}
        bad = [s for s in cfg.shards if not s.strip().isdigit()]
        if bad:
            raise LayoutError(f"--shards takes shard numbers (e.g. 00000,00003), not {bad}")
        missing = sorted(want - {int(s) for s in committed})
        if missing:
            raise LayoutError(f"shard(s) {missing} are not committed in {dataset.root}")
        committed = [s for s in committed if int(s) in want]
    if cfg.limit:
        out, n = [], 0
        for s in committed:
            if n >= cfg.limit:
                break
            out.append(s)
            n += dataset.shard_stats(s).count
        committed = out
    return committed


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
    if cfg.backend == "vllm":
        from recaption.backends.vllm_ray import run_vllm

        return run_vllm(
            dataset, run_cfg, report, progress=cfg.progress if progress is None else progress, say=say
        )

    model = asyncio.run(_check_backend(cfg))
    layer = dataset.layer(name)
    check_or_write_info(layer, layer_info(cfg, model))
    layer.store.makedirs()
    layer.store.clear_staging()
    _fresh(layer.store)

    shards = _select_shards(dataset, cfg)
    report.shards_planned = len(shards)
    committed = set(layer.committed())
    todo: list[tuple[str, str]] = []
    prop_committed = (
        set(dataset.layer(cfg.proposals_layer).committed())
        if (cfg.task == "regions" and cfg.region_mode == "proposals")
        else None
    )
    for s in shards:
        if prop_committed is not None and s not in prop_committed:
            report.shards_waiting.append(s)
            continue
        if s in committed:
            report.shards_skipped += 1
            if cfg.retry_failed and int(layer.store.read_json(layer.stats(s)).get("failed", 0)) > 0:
                todo.append((s, "retry"))
            continue
        todo.append((s, "shard"))
    if report.shards_waiting:
        say(
            f"{len(report.shards_waiting)} shard(s) skipped: layer {cfg.proposals_layer!r} has not committed them"
        )
    if todo:
        _run_on_ray(dataset, storage, run_cfg, model, todo, report, progress, say)
    report.seconds = time.time() - t0
    return report


def _run_on_ray(dataset, storage, run_cfg, model, todo, report, progress, say) -> None:
    import ray
    from tqdm.auto import tqdm

    from engine.runtime import init_ray

    cfg = run_cfg.recaption
    init_ray(run_cfg.ray)
    cpus = max(cfg.client_cpus, 1.0) if cfg.backend == "hf" else cfg.client_cpus
    n_clients = min(cfg.clients, len(todo))
    Worker = ray.remote(num_cpus=cpus, max_restarts=0)(ShardWorker)
    workers = [
        Worker.options(max_concurrency=max(8, cfg.shards_in_flight * 4)).remote(
            dataset.root, storage, cfg, model
        )
        for _ in range(n_clients)
    ]
    load = [0] * n_clients
    pending: dict[Any, tuple[str, str, int]] = {}
    total = sum(dataset.shard_stats(s).count for s, what in todo if what == "shard")
    bar = tqdm(
        total=total or None,
        desc=f"recaption {report.layer}",
        unit="img",
        disable=not (cfg.progress if progress is None else progress),
        dynamic_ncols=True,
    )
    t0 = time.time()

    def collect(block: bool) -> None:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=None if block else 0)
        for ref in done:
            shard, what, w = pending.pop(ref)
            load[w] -= 1
            try:
                stats = ray.get(ref)
            except Exception as e:
                msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                report.shards_failed[shard] = msg
                say(f"shard {shard} failed: {msg}")
                continue
            if what == "retry":
                if stats is not None:
                    report.shards_retried += 1
                    report.requests += int(stats.get("requests", 0))
                    report.retries += int(stats.get("retries", 0))
                    report.completion_tokens += int(stats.get("completion_tokens", 0))
                continue
            report.shards_written += 1
            report.add(stats)
            bar.update(int(stats.get("count", 0)))
            dt = max(time.time() - t0, 1e-6)
            bar.set_postfix(ok=report.ok, failed=report.failed, tok_s=f"{report.completion_tokens / dt:.0f}")

    try:
        for shard, what in todo:
            while len(pending) >= n_clients * cfg.shards_in_flight:
                collect(block=True)
            w = min(range(n_clients), key=load.__getitem__)
            load[w] += 1
            ref = (
                workers[w].retry_shard.remote(shard)
                if what == "retry"
                else workers[w].run_shard.remote(shard)
            )
            pending[ref] = (shard, what, w)
        while pending:
            collect(block=True)
    finally:
        bar.close()
        for w in workers:
            with contextlib.suppress(Exception):  # closing is best effort
                ray.get(w.close.remote(), timeout=30)
            ray.kill(w)
    if report.shards_retried:
        # the totals after a retry come from the committed stats, not from this run's deltas
        layer = dataset.layer(report.layer)
        for s, what in todo:
            if what == "retry" and layer.is_committed(s):
                st = layer.store.read_json(layer.stats(s))
                report.count += int(st.get("count", 0))
                report.ok += int(st.get("ok", 0))
                report.reasons.update({k: int(v) for k, v in (st.get("error_reasons") or {}).items()})


def read_layer(dataset_root: str, layer: str, storage: StorageConfig | None = None):
    """All committed rows of a layer as one Arrow table (union by name across shards)."""
    import pyarrow as pa

    ds = Dataset(dataset_root, storage)
    lay = ds.layer(layer)
    _fresh(lay.store)
    tables = []
    for s in lay.committed():
        with lay.store.open(lay.parquet(s)) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables, promote_options="default") if tables else None
