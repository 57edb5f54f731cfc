"""The in-cluster vLLM driver: vLLM engines in the Ray cluster through Ray Data LLM.

A second driver beside :mod:`recaption.run` (not a backend). One Ray Data pipeline for the
whole run (engines load once):

1. ``from_items(shards).flat_map(expand)``: each shard's samples are read and prepared once
   (:mod:`recaption.samples`); ``expand`` is a generator, so request rows stream out one by
   one and only encoded JPEGs travel (``{"type": "image_url", "image_url": {"url":
   "data:image/jpeg;base64,..."}}``, the part vLLM's chat parser takes). Each row carries the
   sample's small ``meta`` (size, proposals), so the commit never reads the tar again. When a
   shard is expanded, ``expand`` tells the :class:`Ledger` actor how many requests it emitted
   and hands it the rows of samples that get no request (ingest failed, undecodable image).
2. ``build_processor(vLLMEngineProcessorConfig(..., should_continue_on_error=True))``: a row
   the engine cannot serve comes back with ``__inference_error__`` and becomes a failed row
   with that reason; the job goes on.
3. The driver commits a layer shard as soon as all the requests its expansion emitted have
   answers (the same layer writer and commit marker as the HTTP path). ``--retry-failed``
   expands only the failed rows of committed shards and merges them in.

Memory (finding 8 here): the pipeline's object-store budget is ``max_bytes_in_flight``
(Ray Data's streaming executor stops reading shards while that many bytes of request rows
wait), and output blocks are cut at 1/16 of it (at most 128 MiB, Ray Data's default), so a
shard's base64 images never pile up in one block (:func:`data_context`).

Response cache across runs (as on the HTTP path, recaption/cache.py): the driver loads the
fingerprint's stored answers and hands the expansion their keys only (``ray.put``, 64 bytes
each); a sample whose key is there emits no request but a marker the committer fills from
the stored row (counted as ``cache_hits``). At commit the shard's ok answers are stored
before its marker is written.

Structured output goes in the sampling params (``structured_outputs: {"json": schema}``,
vLLM >= 0.12). Ray Data LLM gives no finish reason: an answer that used all ``max_tokens``
counts as ``length``. ``vllm`` and a GPU are needed to run it: everything is imported lazily;
tests/recaption/test_recap_vllm.py checks the request rows against vLLM's chat content-part
contract. ``scripts/recaption_vllm_gpu.sh`` runs it for real.
"""

from __future__ import annotations

import base64
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from engine.shards import ShardTask
from engine.stats import LayerStats, Reason, RowStatus
from recaption.backends.base import CaptionRequest, CaptionResult, fill_images
from recaption.cache import CacheStore, ResponseCache, fingerprint
from recaption.config import RecaptionConfig
from recaption.plan import (
    RecaptionReport,
    check_or_write_info,
    layer_info,
    layer_name,
    make_task,
    plan_tasks,
    retry_extra,
)
from recaption.samples import shard_keys, shard_samples
from recaption.tasks import Metrics, ProposalTask, judge_one

# fields of vLLM's SamplingParams that ``extra_body`` may set; the rest go to their own stage
SAMPLING_FIELDS = (
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "seed",
    "top_p",
)


def engine_kwargs(cfg: RecaptionConfig) -> dict[str, Any]:
    v = cfg.vllm
    kw = {
        "tensor_parallel_size": v.tensor_parallel_size,
        "pipeline_parallel_size": v.pipeline_parallel_size,
        "max_model_len": v.max_model_len,
        "max_num_seqs": v.max_num_seqs,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "limit_mm_per_prompt": {"image": 2},
        "trust_remote_code": v.trust_remote_code,
    }
    kw.update(v.engine_kwargs)
    return kw


def processor_config(cfg: RecaptionConfig):
    """The ``vLLMEngineProcessorConfig`` for this run (multimodal + chat template stages on)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    if not cfg.model:
        raise ValueError("the vllm backend needs --model (a Hugging Face id or a local directory)")
    chat = {"enabled": True}
    if cfg.extra_body.get("chat_template_kwargs"):
        chat["chat_template_kwargs"] = cfg.extra_body["chat_template_kwargs"]
    return vLLMEngineProcessorConfig(
        model_source=cfg.model,
        engine_kwargs=engine_kwargs(cfg),
        concurrency=cfg.vllm.concurrency,
        batch_size=cfg.vllm.batch_size,
        should_continue_on_error=True,
        prepare_multimodal_stage={"enabled": True},
        chat_template_stage=chat,
        tokenize_stage={"enabled": True},
        detokenize_stage={"enabled": True},
    )


def sampling_params(req: CaptionRequest) -> dict[str, Any]:
    sp: dict[str, Any] = {
        "max_tokens": req.sampling.max_tokens,
        "temperature": req.sampling.temperature,
        "top_p": req.sampling.top_p,
    }
    sp.update({k: v for k, v in req.sampling.extra if k in SAMPLING_FIELDS})
    if req.sampling.seed is not None:
        sp["seed"] = req.sampling.seed
    if req.json_schema is not None:
        sp["structured_outputs"] = {"json": req.json_schema}
    return sp


def image_part(data: bytes) -> dict[str, Any]:
    """An image as vLLM's chat parser takes it (``image_url`` with a data URL)."""
    return {
        "type": "image_url",
        "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(data).decode()},
    }


def request_row(req: CaptionRequest, shard: str, meta: dict[str, Any]) -> dict[str, Any]:
    """One Ray Data row for the processor: messages with data-URL images, sampling params, ids."""
    row = {
        "shard": shard,
        "key": meta["key"],
        "req_key": req.key,
        "meta": json.dumps(meta),
        "messages": fill_images(req.messages, req.images, image_part),
        "sampling_params": sampling_params(req),
    }
    mm = dict(req.sampling.extra).get("mm_processor_kwargs")
    if mm:
        row["mm_processor_kwargs"] = mm
    return row


def result_from_row(row: dict[str, Any]) -> CaptionResult:
    """A processor output row as a :class:`CaptionResult` (an engine error is a failed result)."""
    err = row.get("__inference_error__")
    if err:
        return CaptionResult(row["req_key"], error=f"engine error: {str(err)[:300]}")
    max_tokens = int((row.get("sampling_params") or {}).get("max_tokens") or row.get("max_tokens") or 0)
    n_out = int(row.get("num_generated_tokens") or 0)
    finish = "length" if max_tokens and n_out >= max_tokens else "stop"
    return CaptionResult(
        row["req_key"],
        row.get("generated_text") or "",
        finish,
        int(row.get("num_input_tokens") or 0),
        n_out,
        float(row.get("time_taken_llm") or 0.0) * 1000,
        1,
        None,
        "vllm",
    )


def postprocess(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("shard", "key", "req_key", "meta", "generated_text", "num_generated_tokens", "num_input_tokens")
    out = {k: row.get(k) for k in keep}
    out["time_taken_llm"] = row.get("time_taken_llm")
    out["max_tokens"] = (row.get("sampling_params") or {}).get("max_tokens")
    return out


def data_context(cfg: RecaptionConfig):
    """Bound the bytes this pipeline holds: Ray Data's object-store limit is
    ``max_bytes_in_flight`` and blocks are cut at 1/16 of it (1 MiB to 128 MiB)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = limits.copy(object_store_memory=cfg.max_bytes_in_flight)
    ctx.target_max_block_size = max(2**20, min(128 * 2**20, cfg.max_bytes_in_flight // 16))
    return ctx


def response_cache(dataset, cfg: RecaptionConfig, storage) -> tuple[ResponseCache, CacheStore | None]:
    """The run's response cache (its fingerprint as on the HTTP path) and, with
    ``persistent_cache``, its store of answers across runs."""
    from engine.store import Store

    task = make_task(cfg, cfg.model or "?")
    cache = ResponseCache(
        fingerprint(task, {"family": cfg.model_family}), boxes=isinstance(task, ProposalTask)
    )
    if not cfg.persistent_cache:
        return cache, None
    where = cfg.cache_dir or dataset.store.uri("cache/recaption")
    return cache, CacheStore(Store(where, storage).child(cache.fp[:32]))


class Ledger:
    """A small Ray actor: what each shard's expansion emitted (a request count and the rows of
    samples that get no request). The driver takes the entries as they come."""

    def __init__(self) -> None:
        self.done: list[tuple[str, int, list[dict[str, Any]]]] = []

    def shard_done(self, shard: str, n_requests: int, premade: list[dict[str, Any]]) -> None:
        self.done.append((shard, n_requests, premade))

    def take(self) -> list[tuple[str, int, list[dict[str, Any]]]]:
        out, self.done = self.done, []
        return out


def tell(ledger) -> Callable[[str, int, list[dict[str, Any]]], None]:
    """``on_expanded`` for :func:`expand`: report to the :class:`Ledger` actor."""

    def on_expanded(shard: str, n: int, premade: list[dict[str, Any]]) -> None:
        import ray

        ray.get(ledger.shard_done.remote(shard, n, premade))

    return on_expanded


def expand(
    item: dict[str, Any],
    root: str,
    storage,
    cfg: RecaptionConfig,
    on_expanded: Callable[[str, int, list[dict[str, Any]]], None] | None = None,
    cached: Any = None,
) -> Iterator[dict[str, Any]]:
    """The request rows of one shard, one by one (run inside Ray Data); then the ledger entry.
    ``cached``: the response-cache keys answered by earlier runs (a set, or a Ray object ref of
    one): such a sample emits no request, only a ``{"key", "__cache_key__"}`` marker for the
    committer (not for a retry: it asks again)."""
    from engine.layout import Dataset

    if cached is not None and not isinstance(cached, set | frozenset):
        import ray

        cached = ray.get(cached)
    ds = Dataset(root, storage)
    task = make_task(cfg, cfg.model or "?")
    cache = ResponseCache(
        fingerprint(task, {"family": cfg.model_family}), boxes=isinstance(task, ProposalTask)
    )
    only = set(item["only_keys"]) if item.get("only_keys") else None
    n, premade = 0, []
    for smp in shard_samples(ds, item["shard"], cfg, isinstance(task, ProposalTask), only):
        row = task.premade_row(smp)
        if row is not None:
            premade.append(row)
            continue
        k = cache.key(smp)
        if k is not None and cached and only is None and k in cached:
            premade.append({"key": smp.key, "__cache_key__": k})
            continue
        meta = task.meta(smp)
        meta["cache_key"] = k
        reqs = task.requests(smp)
        meta["req_keys"] = [q.key for q in reqs]
        for q in reqs:
            n += 1
            yield request_row(q, item["shard"], meta)
    if on_expanded is not None:
        on_expanded(item["shard"], n, premade)


def run_vllm(dataset, run_cfg, report: RecaptionReport, lease, progress: bool = True, say=print) -> None:
    """Caption the dataset's pending shards with vLLM engines in the Ray cluster."""
    import ray
    from ray.data.llm import build_processor

    from engine.runtime import init_ray

    cfg: RecaptionConfig = run_cfg.recaption
    layer = dataset.layer(layer_name(cfg))
    check_or_write_info(layer, layer_info(cfg, cfg.model))
    todo = plan_tasks(dataset, cfg, report)
    items = [_item(layer, t) for t in todo]
    items = [i for i in items if i is not None]
    if not items:
        return
    init_ray(run_cfg.ray)
    data_context(cfg)
    storage = run_cfg.storage.resolved()
    cache, store = response_cache(dataset, cfg, storage)
    stored = store.load() if store is not None else {}
    ledger = ray.remote(num_cpus=0)(Ledger).remote()
    processor = build_processor(processor_config(cfg), postprocess=postprocess)
    src = ray.data.from_items(items).flat_map(
        expand,
        fn_kwargs={
            "root": dataset.root,
            "storage": storage,
            "cfg": cfg,
            "on_expanded": tell(ledger),
            "cached": ray.put(frozenset(stored)) if stored else None,
        },
    )
    committer = Committer(dataset, cfg, report, lease.run_id, {i["shard"]: i for i in items}, say)
    committer.cached, committer.store = stored, store
    last_poll = 0.0
    for row in processor(src).iter_rows():
        committer.answer(row)
        if time.monotonic() - last_poll > 0.5:
            committer.expanded(ray.get(ledger.take.remote()))
            last_poll = time.monotonic()
        if lease.lost:
            report.stopped = f"lost the lease of layer {report.layer!r}"
            break
    else:
        committer.expanded(ray.get(ledger.take.remote()))
    committer.finish()


def _item(layer, t: ShardTask) -> dict[str, Any] | None:
    if t.kind == "shard":
        return {"shard": t.shard, "kind": "shard", "only_keys": []}
    import pyarrow.parquet as pq

    with layer.store.open(layer.parquet(t.shard)) as f:
        rows = pq.read_table(f, columns=["key", "status", "error"]).to_pylist()
    redo = [
        r["key"]
        for r in rows
        if r["status"] != RowStatus.OK
        and Reason.of(r.get("error")) != Reason.UPSTREAM
        and not str(r.get("error")).startswith("image not decodable")
    ]
    return {"shard": t.shard, "kind": "retry", "only_keys": redo} if redo else None


class Committer:
    """Collects answers per shard and commits a shard once every request its expansion emitted
    has an answer: rows from the answers and the samples' ``meta`` (no image is read again)."""

    def __init__(self, dataset, cfg: RecaptionConfig, report, run_id: str, items, say: Callable) -> None:
        self.dataset, self.cfg, self.report, self.run_id, self.items, self.say = (
            dataset,
            cfg,
            report,
            run_id,
            items,
            say,
        )
        self.layer = dataset.layer(layer_name(cfg))
        self.task = make_task(cfg, cfg.model or "?")
        self.results: dict[str, dict[str, CaptionResult]] = defaultdict(dict)
        self.metas: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        self.expected: dict[str, tuple[int, list[dict[str, Any]]]] = {}
        self.started = time.time()
        self.committed: set[str] = set()
        self.cached: dict[str, dict[str, Any]] = {}  # answers of earlier runs (response cache)
        self.store: CacheStore | None = None  # where this run's ok answers are kept

    def answer(self, row: dict[str, Any]) -> None:
        shard = row["shard"]
        r = result_from_row(row)
        self.results[shard][r.key] = r
        meta = json.loads(row["meta"])
        self.metas[shard][meta["key"]] = meta
        self._maybe_commit(shard)

    def expanded(self, entries) -> None:
        for shard, n, premade in entries:
            self.expected[shard] = (n, premade)
            self._maybe_commit(shard)

    def _maybe_commit(self, shard: str) -> None:
        if shard in self.expected and len(self.results.get(shard, {})) >= self.expected[shard][0]:
            self._commit(shard)

    def _commit(self, shard: str) -> None:
        from engine.layers import write_layer_shard

        started = time.time()
        _, premade = self.expected.pop(shard)
        results = self.results.pop(shard, {})
        metas = self.metas.pop(shard, {})
        metrics = Metrics()
        by_key: dict[str, dict[str, Any]] = {}
        for r in premade:
            ck = r.get("__cache_key__")
            if ck is not None:  # answered by an earlier run
                metrics.cache_hits += 1
                by_key[r["key"]] = {**self.cached[ck], "key": r["key"]}
            else:
                by_key[r["key"]] = r
        fresh: dict[str, dict[str, Any]] = {}
        for key, meta in metas.items():
            judge = self.task.judge(meta)
            outs = []
            for rk in meta["req_keys"]:
                r = results.get(rk) or CaptionResult(rk, error="no answer from the engine")
                metrics.add(r)
                outs.append(judge_one(r, judge))
            by_key[key] = row = self.task.finish(meta, outs, metrics)
            if meta.get("cache_key") and row["status"] == RowStatus.OK:
                fresh[meta["cache_key"]] = row
        extra = {
            "model": self.cfg.model,
            "backend": "vllm",
            "run_id": self.run_id,
            **metrics.as_stats(time.time() - self.started, len(by_key)),
        }
        usage = dict(extra)  # this round's requests and tokens, for the run's report
        retry = self.items[shard]["kind"] == "retry"
        if retry:
            import pyarrow.parquet as pq

            with self.layer.store.open(self.layer.parquet(shard)) as f:
                old = pq.read_table(f).to_pylist()
            rows = [by_key.get(r["key"], r) for r in old]
            extra = retry_extra(self.layer.read_stats(shard), extra)
        else:
            rows = [by_key[k] for k in shard_keys(self.dataset, shard)]
        if self.store is not None:  # answers first: a kill in between costs nothing
            self.store.save(f"{self.run_id}-{shard}", fresh)
        with self.layer.store.staging(f"{self.run_id}-{shard}") as staging:
            if retry:
                self.layer.store.rm(self.layer.stats(shard))
            stats: LayerStats = write_layer_shard(
                self.layer, shard, rows, self.task.schema, staging, started, extra
            )
        if retry:
            self.report.shards_retried += 1
        else:
            self.report.shards_written += 1
        self.report.add_rows(stats.count, stats.ok, stats.error_reasons)
        self.report.add_usage(usage)
        self.committed.add(shard)
        self.say(f"shard {shard}: {stats.ok} ok, {stats.failed} failed")

    def finish(self) -> None:
        """Shards whose answers did not all come back stay uncommitted; a rerun redoes them."""
        for shard in self.items:
            if shard in self.expected:
                n = self.expected[shard][0]
                self.report.shards_failed[shard] = (
                    f"{len(self.results.get(shard, {}))} of {n} answers came back"
                )
            elif shard not in self.committed:
                self.report.shards_failed[shard] = "its expansion did not finish"
