"""The streaming stage 1 loader over committed shards joined with caption and filter layers.

**The data plan** (:class:`DataPlan`, built once per rank from metadata): the usable samples of
every shard (committed in every needed layer; ``success`` rows that no filter rejects and that
have a caption) are counted, laid end to end in shard order and cut into ``world x workers``
contiguous ranges of equal size (±1), one per stream. A stream owns its range in every epoch:
**an epoch is a partition** — each usable sample comes exactly once per epoch across all ranks
and workers, whatever the shard count, and two streams never hold the same sample, so no sample
meets itself in a global batch. Each epoch a stream visits its segments in a new order (seed,
epoch, stream), shuffles within a buffer and plans packed rows from a pool (metadata only: patch
counts come from the shard's width/height); it starts its next epoch only when its buffer and
pool are empty and at a step boundary, so one step never holds a sample twice (the last step of a
stream's epoch may be short). Then the planned images are decoded, patchified and tokenized.

**Constant-time resume**: every batch carries its stream's state after planning it (epoch,
segment, offset in the segment, shuffle RNG, and the keys in the shuffle buffer and the packing
pool). The rank's loader keeps the state of the last batch consumed from each stream; restoring
reopens one segment at its offset and re-reads only the buffered keys: no replay from step 0.
Batch ``i`` of a rank comes from stream ``i % workers``.

**The fingerprint** (:meth:`DataPlan.fingerprint`): usable samples per shard + every data field
that shapes the stream + world and workers; saved with the loader state, compared on resume.

Legend: see :mod:`train.data.packing`.
"""

from __future__ import annotations

import io
import random
import tarfile
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image

from engine.config import StorageConfig
from engine.layout import Dataset, LayoutError
from train.config import DataConfig
from train.data.naflex import grid_for, patchify
from train.data.negatives import hard_negative
from train.data.packing import assemble, plan_rows

ALT_TEXT = "alt-text"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# data fields that do not change which sample lands where (paths may move; workers/world are checked apart)
_NOT_IN_FINGERPRINT = {"dataset", "tokenizer", "workers"}


class DataPlanMismatch(ValueError):
    """The checkpoint's data plan differs from the one configured now; the message names what changed."""


@dataclass
class Record:
    key: str
    shard: str
    epoch: int
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


Meta = dict[str, tuple[int, int, dict[str, str]]]


class ShardReader:
    """Reads one shard's metadata (+ layers) and streams chosen samples in tar order."""

    def __init__(self, ds: Dataset, data: DataConfig, patch: int, stats: Counter) -> None:
        self.ds, self.data, self.patch, self.stats = ds, data, patch, stats

    def ingested(self, shard: str) -> Meta:
        """``key -> (width, height, {alt-text})`` of the shard's successfully ingested images."""
        rows = _read_parquet(
            self.ds.shards, f"{shard}.parquet", ["key", "status", "caption", "width", "height"]
        )
        meta: Meta = {}
        for key, status, alt, w, h in zip(
            rows["key"], rows["status"], rows["caption"], rows["width"], rows["height"], strict=True
        ):
            if status != "success" or not w or not h:
                self.stats["dropped_failed"] += 1
                continue
            meta[key] = (int(w), int(h), {ALT_TEXT: alt} if alt else {})
        return meta

    def metadata(self, shard: str) -> Meta:
        """``key -> (width, height, {source: caption})`` of the shard's usable samples."""
        meta = self.ingested(shard)
        failed: set[str] = set()
        for src in self.data.captions:
            if src.source == ALT_TEXT:
                continue
            layer = self.ds.layer(src.source)
            cap = _read_parquet(layer.store, layer.parquet(shard), ["key", "caption", "status"])
            for key, text, status in zip(cap["key"], cap["caption"], cap["status"], strict=True):
                if key not in meta:
                    continue
                if status == "ok" and text:
                    meta[key][2][src.source] = text
                else:
                    failed.add(key)
        for key in failed:
            # a failed recaption row: fall back to the other sources (alt-text) or drop the sample
            if self.data.failed_captions == "drop":
                self.stats["dropped_caption_failed"] += 1
                del meta[key]
            else:
                self.stats["caption_fallback"] += 1
        for name in self.data.filters:
            layer = self.ds.layer(name)
            flt = _read_parquet(layer.store, layer.parquet(shard), ["key", "keep"])
            keep = dict(zip(flt["key"], flt["keep"], strict=True))
            for key in list(meta):
                if keep.get(key) is not True:
                    self.stats["dropped_filter" if key in keep else "dropped_filter_missing"] += 1
                    del meta[key]
        for key in [k for k, (_, _, caps) in meta.items() if not self._sources(caps)]:
            self.stats["dropped_no_caption"] += 1
            del meta[key]
        return meta

    def _sources(self, captions: dict[str, str]) -> list[Any]:
        return [c for c in self.data.captions if c.source in captions]

    def choose_caption(self, key: str, captions: dict[str, str], epoch: int) -> str | None:
        sources = self._sources(captions)
        if not sources:
            return None
        rng = random.Random(zlib.crc32(f"{self.data.seed}:{epoch}:{key}".encode()))
        pick = rng.choices(sources, weights=[c.weight for c in sources])[0]
        return captions[pick.source]

    def usable_keys(self, shard: str) -> list[str]:
        return sorted(self.metadata(shard))

    def scan(
        self, shard: str, want: Callable[[str], int | None], meta: Meta | None = None
    ) -> Iterator[Record]:
        """Records of the shard's usable keys for which ``want(key)`` gives an epoch, in tar order."""
        meta = self.metadata(shard) if meta is None else meta
        with self.ds.shards.open(f"{shard}.tar") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if ext.lower() not in IMAGE_EXTS or key not in meta:
                    continue
                epoch = want(key)
                if epoch is None:
                    continue
                data = tar.extractfile(member).read()
                w, h, captions = meta[key]
                gh, gw = grid_for(w, h, self.patch, self.data.max_patches)
                caption = self.choose_caption(key, captions, epoch)
                yield Record(key, shard, epoch, data, w, h, caption, gh * gw)

    def segment(self, shard: str, lo: int, hi: int, epoch: int, skip: int = 0) -> Iterator[Record]:
        """Usable samples ``lo:hi`` (in key order) of a shard, tar order, the first ``skip`` left out."""
        meta = self.metadata(shard)
        mine = set(sorted(meta)[lo:hi])
        for i, rec in enumerate(self.scan(shard, lambda k: epoch if k in mine else None, meta)):
            if i >= skip:
                yield rec


Segment = tuple[str, int, int]  # (shard, lo, hi): usable samples lo:hi of the shard, in key order


@dataclass
class DataPlan:
    """Usable samples per shard and their split into streams; see the module docstring."""

    counts: dict[str, int]
    data: DataConfig
    world: int
    workers: int

    @classmethod
    def build(cls, root: str, storage: StorageConfig, data: DataConfig, patch: int, world: int) -> DataPlan:
        ds = Dataset(root, storage)
        shards = usable_shards(ds, data)
        reader = ShardReader(ds, data, patch, Counter())
        with ThreadPoolExecutor(8) as pool:  # metadata only: a few small Parquet reads per shard
            counts = list(pool.map(lambda s: len(reader.metadata(s)), shards))
        plan = cls(dict(zip(shards, counts, strict=True)), data, max(world, 1), max(data.workers, 1))
        total, n = sum(counts), plan.world * plan.workers
        if total < n:
            raise LayoutError(
                f"{root} has {total} usable samples for {n} streams (world {plan.world} x workers "
                f"{plan.workers}): every stream needs at least one"
            )
        return plan

    @property
    def n_streams(self) -> int:
        return self.world * self.workers

    def segments(self, gid: int) -> list[Segment]:
        """Stream ``gid``'s contiguous range of the usable samples laid end to end, as per-shard segments."""
        total = sum(self.counts.values())
        lo, hi = gid * total // self.n_streams, (gid + 1) * total // self.n_streams
        out, start = [], 0
        for shard, n in self.counts.items():
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                out.append((shard, a - start, b - start))
            start += n
        return out

    def fingerprint(self) -> dict[str, Any]:
        config = {k: v for k, v in self.data.model_dump(mode="json").items() if k not in _NOT_IN_FINGERPRINT}
        return {"shards": dict(self.counts), "config": config, "world": self.world, "workers": self.workers}


def fingerprint_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between two fingerprints, one phrase per change (empty when equal)."""
    out = []
    for k in ("world", "workers"):
        if saved[k] != now[k]:
            out.append(f"{'world size' if k == 'world' else 'data.workers'} {saved[k]} -> {now[k]}")
    for k in sorted(set(saved["config"]) | set(now["config"])):
        a, b = saved["config"].get(k), now["config"].get(k)
        if a != b:
            out.append(f"data.{k} {a!r} -> {b!r}")
    old, new = saved["shards"], now["shards"]
    added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
    if added:
        out.append(f"shards added: {', '.join(added[:5])}{' ...' if len(added) > 5 else ''}")
    if removed:
        out.append(f"shards removed: {', '.join(removed[:5])}{' ...' if len(removed) > 5 else ''}")
    changed = [s for s in sorted(set(old) & set(new)) if old[s] != new[s]]
    if changed:
        out.append(
            "usable samples changed in shards "
            + ", ".join(f"{s} ({old[s]} -> {new[s]})" for s in changed[:5])
            + (" ..." if len(changed) > 5 else "")
        )
    return out


class PlanStream:
    """One stream's packed plans (records with undecoded bytes), with a small restorable state."""

    def __init__(
        self,
        segments: list[Segment],
        gid: int,
        data: DataConfig,
        reader: ShardReader,
        state: dict[str, Any] | None = None,
        start_epoch: int = 0,
    ) -> None:
        self.segments, self.gid, self.data, self.reader = segments, gid, data, reader
        self.epoch, self.seg, self.offset = start_epoch, 0, 0
        self.rng = random.Random(data.seed * 7919 + gid)
        self.buffer: list[Record] = []
        self.pool: list[Record] = []
        self._src: Iterator[Record] | None = None
        self._yielded = 0  # records of this epoch so far (guards a stream with nothing to read)
        if state is not None:
            self._restore(state)

    # ---- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "seg": self.seg,
            "offset": self.offset,
            "rng": self.rng.getstate(),
            "buffer": [(r.key, r.shard, r.epoch) for r in self.buffer],
            "pool": [(r.key, r.shard, r.epoch) for r in self.pool],
            "stats": dict(self.reader.stats),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.seg, self.offset = int(state["epoch"]), int(state["seg"]), int(state["offset"])
        self._yielded = 1
        self.rng.setstate(_as_rng_state(state["rng"]))
        self.reader.stats.clear()
        self.reader.stats.update(state["stats"])
        held = [tuple(x) for x in state["buffer"]] + [tuple(x) for x in state["pool"]]
        by_shard: dict[str, dict[str, int]] = {}
        for key, shard, epoch in held:
            by_shard.setdefault(shard, {})[key] = epoch
        found: dict[str, Record] = {}
        silent = ShardReader(self.reader.ds, self.data, self.reader.patch, Counter())
        for shard, want in by_shard.items():
            for rec in silent.scan(shard, want.get):
                found[rec.key] = rec
        missing = [k for k, _, _ in held if k not in found]
        if missing:
            raise LayoutError(
                f"cannot restore the loader: {len(missing)} buffered samples are gone ({missing[0]})"
            )
        self.buffer = [found[k] for k, _, _ in state["buffer"]]
        self.pool = [found[k] for k, _, _ in state["pool"]]

    # ---- the stream ------------------------------------------------------------------------------
    def _order(self) -> list[int]:
        order = list(range(len(self.segments)))
        random.Random(zlib.crc32(f"{self.data.seed}:{self.epoch}:{self.gid}".encode())).shuffle(order)
        return order

    def _next_record(self) -> Record | None:
        """The next record of this epoch, None at the epoch's end."""
        while self.seg < len(self.segments):
            if self._src is None:
                shard, lo, hi = self.segments[self._order()[self.seg]]
                self._src = self.reader.segment(shard, lo, hi, self.epoch, skip=self.offset)
            rec = next(self._src, None)
            if rec is not None:
                self.offset += 1
                self._yielded += 1
                return rec
            self._src, self.seg, self.offset = None, self.seg + 1, 0
        return None

    def _new_epoch(self) -> None:
        if not self._yielded:
            raise LayoutError(f"stream {self.gid} read no sample in epoch {self.epoch}: its shards are empty")
        self.epoch, self.seg, self.offset, self._src, self._yielded = self.epoch + 1, 0, 0, None, 0
        self.reader.stats["epochs"] = max(self.reader.stats["epochs"], self.epoch)

    def _refill(self) -> None:
        d = self.data
        while len(self.pool) < d.pack_buffer:
            while len(self.buffer) < d.shuffle_buffer:
                rec = self._next_record()
                if rec is None:
                    break  # drain this epoch; the next one starts with the next step
                self.buffer.append(rec)
            if not self.buffer:
                return
            j = self.rng.randrange(len(self.buffer))
            self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
            self.pool.append(self.buffer.pop())

    def next_plan(self) -> list[list[Record]]:
        d = self.data
        if self.seg >= len(self.segments) and not self.buffer and not self.pool:
            self._new_epoch()
        return plan_rows(self.pool, lambda r: r.n_patches, self._refill, d.rows, d.seq_len, d.max_images)


def _as_rng_state(s: Any) -> tuple:
    """``random.Random.getstate()`` after a round trip through lists (JSON) or tuples (pickle)."""
    return (s[0], tuple(s[1]), s[2])


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
        plan: DataPlan | None = None,
        consumed: int = 0,
        states: dict[int, dict[str, Any]] | None = None,
        start_epoch: int = 0,
    ) -> None:
        super().__init__()
        self.root, self.storage, self.data, self.patch, self.context = root, storage, data, patch, context
        self.rank, self.world = rank, max(world, 1)
        self.plan = plan or DataPlan.build(root, storage, data, patch, self.world)
        self.consumed, self.states, self.start_epoch = consumed, states or {}, start_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        wid, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # a restarted DataLoader begins with worker 0: rotate so batch i still comes from stream i % workers
        wid = (wid + self.consumed) % n_workers
        gid = self.rank * n_workers + wid
        reader = ShardReader(Dataset(self.root, self.storage), self.data, self.patch, Counter())
        stream = PlanStream(
            self.plan.segments(gid), gid, self.data, reader, self.states.get(wid), self.start_epoch
        )
        tokenizer = load_tokenizer(self.data.tokenizer)
        while True:
            plan = stream.next_plan()
            batch = self._materialize(plan, tokenizer, reader.stats, wid)
            batch["state"] = stream.state()
            yield batch

    def _materialize(
        self, plan: list[list[Record]], tokenizer: Any, stats: Counter, wid: int
    ) -> dict[str, Any]:
        d, p = self.data, self.patch
        rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        captions: list[str] = []
        keys: list[str] = []
        epochs: list[int] = []
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
                epochs.append(rec.epoch)
            rows.append(out)
        vision, real = assemble(rows, d.seq_len, d.max_images, 3 * p * p)
        tokens_BL, mask_BL, truncated = tokenize(tokenizer, captions, self.context, d.max_images)
        stats["truncated_captions"] += truncated
        stats["images"] += len(captions)
        valid_B = torch.zeros(d.max_images, dtype=torch.bool)
        valid_B[: len(captions)] = True
        extra: dict[str, torch.Tensor] = {}
        masks = [mask_BL]
        if d.hard_negatives:
            negs = [
                hard_negative(c, k, e, d.seed, d.hard_negative_words)
                for c, k, e in zip(captions, keys, epochs, strict=True)
            ]
            neg_BL, neg_mask_BL, _ = tokenize(tokenizer, [n or "" for n in negs], self.context, d.max_images)
            neg_valid_B = torch.zeros(d.max_images, dtype=torch.bool)
            neg_valid_B[: len(negs)] = torch.tensor([n is not None for n in negs], dtype=torch.bool)
            extra = {"neg_tokens_BL": neg_BL, "neg_mask_BL": neg_mask_BL, "neg_valid_B": neg_valid_B}
            masks.append(neg_mask_BL)
            stats["hard_negatives"] += int(neg_valid_B.sum())
        # the text tower runs at the longest caption of the step (rounded up to 8 to bound the
        # shapes torch.compile sees), not at the full context: empty slots cost little. Captions
        # and their negatives share the width, so the step runs them as one text batch.
        longest = max(int(m.sum(1).max()) for m in masks) if captions else 1
        width = min(self.context, -(-max(longest, 1) // 8) * 8)
        tokens_BL, mask_BL = tokens_BL[:, :width].contiguous(), mask_BL[:, :width].contiguous()
        for k in ("neg_tokens_BL", "neg_mask_BL"):
            if k in extra:
                extra[k] = extra[k][:, :width].contiguous()
        return {
            **extra,
            "vision": vision,
            "tokens_BL": tokens_BL,
            "mask_BL": mask_BL,
            "valid_B": valid_B,
            "real_tokens": real,
            "worker": wid,
            "stats": dict(stats),
            "keys": keys,
            "epochs": epochs,
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
    """The rank's loader: a DataLoader over :class:`Stage1Stream`; its state restores in constant time."""

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
        self.args = (root, storage, data, patch, context)
        self.data, self.rank, self.world = data, rank, max(world, 1)
        self.consumed = 0
        self.streams: dict[int, dict[str, Any]] = {}  # stream (worker) -> state after its last consumed batch
        self.start_epoch = 0
        self._plan: DataPlan | None = None
        self._it: Iterator[dict[str, Any]] | None = None

    @property
    def plan(self) -> DataPlan:
        if self._plan is None:
            root, storage, data, patch, _ = self.args
            self._plan = DataPlan.build(root, storage, data, patch, self.world)
        return self._plan

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches": self.consumed,
            "seed": self.data.seed,
            "world": self.world,
            "workers": self.data.workers,
            "fingerprint": self.plan.fingerprint(),
            "streams": {int(k): v for k, v in self.streams.items()},
        }

    def load_state_dict(self, state: dict[str, Any], allow_data_change: bool = False) -> None:
        """Resume exactly where ``state`` stopped; refuse a different data plan unless allowed.

        With ``allow_data_change`` a changed plan only warns: every stream starts afresh at the
        epoch after the furthest one the checkpoint reached (not exact any more)."""
        saved = state.get("fingerprint")
        changes = (
            fingerprint_changes(saved, self.plan.fingerprint())
            if saved
            else ["the checkpoint has no data fingerprint (saved by an older version)"]
        )
        self.consumed = int(state["batches"])
        self._it = None
        if not changes:
            self.streams = {int(k): v for k, v in state.get("streams", {}).items()}
            return
        msg = "the data plan changed since the checkpoint: " + "; ".join(changes)
        if not allow_data_change:
            raise DataPlanMismatch(
                msg + ". Exact resume needs the same plan: restore it, or set "
                "checkpoint.allow_data_change=true to go on from a fresh epoch"
            )
        warnings.warn(msg + ": starting a fresh epoch on the new plan (resume is not exact)", stacklevel=2)
        epochs = [int(s["epoch"]) for s in state.get("streams", {}).values()]
        self.start_epoch = max(epochs, default=0) + 1
        self.streams = {}

    def _make(self) -> Iterator[dict[str, Any]]:
        stream = Stage1Stream(
            *self.args,
            rank=self.rank,
            world=self.world,
            plan=self.plan,
            consumed=self.consumed,
            states=self.streams,
            start_epoch=self.start_epoch,
        )
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
        self.streams[int(batch["worker"])] = batch.pop("state")
        return batch

    def stats(self) -> dict[str, int]:
        """Counters summed over this rank's streams (latest report of each)."""
        total: Counter = Counter()
        for s in self.streams.values():
            total.update(s["stats"])
        return dict(total)
