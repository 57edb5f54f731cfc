"""``vllm`` backend: vLLM engines inside the Ray cluster through Ray Data LLM.

One Ray Data pipeline for the whole run (engines load once): the pending shards are
expanded into requests (images downscaled to ``image_max_side`` and given as PIL images in
OpenAI-style messages, ``{"type": "image", "image": PIL}``), run through
``build_processor(vLLMEngineProcessorConfig(...))``, and the answers stream back to the
driver, which commits a layer shard as soon as all of its answers are in (the same
layer writer and commit marker as the HTTP path, so resume and exactly-once hold).

Structured output goes in the sampling params (``structured_outputs: {"json": schema}``,
vLLM >= 0.12; ``guided_decoding`` is gone). Ray Data LLM gives no finish reason: an answer
that used all ``max_tokens`` is reported as ``length``. Bad answers are not asked again
inside the pipeline (it has no per-row loop); they are recorded as failed with the reason,
and ``--retry-failed`` (with any backend) redoes them.

``vllm`` and a GPU are needed to run it: everything is imported lazily, and everything up
to the engine call (config, request rows, answer parsing, row building) is plain Python
that the tests cover on a CPU machine. ``scripts/recaption_vllm_gpu.sh`` runs it for real.
"""

from __future__ import annotations

import io
import time
from collections import defaultdict
from typing import Any

from recaption.backends.base import CaptionRequest, CaptionResult, fill_images
from recaption.config import RecaptionConfig


def engine_kwargs(cfg: RecaptionConfig) -> dict[str, Any]:
    v = cfg.vllm
    kw = {
        "tensor_parallel_size": v.tensor_parallel_size,
        "pipeline_parallel_size": v.pipeline_parallel_size,
        "max_model_len": v.max_model_len,
        "max_num_seqs": v.max_num_seqs,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "limit_mm_per_prompt": {"image": 2},
        "trust_remote_code": False,
    }
    kw.update(v.engine_kwargs)
    return kw


def processor_config(cfg: RecaptionConfig):
    """The ``vLLMEngineProcessorConfig`` for this run (multimodal + chat template stages on)."""
    from ray.data.llm import vLLMEngineProcessorConfig

    if not cfg.model:
        raise ValueError("the vllm backend needs --model (a Hugging Face id or a local directory)")
    return vLLMEngineProcessorConfig(
        model_source=cfg.model,
        engine_kwargs=engine_kwargs(cfg),
        concurrency=cfg.vllm.concurrency,
        batch_size=cfg.vllm.batch_size,
        prepare_multimodal_stage={"enabled": True},
        chat_template_stage={"enabled": True},
        tokenize_stage={"enabled": True},
        detokenize_stage={"enabled": True},
    )


def sampling_params(req: CaptionRequest) -> dict[str, Any]:
    sp: dict[str, Any] = {
        "max_tokens": req.sampling.max_tokens,
        "temperature": req.sampling.temperature,
        "top_p": req.sampling.top_p,
    }
    if req.sampling.seed is not None:
        sp["seed"] = req.sampling.seed
    if req.json_schema is not None:
        sp["structured_outputs"] = {"json": req.json_schema}
    return sp


def request_row(req: CaptionRequest, shard: str, key: str) -> dict[str, Any]:
    """One Ray Data row for the processor: messages with PIL images, sampling params, ids."""
    from PIL import Image

    def pil(data: bytes) -> dict[str, Any]:
        return {"type": "image", "image": Image.open(io.BytesIO(data)).convert("RGB")}

    return {
        "shard": shard,
        "key": key,
        "req_key": req.key,
        "messages": fill_images(req.messages, req.images, pil),
        "sampling_params": sampling_params(req),
    }


def result_from_row(row: dict[str, Any]) -> CaptionResult:
    """A processor output row as a :class:`CaptionResult`."""
    err = row.get("__inference_error__") or row.get("error")
    max_tokens = int((row.get("sampling_params") or {}).get("max_tokens") or row.get("max_tokens") or 0)
    n_out = int(row.get("num_generated_tokens") or 0)
    if err:
        return CaptionResult(row["req_key"], error=f"engine error: {str(err)[:200]}")
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
        "key",
        "req_key",
        "generated_text",
        "num_generated_tokens",
        "num_input_tokens",
        "time_taken_llm",
        "__inference_error__",
    )
    out = {k: row.get(k) for k in keep}
    out["max_tokens"] = (row.get("sampling_params") or {}).get("max_tokens")
    return out


class _Replay:
    """A backend that answers with results already computed (by the engines), so the tasks'
    own judging and row building serve this path too."""

    name = "vllm"
    capacity = 1 << 30

    def __init__(self, results: dict[str, CaptionResult]) -> None:
        self.results = results

    async def generate(self, request: CaptionRequest) -> CaptionResult:
        return self.results.get(request.key) or CaptionResult(request.key, error="no answer from the engine")


def expand_shard(item: dict[str, Any], root: str, storage, cfg: RecaptionConfig) -> list[dict[str, Any]]:
    """All request rows of one shard (run inside Ray Data)."""
    import asyncio

    from engine.layout import Dataset
    from recaption.run import make_task, shard_samples

    ds = Dataset(root, storage)
    task = make_task(cfg, cfg.model or "?")
    rows: list[dict[str, Any]] = []

    class Capture:
        capacity = 1 << 30

        async def generate(self, request: CaptionRequest) -> CaptionResult:
            rows.append(request_row(request, item["shard"], request.key.split("#", 1)[0]))
            return CaptionResult(request.key, error="captured")

    from recaption.tasks import Metrics

    async def go():
        for s in shard_samples(ds, item["shard"], cfg, task):
            await task.run(Capture(), s, Metrics())

    asyncio.run(go())
    return rows


def run_vllm(dataset, run_cfg, report, progress: bool = True, say=print):
    """Caption the dataset's pending shards with vLLM engines in the Ray cluster."""
    import asyncio

    import ray
    from ray.data.llm import build_processor

    from engine.layers import write_layer_shard
    from engine.runtime import init_ray
    from recaption.run import (
        _select_shards,
        check_or_write_info,
        layer_info,
        layer_name,
        make_task,
        shard_keys,
        shard_samples,
    )
    from recaption.tasks import Metrics

    cfg = run_cfg.recaption
    t0 = time.time()
    layer = dataset.layer(layer_name(cfg))
    check_or_write_info(layer, layer_info(cfg, cfg.model))
    layer.store.makedirs()
    layer.store.clear_staging()
    committed = set(layer.committed())
    shards = _select_shards(dataset, cfg)
    report.shards_planned = len(shards)
    todo = [s for s in shards if s not in committed]
    report.shards_skipped = len(shards) - len(todo)
    if not todo:
        return report
    init_ray(run_cfg.ray)
    storage = run_cfg.storage.resolved()
    task = make_task(cfg, cfg.model)
    processor = build_processor(processor_config(cfg), postprocess=postprocess)
    src = ray.data.from_items([{"shard": s} for s in todo]).flat_map(
        expand_shard, fn_kwargs={"root": dataset.root, "storage": storage, "cfg": cfg}
    )
    # expected answers per shard: the same task logic, without images (cheap: Parquet only)
    expected: dict[str, int] = {}
    for s in todo:
        expected[s] = sum(1 for _ in _count_requests(dataset, s, cfg, task))
    results: dict[str, dict[str, CaptionResult]] = defaultdict(dict)

    def commit(shard: str) -> None:
        started = time.time()
        metrics = Metrics()
        replay = _Replay(results.pop(shard, {}))
        no_retry = make_task(cfg.model_copy(update={"retries": 0}), cfg.model)

        async def rows_of():
            return {
                s.key: await no_retry.run(replay, s, metrics)
                for s in shard_samples(dataset, shard, cfg, task)
            }

        by_key = asyncio.run(rows_of())
        rows = [by_key[k] for k in shard_keys(dataset, shard)]
        extra = {"model": cfg.model, "backend": "vllm", **metrics.as_stats(time.time() - t0, len(rows))}
        with layer.store.staging(f"vllm-{shard}") as staging:
            stats = write_layer_shard(layer, shard, rows, task.schema, staging, started, extra).to_dict()
        report.shards_written += 1
        report.add(stats)
        say(f"shard {shard}: {stats['ok']} ok, {stats['failed']} failed")

    for s in [s for s, n in expected.items() if n == 0]:
        commit(s)
        expected.pop(s)
    for row in processor(src).iter_rows():
        r = result_from_row(row)
        results[row["shard"]][r.key] = r
        if len(results[row["shard"]]) >= expected.get(row["shard"], 1 << 60):
            commit(row["shard"])
            expected.pop(row["shard"])
    for s in list(expected):  # answers that never came: the shard stays uncommitted, a rerun redoes it
        report.shards_failed[s] = f"{len(results.get(s, {}))} of {expected[s]} answers came back"
    report.seconds = time.time() - t0
    return report


def _count_requests(dataset, shard: str, cfg: RecaptionConfig, task):
    """The request keys a shard produces (samples with an image; one per proposal box)."""
    from recaption.run import _proposals, _shard_rows
    from recaption.tasks import ProposalTask

    props = _proposals(dataset, cfg, shard) if isinstance(task, ProposalTask) else None
    for r in _shard_rows(dataset, shard):
        if r["status"] != "success":
            continue
        if props is None:
            yield r["key"]
            continue
        p = props.get(r["key"])
        if p is not None and p.get("status") == "ok":
            for i in range(len(p.get("regions") or [])):
                yield f"{r['key']}#{i}"
