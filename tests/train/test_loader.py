"""The streaming loader: joins, drops, caption mixing, rank split, exact resume, bad input, S3."""

from __future__ import annotations

import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from engine.config import StorageConfig
from engine.layout import Dataset, LayoutError
from train.config import CaptionSource, DataConfig
from train.data.loader import DataPlan, DataPlanMismatch, PlanStream, ShardReader, Stage1Loader

PATCH, CONTEXT = 16, 64


def _data(ds, **kw) -> DataConfig:
    base = {
        "dataset": str(ds.root),
        "tokenizer": str(ds.tokenizer),
        "captions": [CaptionSource(source="gt-global")],
        "max_patches": 32,
        "seq_len": 64,
        "rows": 2,
        "max_images": 8,
        "shuffle_buffer": 8,
        "pack_buffer": 6,
    }
    base.update(kw)
    return DataConfig(**base)


def _loader(
    data: DataConfig, rank: int = 0, world: int = 1, storage: StorageConfig | None = None
) -> Stage1Loader:
    return Stage1Loader(data.dataset, storage or StorageConfig(), data, PATCH, CONTEXT, rank, world)


def _gt(root: Path) -> dict[str, str]:
    out = {}
    for f in sorted((root / "layers" / "gt-global").glob("*.parquet")):
        t = pq.read_table(f).to_pydict()
        out.update(zip(t["key"], t["caption"], strict=True))
    return out


def test_batches_join_captions_by_key(stage1_data) -> None:
    loader = _loader(_data(stage1_data))
    gt = _gt(stage1_data.root)
    b = loader.next()
    n = int(b["valid_B"].sum())
    assert n == len(b["keys"]) > 0
    assert all(gt[k] == c for k, c in zip(b["keys"], b["captions"], strict=True))
    v = b["vision"]
    assert v.patches_TP.shape == (2 * 64, 3 * PATCH * PATCH)
    assert int((v.img_T >= 0).sum()) == b["real_tokens"]
    assert b["mask_BL"][:n].any(1).all() and not b["mask_BL"][n:].any()
    # dense captions are longer than 64 tokens: truncated to the context and counted
    assert b["stats"]["truncated_captions"] > 0 and b["mask_BL"][:n].all(1).any()


def test_caption_mixing_weights(stage1_data) -> None:
    data = _data(
        stage1_data,
        captions=[
            CaptionSource(source="gt-global", weight=0.8),
            CaptionSource(source="alt-text", weight=0.2),
        ],
    )
    reader = ShardReader(Dataset(data.dataset), data, PATCH, Counter())
    picks = Counter(
        reader.choose_caption(f"k{i}", {"gt-global": "G", "alt-text": "A"}, 0) for i in range(2000)
    )
    assert 0.75 < picks["G"] / 2000 < 0.85
    assert reader.choose_caption("x", {"alt-text": "A"}, 0) == "A"  # only the available source
    assert reader.choose_caption("x", {}, 0) is None


def test_ranks_see_disjoint_samples(stage1_data) -> None:
    data = _data(stage1_data)
    seen = []
    for r in range(2):
        loader = _loader(data, r, 2)
        keys: set[str] = set()
        for _ in range(3):
            keys |= set(loader.next()["keys"])
        seen.append(keys)
    assert seen[0] and seen[1] and not seen[0] & seen[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(stage1_data, workers: int) -> None:
    data = _data(stage1_data, workers=workers)
    a = _loader(data)
    for _ in range(5):
        a.next()
    state = a.state_dict()
    want = [a.next() for _ in range(3)]
    b = _loader(data)
    b.load_state_dict(state)
    got = [b.next() for _ in range(3)]
    for x, y in zip(want, got, strict=True):
        assert x["keys"] == y["keys"] and x["captions"] == y["captions"]
        assert torch.equal(x["vision"].patches_TP, y["vision"].patches_TP)
    with pytest.raises(ValueError, match="world size"):
        _loader(data, 0, 2).load_state_dict(state)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_drops_failed_filtered_and_corrupt(stage1_data, tmp_path: Path) -> None:
    root = _copy(stage1_data.root, tmp_path / "ds")
    shard = "00000"
    meta = pq.read_table(root / "shards" / f"{shard}.parquet")
    keys = meta.column("key").to_pylist()
    # a failed row, a filter layer rejecting two keys, a corrupt image
    status = meta.column("status").to_pylist()
    status[0] = "failed_to_download"
    pq.write_table(
        meta.set_column(meta.schema.get_field_index("status"), "status", pa.array(status)),
        root / "shards" / f"{shard}.parquet",
    )
    flt = root / "layers" / "nsfw"
    flt.mkdir()
    for s in ("00000", "00001", "00002"):
        ks = pq.read_table(root / "shards" / f"{s}.parquet").column("key").to_pylist()
        keep = [k not in (keys[1], keys[2]) for k in ks]
        pq.write_table(pa.table({"key": ks, "keep": keep, "reasons": [[] for _ in ks]}), flt / f"{s}.parquet")
        (flt / f"{s}_stats.json").write_text("{}")
    tar_path = root / "shards" / f"{shard}.tar"
    members = []
    with tarfile.open(tar_path) as t:
        for m in t.getmembers():
            members.append((m, t.extractfile(m).read()))
    with tarfile.open(tar_path, "w") as t:
        for m, data in members:
            if m.name == f"{keys[3]}.jpg":
                data = b"\xff\xd8\xff garbage, not a jpeg"
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))
    data = _data(
        stage1_data, dataset=str(root), filters=["nsfw"], max_images=48, rows=12, seq_len=128, max_patches=64
    )
    loader = _loader(data)
    seen: set[str] = set()
    for _ in range(4):
        seen |= set(loader.next()["keys"])
    assert not seen & {keys[0], keys[1], keys[2], keys[3]}
    stats = loader.stats()
    assert stats["dropped_failed"] >= 1 and stats["dropped_filter"] >= 2 and stats["corrupt_images"] >= 1
    assert len(seen) >= 40  # everything else arrives


def test_clear_errors(stage1_data, tmp_path: Path) -> None:
    with pytest.raises(LayoutError, match="no-such-layer"):
        _loader(_data(stage1_data, captions=[CaptionSource(source="no-such-layer")])).next()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "dataset.json").write_text('{"layout_version": 1, "samples_per_shard": 4}')
    with pytest.raises(LayoutError, match="no committed shards"):
        _loader(_data(stage1_data, dataset=str(tmp_path / "empty"))).next()


@pytest.mark.s3
def test_reads_from_s3(stage1_data, s3) -> None:
    uri = s3.upload_dir(stage1_data.root, "scenes")
    data = _data(stage1_data, dataset=uri)
    b = _loader(data, storage=s3.storage).next()
    local = _loader(_data(stage1_data)).next()
    assert b["keys"] == local["keys"]
    assert torch.equal(b["vision"].patches_TP, local["vision"].patches_TP)


# ---------------------------------------------------------------- epochs, resume, fingerprint


def _uneven(stage1_data, tmp_path: Path, drop: int = 3) -> Path:
    """A copy whose filter layer rejects ``drop`` keys: 48 - drop usable samples over 3 shards."""
    root = _copy(stage1_data.root, tmp_path / "uneven")
    flt = root / "layers" / "keep"
    flt.mkdir()
    for i, s in enumerate(("00000", "00001", "00002")):
        ks = pq.read_table(root / "shards" / f"{s}.parquet").column("key").to_pylist()
        keep = [not (i == 1 and j < drop) for j in range(len(ks))]
        pq.write_table(pa.table({"key": ks, "keep": keep, "reasons": [[] for _ in ks]}), flt / f"{s}.parquet")
        (flt / f"{s}_stats.json").write_text("{}")
    return root


def _usable(root: Path) -> set[str]:
    keep = set()
    for f in (root / "layers" / "keep").glob("*.parquet"):
        t = pq.read_table(f).to_pydict()
        keep |= {k for k, ok in zip(t["key"], t["keep"], strict=True) if ok}
    return keep


def test_epoch_is_a_partition_across_ranks_and_workers(stage1_data, tmp_path: Path) -> None:
    """world 2 x workers 2 over two epochs, 45 samples in 3 shards: each sample once per epoch,
    never twice in a global step (rank r's step i comes from its stream i % workers)."""
    root = _uneven(stage1_data, tmp_path)
    data = _data(stage1_data, dataset=str(root), filters=["keep"], workers=2)
    world, workers = 2, 2
    plan = DataPlan.build(str(root), StorageConfig(), data, PATCH, world)
    streams = [
        PlanStream(plan.segments(g), g, data, ShardReader(Dataset(str(root)), data, PATCH, Counter()))
        for g in range(world * workers)
    ]
    plans: list[list[list[tuple[str, int]]]] = [[] for _ in streams]
    for g, s in enumerate(streams):  # each stream until it has planned two whole epochs
        while not plans[g] or max(e for _, e in plans[g][-1]) < 2:
            plans[g].append([(r.key, r.epoch) for row in s.next_plan() for r in row])
    usable = _usable(root)
    assert len(usable) == 45
    for epoch in (0, 1):
        drawn = Counter(k for p in plans for step in p for k, e in step if e == epoch)
        assert set(drawn) == usable and set(drawn.values()) == {1}, epoch
    steps = min(len(p) for p in plans) * workers
    for i in range(steps):
        global_batch = [k for r in range(world) for k, _ in plans[r * workers + i % workers][i // workers]]
        assert len(global_batch) == len(set(global_batch)), i


@pytest.mark.slow
def test_epoch_partition_through_the_real_loader(stage1_data, tmp_path: Path) -> None:
    """The same guarantee end to end: two rank loaders, 2 DataLoader workers each, two epochs."""
    root = _uneven(stage1_data, tmp_path)
    data = _data(stage1_data, dataset=str(root), filters=["keep"], workers=2)
    loaders = [_loader(data, r, 2) for r in range(2)]
    batches: list[list[dict]] = [[], []]
    reached: dict[tuple[int, int], int] = {}  # (rank, stream) -> furthest epoch drawn
    while len(reached) < 4 or min(reached.values()) < 2:
        for r in range(2):
            b = loaders[r].next()
            batches[r].append(b)
            reached[r, b["worker"]] = max(reached.get((r, b["worker"]), 0), *b["epochs"])
        assert len(batches[0]) < 60
    # keep only what each stream drew in epochs 0 and 1
    drawn = Counter((k, e) for b in batches for x in b for k, e in zip(x["keys"], x["epochs"], strict=True))
    usable = _usable(root)
    for epoch in (0, 1):
        assert {k for k, e in drawn if e == epoch} == usable
    assert set(drawn.values()) == {1}
    for x, y in zip(*batches, strict=True):
        assert not set(x["keys"]) & set(y["keys"])


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_restores_state_without_replay(stage1_data, tmp_path: Path, monkeypatch, workers: int) -> None:
    """Resume deep into the second epoch: the next batches are exact, and restoring reads only the
    shards holding buffered samples plus the current one (not every shard since step 0)."""
    data = _data(stage1_data, workers=workers, shuffle_buffer=4, pack_buffer=4)
    a = _loader(data)
    while min(max(b["epochs"]) for b in [a.next()]) < 1:
        pass
    for _ in range(3):
        a.next()
    state = a.state_dict()
    assert all(s["epoch"] >= 1 for s in state["streams"].values())
    want = [a.next() for _ in range(3)]
    scans: list[str] = []
    real = ShardReader.scan

    def counted(self, shard, *args, **kw):
        scans.append(shard)
        return real(self, shard, *args, **kw)

    monkeypatch.setattr(ShardReader, "scan", counted)
    b = _loader(data)
    b.load_state_dict(state)
    b.next()
    if workers == 0:  # worker processes do not report back through the patch
        held = {s for st in state["streams"].values() for _, s, _ in st["buffer"] + st["pool"]}
        assert len(scans) <= len(held) + 2, scans
    b = _loader(data)
    b.load_state_dict(state)
    got = [b.next() for _ in range(3)]
    for x, y in zip(want, got, strict=True):
        assert x["keys"] == y["keys"] and x["captions"] == y["captions"] and x["epochs"] == y["epochs"]
        assert torch.equal(x["vision"].patches_TP, y["vision"].patches_TP)


def test_data_plan_fingerprint_refuses_a_changed_plan(stage1_data, tmp_path: Path) -> None:
    root = _copy(stage1_data.root, tmp_path / "ds")
    stats = root / "shards" / "00002_stats.json"
    held = stats.read_text()
    stats.unlink()  # shard 00002 not committed yet
    data = _data(stage1_data, dataset=str(root))
    a = _loader(data)
    a.next()
    state = a.state_dict()
    assert state["fingerprint"]["shards"] == {"00000": 16, "00001": 16}
    with pytest.raises(DataPlanMismatch, match=r"data.seq_len 64 -> 128"):
        _loader(_data(stage1_data, dataset=str(root), seq_len=128)).load_state_dict(state)
    stats.write_text(held)  # a shard lands in between
    with pytest.raises(DataPlanMismatch, match="shards added: 00002"):
        _loader(data).load_state_dict(state)
    b = _loader(data)
    with pytest.warns(UserWarning, match="shards added: 00002"):
        b.load_state_dict(state, allow_data_change=True)
    assert b.next()["epochs"][0] == 1  # a fresh epoch on the new plan
    unfingerprinted = {k: v for k, v in state.items() if k != "fingerprint"}
    with pytest.raises(DataPlanMismatch, match="no data fingerprint"):
        _loader(data).load_state_dict(unfingerprinted)


@pytest.mark.parametrize("mode", ["fallback", "drop"])
def test_failed_recaption_rows_fall_back_or_drop_and_are_counted(
    stage1_data, tmp_path: Path, mode: str
) -> None:
    root = _copy(stage1_data.root, tmp_path / "ds")
    path = root / "layers" / "gt-global" / "00000.parquet"
    t = pq.read_table(path)
    status = t.column("status").to_pylist()
    status[:2] = ["failed", "failed"]
    failed = set(t.column("key").to_pylist()[:2])
    pq.write_table(t.set_column(t.schema.get_field_index("status"), "status", pa.array(status)), path)
    alt = {}
    for f in (root / "shards").glob("*.parquet"):
        m = pq.read_table(f).to_pydict()
        alt.update(zip(m["key"], m["caption"], strict=True))
    data = _data(
        stage1_data,
        dataset=str(root),
        failed_captions=mode,
        captions=[CaptionSource(source="gt-global"), CaptionSource(source="alt-text", weight=0.001)],
        rows=12,
        seq_len=128,
        max_patches=64,
        max_images=48,
    )
    loader = _loader(data)
    usable = sum(loader.plan.counts.values())
    assert usable == (48 if mode == "fallback" else 46)
    got: dict[str, str] = {}
    while len(got) < usable:  # one epoch (the next one starts with a new step)
        b = loader.next()
        got.update(zip(b["keys"], b["captions"], strict=True))
    stats = loader.stats()
    if mode == "fallback":
        assert stats["caption_fallback"] == 2 and not stats.get("dropped_caption_failed")
        assert all(got[k] == alt[k] for k in failed)
    else:
        assert stats["dropped_caption_failed"] == 2 and not stats.get("caption_fallback")
        assert not failed & set(got)
