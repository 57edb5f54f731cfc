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
from train.data.loader import ShardReader, Stage1Loader

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
