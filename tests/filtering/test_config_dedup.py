"""Filter configs stop at start-up naming the bad field; duplicate clusters over DuckDB."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engine.audit.views import connect
from engine.config import ConfigError
from filtering.config import DEFAULT_CONFIG, build_filters, load_filter_config
from filtering.dedup import (
    PHASH_SCHEMA,
    MinHasher,
    UnionFind,
    exact_image_dups,
    lsh_params,
    near_caption_dups,
    near_image_dups,
)


def _cfg(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "f.yaml"
    p.write_text(text)
    return p


def test_default_config_builds() -> None:
    cfg = load_filter_config(DEFAULT_CONFIG, ["filter.layer=x"])
    names = [f.name for f in build_filters(cfg.filter)]
    assert names[:4] == ["image_status", "image_size", "exact_dup_image", "near_dup_image"]
    assert {
        "length",
        "truncation",
        "refusal",
        "repetition",
        "garbled",
        "language",
        "near_dup_caption",
    } <= set(names)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- type: lenght\n", "filter.filters.0: Input tag 'lenght'"),
        ("- type: length\n  min_char: 3\n", r"filter.filters.0.length.min_char: Extra inputs"),
        ("- type: length\n  min_words: -1\n", r"filter.filters.0.length.min_words: Input should be greater"),
        (
            "- type: refusal\n- type: blocklist\n  patterns: ['(']\n",
            r"filter.filters.1.blocklist: .*patterns: '\('",
        ),
        ("- type: near_dup_caption\n  threshold: 1.5\n", r"filter.filters.0.near_dup_caption.threshold"),
        (
            "- type: alignment\n  checkpoint: run\n  drop_percentile: 150\n",
            r"filter.filters.0.alignment.drop_percentile: Input should be less than 100",
        ),
        ("- type: length\n- type: length\n", "listed twice"),
        ("[]\n", "no filters listed"),
        ("filters: 3\n", "filter.filters: Input should be a valid list"),
        ("just a string\n", "must be a list of filters"),
    ],
)
def test_bad_config_names_the_field(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_filter_config(_cfg(tmp_path, text))


def test_bad_language_code_fails_at_build(tmp_path: Path) -> None:
    cfg = load_filter_config(_cfg(tmp_path, "- type: language\n  keep: [zz]\n"))
    with pytest.raises(ConfigError, match="filter 'language': unknown ISO 639-1 language code 'zz'"):
        build_filters(cfg.filter)


def test_lsh_params_and_union_find() -> None:
    b, r = lsh_params(0.7, 128)
    assert b * r <= 128 and 0.5 < (1 / b) ** (1 / r) < 0.8  # the S-curve's knee near the threshold
    uf = UnionFind()
    uf.union("c", "b")
    uf.union("d", "a")
    uf.union("b", "d")
    uf.union("x", "y")
    assert uf.dropped() == {"b": "a", "c": "a", "d": "a", "y": "x"}


def _words(rng: random.Random, n: int) -> str:
    vocab = [f"w{i}" for i in range(2000)]
    return " ".join(rng.choice(vocab) for _ in range(n)) + "."


def test_near_caption_clusters_keep_the_smallest_key(tmp_path: Path) -> None:
    rng = random.Random(0)
    h = MinHasher(num_perm=128, threshold=0.7, ngram=3)
    base = [_words(rng, 60) for _ in range(40)]
    items = [(f"{i:04d}", t, "ok") for i, t in enumerate(base)]
    # planted: 1010 ~ 0003 (one word changed), 1011 ~ 1010 (another change: same cluster), 1012 = 0005
    w = base[3].split()
    w[30] = "changed"
    items.append(("1010", " ".join(w), "ok"))
    w[10] = "again"
    items.append(("1011", " ".join(w), "ok"))
    items.append(("1012", base[5], "ok"))
    items.append(("1013", None, "ok"))
    items.append(("1014", base[6], "failed"))
    rows = h.rows_for(items)
    assert [r["status"] for r in rows[-2:]] == ["failed", "failed"]
    half = len(rows) // 2
    files = []
    for i, part in enumerate((rows[:half], rows[half:])):  # two shards
        f = tmp_path / f"{i}.parquet"
        pq.write_table(pa.Table.from_pylist(part, schema=h.schema()), f)
        files.append(str(f))
    got = near_caption_dups(connect(None, False), files, h, 0.7)
    assert set(got) == {"1010", "1011", "1012"}
    assert got == {"1010": "0003", "1011": "0003", "1012": "0005"}


def test_exact_and_near_image_dups(tmp_path: Path) -> None:
    shard = tmp_path / "s.parquet"
    pq.write_table(
        pa.table(
            {
                "key": ["01", "02", "03", "04", "05"],
                "status": ["success", "success", "success", "failed_to_download", "success"],
                "sha256": ["aa", "bb", "aa", "aa", "aa"],
            }
        ),
        shard,
    )
    con = connect(None, False)
    assert exact_image_dups(con, [str(shard)]) == {"03": "01", "05": "01"}
    ph = tmp_path / "p.parquet"
    a = 0x0F0F_1234_5678_9ABC
    rows = [
        ("10", a),
        ("11", a ^ 0b1011),  # 3 bits from 10
        ("12", a ^ (0b11111 << 40)),  # 5 bits from 10 (8 from 11, 6 from 14)
        ("13", a ^ (0xFFFF << 20)),  # 16 bits away
        ("14", a ^ (1 << 63)),  # the sign bit: 1 bit from 10
        ("15", a),  # excluded (an exact duplicate already)
        ("16", a ^ (1 | 1 << 16 | 1 << 32 | 1 << 48)),  # 4 bits from 10, one in each 16-bit quarter
    ]
    signed = [v - (1 << 64) if v >= (1 << 63) else v for _, v in rows]
    pq.write_table(
        pa.table(
            {"key": [k for k, _ in rows], "phash": signed, "status": ["ok"] * 7, "error": [None] * 7},
            schema=PHASH_SCHEMA,
        ),
        ph,
    )
    got = near_image_dups(con, [str(ph)], 4, exclude={"15"})
    assert got == {"11": "10", "14": "10", "16": "10"}
    got = near_image_dups(con, [str(ph)], 5, exclude={"15"})
    assert set(got) == {"11", "12", "14", "16"}
    assert np.int64(signed[4]) < 0


def _phash_table(path: Path, keys: list[str], images: list, bits: int) -> None:
    from filtering.dedup import phash_int, phash_schema

    pq.write_table(
        pa.table(
            {
                "key": keys,
                "phash": [phash_int(im, bits) for im in images],
                "status": ["ok"] * len(keys),
                "error": [None] * len(keys),
            },
            schema=phash_schema(bits),
        ),
        path,
    )


def test_256_bit_phash_tells_one_object_scenes_apart_and_still_matches_their_copies(tmp_path: Path) -> None:
    """Different images of one small object on a plain background: the 64-bit hash at 4 bits puts
    some into one cluster (the demo lost 292 of its 411 such scenes); the 256-bit hash at 16 bits
    keeps them all, and still finds a JPEG re-encode and a resize of them."""
    import io

    from PIL import Image

    from engine.synthetic import make_scene, render_scene

    scenes = [s for s in (make_scene(0, i, 128) for i in range(400)) if len(s.objects) == 1][:80]
    images = [render_scene(s) for s in scenes]
    keys = [f"{i:04d}" for i in range(len(images))]
    copies, copy_keys = [], []
    for i in range(0, 20, 4):
        buf = io.BytesIO()
        images[i].convert("RGB").save(buf, "JPEG", quality=60)
        copies.append(Image.open(io.BytesIO(buf.getvalue())))
        copies.append(images[i + 1].resize((77, 77)))
        copy_keys += [f"9{i:03d}", f"9{i + 1:03d}"]
    con = connect(None, False)
    _phash_table(tmp_path / "p64.parquet", keys, images, 64)
    assert near_image_dups(con, [str(tmp_path / "p64.parquet")], 4, set())  # the failure it fixes
    _phash_table(tmp_path / "p256.parquet", keys + copy_keys, images + copies, 256)
    got = near_image_dups(con, [str(tmp_path / "p256.parquet")], 16, set(), bits=256)
    assert got == {k: f"{int(k[1:]):04d}" for k in copy_keys}


def test_near_dup_image_distance_must_fit_the_hash(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_distance"):
        load_filter_config(_cfg(tmp_path, "- {type: near_dup_image, hash_bits: 64, max_distance: 20}\n"))
    cfg = load_filter_config(_cfg(tmp_path, "- {type: near_dup_image, hash_bits: 256, max_distance: 16}\n"))
    assert build_filters(cfg.filter)[0].layer_name == "phash-256"
