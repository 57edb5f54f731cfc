"""The in-cluster vLLM driver: vLLM engines in the Ray cluster through Ray Data LLM.

A second driver beside :mod:`recaption.run` (not a backend). One Ray Data pipeline for the
whole run (engines load once), for every layer of the pass (``recaption.layers``, else the
one layer of ``recaption``):

1. ``from_items(shards).flat_map(expand)``: each shard's samples are read and prepared once
   for all the layers that want the shard (:mod:`recaption.samples`); ``expand`` is a
   generator, so request rows stream out one by one, each tagged with its layer, and only
   encoded JPEGs travel (``{"type": "image_url", "image_url": {"url":
   "data:image/jpeg;base64,..."}}``, the part vLLM's chat parser takes). Each row carries the
   sample's small ``meta`` (size, proposals), so the commit never reads the tar again. When a
   shard is expanded, ``expand`` tells the :class:`Ledger` actor, per layer, how many requests
   it emitted and hands it the rows of samples that get no request (ingest failed,
   undecodable image, answered by the cache or by a duplicate).
2. ``build_processor(vLLMEngineProcessorConfig(..., should_continue_on_error=True))``: a row
   the engine cannot serve comes back with ``__inference_error__`` and becomes a failed row
   with that reason; the job goes on.
3. The driver commits a layer shard as soon as all the requests its expansion emitted have
   answers (the same layer writer and commit marker as the HTTP path), each layer on its own
   (its lease, run id, stats and cache). ``--retry-failed`` expands only the failed rows of
   committed shards and merges them in.

Duplicate images within the run (recaption/dedupe.py): before the pipeline starts, DuckDB
groups the run's samples by the ``sha256`` the shards carry; in each group (per layer, and
per proposals in proposals mode) the first sample asks and the others emit a ``__dup_of__``
marker instead of a request (their image is not even decoded). The committer fills them
with the first one's row (ok or failed; counted as ``cache_hits``), so a shard waits for the
commit of the shard its duplicates' answers come from.

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
from dataclasses import dataclass, field
from typing import Any

from engine.shards import ShardTask
from engine.stats import LayerStats, Reason, RowStatus
from recaption.backends.base import CaptionRequest, CaptionResult, fill_images
from recaption.cache import CacheStore, ResponseCache, fingerprint
from recaption.config import RecaptionConfig
from recaption.dedupe import duplicate_groups, plan_duplicates
from recaption.plan import (
    RecaptionReport,
    check_or_write_info,
    layer_configs,
    layer_info,
    layer_name,
    make_task,
    plan_pass,
    retry_extra,
)
from recaption.samples import shard_keys, shard_samples
from recaption.tasks import Metrics, ProposalTask, Task, judge_one

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


def request_row(req: CaptionRequest, shard: str, meta: dict[str, Any], layer: int = 0) -> dict[str, Any]:
    """One Ray Data row for the processor: messages with data-URL images, sampling params, ids
    (``layer``: the index of the pass's layer that asks)."""
    row = {
        "shard": shard,
        "layer": layer,
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
    keep = (
        "shard",
        "layer",
        "key",
        "req_key",
        "meta",
        "generated_text",
        "num_generated_tokens",
        "num_input_tokens",
    )
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
    """The layer's response cache (its fingerprint as on the HTTP path) and, with
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


def check_layers(cfgs: list[RecaptionConfig]) -> None:
    """What the layers of one vLLM pass must share: the processor has one chat-template stage
    (``chat_template_kwargs``), and Ray Data stores ``sampling_params`` as one Arrow struct, so a
    field set by one layer's ``extra_body`` would reach the others' rows as None."""
    if len(cfgs) < 2:
        return
    chat = {json.dumps(c.extra_body.get("chat_template_kwargs"), sort_keys=True) for c in cfgs}
    if len(chat) > 1:
        raise ValueError(
            "recaption.layers on the vllm backend: every layer must have the same "
            "extra_body.chat_template_kwargs (one chat-template stage per run)"
        )
    fields = {tuple(sorted(k for k in c.extra_body if k in SAMPLING_FIELDS)) for c in cfgs}
    if len(fields) > 1:
        raise ValueError(
            "recaption.layers on the vllm backend: every layer must set the same sampling fields in "
            f"extra_body (got {sorted(fields)}); give the others their default value explicitly"
        )


class Ledger:
    """A small Ray actor: what each shard's expansion emitted per layer (a request count and the
    rows of samples that get no request). The driver takes the entries as they come."""

    def __init__(self) -> None:
        self.done: list[tuple[str, int, int, list[dict[str, Any]]]] = []

    def shard_done(self, shard: str, layer: int, n_requests: int, premade: list[dict[str, Any]]) -> None:
        self.done.append((shard, layer, n_requests, premade))

    def take(self) -> list[tuple[str, int, int, list[dict[str, Any]]]]:
        out, self.done = self.done, []
        return out


OnExpanded = Callable[[str, int, int, list[dict[str, Any]]], None]


def tell(ledger) -> OnExpanded:
    """``on_expanded`` for :func:`expand`: report to the :class:`Ledger` actor."""

    def on_expanded(shard: str, layer: int, n: int, premade: list[dict[str, Any]]) -> None:
        import ray

        ray.get(ledger.shard_done.remote(shard, layer, n, premade))

    return on_expanded


def expand(
    item: dict[str, Any],
    root: str,
    storage,
    cfg: RecaptionConfig,
    on_expanded: OnExpanded | None = None,
    cached: Any = None,
) -> Iterator[dict[str, Any]]:
    """The request rows of one shard for every layer of the pass, one by one (run inside Ray
    Data); then one ledger entry per layer. Each image is read and prepared once, and not at all
    when every layer gets its row from elsewhere.

    ``item["plan"]`` (JSON; absent: the whole shard for the one layer of ``cfg``): ``wants``,
    ``[layer index, "shard" or "retry", keys or None]`` per layer that wants the shard, and
    ``dups``, per layer ``{key: [primary shard, primary key]}`` (recaption/dedupe.py): such a
    sample emits no request, only a ``{"key", "__dup_of__"}`` marker for the committer.
    ``cached``: per layer, the response-cache keys answered by earlier runs (a set, or a Ray
    object ref of one; or one for a single layer): such a sample emits a ``{"key",
    "__cache_key__"}`` marker (not for a retry: it asks again)."""
    from engine.layout import Dataset

    plan = json.loads(item["plan"]) if item.get("plan") else {"wants": [[0, "shard", None]], "dups": {}}
    cfgs = layer_configs(cfg)
    if not isinstance(cached, list | tuple):
        cached = [cached] * len(cfgs)
    ds = Dataset(root, storage)
    shard = item["shard"]
    all_keys: list[str] | None = None
    wants: list[tuple[int, str, set[str]]] = []
    for i, kind, keys in plan["wants"]:
        if keys is None:
            all_keys = all_keys if all_keys is not None else shard_keys(ds, shard)
            keys = all_keys
        wants.append((int(i), kind, set(keys)))
    dups = {int(i): d for i, d in (plan.get("dups") or {}).items()}
    tasks, caches, known = {}, {}, {}
    for i, _, _ in wants:
        tasks[i] = make_task(cfgs[i], cfg.model or "?")
        caches[i] = ResponseCache(
            fingerprint(tasks[i], {"family": cfgs[i].model_family}), boxes=isinstance(tasks[i], ProposalTask)
        )
        c = cached[i]
        if c is not None and not isinstance(c, set | frozenset):
            import ray

            c = ray.get(c)
        known[i] = c
    n = {i: 0 for i, _, _ in wants}
    premade: dict[int, list[dict[str, Any]]] = {i: [] for i, _, _ in wants}
    read: set[str] = set()
    for i, _, keys in wants:
        mine = dups.get(i, {})
        premade[i] += [{"key": k, "__dup_of__": mine[k]} for k in sorted(keys & mine.keys())]
        read |= keys - mine.keys()
    props = [c for c in cfgs if c.task == "regions" and c.region_mode == "proposals"]
    read_cfg = props[0] if props else cfg  # one proposals layer per pass (layer_configs)
    any_props = any(isinstance(tasks[i], ProposalTask) for i in tasks)
    for smp in shard_samples(ds, shard, read_cfg, any_props, read) if read else ():
        for i, kind, keys in wants:
            if smp.key not in keys or smp.key in dups.get(i, {}):
                continue
            task = tasks[i]
            row = task.premade_row(smp)
            if row is not None:
                premade[i].append(row)
                continue
            k = caches[i].key(smp)
            if k is not None and known[i] and kind == "shard" and k in known[i]:
                premade[i].append({"key": smp.key, "__cache_key__": k})
                continue
            meta = task.meta(smp)
            meta["cache_key"] = k
            reqs = task.requests(smp)
            meta["req_keys"] = [q.key for q in reqs]
            for q in reqs:
                n[i] += 1
                yield request_row(q, shard, meta, i)
    if on_expanded is not None:
        for i, _, _ in wants:
            on_expanded(shard, i, n[i], premade[i])


def run_vllm(
    dataset,
    run_cfg,
    reports: list[RecaptionReport],
    leases: list,
    progress: bool = True,
    say=print,
) -> None:
    """Caption the dataset's pending shards into every layer of the pass (``recaption.layers``,
    else the one layer of ``recaption``) with vLLM engines in the Ray cluster. ``reports`` and
    ``leases``: one per layer, in the order of :func:`recaption.plan.layer_configs`."""
    import ray
    from ray.data.llm import build_processor

    from engine.runtime import init_ray

    cfg: RecaptionConfig = run_cfg.recaption
    cfgs = layer_configs(cfg)
    check_layers(cfgs)
    layers = [dataset.layer(layer_name(c)) for c in cfgs]
    for c, layer in zip(cfgs, layers, strict=True):
        check_or_write_info(layer, layer_info(c, cfg.model))
    todo = plan_pass(dataset, cfgs, reports)
    items = [i for i in (_item(layers, t) for t in todo) if i is not None]
    if not items:
        return
    init_ray(run_cfg.ray)
    data_context(cfg)
    storage = run_cfg.storage.resolved()
    runs = []
    for c, layer, report, lease in zip(cfgs, layers, reports, leases, strict=True):
        _, store = response_cache(dataset, c, storage)
        runs.append(LayerRun(c, make_task(c, cfg.model or "?"), layer, report, lease.run_id, store))
    _plan_duplicates(dataset, storage, cfgs, items)
    ledger = ray.remote(num_cpus=0)(Ledger).remote()
    processor = build_processor(processor_config(cfg), postprocess=postprocess)
    src = ray.data.from_items(
        [{"shard": it["shard"], "plan": json.dumps(it["plan"])} for it in items]
    ).flat_map(
        expand,
        fn_kwargs={
            "root": dataset.root,
            "storage": storage,
            "cfg": cfg,
            "on_expanded": tell(ledger),
            "cached": [ray.put(frozenset(r.cached)) if r.cached else None for r in runs],
        },
    )
    committer = Committer(dataset, runs, items, say)
    last_poll = 0.0
    for row in processor(src).iter_rows():
        committer.answer(row)
        if time.monotonic() - last_poll > 0.5:
            committer.expanded(ray.get(ledger.take.remote()))
            last_poll = time.monotonic()
        lost = [r for r, lease in zip(reports, leases, strict=True) if lease.lost]
        if lost:
            for r in reports:
                r.stopped = f"lost the lease of layer {lost[0].layer!r}"
            break
    else:
        committer.expanded(ray.get(ledger.take.remote()))
    committer.finish()


def _item(layers, t: ShardTask) -> dict[str, Any] | None:
    """A shard unit of the pass (``t.payload``: ``(layer index, kind)``, recaption.plan.plan_pass)
    with the keys each layer asks for: all (None) or, for a retry, its failed rows with an image."""
    import pyarrow.parquet as pq

    wants = []
    for i, kind in t.payload or [(0, t.kind)]:
        if kind == "shard":
            wants.append([i, kind, None])
            continue
        layer = layers[i]
        with layer.store.open(layer.parquet(t.shard)) as f:
            rows = pq.read_table(f, columns=["key", "status", "error"]).to_pylist()
        redo = [
            r["key"]
            for r in rows
            if r["status"] != RowStatus.OK
            and Reason.of(r.get("error")) != Reason.UPSTREAM
            and not str(r.get("error")).startswith("image not decodable")
        ]
        if redo:
            wants.append([i, kind, redo])
    return {"shard": t.shard, "plan": {"wants": wants, "dups": {}}} if wants else None


def _plan_duplicates(dataset, storage, cfgs: list[RecaptionConfig], items: list[dict[str, Any]]) -> None:
    """Fill each item's ``plan["dups"]``: per layer, the samples whose question another sample
    of this run asks already (recaption/dedupe.py)."""
    from recaption.samples import proposals

    groups = duplicate_groups(dataset, [it["shard"] for it in items], storage)
    if not groups:
        return
    involved = {s for g in groups for s, _ in g}
    for i, c in enumerate(cfgs):
        wanted = {
            it["shard"]: (set(keys) if keys is not None else None)
            for it in items
            for j, _, keys in it["plan"]["wants"]
            if j == i
        }
        boxes = None
        if c.task == "regions" and c.region_mode == "proposals":
            boxes = {s: proposals(dataset, c.proposals_layer, s) for s in involved if s in wanted}
        for it in items:
            d = plan_duplicates(groups, wanted, boxes).get(it["shard"])
            if d:
                it["plan"]["dups"][str(i)] = d


@dataclass
class LayerRun:
    """One layer of the pass on the driver: its settings, task, directory, report, run id (the
    lease's: staging names) and response-cache store with the answers of earlier runs."""

    cfg: RecaptionConfig
    task: Task
    layer: Any
    report: RecaptionReport
    run_id: str
    store: CacheStore | None = None
    cached: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.store is not None:
            self.cached = self.store.load()


Unit = tuple[str, int]  # (shard, layer index): what one commit writes


class Committer:
    """Collects answers per (shard, layer) and commits a layer shard once every request its
    expansion emitted has an answer and every duplicate's primary has its row: rows from the
    answers and the samples' ``meta`` (no image is read again)."""

    def __init__(self, dataset, runs: list[LayerRun], items: list[dict[str, Any]], say: Callable) -> None:
        self.dataset, self.runs, self.say = dataset, runs, say
        self.kinds: dict[Unit, str] = {}
        self.needed: set[tuple[int, str, str]] = set()  # (layer, shard, key) of duplicated primaries
        for it in items:
            for i, kind, _ in it["plan"]["wants"]:
                self.kinds[(it["shard"], i)] = kind
            for i, d in it["plan"]["dups"].items():
                self.needed |= {(int(i), ps, pk) for ps, pk in d.values()}
        self.results: dict[Unit, dict[str, CaptionResult]] = defaultdict(dict)
        self.metas: dict[Unit, dict[str, dict[str, Any]]] = defaultdict(dict)
        self.expected: dict[Unit, tuple[int, list[dict[str, Any]]]] = {}
        self.primaries: dict[tuple[int, str, str], dict[str, Any]] = {}  # their rows, once committed
        self.started = time.time()
        self.committed: set[Unit] = set()

    def answer(self, row: dict[str, Any]) -> None:
        unit = (row["shard"], int(row.get("layer") or 0))
        r = result_from_row(row)
        self.results[unit][r.key] = r
        meta = json.loads(row["meta"])
        self.metas[unit][meta["key"]] = meta
        self._maybe_commit(unit)

    def expanded(self, entries) -> None:
        for shard, i, n, premade in entries:
            self.expected[(shard, i)] = (n, premade)
        self._commit_ready()

    def _ready(self, unit: Unit) -> bool:
        if unit not in self.expected:
            return False
        n, premade = self.expected[unit]
        if len(self.results.get(unit, {})) < n:
            return False
        for r in premade:
            dup = r.get("__dup_of__")
            if dup is not None and dup[0] != unit[0] and (unit[1], *dup) not in self.primaries:
                return False  # its primary's shard is not committed yet
        return True

    def _maybe_commit(self, unit: Unit) -> None:
        if self._ready(unit):
            self._commit(unit)
            self._commit_ready()

    def _commit_ready(self) -> None:
        while True:
            ready = [u for u in self.expected if self._ready(u)]
            if not ready:
                return
            for u in ready:
                self._commit(u)

    def _commit(self, unit: Unit) -> None:
        from engine.layers import write_layer_shard

        shard, i = unit
        run = self.runs[i]
        task, layer = run.task, run.layer
        started = time.time()
        _, premade = self.expected.pop(unit)
        results = self.results.pop(unit, {})
        metas = self.metas.pop(unit, {})
        metrics = Metrics()
        by_key: dict[str, dict[str, Any]] = {}
        fresh: dict[str, dict[str, Any]] = {}
        for key, meta in metas.items():
            judge = task.judge(meta)
            outs = []
            for rk in meta["req_keys"]:
                r = results.get(rk) or CaptionResult(rk, error="no answer from the engine")
                metrics.add(r)
                outs.append(judge_one(r, judge))
            by_key[key] = row = task.finish(meta, outs, metrics)
            if meta.get("cache_key") and row["status"] == RowStatus.OK:
                fresh[meta["cache_key"]] = row
        dups = []
        for r in premade:
            if r.get("__dup_of__") is not None:
                dups.append(r)
            elif r.get("__cache_key__") is not None:  # answered by an earlier run
                metrics.cache_hits += 1
                by_key[r["key"]] = {**run.cached[r["__cache_key__"]], "key": r["key"]}
            else:
                by_key[r["key"]] = r
        for r in dups:  # the answer of the sample that asked the same question in this run
            ps, pk = r["__dup_of__"]
            metrics.cache_hits += 1
            src = by_key[pk] if ps == shard else self.primaries[(i, ps, pk)]
            by_key[r["key"]] = {**src, "key": r["key"]}
        for key, row in by_key.items():
            if (i, shard, key) in self.needed:
                self.primaries[(i, shard, key)] = row
        extra = {
            "model": run.cfg.model,
            "backend": "vllm",
            "run_id": run.run_id,
            **metrics.as_stats(time.time() - self.started, len(by_key)),
        }
        usage = dict(extra)  # this round's requests and tokens, for the run's report
        retry = self.kinds[unit] == "retry"
        if retry:
            import pyarrow.parquet as pq

            with layer.store.open(layer.parquet(shard)) as f:
                old = pq.read_table(f).to_pylist()
            rows = [by_key.get(r["key"], r) for r in old]
            extra = retry_extra(layer.read_stats(shard), extra)
        else:
            rows = [by_key[k] for k in shard_keys(self.dataset, shard)]
        if run.store is not None:  # answers first: a kill in between costs nothing
            run.store.save(f"{run.run_id}-{shard}", fresh)
        with layer.store.staging(f"{run.run_id}-{shard}") as staging:
            if retry:
                layer.store.rm(layer.stats(shard))
            stats: LayerStats = write_layer_shard(layer, shard, rows, task.schema, staging, started, extra)
        if retry:
            run.report.shards_retried += 1
        else:
            run.report.shards_written += 1
        run.report.add_rows(stats.count, stats.ok, stats.error_reasons)
        run.report.add_usage(usage)
        self.committed.add(unit)
        name = f" ({run.report.layer})" if len(self.runs) > 1 else ""
        self.say(f"shard {shard}{name}: {stats.ok} ok, {stats.failed} failed")

    def finish(self) -> None:
        """Layer shards whose answers did not all come back stay uncommitted; a rerun redoes them."""
        for unit in self.kinds:
            shard, i = unit
            report = self.runs[i].report
            if unit in self.expected:
                n, premade = self.expected[unit]
                got = len(self.results.get(unit, {}))
                if got < n:
                    report.shards_failed[shard] = f"{got} of {n} answers came back"
                else:
                    waits = sorted({r["__dup_of__"][0] for r in premade if r.get("__dup_of__")})
                    report.shards_failed[shard] = (
                        f"waits for the answers of duplicate images in shard(s) {waits}, not committed"
                    )
            elif unit not in self.committed:
                report.shards_failed[shard] = "its expansion did not finish"
