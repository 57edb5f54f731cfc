"""Stage 2 data: region captions and global captions as prompt -> target samples.

Tasks (mixed by weight per image, chosen deterministically from ``(seed, epoch, key)``):

* ``box_caption``: the prompt names a box on a 0-1000 grid, ``<box>(x0,y0),(x1,y1)</box>``; the
  target is the region's caption;
* ``caption_box``: the prompt is a region caption; the target is its box as text (grounding);
* ``global``: the target is the image's global caption.

The plan (which image, which task, which region, in which batch) is made from metadata only
(parquet), so resuming replays it without decoding: the loader's state is the number of
batches consumed. Samples are split over ranks by position (``i % world == rank``). Regions
whose box is not finite, inside [0, 1] with x0 < x1 and y0 < y1 are skipped and counted
(``invalid_boxes``). Legend: see :mod:`train.data.packing`; B samples, L tokens.
"""

from __future__ import annotations

import io
import math
import random
import re
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
from train.data.packing import assemble

TASKS = ("box_caption", "caption_box", "global")
BOX_RE = re.compile(r"<box>\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*,\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*</box>")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def box_text(box: tuple[float, float, float, float]) -> str:
    """A normalized box as text on the 0-1000 grid (Qwen2-VL's convention)."""
    x0, y0, x1, y1 = (min(1000, max(0, round(v * 1000))) for v in box)
    return f"<box>({x0},{y0}),({x1},{y1})</box>"


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """The first ``<box>(x0,y0),(x1,y1)</box>`` of ``text`` as a normalized box, or None."""
    m = BOX_RE.search(text)
    if not m:
        return None
    x0, y0, x1, y1 = (int(g) / 1000 for g in m.groups())
    return x0, y0, x1, y1


def valid_box(b: Any) -> bool:
    try:
        x0, y0, x1, y1 = (float(v) for v in b)
    except (TypeError, ValueError):
        return False
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        return False
    return 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def prompt_for(task: str, box: tuple[float, ...] | None = None, caption: str = "") -> str:
    if task == "box_caption":
        return f"Describe the region {box_text(box)}."
    if task == "caption_box":
        return f"Where is {caption}? Answer with a box."
    return "Describe the image."


Region = tuple[tuple[float, float, float, float], str]  # (normalized box, caption)


@dataclass(frozen=True)
class Sample:
    key: str
    shard: str
    task: str
    prompt: str
    target: str
    regions: tuple[Region, ...] = ()  # every valid region of the image (the regional contrastive term's)
    caption: str | None = None  # the image's global caption (the global contrastive term's)


@dataclass
class ImageMeta:
    width: int
    height: int
    regions: list[Region]
    caption: str | None


def _read(store: Any, rel: str, columns: list[str]) -> dict[str, list[Any]]:
    with store.open(rel) as f:
        return pq.read_table(f, columns=columns).to_pydict()


class RegionData:
    """Per shard metadata: image sizes, valid regions, global captions (with counters)."""

    def __init__(
        self,
        root: str,
        storage: StorageConfig | None,
        regions_layer: str,
        global_layer: str | None,
        stats: Counter | None = None,
    ) -> None:
        self.ds = Dataset(root, storage)
        self.regions_layer, self.global_layer = regions_layer, global_layer
        self.stats = stats if stats is not None else Counter()
        shards = self.ds.committed_shards()
        if not shards:
            raise LayoutError(f"no committed shards under {self.ds.shards.root}: ingest first")
        for name in [regions_layer] + ([global_layer] if global_layer else []):
            done = set(self.ds.layer(name).committed())
            if not done:
                raise LayoutError(
                    f"layer {name!r} has no committed shards at {self.ds.layer(name).store.root} "
                    "(data.regions_layer / data.global_layer)"
                )
            shards = [s for s in shards if s in done]
        if not shards:
            raise LayoutError(f"no shard of {self.ds.root} is committed in every layer needed")
        self.shards = shards
        self._meta: dict[str, dict[str, ImageMeta]] = {}

    def meta(self, shard: str) -> dict[str, ImageMeta]:
        if shard in self._meta:
            return self._meta[shard]
        rows = _read(self.ds.shards, f"{shard}.parquet", ["key", "status", "width", "height"])
        out: dict[str, ImageMeta] = {}
        for key, status, w, h in zip(rows["key"], rows["status"], rows["width"], rows["height"], strict=True):
            if status == "success" and w and h:
                out[key] = ImageMeta(int(w), int(h), [], None)
        layer = self.ds.layer(self.regions_layer)
        reg = _read(layer.store, layer.parquet(shard), ["key", "regions", "status"])
        for key, regions, status in zip(reg["key"], reg["regions"], reg["status"], strict=True):
            if key not in out or status != "ok":
                continue
            for r in regions or []:
                box = (r.get("x0"), r.get("y0"), r.get("x1"), r.get("y1"))
                if not valid_box(box) or not r.get("caption"):
                    self.stats["invalid_boxes"] += 1
                    continue
                out[key].regions.append((tuple(float(v) for v in box), r["caption"]))
        if self.global_layer:
            layer = self.ds.layer(self.global_layer)
            cap = _read(layer.store, layer.parquet(shard), ["key", "caption", "status"])
            for key, text, status in zip(cap["key"], cap["caption"], cap["status"], strict=True):
                if key in out and status == "ok" and text:
                    out[key].caption = text
        self._meta[shard] = out
        return out

    def images(self, shard: str) -> dict[str, bytes]:
        """Image bytes of one shard by key."""
        out: dict[str, bytes] = {}
        with self.ds.shards.open(f"{shard}.tar") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition("/")[2].partition(".")
                if ext.lower() in IMAGE_EXTS:
                    out[key] = tar.extractfile(member).read()
        return out


def choose(
    key: str, meta: ImageMeta, tasks: list[tuple[str, float]], seed: int, epoch: int
) -> tuple[str, str, str] | None:
    """``(task, prompt, target)`` for one image: a task by weight among those the image supports."""
    rng = random.Random(zlib.crc32(f"{seed}:{epoch}:{key}".encode()))
    usable = [
        (t, w) for t, w in tasks if (t == "global" and meta.caption) or (t != "global" and meta.regions)
    ]
    if not usable:
        return None
    task = rng.choices([t for t, _ in usable], weights=[w for _, w in usable])[0]
    if task == "global":
        return task, prompt_for(task), meta.caption
    box, caption = meta.regions[rng.randrange(len(meta.regions))]
    if task == "box_caption":
        return task, prompt_for(task, box=box), caption
    return task, prompt_for(task, caption=caption), box_text(box)


def plan(
    data: RegionData, tasks: list[tuple[str, float]], seed: int, batch: int, rank: int = 0, world: int = 1
) -> Iterator[list[Sample]]:
    """Never-ending batches of :class:`Sample` for one rank (metadata only)."""
    epoch, out, i = 0, [], 0
    while True:
        order = list(data.shards)
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for shard in order:
            meta = data.meta(shard)
            keys = sorted(meta)
            random.Random(zlib.crc32(f"{seed}:{epoch}:{shard}".encode())).shuffle(keys)
            for key in keys:
                picked = choose(key, meta[key], tasks, seed, epoch)
                if picked is None:
                    data.stats["no_target"] += 1
                    continue
                if i % world == rank:
                    m = meta[key]
                    out.append(Sample(key, shard, *picked, regions=tuple(m.regions), caption=m.caption))
                    if len(out) == batch:
                        yield out
                        out = []
                i += 1
        epoch += 1
        data.stats["epochs"] = epoch


def encode_sample(
    processor: Any, prompt: str, target: str, grid: tuple[int, int], max_len: int, stats: Counter
) -> tuple[list[int], list[int], list[list[float]]] | None:
    """``(input_ids, labels, regions)`` of one sample: chat-templated prompt with its image tokens
    (and region tokens, ``regions`` rows ``[0, x0, y0, x1, y1]``), then the target and EOS. Past
    ``max_len`` the prompt's text loses tokens from its start (never image or region tokens, never
    the target); a sample whose image tokens + target alone do not fit is dropped."""
    tok = processor.tokenizer
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        add_generation_prompt=True,
    )
    p_ids = tok(processor.expand(text, [grid]), add_special_tokens=False)["input_ids"]
    t_ids = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    over = len(p_ids) + len(t_ids) - max_len
    if over > 0:
        special = {processor.image_token_id}
        if processor.region_token is not None:
            special.add(tok.convert_tokens_to_ids(processor.region_token))
        n_special = sum(1 for t in p_ids if t in special)
        if n_special + len(t_ids) > max_len:
            stats["too_long"] += 1
            return None
        keep, dropped = [], 0
        for t in p_ids:
            if dropped < over and t not in special:
                dropped += 1
                continue
            keep.append(t)
        p_ids = keep
        stats["truncated_prompts"] += 1
    return p_ids + t_ids, [-100] * len(p_ids) + t_ids, processor.regions(text)


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: the indices of ``lengths`` in rows whose sums stay within ``capacity``
    (a longer item gets a row of its own). Deterministic: ties keep their input order."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((j for j, left in enumerate(room) if left >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def collate(
    samples: list[Sample],
    images: dict[str, bytes],
    processor: Any,
    max_len: int,
    seq_len: int,
    stats: Counter,
    pack: bool = False,
) -> dict[str, Any]:
    """Decode, patchify and pack the images (rows of ``seq_len`` patches, first fit) and lay out the
    token sequences: one sample per row padded right to the longest, or with ``pack`` several
    samples per row of at most ``max_len`` tokens (first fit decreasing).

    Returns ``vision``, ``spans``, ``input_ids_BL``, ``labels_BL``, ``mask_BL`` (1 on real tokens),
    ``position_ids_BL`` (None unless packed: positions restart at 0 with each sample, which is how
    transformers' LMs keep packed samples apart: a block-causal mask under SDPA/eager, varlen under
    flash-attention), ``sample_BL`` (each token's sample, -1 on padding), ``keys``, ``tasks``,
    ``targets``, ``real_tokens``, ``region_boxes`` (``(R, 5)``: sample, box), ``image_regions``
    (``(Q, 5)``: sample, box of every region of the batch's images) with ``image_region_captions``
    (their captions; the regional contrastive term's pairs) and ``image_captions`` (each sample's
    image's global caption or None; the global contrastive term's). Samples (and so
    ``spans``, region rows, ``keys``...) are in the order their tokens appear in the flattened rows,
    the order in which the model fills image and region tokens."""
    rows: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
    room: list[int] = []
    spans, seqs, kept = [], [], []
    regions: list[list[float]] = []
    for s in samples:
        try:
            with Image.open(io.BytesIO(images[s.key])) as im:
                im.load()
                patches, grids = processor.image_inputs([im.convert("RGB")])
        except Exception:
            stats["corrupt_images"] += 1
            continue
        grid, x_NP = grids[0], patches[0]
        enc = encode_sample(processor, s.prompt, s.target, grid, max_len, stats)
        if enc is None:
            continue
        n = x_NP.shape[0]
        r = next((i for i, left in enumerate(room) if left >= n), None)
        if r is None:
            rows.append([])
            room.append(seq_len)
            r = len(rows) - 1
        at = seq_len - room[r]
        gh, gw = grid
        rows_pos = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1).reshape(
            -1, 2
        )
        rows[r].append((x_NP, rows_pos))
        room[r] -= n
        spans.append((r * seq_len + at, gh, gw))
        seqs.append(enc[:2])
        regions += [[float(len(kept)), *row[1:]] for row in enc[2]]  # its image: this sample's
        kept.append(s)
        stats[f"task_{s.task}"] += 1
    if not kept:
        raise LayoutError("a stage-2 batch has no usable sample (all corrupt or too long): check the data")
    P = rows[0][0][0].shape[1]
    vision, real = assemble(rows, seq_len, len(kept), P)
    # assemble numbers slots in row order; our spans were computed from the same placement
    lm_rows = pack_rows([len(ids) for ids, _ in seqs], max_len) if pack else [[i] for i in range(len(seqs))]
    order = [i for row in lm_rows for i in row]  # the samples as the flattened rows hold them
    new_index = {old: new for new, old in enumerate(order)}
    spans = [spans[i] for i in order]
    regions = sorted(([float(new_index[int(r[0])]), *r[1:]] for r in regions), key=lambda r: r[0])
    kept = [kept[i] for i in order]
    pairs = [(i, box, cap) for i, s in enumerate(kept) for box, cap in s.regions]
    L = max(sum(len(seqs[i][0]) for i in row) for row in lm_rows)
    pad = processor.tokenizer.pad_token_id
    pad = pad if pad is not None else 0
    B = len(lm_rows)
    input_ids = torch.full((B, L), pad, dtype=torch.long)
    labels = torch.full((B, L), -100, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    sample_BL = torch.full((B, L), -1, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long) if pack else None
    for b, row in enumerate(lm_rows):
        at = 0
        for i in row:
            ids, lab = seqs[i]
            n = len(ids)
            input_ids[b, at : at + n] = torch.tensor(ids)
            labels[b, at : at + n] = torch.tensor(lab)
            mask[b, at : at + n] = 1
            sample_BL[b, at : at + n] = new_index[i]
            if position_ids is not None:
                position_ids[b, at : at + n] = torch.arange(n)
            at += n
        if position_ids is not None:  # the padding is a sequence of its own
            position_ids[b, at:] = torch.arange(L - at)
    stats["samples"] += len(kept)
    return {
        "vision": vision,
        "spans": spans,
        "input_ids_BL": input_ids,
        "labels_BL": labels,
        "mask_BL": mask,
        "position_ids_BL": position_ids,
        "sample_BL": sample_BL,
        "keys": [s.key for s in kept],
        "tasks": [s.task for s in kept],
        "targets": [s.target for s in kept],
        "real_tokens": int(mask.sum()),
        "padded_tokens": B * L,
        "patch_tokens": real,
        "region_boxes": torch.tensor(regions, dtype=torch.float32).reshape(-1, 5),
        "image_regions": torch.tensor([[float(i), *box] for i, box, _ in pairs], dtype=torch.float32).reshape(
            -1, 5
        ),
        "image_region_captions": [cap for _, _, cap in pairs],
        "image_captions": [s.caption for s in kept],
    }


class Stage2Loader:
    """The rank's stage-2 batches; ``state_dict`` is the number of batches consumed (exact resume)."""

    def __init__(
        self,
        root: str,
        storage: StorageConfig | None,
        regions_layer: str,
        global_layer: str | None,
        tasks: list[tuple[str, float]],
        processor: Any,
        batch: int,
        max_len: int,
        seq_len: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        pack: bool = False,
    ) -> None:
        self.stats_: Counter = Counter()
        self.pack = pack
        self.data = RegionData(root, storage, regions_layer, global_layer, self.stats_)
        self.tasks, self.processor = tasks, processor
        self.batch, self.max_len, self.seq_len = batch, max_len, seq_len
        self.seed, self.rank, self.world = seed, rank, world
        self.consumed = 0
        self._it: Iterator[list[Sample]] | None = None
        self._shard: str | None = None
        self._images: dict[str, bytes] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.consumed, "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "world"):
            if int(state[k]) != int(self.state_dict()[k]):
                raise ValueError(f"loader state was saved with {k}={state[k]}, now {self.state_dict()[k]}")
        self.consumed = int(state["batches"])
        self._it = None

    def _image_bytes(self, samples: list[Sample]) -> dict[str, bytes]:
        out = {}
        for s in samples:
            if s.shard != self._shard:
                self._shard, self._images = s.shard, self.data.images(s.shard)
            if s.key in self._images:
                out[s.key] = self._images[s.key]
        return out

    def next(self) -> dict[str, Any]:
        if self._it is None:
            self._it = plan(self.data, self.tasks, self.seed, self.batch, self.rank, self.world)
            for _ in range(self.consumed):  # replay the plan (metadata only)
                next(self._it)
        samples = next(self._it)
        self.consumed += 1
        return collate(
            samples,
            self._image_bytes(samples),
            self.processor,
            self.max_len,
            self.seq_len,
            self.stats_,
            self.pack,
        )

    def stats(self) -> dict[str, int]:
        return dict(self.stats_)
