"""``finevit filter``: a list of filters over a dataset, written as a keep/drop layer.

Driver (:func:`filter_dataset`):

1. check the config (every filter built once on the driver: a bad parameter or a missing
   library stops here), the ``--on`` layers (one caption layer, one region layer) and the
   filter layer's ``layer.json`` (a rerun must use the same filters);
2. pick the shards: committed image shards that every ``--on`` layer has committed; the others
   are reported and skipped with a reason;
3. pass 1 (only with duplicate filters or an alignment percentile): per shard on Ray, the
   signature / score layers that are not committed yet (:mod:`filtering.dedup`,
   :mod:`filtering.align`); then, on the driver, DuckDB finds the duplicate clusters and the
   alignment cut over the whole dataset;
4. pass 2: per shard on Ray (:func:`filter_shard`), every filter over every row, written with
   the one layer writer (Parquet moved into place, ``_stats.json`` with per-filter counters
   last). A rerun skips committed shards, so a killed run resumes, each shard exactly once;
   the global pass is recomputed (it is deterministic: same signatures, same clusters).

The layer: ``key, keep, reasons: list<string>`` plus each filter's score columns. Nothing is
deleted; the trainer (``data.filters``) and the audit read the keep mask.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.config import ConfigError, StorageConfig
from engine.layout import Dataset, LayerDir, LayoutError, sample_digits
from engine.lease import Lease
from engine.schemas import FILTER_BASE_SCHEMA
from engine.shards import Progress, StageReport, run_shard_tasks
from filtering.align import ALIGN_SCHEMA, AlignmentFilter, alignment_cut
from filtering.base import Filter, Sample
from filtering.batch import Batch
from filtering.config import FilterRunConfig, FilterStageConfig, build_filters
from filtering.dedup import (
    ExactDupImageFilter,
    NearDupCaptionFilter,
    NearDupImageFilter,
    exact_image_dups,
    near_caption_dups,
    near_image_dups,
    phash_int,
    phash_schema,
)
from filtering.text import caption_problem

META_COLUMNS = [
    "key",
    "status",
    "error_message",
    "width",
    "height",
    "original_width",
    "original_height",
    "sha256",
]
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass(kw_only=True)
class FilterReport(StageReport):
    dataset: str
    layer: str
    kept: int = 0
    dropped: int = 0
    by_filter: Counter = field(default_factory=Counter)  # filter name -> rows it drops
    shards_missing: dict[str, str] = field(default_factory=dict)  # shard -> why it was skipped
    hash_shards_written: int = 0


# ---------------------------------------------------------------- what to run


def _layer_kind(ds: Dataset, name: str) -> str:
    layer = ds.layer(name)
    info = layer.info() or {}
    kind = info.get("kind")
    if kind in ("caption", "regions"):
        return kind
    committed = layer.committed()
    if not committed:
        raise LayoutError(f"layer {name!r} has no committed shards at {layer.store.root}")
    with layer.store.open(layer.parquet(committed[0])) as f:
        names = pq.read_schema(f).names
    if "regions" in names:
        return "regions"
    if "caption" in names:
        return "caption"
    raise LayoutError(f"layer {name!r} is neither a caption layer nor a region layer (columns {names})")


def resolve_on(ds: Dataset, on: list[str], filters: list[Filter]) -> dict[str, str | None]:
    """``{"caption": layer|None, "regions": layer|None}`` from ``--on``; errors name the problem."""
    out: dict[str, str | None] = {"caption": None, "regions": None}
    for name in on:
        kind = _layer_kind(ds, name)
        if out[kind] is not None:
            raise ConfigError(
                f"--on: two {kind} layers ({out[kind]!r}, {name!r}); give one of each kind at most"
            )
        out[kind] = name
    for f in filters:
        if (f.needs == "caption" or isinstance(f, NearDupCaptionFilter)) and out["caption"] is None:
            raise ConfigError(f"filter {f.name!r} reads captions: give a caption layer with --on")
        if f.needs == "regions" and out["regions"] is None:
            raise ConfigError(f"filter {f.name!r} reads regions: give a region layer with --on")
    return out


def layer_info(st: FilterStageConfig, on: dict[str, str | None], filters: list[Filter]) -> dict[str, Any]:
    return {
        "kind": "filter",
        "stage": "filter",
        "on": on,
        "filters": [f.model_dump() for f in st.filters],
        "score_columns": list(score_schema(filters).names),
    }


def check_or_write_info(layer: LayerDir, info: dict[str, Any]) -> None:
    old = layer.info()
    if old is None:
        layer.write_info(info)
        return
    for k in ("on", "filters"):
        if old.get(k) != info.get(k):
            raise LayoutError(
                f"filter layer {layer.name!r} was written with other {k} ({old.get(k)!r}); "
                "a layer holds one filter config: choose another --layer name"
            )


def score_schema(filters: list[Filter]) -> pa.Schema:
    fields = []
    for f in filters:
        fields += [pa.field(n, t) for n, t in f.score_columns().items()]
    return pa.schema(fields)


def layer_schema(filters: list[Filter]) -> pa.Schema:
    return pa.schema([*FILTER_BASE_SCHEMA, *score_schema(filters)])


# ---------------------------------------------------------------- applying filters


BATCH_ROWS = 16384  # rows per batch: large enough for the column code, small enough for the cache


def apply_filters(filters: list[Filter], samples: list[Sample]) -> tuple[pa.Table, dict[str, Any]]:
    """Every filter over every sample: the layer table and the per-filter counters.

    Batches of :data:`BATCH_ROWS` rows; in each, one :meth:`Filter.check_batch` per filter
    (the caption filters see only the rows with a usable caption, checked once first). A row
    keeps every reason, in filter order."""
    schema = layer_schema(filters)
    reads_captions = any(f.needs == "caption" for f in filters)
    checked: Counter = Counter()
    dropped: Counter = Counter()
    reasons_all: Counter = Counter()
    parts = []
    for lo in range(0, len(samples), BATCH_ROWS):
        chunk = samples[lo : lo + BATCH_ROWS]
        parts.append(_apply_batch(filters, chunk, schema, reads_captions, checked, dropped, reasons_all))
    table = pa.concat_tables(parts) if parts else schema.empty_table()
    kept = int(pc.sum(table.column("keep")).as_py() or 0) if len(table) else 0
    names = (["caption"] if reads_captions else []) + [f.name for f in filters]
    stats = {
        "kept": kept,
        "dropped": len(samples) - kept,
        "filters": {n: {"checked": checked[n], "dropped": dropped[n]} for n in names},
        "drop_reasons": dict(reasons_all.most_common(50)),
    }
    if reads_captions:
        stats["filters"]["caption"]["checked"] = len(samples)
    return table, stats


def _apply_batch(
    filters: list[Filter],
    samples: list[Sample],
    schema: pa.Schema,
    reads_captions: bool,
    checked: Counter,
    dropped: Counter,
    reasons_all: Counter,
) -> pa.Table:
    n = len(samples)
    pairs: list[tuple[int, int, str]] = []  # (row, filter position, reason)
    if reads_captions:
        bad = [caption_problem(s) for s in samples]
        pairs += [(i, -1, r) for i, r in enumerate(bad) if r is not None]
        dropped["caption"] += len(pairs)
        cap_rows = np.fromiter((i for i, r in enumerate(bad) if r is None), np.int64)
    else:
        cap_rows = np.arange(n)
    whole = Batch(samples)
    caps = whole if len(cap_rows) == n else Batch([samples[i] for i in cap_rows])
    scores: dict[str, pa.Array] = {}
    for pos, f in enumerate(filters):
        on_caps = f.needs == "caption"
        b, rows = (caps, cap_rows) if on_caps else (whole, None)
        if not len(b):
            continue
        v = f.check_batch(b)
        checked[f.name] += len(b)
        dropped[f.name] += len(v.reasons)
        pairs += [(int(rows[j]) if on_caps else j, pos, r) for j, r in v.reasons.items()]
        types = f.score_columns()
        for name, col in v.scores.items():
            if name not in types:
                continue
            arr = _to_arrow(col, types[name])
            if on_caps and len(cap_rows) != n:  # spread over all rows: null where no caption
                where = np.full(n, -1, np.int64)
                where[cap_rows] = np.arange(len(cap_rows))
                arr = arr.take(pa.array(where, mask=where < 0))
            scores[name] = arr if name not in scores or not on_caps else _overlay(scores[name], arr, cap_rows)
    pairs.sort(key=lambda p: (p[0], p[1]))
    reasons_all.update(r for _, _, r in pairs)
    counts = np.bincount(np.fromiter((p[0] for p in pairs), np.int64, len(pairs)), minlength=n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    reasons = pa.ListArray.from_arrays(pa.array(offsets), pa.array([p[2] for p in pairs], pa.string()))
    cols: dict[str, pa.Array] = {
        "key": pa.array([s.key for s in samples], pa.string()),
        "keep": pa.array(counts == 0),
        "reasons": reasons,
    }
    for fld in schema:
        if fld.name not in cols:
            cols[fld.name] = scores.get(fld.name, pa.nulls(n, fld.type))
    return pa.table([cols[f.name] for f in schema], schema=schema)


def _to_arrow(col: Any, typ: pa.DataType) -> pa.Array:
    if isinstance(col, np.ma.MaskedArray):
        return pa.array(col.data, mask=np.ma.getmaskarray(col)).cast(typ)
    if isinstance(col, np.ndarray):
        return pa.array(col).cast(typ)
    return pa.array(col, typ)


def _overlay(old: pa.Array, new: pa.Array, rows: np.ndarray) -> pa.Array:
    """A later filter's score column wins on the rows it scored (as a dict update would)."""
    mask = np.zeros(len(old), bool)
    mask[rows] = True
    return pc.if_else(pa.array(mask), new, old)


def _read(store: Any, rel: str, want: list[str]) -> dict[str, list[Any]]:
    with store.open(rel) as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in want if c in pf.schema_arrow.names]
        return pf.read(columns=cols).to_pydict()


def shard_samples(ds: Dataset, shard: str, on: dict[str, str | None]) -> list[Sample]:
    """One :class:`Sample` per row of the image shard, joined by key with the ``--on`` layers."""
    meta = _read(ds.shards, f"{shard}.parquet", META_COLUMNS)
    n = len(meta["key"])
    samples = [Sample(key=meta["key"][i], meta={c: meta[c][i] for c in meta}) for i in range(n)]
    by_key = {s.key: s for s in samples}
    if on.get("caption"):
        lay = ds.layer(on["caption"])
        c = _read(
            lay.store, lay.parquet(shard), ["key", "caption", "status", "error", "finish_reason", "n_tokens"]
        )
        seen = set()
        for i, key in enumerate(c["key"]):
            s = by_key.get(key)
            if s is None:
                continue
            seen.add(key)
            s.caption = c["caption"][i] if "caption" in c else None
            s.caption_status = c["status"][i] if "status" in c else "ok"
            s.caption_error = c["error"][i] if "error" in c else None
            s.finish_reason = c["finish_reason"][i] if "finish_reason" in c else None
            s.n_tokens = c["n_tokens"][i] if "n_tokens" in c else None
        for s in samples:
            if s.key not in seen:
                s.caption_status, s.caption_error = "failed", f"no row in caption layer {on['caption']!r}"
    if on.get("regions"):
        lay = ds.layer(on["regions"])
        r = _read(lay.store, lay.parquet(shard), ["key", "regions", "status"])
        for s in samples:
            s.regions_status = "failed"
        for i, key in enumerate(r["key"]):
            s = by_key.get(key)
            if s is not None:
                s.regions = r["regions"][i]
                s.regions_status = r["status"][i] if "status" in r else "ok"
    return samples


def filter_shard(
    root: str,
    storage: StorageConfig,
    st: FilterStageConfig,
    on: dict[str, str | None],
    shard: str,
    dups: dict[str, dict[str, str]],
    cuts: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """Filter one shard and commit its layer shard; returns its stats (``LayerStats.to_dict()``).

    ``dups``: the global pass's verdicts for this shard's keys (key -> filter name -> reason);
    ``cuts``: the global pass's score cuts (filter name -> cut)."""
    from engine.layers import write_layer_shard

    started = time.time()
    ds = Dataset(root, storage)
    filters = build_filters(st)
    samples = shard_samples(ds, shard, on)
    for s in samples:
        d = dups.get(s.key)
        if d:
            s.cache["dups"] = d
    for f in filters:
        if isinstance(f, AlignmentFilter) and f.drop_percentile is not None:
            # pass 1 scored every shard: read this one's scores back, apply the global cut
            lay = ds.layer(f.layer_name(on["caption"] or ""))
            got = _read(lay.store, lay.parquet(shard), ["key", "align_score", "status"])
            ok = zip(got["key"], got["align_score"], got["status"], strict=True)
            scores = {k: v for k, v, status in ok if status == "ok" and v is not None}
            for s in samples:
                if s.key in scores:
                    s.cache["align"] = scores[s.key]
            f.cut = (cuts or {}).get(f.name)
            continue
        prepare = getattr(f, "prepare", None)
        if prepare is not None:
            with ds.shards.open(f"{shard}.tar") as tar:
                prepare(tar, samples)
    table, extra = apply_filters(filters, samples)
    layer = ds.layer(st.layer or "")
    with layer.store.staging(f"filter-{shard}") as staging:
        stats = write_layer_shard(layer, shard, table, table.schema, staging, started, extra)
    return stats.to_dict()


# ---------------------------------------------------------------- pass 1: signatures


def _iter_images(ds: Dataset, shard: str):
    import io
    import tarfile

    from PIL import Image

    with ds.shards.open(f"{shard}.tar") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            key, _, ext = m.name.rpartition("/")[2].partition(".")
            if m.isfile() and ext.lower() in IMAGE_EXTS:
                data = tar.extractfile(m).read()
                try:
                    yield key, Image.open(io.BytesIO(data)), None
                except Exception as e:
                    yield key, None, f"image not decodable: {type(e).__name__}: {e}"


def hash_shard(root: str, storage: StorageConfig, shard: str, jobs: dict[str, Any]) -> dict[str, int]:
    """Write the signature / score layer shards in ``jobs`` (``{"phash": (layer, bits)}``, ``{"minhash":
    (layer, caption layer, filter)}``, ``{"align": (layer, caption layer, filter)}``) for one
    shard; returns rows written per layer."""
    from engine.layers import write_layer_shard

    ds = Dataset(root, storage)
    keys = _read(ds.shards, f"{shard}.parquet", ["key", "status"])
    out: dict[str, int] = {}
    if "phash" in jobs:
        started = time.time()
        layer_name, bits = jobs["phash"]
        layer = ds.layer(layer_name)
        ok = {k for k, s in zip(keys["key"], keys["status"], strict=True) if s == "success"}
        got: dict[str, dict[str, Any]] = {}
        for key, img, err in _iter_images(ds, shard):
            if key not in ok:
                continue
            if img is None:
                got[key] = {"key": key, "phash": None, "status": "failed", "error": err}
            else:
                try:
                    got[key] = {"key": key, "phash": phash_int(img, bits), "status": "ok", "error": None}
                except Exception as e:
                    got[key] = {
                        "key": key,
                        "phash": None,
                        "status": "failed",
                        "error": f"{type(e).__name__}: {e}",
                    }
        rows = [
            got.get(k) or {"key": k, "phash": None, "status": "failed", "error": "image not available"}
            for k in keys["key"]
        ]
        with layer.store.staging(f"phash-{shard}") as staging:
            write_layer_shard(layer, shard, rows, phash_schema(bits), staging, started, {"hash": "phash"})
        out[layer_name] = len(rows)
    if "minhash" in jobs:
        started = time.time()
        name, cap_layer, flt = jobs["minhash"]
        layer = ds.layer(name)
        lay = ds.layer(cap_layer)
        c = _read(lay.store, lay.parquet(shard), ["key", "caption", "status"])
        caps = {
            k: (c["caption"][i] if "caption" in c else None, c["status"][i] if "status" in c else "ok")
            for i, k in enumerate(c["key"])
        }
        items = [(k, *caps.get(k, (None, "failed"))) for k in keys["key"]]
        rows = flt.hasher.rows_for(items)
        with layer.store.staging(f"minhash-{shard}") as staging:
            write_layer_shard(layer, shard, rows, flt.hasher.schema(), staging, started, {"hash": "minhash"})
        out[name] = len(rows)
    if "align" in jobs:
        started = time.time()
        name, cap_layer, flt = jobs["align"]
        layer = ds.layer(name)
        samples = shard_samples(ds, shard, {"caption": cap_layer, "regions": None})
        with ds.shards.open(f"{shard}.tar") as tar:
            rows = flt.score_rows(tar, samples)
        with layer.store.staging(f"align-{shard}") as staging:
            write_layer_shard(layer, shard, rows, ALIGN_SCHEMA, staging, started, {"score": "alignment"})
        out[name] = len(rows)
    return out


# ---------------------------------------------------------------- driver


def _fresh(store: Any) -> None:
    if not store.is_local:
        store.fs.invalidate_cache()


def _shard_of(key: str, digits: int) -> int:
    return int(key[:-digits]) if digits else int(key)


def global_dups(
    ds: Dataset, storage: StorageConfig, shards: list[str], filters: list[Filter], on: dict[str, str | None]
) -> dict[int, dict[str, dict[str, str]]]:
    """The duplicate filters' verdicts over the whole dataset: shard -> key -> filter -> reason."""
    from engine.audit.views import connect

    con = connect(storage, s3=not ds.store.is_local)
    if not ds.store.is_local:  # the workers wrote the signature layers: forget cached listings
        from engine.store import s3_filesystem

        s3_filesystem(storage).invalidate_cache()
        _fresh(ds.store)
    found: dict[str, dict[str, str]] = defaultdict(dict)
    exact: dict[str, str] = {}
    for f in filters:
        if isinstance(f, ExactDupImageFilter):
            exact = exact_image_dups(con, [ds.shard_parquet(s) for s in shards])
            for k, r in exact.items():
                found[k][f.name] = r
    for f in filters:
        if isinstance(f, NearDupImageFilter):
            lay = ds.layer(f.layer_name)
            near = near_image_dups(
                con, [lay.store.uri(lay.parquet(s)) for s in shards], f.max_distance, set(exact), f.hash_bits
            )
            for k, r in near.items():
                found[k][f.name] = r
        elif isinstance(f, NearDupCaptionFilter):
            lay = ds.layer(f.layer_name(on["caption"] or ""))
            near = near_caption_dups(
                con, [lay.store.uri(lay.parquet(s)) for s in shards], f.hasher, f.threshold
            )
            for k, r in near.items():
                found[k][f.name] = r
    con.close()
    digits = sample_digits(ds.samples_per_shard)
    out: dict[int, dict[str, dict[str, str]]] = defaultdict(dict)
    for k, v in found.items():
        out[_shard_of(k, digits)][k] = v
    return out


def filter_dataset(
    dataset_root: str,
    cfg: FilterRunConfig,
    progress: bool | None = None,
    on_event: Any = None,
) -> FilterReport:
    """Filter every usable shard of ``dataset_root`` into ``cfg.filter.layer``; resumable, exactly once."""
    st = cfg.filter
    say = on_event or (lambda _m: None)
    t0 = time.time()
    if not st.layer:
        raise ConfigError("filter.layer: give the filter layer's name (--layer NAME)")
    storage = cfg.storage.resolved()
    ds = Dataset(dataset_root, storage)
    ds.manifest  # noqa: B018 - a clear error now if there is no dataset
    filters = build_filters(st)
    on = resolve_on(ds, st.on, filters)
    report = FilterReport(dataset=ds.root, layer=st.layer)
    layer = ds.layer(st.layer)
    if st.layer in st.on:
        raise ConfigError(f"--layer {st.layer!r} is also an --on layer: name the filter layer something else")
    check_or_write_info(layer, layer_info(st, on, filters))
    layer.store.makedirs()
    # one writer per layer (engine/lease.py): a second run on this layer would clear our staging
    with Lease(layer.store, st.layer) as lease:
        layer.store.clear_staging()
        return _filter_layer(cfg, ds, storage, filters, on, report, layer, lease, progress, say, t0)


def _filter_layer(
    cfg: FilterRunConfig,
    ds: Dataset,
    storage: Any,
    filters: list[Any],
    on: dict[str, str | None],
    report: FilterReport,
    layer: Any,
    lease: Lease,
    progress: bool | None,
    say: Any,
    t0: float,
) -> FilterReport:
    import ray

    from engine.runtime import init_ray

    st = cfg.filter
    shards = ds.committed_shards()
    for name in [n for n in on.values() if n]:
        lay = ds.layer(name)
        _fresh(lay.store)
        done = set(lay.committed())
        for s in shards:
            if s not in done and s not in report.shards_missing:
                report.shards_missing[s] = f"layer {name!r} has not committed this shard"
    usable = [s for s in shards if s not in report.shards_missing]
    if report.shards_missing:
        say(f"{len(report.shards_missing)} shard(s) skipped: an --on layer has not committed them")
    report.shards_planned = len(usable)
    _fresh(layer.store)
    committed = set(layer.committed())
    todo = [s for s in usable if s not in committed]
    report.shards_skipped = len(usable) - len(todo)
    if not todo:
        report.seconds = time.time() - t0
        return report

    init_ray(cfg.ray)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    in_flight = st.workers or max(2 * cpus, 1)

    # pass 1: signature layers, then the global view
    jobs: dict[str, dict[str, Any]] = defaultdict(dict)
    for f in filters:
        if isinstance(f, NearDupImageFilter):
            lay = ds.layer(f.layer_name)
            lay.write_info({"kind": "signatures", "stage": "filter", "hash": "phash", "bits": f.hash_bits})
            _fresh(lay.store)
            have = set(lay.committed())
            for s in usable:
                if s not in have:
                    jobs[s]["phash"] = (f.layer_name, f.hash_bits)
        elif isinstance(f, NearDupCaptionFilter):
            name = f.layer_name(on["caption"] or "")
            lay = ds.layer(name)
            h = f.hasher
            lay.write_info(
                {
                    "kind": "signatures",
                    "stage": "filter",
                    "hash": "minhash",
                    "on": on["caption"],
                    "num_perm": h.num_perm,
                    "bands": h.bands,
                    "rows": h.rows,
                    "ngram": h.ngram,
                    "seed": h.seed,
                }
            )
            _fresh(lay.store)
            have = set(lay.committed())
            for s in usable:
                if s not in have:
                    jobs[s]["minhash"] = (name, on["caption"], f)
        elif isinstance(f, AlignmentFilter) and f.drop_percentile is not None:
            name = f.layer_name(on["caption"] or "")
            lay = ds.layer(name)
            info = {"kind": "signatures", "stage": "filter", "score": "alignment", "on": on["caption"]}
            lay.write_info({**info, "checkpoint": f.checkpoint})
            _fresh(lay.store)
            have = set(lay.committed())
            for s in usable:
                if s not in have:
                    jobs[s]["align"] = (name, on["caption"], f)
    has_global = any(f.needs == "global" for f in filters)
    cuts: dict[str, float | None] = {}
    dups: dict[int, dict[str, dict[str, str]]] = {}
    if jobs:
        hash_task = ray.remote(num_cpus=st.task_cpus)(hash_shard)
        failed_hash: dict[str, str] = {}

        def on_hash_done(s: str, out: dict[str, int]) -> None:
            report.hash_shards_written += 1

        def on_hash_error(s: str, e: BaseException) -> None:
            failed_hash[s] = report.shard_failed(s, e)

        run_shard_tasks(
            sorted(jobs),
            lambda s: hash_task.remote(ds.root, storage, s, jobs[s]),
            on_hash_done,
            max_in_flight=in_flight,
            on_error=on_hash_error,
            progress=Progress(
                "filter: signatures", unit="shard", total=len(jobs), enabled=_progress(st, progress)
            ),
        )
        if failed_hash:
            say(f"{len(failed_hash)} shard(s) failed computing signatures: no duplicate pass, no filtering")
            report.seconds = time.time() - t0
            return report
    if has_global:
        dups = global_dups(ds, storage, usable, filters, on)
    for f in filters:
        if isinstance(f, AlignmentFilter) and f.drop_percentile is not None:
            from engine.audit.views import connect

            lay = ds.layer(f.layer_name(on["caption"] or ""))
            _fresh(lay.store)
            con = connect(storage, s3=not ds.store.is_local)
            files = [lay.store.uri(lay.parquet(s)) for s in usable]
            cuts[f.name] = alignment_cut(con, files, f.drop_percentile)
            con.close()
            say(f"alignment: the lowest {f.drop_percentile:g} % of scores is below {cuts[f.name]}")

    if lease.lost:
        raise LayoutError(f"lost the lease of layer {st.layer!r} (another run took it over): stopping")
    # pass 2: the filter layer
    task = ray.remote(num_cpus=st.task_cpus)(filter_shard)
    total = sum(ds.shard_stats(s).count for s in todo)
    bar = Progress(f"filter {st.layer}", unit="row", total=total, enabled=_progress(st, progress))

    def on_done(s: str, stats: dict[str, Any]) -> None:
        report.shards_written += 1
        n = int(stats.get("count", 0))
        report.add_rows(n, n, {})
        report.kept += int(stats.get("kept", 0))
        report.dropped += int(stats.get("dropped", 0))
        for name, c in (stats.get("filters") or {}).items():
            report.by_filter[name] += int(c.get("dropped", 0))
        report.reasons.update({k: int(v) for k, v in (stats.get("drop_reasons") or {}).items()})
        bar.update(n, kept=report.kept, dropped=report.dropped)

    def on_error(s: str, e: BaseException) -> None:
        say(f"shard {s} failed: {report.shard_failed(s, e)}")

    run_shard_tasks(
        todo,
        lambda s: task.remote(ds.root, storage, st, on, s, dups.get(int(s), {}), cuts),
        on_done,
        max_in_flight=in_flight,
        on_error=on_error,
        progress=bar,
    )
    report.seconds = time.time() - t0
    return report


def _progress(st: FilterStageConfig, progress: bool | None) -> bool:
    return st.progress if progress is None else progress
