"""What a recaption run does, before any image is read: the layer's name, the task, the
layer's ``layer.json``, which shards to caption or retry, and which wait for a proposals layer.
Shared by both drivers (:mod:`recaption.run`, :mod:`recaption.vllm_driver`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.layout import Dataset, LayerDir, LayoutError
from engine.shards import ShardTask, StageReport
from engine.stats import LayerStats
from recaption.backends.base import SamplingParams
from recaption.config import RecaptionConfig
from recaption.prompts import DEFAULTS, Prompt, load_prompt
from recaption.tasks import GlobalTask, GroundedTask, ProposalTask, Task, TaskSettings


@dataclass(kw_only=True)
class RecaptionReport(StageReport):
    dataset: str
    layer: str
    shards_waiting: list[str] = field(default_factory=list)  # proposals not committed yet
    requests: int = 0
    retries: int = 0
    completion_tokens: int = 0
    cache_hits: int = 0
    stopped: str | None = None  # the circuit breaker's reason, when it stopped the run
    endpoint_snapshots: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)  # per client

    @property
    def endpoints(self) -> dict[str, dict[str, Any]]:
        """Per endpoint over the run: counts summed over the client actors; latency percentiles
        exact with one client (the default), the largest of the clients' otherwise."""
        out: dict[str, dict[str, Any]] = {}
        for snap in self.endpoint_snapshots.values():
            for url, e in snap.items():
                o = out.setdefault(url, {})
                for k, v in e.items():
                    if k.startswith("latency_ms_"):
                        o[k] = v if o.get(k) is None else max(o[k], v or 0)
                    elif isinstance(v, bool):
                        o[k] = o.get(k, False) or v
                    else:
                        o[k] = o.get(k, 0) + (v or 0)
        return out

    @property
    def images_per_second(self) -> float:
        return self.rows_per_second

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    def add_usage(self, extra: dict[str, Any]) -> None:
        self.requests += int(extra.get("requests", 0))
        self.retries += int(extra.get("retries", 0))
        self.completion_tokens += int(extra.get("completion_tokens", 0))
        self.cache_hits += int(extra.get("cache_hits", 0))


def layer_configs(cfg: RecaptionConfig) -> list[RecaptionConfig]:
    """The layers one image pass writes: ``cfg`` itself, or one config per ``cfg.layers`` entry
    (its fields over ``cfg``'s). Refuses two entries with one layer name, and a proposals layer
    that the same pass writes (its boxes would not exist yet when the pass reads them)."""
    if not cfg.layers:
        return [cfg]
    base = cfg.model_dump(exclude_unset=True)
    base.pop("layers", None)
    out = [
        RecaptionConfig.model_validate({**base, **spec.model_dump(exclude_none=True)}) for spec in cfg.layers
    ]
    names = [layer_name(c) for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise LayoutError(
            f"recaption.layers writes layer {dup[0]!r} twice: give each entry its own layer name"
        )
    props = {c.proposals_layer for c in out if c.task == "regions" and c.region_mode == "proposals"}
    if len(props) > 1:
        raise LayoutError(
            f"recaption.layers: proposals tasks of one pass read one proposals layer, got {sorted(props)}"
        )
    if props & set(names):
        raise LayoutError(
            f"recaption.layers: layer {sorted(props & set(names))[0]!r} is both written and read as "
            "proposals by this pass: write it first, then caption its boxes in a second run"
        )
    return out


def resolve_prompt(cfg: RecaptionConfig) -> Prompt:
    default = DEFAULTS["global"] if cfg.task == "global" else DEFAULTS[cfg.region_mode]
    return load_prompt(cfg.prompt or default)


def layer_name(cfg: RecaptionConfig) -> str:
    return cfg.layer or (f"recap-{cfg.task}" if cfg.task == "global" else f"recap-regions-{cfg.region_mode}")


def sampling(cfg: RecaptionConfig) -> SamplingParams:
    return SamplingParams(
        cfg.max_tokens, cfg.temperature, cfg.top_p, extra=tuple(sorted(cfg.extra_body.items()))
    )


def make_task(cfg: RecaptionConfig, model: str) -> Task:
    s = TaskSettings(
        model=model,
        sampling=sampling(cfg),
        seed=cfg.seed,
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
        "model_family": cfg.model_family,
        "prompt_id": p.id,
        "prompt_text": p.text,
        "sampling": {
            "max_tokens": cfg.max_tokens,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            **({"seed": cfg.seed} if cfg.seed is not None else {}),
            **({"extra": cfg.extra_body} if cfg.extra_body else {}),
        },
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
    """Call with the layer's lease held (engine/lease.py): then check-then-write is safe."""
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


def select_shards(dataset: Dataset, cfg: RecaptionConfig) -> list[str]:
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


def plan_tasks(dataset: Dataset, cfg: RecaptionConfig, report: RecaptionReport) -> list[ShardTask]:
    """The shards to caption (``shard``) and, with ``retry_failed``, the committed ones with
    failed rows to redo (``retry``). In proposals mode a shard waits until the proposals layer
    has committed it (``report.shards_waiting``)."""
    layer = dataset.layer(layer_name(cfg))
    if not layer.store.is_local:
        layer.store.fs.invalidate_cache()
    shards = select_shards(dataset, cfg)
    report.shards_planned = len(shards)
    committed = set(layer.committed())
    proposals = cfg.task == "regions" and cfg.region_mode == "proposals"
    prop_committed = set(dataset.layer(cfg.proposals_layer).committed()) if proposals else None
    todo: list[ShardTask] = []
    for s in shards:
        if prop_committed is not None and s not in prop_committed:
            report.shards_waiting.append(s)
            continue
        if s in committed:
            report.shards_skipped += 1
            if cfg.retry_failed and layer.read_stats(s).failed > 0:
                todo.append(ShardTask(s, "retry"))
            continue
        todo.append(ShardTask(s, "shard"))
    return todo


def plan_pass(
    dataset: Dataset, cfgs: list[RecaptionConfig], reports: list[RecaptionReport]
) -> list[ShardTask]:
    """One unit per shard for a multi-layer pass: ``payload`` lists ``(layer index, "shard" or
    "retry")`` for the layers that want the shard (each layer planned by :func:`plan_tasks`), so
    a shard's images are read once for all of them and a layer that committed it is left alone."""
    want: dict[str, list[tuple[int, str]]] = {}
    order: list[str] = []
    for i, (c, rep) in enumerate(zip(cfgs, reports, strict=True)):
        for t in plan_tasks(dataset, c, rep):
            if t.shard not in want:
                want[t.shard] = []
                order.append(t.shard)
            want[t.shard].append((i, t.kind))
    return [ShardTask(s, "shard", want[s]) for s in sorted(order)]


def retry_extra(old: LayerStats, new: dict[str, Any]) -> dict[str, Any]:
    """The counters of a shard after a ``--retry-failed`` round: usage (requests, tokens,
    retries, cache hits) accumulates over the rounds; the rest is the last round's."""
    out = dict(new)
    for k in (
        "requests",
        "retries",
        "transport_retries",
        "answer_retries",
        "prompt_tokens",
        "completion_tokens",
        "cache_hits",
    ):
        out[k] = int(old.extra.get(k, 0) or 0) + int(new.get(k, 0) or 0)
    out["retry_rounds"] = int(old.extra.get("retry_rounds", 0) or 0) + 1
    return out


def dry_run(dataset: Dataset, cfg: RecaptionConfig) -> dict[str, Any]:
    """What a run with ``cfg`` would do, from the dataset's metadata alone: shards to caption,
    retry, skip or wait for; images; requests to send; response-cache hits expected (images
    whose sha256 repeats among those to send); completion tokens (at most ``max_tokens`` per
    request; the layer's measured mean per request when it has committed shards). Contacts no
    endpoint and writes nothing (no lease, no ``layer.json``)."""
    import pyarrow.parquet as pq

    from engine.schemas import STATUS_SUCCESS

    resolve_prompt(cfg)  # a clear error now if the prompt is unknown
    report = RecaptionReport(dataset=dataset.root, layer=layer_name(cfg))
    layer = dataset.layer(report.layer)
    todo = plan_tasks(dataset, cfg, report)
    proposals = cfg.task == "regions" and cfg.region_mode == "proposals"
    images = requests = hits = 0
    seen: set[str] = set()
    for t in todo:
        with dataset.shards.open(f"{t.shard}.parquet") as f:
            rows = pq.read_table(f, columns=["key", "status", "sha256"]).to_pylist()
        keys = {r["key"] for r in rows if r["status"] == STATUS_SUCCESS}
        if t.kind == "retry":  # only the failed rows that a retry redoes
            with layer.store.open(layer.parquet(t.shard)) as f:
                old = pq.read_table(f, columns=["key", "status", "error"]).to_pylist()
            keys &= {
                r["key"]
                for r in old
                if r["status"] != "ok" and not str(r.get("error")).startswith(("image not", "upstream"))
            }
        boxes: dict[str, int] = {}
        if proposals:
            p = dataset.layer(cfg.proposals_layer)
            with p.store.open(p.parquet(t.shard)) as f:
                boxes = {
                    r["key"]: len(r["regions"] or []) if r["status"] == "ok" else 0
                    for r in pq.read_table(f, columns=["key", "status", "regions"]).to_pylist()
                }
        for r in rows:
            if r["key"] not in keys:
                continue
            images += 1
            n = boxes.get(r["key"], 0) if proposals else 1
            sha = r.get("sha256")
            if sha is not None and not proposals and t.kind == "shard" and sha in seen:
                hits += 1
                continue
            if sha is not None:
                seen.add(sha)
            requests += n
    measured = None
    done = layer.committed()
    if done:
        st = [layer.read_stats(s).extra for s in done]
        req = sum(int(x.get("requests", 0) or 0) for x in st)
        if req:
            measured = sum(int(x.get("completion_tokens", 0) or 0) for x in st) / req
    return {
        "dataset": dataset.root,
        "layer": report.layer,
        "task": cfg.task if cfg.task == "global" else f"regions ({cfg.region_mode})",
        "shards_planned": report.shards_planned,
        "shards_to_caption": sum(1 for t in todo if t.kind == "shard"),
        "shards_to_retry": sum(1 for t in todo if t.kind == "retry"),
        "shards_already_committed": report.shards_skipped,
        "shards_waiting": list(report.shards_waiting),
        "images": images,
        "requests": requests,
        "cache_hits_expected": hits,
        "completion_tokens_max": requests * cfg.max_tokens,
        "completion_tokens_per_request_measured": round(measured, 1) if measured is not None else None,
        "completion_tokens_estimated": round(requests * measured) if measured is not None else None,
    }
