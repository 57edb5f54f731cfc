"""The streaming stage 1 loader over committed shards joined with caption and filter layers.

Per epoch: the usable shards are shuffled (seed, epoch) and split over all ``rank x worker``
streams (by shard when there are enough shards, else by sample); each stream reads its tars
in order, joins each sample by key with its captions, drops failed rows, rows that a filter
layer rejects (``keep=false``) and rows with no caption, picks a caption source by weight,
shuffles within a buffer, plans packed rows from a pool (metadata only: patch counts come
from the shard's width/height), then decodes + patchifies + tokenizes the planned images.
Streams never end (epochs repeat); training is counted in steps.

Exact resume: batch ``i`` of a rank comes from worker stream ``i % workers``; the state is the
number of batches the trainer consumed. On resume each worker replays its stream's plan
(reading, never decoding) up to where it stopped; replay costs reading the epoch so far. Legend: see :mod:`train.data.packing`.
"""

from __future__ import annotations

import io
import random
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image

from engine.config import StorageConfig
from engine.layout import Dataset, LayoutError
from train.config import DataConfig
from train.data.naflex import grid_for, patchify
from train.data.packing import assemble, plan_rows

ALT_TEXT = "alt-text"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Record:
    key: str
    image: bytes
    width: int
    height: int
    caption: str
    n_patches: int


def usable_shards(ds: Dataset, data: DataConfig) -> list[str]:
    """Committed shards that every needed layer has committed too; clear errors when none."""
    shards = ds.committed_shards()
    if not shards:
        raise LayoutError(f"no committed shards under {ds.shards.root} (no <shard>_stats.json): ingest first")
    layers = [c.source for c in data.captions if c.source != ALT_TEXT] + list(data.filters)
    for name in layers:
        layer = ds.layer(name)
        done = set(layer.committed())
        if not done:
            raise LayoutError(f"layer {name!r} has no committed shards at {layer.store.root}")
        shards = [s for s in shards if s in done]
    if not shards:
        raise LayoutError(f"no shard of {ds.root} is committed in every layer of {layers}")
    return shards


def _read_parquet(store: Any, rel: str, columns: list[str]) -> dict[str, list[Any]]:
    with store.open(rel) as f:
        return pq.read_table(f, columns=columns).to_pydict()


class ShardReader:
    """Reads one shard's metadata (+ layers) and streams its usable samples in tar order."""

    def __init__(self, ds: Dataset, data: DataConfig, patch: int, stats: Counter) -> None:
        self.ds, self.data, self.patch, self.stats = ds, data, patch, stats

    def metadata(self, shard: str) -> dict[str, tuple[int, int, dict[str, str]]]:
        rows = _read_parquet(
            self.ds.shards, f"{shard}.parquet", ["key", "status", "caption", "width", "height"]
        )
        meta: dict[str, tuple[int, int, dict[str, str]]] = {}
        for key, status, alt, w, h in zip(
            rows["key"], rows["status"], rows["caption"], rows["width"], rows["height"], strict=True
        ):
            if status != "success" or not w or not h:
                self.stats["dropped_failed"] += 1
                continue
            meta[key] = (int(w), int(h), {ALT_TEXT: alt} if alt else {})
        for src in self.data.captions:
            if src.source == ALT_TEXT:
                continue
            layer = self.ds.layer(src.source)
            cap = _read_parquet(layer.store, layer.parquet(shard), ["key", "caption", "status"])
            for key, text, status in zip(cap["key"], cap["caption"], cap["status"], strict=True):
                if key in meta and status == "ok" and text:
                    meta[key][2][src.source] = text
        for name in self.data.filters:
            layer = self.ds.layer(name)
            flt = _read_parquet(layer.store, layer.parquet(shard), ["key", "keep"])
            keep = dict(zip(flt["key"], flt["keep"], strict=True))
            for key in list(meta):
                if keep.get(key) is not True:
                    self.stats["dropped_filter" if key in keep else "dropped_filter_missing"] += 1
                    del meta[key]
        return meta

    def choose_caption(self, key: str, captions: dict[str, str], epoch: int) -> str | None:
        sources = [c for c in self.data.captions if c.source in captions]
        if not sources:
            return None
        rng = random.Random(zlib.crc32(f"{self.data.seed}:{epoch}:{key}".encode()))
        pick = rng.choices(sources, weights=[c.weight for c in sources])[0]
        return captions[pick.source]

    def records(self, shard: str, epoch: int) -> Iterator[Record]:
        meta = self.metadata(shard)
        with self.ds.shards.open(f"{shard}.tar") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if ext.lower() not in IMAGE_EXTS or key not in meta:
                    continue
                data = tar.extractfile(member).read()
                w, h, captions = meta[key]
                caption = self.choose_caption(key, captions, epoch)
                if caption is None:
                    self.stats["dropped_no_caption"] += 1
                    continue
                gh, gw = grid_for(w, h, self.patch, self.data.max_patches)
                yield Record(key, data, w, h, caption, gh * gw)


class Stage1Stream(torch.utils.data.IterableDataset):
    """Never-ending stream of packed steps for one rank; see the module docstring."""

    def __init__(
        self,
        root: str,
        storage: StorageConfig,
        data: DataConfig,
        patch: int,
        context: int,
        rank: int = 0,
        world: int = 0,
        skip_batches: int = 0,
    ) -> None:
        super().__init__()
        self.root, self.storage, self.data, self.patch, self.context = root, storage, data, patch, context
        self.rank, self.world = rank, max(world, 1)
        self.skip_batches = skip_batches
        self.shards = usable_shards(Dataset(root, storage), data)

    # ---- planning (metadata only) ------------------------------------------------------------
    def _stream(self, gid: int, n_streams: int, reader: ShardReader) -> Iterator[Record]:
        epoch = 0
        while True:
            order = list(self.shards)
            random.Random(self.data.seed * 1_000_003 + epoch).shuffle(order)
            by_shard = len(order) >= n_streams
            mine = order[gid::n_streams] if by_shard else order
            i = 0
            for shard in mine:
                for rec in reader.records(shard, epoch):
                    if by_shard or i % n_streams == gid:
                        yield rec
                    i += 1
            epoch += 1
            reader.stats["epochs"] = epoch

    def _plans(self, gid: int, n_streams: int, reader: ShardReader) -> Iterator[list[list[Record]]]:
        d = self.data
        rng = random.Random(d.seed * 7919 + gid)
        stream = self._stream(gid, n_streams, reader)
        buffer: list[Record] = []
        pool: list[Record] = []

        def refill() -> None:
            while len(pool) < d.pack_buffer:
                while len(buffer) < d.shuffle_buffer:
                    buffer.append(next(stream))
                j = rng.randrange(len(buffer))
                buffer[j], buffer[-1] = buffer[-1], buffer[j]
                pool.append(buffer.pop())

        while True:
            yield plan_rows(pool, lambda r: r.n_patches, refill, d.rows, d.seq_len, d.max_images)

    # ---- materializing (decode + patchify + tokenize) --------------------------------------------
    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # a restarted DataLoader begins with worker 0: rotate so batch i still comes from stream i % workers
        wid = (wid + self.skip_batches) % n_workers
        gid, n_streams = self.rank * n_workers + wid, self.world * n_workers
        skip = max(0, (self.skip_batches - wid + n_workers - 1) // n_workers)
        stats: Counter = Counter()
        reader = ShardReader(Dataset(self.root, self.storage), self.data, self.patch, stats)
        tokenizer = load_tokenizer(self.data.tokenizer)
        for index, plan in enumerate(self._plans(gid, n_streams, reader)):
            if index < skip:
                continue
            yield self._materialize(plan, tokenizer, stats, wid)

    def _materialize(
        self, plan: list[list[Record]], tokenizer: Any, stats: Counter, wid: int
    ) -> dict[str, Any]:
        d, p = self.data, self.patch
        rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        captions: list[str] = []
        keys: list[str] = []
        for row in plan:
            out = []
            for rec in row:
                try:
                    with Image.open(io.BytesIO(rec.image)) as im:
                        im.load()
                        grid = grid_for(rec.width, rec.height, p, d.max_patches)
                        out.append(patchify(im, grid, p, d.mean, d.std))
                except Exception:
                    stats["corrupt_images"] += 1
                    continue
                captions.append(rec.caption)
                keys.append(rec.key)
            rows.append(out)
        vision, real = assemble(rows, d.seq_len, d.max_images, 3 * p * p)
        tokens_BL, mask_BL, truncated = tokenize(tokenizer, captions, self.context, d.max_images)
        stats["truncated_captions"] += truncated
        stats["images"] += len(captions)
        valid_B = torch.zeros(d.max_images, dtype=torch.bool)
        valid_B[: len(captions)] = True
        return {
            "vision": vision,
            "tokens_BL": tokens_BL,
            "mask_BL": mask_BL,
            "valid_B": valid_B,
            "real_tokens": real,
            "worker": wid,
            "stats": dict(stats),
            "keys": keys,
            "captions": captions,
        }


def load_tokenizer(path: str) -> Any:
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast.from_pretrained(path)
    except Exception as e:
        raise LayoutError(f"cannot load a tokenizer from {path!r}: {e}") from None


def tokenize(
    tokenizer: Any, texts: list[str], context: int, slots: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(tokens_BL, mask_BL, n_truncated)``: ``slots`` rows of ``context`` ids, longer captions truncated."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens_BL = torch.full((slots, context), pad, dtype=torch.long)
    mask_BL = torch.zeros((slots, context), dtype=torch.bool)
    truncated = 0
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else []
    for b, row in enumerate(ids):
        if len(row) > context:
            truncated += 1
            row = row[:context]
        tokens_BL[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask_BL[b, : len(row)] = True
    return tokens_BL, mask_BL, truncated


class Stage1Loader:
    """The rank's loader: a DataLoader over :class:`Stage1Stream`, counting consumed batches."""

    def __init__(
        self,
        root: str,
        storage: StorageConfig,
        data: DataConfig,
        patch: int,
        context: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.args = (root, storage, data, patch, context, rank, world)
        self.data, self.rank, self.world = data, rank, world
        self.consumed = 0
        self.worker_stats: dict[int, dict[str, int]] = {}
        self._it: Iterator[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.consumed,
            "seed": self.data.seed,
            "world": self.world,
            "workers": self.data.workers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "world", "workers"):
            if int(state[k]) != int(self.state_dict()[k]):
                raise ValueError(
                    f"loader state was saved with {k}={state[k]}, now {k}={self.state_dict()[k]}: "
                    "exact resume needs the same seed, world size and workers"
                )
        self.consumed = int(state["batches"])
        self._it = None

    def _make(self) -> Iterator[dict[str, Any]]:
        stream = Stage1Stream(*self.args[:5], rank=self.rank, world=self.world, skip_batches=self.consumed)
        dl = torch.utils.data.DataLoader(
            stream,
            batch_size=None,
            num_workers=self.data.workers,
            persistent_workers=False,
            prefetch_factor=2 if self.data.workers else None,
        )
        return iter(dl)

    def next(self) -> dict[str, Any]:
        if self._it is None:
            self._it = self._make()
        batch = next(self._it)
        self.consumed += 1
        self.worker_stats[int(batch["worker"])] = batch["stats"]
        return batch

    def stats(self) -> dict[str, int]:
        """Counters summed over this rank's workers (latest report of each)."""
        total: Counter = Counter()
        for s in self.worker_stats.values():
            total.update(s)
        return dict(total)
