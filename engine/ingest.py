"""``finevit ingest SOURCE OUTPUT``: any image source -> img2dataset-format shards, exactly once.

The driver streams the source's shard plan and keeps a bounded number of Ray tasks in
flight (one task = one shard). A task stages its files locally, commits the source's
layers, moves the tar and Parquet into place and writes ``<shard>_stats.json`` last. A
rerun skips committed shards, so a run killed at any moment and started again ends with
every input exactly once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from engine.config import FineVitConfig, IngestConfig
from engine.layout import (
    MANIFEST,
    STATS_SUFFIX,
    Dataset,
    LayoutError,
    code_version,
    commit_parts,
    shard_name,
)
from engine.lease import Lease
from engine.shards import Progress, ShardTask, StageReport, run_shard_tasks
from engine.sources import open_source
from engine.sources.base import Source
from engine.stats import ShardStats, current_node
from engine.store import Store


@dataclass(kw_only=True)
class IngestReport(StageReport):
    output: str
    source: str
    registered_only: bool = False

    @property
    def successes(self) -> int:
        """img2dataset's name for the rows that are ok."""
        return self.ok

    @property
    def images_per_second(self) -> float:
        return self.rows_per_second

    def add(self, stats: ShardStats) -> None:
        self.add_rows(stats.count, stats.successes, stats.reasons)


# ---------------------------------------------------------------- worker side (one task = one shard)


def ingest_shard(
    source: Source,
    payload: Any,
    shard_index: int,
    shards: Store,
    layers_root: Store,
    cfg: IngestConfig,
) -> ShardStats:
    """Build one shard in a staging folder and commit it. Returns its stats."""
    import pyarrow as pa

    from engine.layers import write_layer_shard
    from engine.layout import LayerDir
    from engine.schemas import LAYER_SCHEMAS
    from engine.shard_writer import write_shard

    name = shard_name(shard_index)
    started = time.time()
    label = source.kind
    with shards.staging(f"shard-{name}") as staging:
        layer_rows: dict[str, list[dict[str, Any]]] = {spec.name: [] for spec in source.layers}
        if source.downloads:
            from engine.download import download_shard

            download_shard(list(payload), shard_index, staging, label, cfg.samples_per_shard, cfg)
            _check_row_count(os.path.join(staging, f"{name}.parquet"), len(payload))
            i2d_stats = f"{name}{STATS_SUFFIX}"
            stats = ShardStats.read(Store(staging), i2d_stats)
            os.unlink(os.path.join(staging, i2d_stats))  # replaced by our stats, written last at commit
            stats.code_version = code_version()
        else:

            def collect(key: str, raw: Any) -> None:
                for layer, row in raw.layers.items():
                    layer_rows[layer].append({"key": key, **row})

            rows = source.build_shard(payload, shard_index, staging, cfg, collect)
            if rows is None:  # the usual path: decode every sample, number the keys
                rows = write_shard(
                    source.read(payload),
                    shard_index,
                    cfg.samples_per_shard,
                    staging,
                    label,
                    cfg.image,
                    collect,
                )
            stats = ShardStats.from_rows(rows, started, code_version=code_version())
        stats.shard, stats.source, stats.kind = name, source.uri, source.kind
        stats.node = current_node()  # img2dataset's own stats (the download path) know no node
        # layers first, the image shard's marker last: a shard is visible only when all of it is
        for spec in source.layers:
            layer = LayerDir(layers_root.child(spec.name), spec.name)
            table = pa.Table.from_pylist(layer_rows[spec.name], schema=LAYER_SCHEMAS[spec.kind])
            write_layer_shard(layer, name, table, LAYER_SCHEMAS[spec.kind], staging, started)
        _commit_image_shard(shards, name, staging, stats)
    return stats


def _commit_image_shard(shards: Store, name: str, folder: str, stats: ShardStats) -> None:
    """Move ``<name>.tar`` and ``<name>.parquet`` from ``folder`` into place, then the marker."""
    tar, parquet = os.path.join(folder, f"{name}.tar"), os.path.join(folder, f"{name}.parquet")
    stats.bytes = os.path.getsize(tar)
    commit_parts(shards, {f"{name}.tar": tar, f"{name}.parquet": parquet}, f"{name}{STATS_SUFFIX}", stats)


def _check_row_count(parquet_path: str, expected: int) -> None:
    """img2dataset's downloader logs and drops a sample whose write fails; we refuse to commit
    such a shard (the task fails, Ray retries it) rather than lose a row silently."""
    import pyarrow.parquet as pq

    n = pq.ParquetFile(parquet_path).metadata.num_rows
    if n != expected:
        raise RuntimeError(f"shard has {n} rows for {expected} inputs: refusing to commit it")


def retry_shard(source: Source, shard_index: int, shards: Store, cfg: IngestConfig) -> ShardStats | None:
    """Re-attempt a committed shard's transient failures and rewrite it atomically.

    The commit marker is removed first, so readers never see a half-replaced shard; a kill
    in between leaves the shard uncommitted and a plain rerun rebuilds it from the source.
    """
    from engine.shard_writer import rewrite_failed

    name = shard_name(shard_index)
    started = time.time()
    with shards.staging(f"retry-{name}") as staging:
        src_tar, src_pq = os.path.join(staging, "in.tar"), os.path.join(staging, "in.parquet")
        with open(src_tar, "wb") as f:
            f.write(shards.read_bytes(f"{name}.tar"))
        with open(src_pq, "wb") as f:
            f.write(shards.read_bytes(f"{name}.parquet"))
        out = os.path.join(staging, "out")
        os.makedirs(out)
        result = rewrite_failed(src_tar, src_pq, out, shard_index, source.fetch, cfg.image)
        if result is None:
            return None
        rows, n_retried = result
        old = ShardStats.read(shards, f"{name}{STATS_SUFFIX}")
        stats = ShardStats.from_rows(
            rows,
            started,
            code_version=code_version(),
            shard=name,
            source=old.source or source.uri,
            kind=old.kind or source.kind,
            retried=n_retried,
            retries_total=(old.retries_total or 0) + n_retried,
        )
        shards.rm(f"{name}{STATS_SUFFIX}")  # uncommit first: never a half-replaced shard in view
        _commit_image_shard(shards, name, out, stats)
    return stats


# ---------------------------------------------------------------- driver side


def _source_entry(dataset: Dataset, source: Source, cfg: FineVitConfig) -> dict[str, Any]:
    """Find or add this source in ``dataset.json``; returns its entry (with ``first_shard``)."""
    sps = cfg.ingest.samples_per_shard
    image = cfg.ingest.image.model_dump()
    entry = {**source.describe(), "first_shard": 0, "num_shards": None, "image": image}
    if not dataset.exists():
        dataset.write_manifest(
            {
                "name": os.path.basename(dataset.root.rstrip("/")) or "dataset",
                "samples_per_shard": sps,
                "shard_root": "shards",
                "sources": [entry],
                "created_by": f"finevit {code_version()}",
                "created_at": time.time(),
            }
        )
        return entry
    m = dict(dataset.manifest)
    if int(m["samples_per_shard"]) != sps:
        raise LayoutError(
            f"{dataset.root} was ingested with samples_per_shard={m['samples_per_shard']}; rerun with "
            f"--samples-per-shard {m['samples_per_shard']} (keys depend on it) or choose another OUTPUT"
        )
    sources = list(m.get("sources", []))
    for e in sources:
        if e["uri"] == source.uri:
            if e.get("image") != image:
                raise LayoutError(
                    f"{source.uri} was ingested into {dataset.root} with image settings {e.get('image')}; "
                    f"resuming with different ones ({image}) would mix two formats in one dataset"
                )
            return e
    if sources and source.keeps_keys:
        raise LayoutError(
            f"{source.uri} keeps its own keys ({source.kind}): ingest it into an empty OUTPUT, then add other sources"
        )
    if sources and sources[-1].get("num_shards") is None:
        raise LayoutError(
            f"the ingest of {sources[-1]['uri']} into {dataset.root} has not finished: rerun it before adding another source"
        )
    if sources:
        entry["first_shard"] = sources[-1]["first_shard"] + sources[-1]["num_shards"]
    m["sources"] = sources + [entry]
    dataset.write_manifest(m)
    return entry


def _register_existing(source: Any, dataset: Dataset, report: IngestReport) -> IngestReport:
    info = source.inspect()
    if dataset.exists():
        raise LayoutError(
            f"{dataset.root} already holds a dataset; register {source.uri} into an empty OUTPUT"
        )
    same = Store(source.uri).root == dataset.store.root or info["shard_root"].startswith(
        dataset.store.root + "/"
    )
    shard_root = (
        os.path.relpath(info["shard_root"], dataset.store.root)
        if same and dataset.store.is_local
        else info["shard_root"]
    )
    if same and not dataset.store.is_local:
        shard_root = info["shard_root"][len(dataset.store.root) :].strip("/") or "."
    dataset.write_manifest(
        {
            "name": os.path.basename(dataset.root.rstrip("/")) or "dataset",
            "samples_per_shard": info["samples_per_shard"],
            "shard_root": shard_root,
            "shard_digits": info["shard_digits"],
            "sources": [{**source.describe(), "first_shard": 0, "num_shards": info["num_shards"]}],
            "created_by": f"finevit {code_version()} (registered an img2dataset output)",
            "created_at": time.time(),
        }
    )
    summary = dataset.summary()
    report.registered_only = True
    report.shards_skipped = summary["shards"]
    report.count, report.ok = summary["count"], summary["successes"]
    report.reasons.update(summary["reasons"])
    return report


def ingest(
    source_uri: str,
    output: str,
    cfg: FineVitConfig | None = None,
    progress: bool = True,
    on_event: Callable[[str], None] | None = None,
) -> IngestReport:
    """Ingest ``source_uri`` into the dataset at ``output``; resumable, exactly once."""
    from engine.sources.existing import ExistingShardsSource

    cfg = cfg or FineVitConfig()
    cfg = cfg.model_copy(update={"storage": cfg.storage.resolved()})
    say = on_event or (lambda _msg: None)
    t0 = time.time()
    source = open_source(source_uri, cfg)
    dataset = Dataset(output, cfg.storage)
    _check_output(dataset)
    report = IngestReport(output=dataset.root, source=source_uri)
    # one writer per dataset: a second ingest into OUTPUT is refused while this one lives (it
    # would clear our staging, and race on dataset.json); a killed run's lease is taken over
    with Lease(dataset.store, dataset.root, ttl=cfg.ingest.lease_ttl, what="dataset") as lease:
        if isinstance(source, ExistingShardsSource):
            return _register_existing(source, dataset, report)
        return _ingest(source, dataset, cfg, report, lease, progress, say, t0)


def _ingest(
    source: Source,
    dataset: Dataset,
    cfg: FineVitConfig,
    report: IngestReport,
    lease: Lease,
    progress: bool,
    say: Callable[[str], None],
    t0: float,
) -> IngestReport:
    import ray

    from engine.runtime import init_ray

    entry = _source_entry(dataset, source, cfg)
    first = int(entry["first_shard"])
    shards = dataset.shards
    shards.makedirs()
    shards.clear_staging()
    for spec in source.layers:
        layer = dataset.layer(spec.name)
        if layer.info() is None:
            layer.write_info({"kind": spec.kind, **spec.info, "source": source.uri})
    committed = set(dataset.committed_shards())
    layers_root = dataset.store.child("layers")

    resources = init_ray(cfg.ray)
    # --workers N: exactly N shards at once. Default: twice the CPUs, so a queued task is ready the
    # moment one ends (Ray still runs one per CPU: each asks for num_cpus=1).
    max_in_flight = cfg.ingest.workers or 2 * max(1, int(resources.get("CPU", 1)))
    # one task per shard; a worker crash or a transient storage error is retried by Ray
    run_shard = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=True)(ingest_shard)
    run_retry = ray.remote(num_cpus=1, max_retries=2, retry_exceptions=True)(retry_shard)
    source_ref = ray.put(source)
    bar = Progress("ingest", enabled=progress)
    n_planned = 0

    def plan() -> Iterator[ShardTask]:
        nonlocal n_planned
        for i, payload in enumerate(source.plan(cfg.ingest.samples_per_shard)):
            if lease.lost:
                raise LayoutError(f"lost the lease of {dataset.root} (another run took it over): stopping")
            n_planned = i + 1
            task = ShardTask(shard_name(first + i), payload=(first + i, payload))
            if task.shard not in committed:
                yield task
                continue
            report.shards_skipped += 1
            if (
                cfg.ingest.retry_failed
                and source.can_fetch
                and dataset.shard_stats(task.shard).has_transient()
            ):
                yield ShardTask(task.shard, "retry", task.payload)

    def submit(task: ShardTask) -> Any:
        index, payload = task.payload
        if task.kind == "retry":
            return run_retry.remote(source_ref, index, shards, cfg.ingest)
        return run_shard.remote(source_ref, payload, index, shards, layers_root, cfg.ingest)

    def on_done(task: ShardTask, stats: ShardStats | None) -> None:
        if task.kind == "retry":
            report.shards_retried += stats is not None
            return
        assert stats is not None
        report.shards_written += 1
        report.add(stats)
        bar.update(stats.count, ok=report.ok, failed=report.failed, shards=report.shards_written)

    def on_error(task: ShardTask, exc: BaseException) -> None:
        say(f"shard {task.shard} failed: {report.shard_failed(task.shard, exc)}")

    try:
        run_shard_tasks(plan(), submit, on_done, max_in_flight=max_in_flight, on_error=on_error, progress=bar)
        report.shards_planned = n_planned
        _finish_entry(dataset, source.uri, n_planned)
    except BaseException:
        if n_planned == 0:
            _forget_unplanned_source(dataset, source.uri, first)
        raise
    finally:
        shards.clear_staging()  # every task has ended: nothing of ours is staged any more
        if dataset.exists():
            write_size_files(dataset)
    report.seconds = time.time() - t0
    return report


def _finish_entry(dataset: Dataset, uri: str, n_planned: int) -> None:
    m = dict(dataset.manifest)
    for e in m["sources"]:
        if e["uri"] == uri and e.get("num_shards") != n_planned:
            e["num_shards"] = n_planned
            dataset.write_manifest(m)
            return


def _check_output(dataset: Dataset) -> None:
    """OUTPUT must be a folder (or not exist yet): a file there, or above it, is bad input."""
    if not dataset.store.is_local:
        return
    path = os.path.abspath(dataset.root)
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    if os.path.isfile(path):
        what = "is a file" if path == os.path.abspath(dataset.root) else f"is inside {path}, which is a file"
        raise LayoutError(f"OUTPUT {dataset.root} {what}: give a folder (new or a FineViT dataset)")


def _forget_unplanned_source(dataset: Dataset, uri: str, first: int) -> None:
    """A source whose plan failed before its first shard (an empty folder, an unreadable list)
    leaves no unfinished entry behind: the next source could never be added after it."""
    m = dict(dataset.manifest)
    sources = list(m.get("sources", []))
    entry = next((e for e in sources if e["uri"] == uri), None)
    if entry is None or entry.get("num_shards") is not None:
        return
    committed = dataset.committed_shards()
    if any(int(name) >= first for name in committed):
        return  # shards of an earlier run of this source exist: keep the entry, a rerun resumes it
    m["sources"] = [e for e in sources if e is not entry]
    if not m["sources"] and not committed:
        dataset.store.rm(MANIFEST)  # this entry was all there was: OUTPUT is as before the run
        return
    dataset.write_manifest(m)


SIZES_FILE = "sizes.json"  # OpenCLIP's loader: tar name -> samples (no --train-num-samples needed)
INFO_FILE = "_info.json"  # webdataset's wids shard index (wids-shard-index-v1)


def write_size_files(dataset: Dataset) -> None:
    """Write ``sizes.json`` and ``_info.json`` beside the tars: the samples in each committed tar
    (its successes), from the commit markers alone. Checked at the end of every run, so a
    ``--retry-failed`` that turned failures into images keeps them true; a file whose content
    is already right is left alone (a rerun that does nothing changes nothing)."""
    shards = dataset.shards
    markers = {name: dataset.shard_stats(name) for name in dataset.committed_shards()}
    sizes = {f"{name}.tar": st.successes for name, st in markers.items()}
    info = {
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": dataset.manifest.get("name", "dataset"),
        "shardlist": [
            {"url": f"{name}.tar", "nsamples": st.successes, "filesize": st.bytes}
            for name, st in markers.items()
        ],
    }
    for rel, content in ((SIZES_FILE, sizes), (INFO_FILE, info)):
        try:
            if shards.read_json(rel) == content:
                continue
        except (FileNotFoundError, ValueError):
            pass
        shards.write_json(rel, content)
