"""Exact and near duplicates: the filters that need the whole dataset at once.

Two passes (see :mod:`filtering.run`):

1. per shard, on Ray: signatures written as layers, computed once and reused by every filter
   run that asks for the same parameters (their names carry them):
   ``phash-<bits>`` (``key, phash``: one int64, or a list of ``bits / 64`` of them; the image
   decoded once, :func:`imagehash.phash`) and
   ``minhash-<caption layer>-p<perms>-b<bands>-n<ngram>`` (``key, sig: binary`` (the
   ``datasketch`` MinHash values) and ``band_00 .. band_NN: int64``, one LSH band hash each).
2. on the driver, DuckDB over those layers and the shard metadata:
   exact image duplicates: a window over ``sha256``; near-duplicate images: a self-join on
   at least ``t+1`` slices of the hash (two hashes within Hamming distance ``t`` agree on at
   least one slice), then the summed ``bit_count(xor(a, b))`` of its words ``<= t``; near-duplicate captions: a group-by
   over each band column (rows sharing a band value are candidates), candidates verified by
   their estimated Jaccard similarity. Clusters are the connected components of the verified
   pairs; each keeps its smallest key (deterministic: keys do not depend on timing), the rest
   are dropped with the kept key in the reason.

The kept row of a cluster is chosen by key alone, whatever other filters say about it (a
cluster of refusals keeps one refusal, which the refusal filter then drops).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from filtering.base import Filter, Sample, Verdict

SIG_BASE = [pa.field("key", pa.string()), pa.field("status", pa.string()), pa.field("error", pa.string())]


# ---------------------------------------------------------------- filters (verdicts computed globally)


class GlobalFilter(Filter):
    """A filter whose verdicts come from the global pass: ``sample.cache['dups'][name]`` is the
    key of the row its cluster keeps. The reason is a category (counted in the audit); the kept
    key goes to the ``<column>`` score column."""

    needs = "global"
    column: ClassVar[str] = "dup_of"
    detail: ClassVar[str] = "duplicate"

    def score_columns(self) -> dict[str, pa.DataType]:
        return {self.column: pa.string()}

    def check(self, s: Sample) -> Verdict:
        first = s.cache.get("dups", {}).get(self.name)
        return (
            self.drop(self.detail, {self.column: first})
            if first
            else Verdict(True, None, {self.column: None})
        )


class ExactDupImageFilter(GlobalFilter):
    name = "exact_dup_image"
    column = "sha256_dup_of"
    detail = "same sha256 as a kept image"


class NearDupImageFilter(GlobalFilter):
    name = "near_dup_image"
    column = "phash_dup_of"
    detail = "perceptual hash near a kept image"

    def __init__(self, max_distance: int = 4, hash_bits: int = 64) -> None:
        if hash_bits not in PHASH_BITS:
            raise ValueError(
                f"hash_bits: {hash_bits} is not one of {PHASH_BITS} (imagehash's 8x8 or 16x16 DCT hash)"
            )
        self.max_distance = max_distance
        self.hash_bits = hash_bits

    @property
    def layer_name(self) -> str:
        return f"phash-{self.hash_bits}"


class NearDupCaptionFilter(GlobalFilter):
    name = "near_dup_caption"
    column = "caption_dup_of"
    detail = "near-duplicate of a kept caption"

    def __init__(self, threshold: float = 0.7, num_perm: int = 128, ngram: int = 3, seed: int = 1) -> None:
        self.threshold = threshold
        self.hasher = MinHasher(num_perm, threshold, ngram, seed)

    def layer_name(self, caption_layer: str) -> str:
        h = self.hasher
        return f"minhash-{caption_layer}-p{h.num_perm}-b{h.bands}-n{h.ngram}"


# ---------------------------------------------------------------- MinHash + LSH bands


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) minimising false positives + false negatives around ``threshold``
    (the S-curve ``1 - (1 - s^r)^b`` integrated below and above it, as datasketch's LSH does)."""
    best, best_err = (1, num_perm), float("inf")
    s_lo = np.linspace(0, threshold, 200)
    s_hi = np.linspace(threshold, 1, 200)
    for b in range(1, num_perm + 1):
        r = num_perm // b
        if r < 1:
            break
        fp = np.trapezoid(1 - (1 - s_lo**r) ** b, s_lo)
        fn = np.trapezoid((1 - s_hi**r) ** b, s_hi)
        if fp + fn < best_err:
            best, best_err = (b, r), fp + fn
    return best


# punctuation -> space, so "circle." and "circle" are one word (str.translate: C speed)
_PUNCT = str.maketrans({c: " " for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"})


class MinHasher:
    """MinHash signatures of word n-gram shingles (``datasketch``, xxh32 as its hash
    function: 2x sha1's speed here), cut into LSH bands."""

    def __init__(self, num_perm: int = 128, threshold: float = 0.7, ngram: int = 3, seed: int = 1) -> None:
        import xxhash
        from datasketch import MinHash

        self.num_perm, self.ngram, self.seed = num_perm, ngram, seed
        self.bands, self.rows = lsh_params(threshold, num_perm)
        # permutations drawn once, copied per caption
        self._proto = MinHash(num_perm=num_perm, seed=seed, hashfunc=xxhash.xxh32_intdigest)

    def shingles(self, text: str) -> list[bytes]:
        words = text.lower().translate(_PUNCT).split()
        n = self.ngram
        if len(words) < n:
            return [" ".join(words).encode()] if words else []
        return [g.encode() for g in {" ".join(g) for g in zip(*(words[i:] for i in range(n)), strict=False)}]

    def signature(self, text: str) -> np.ndarray:
        m = self._proto.copy()
        m.update_batch(self.shingles(text))
        return m.hashvalues

    def band_hashes(self, sig: np.ndarray) -> list[int]:
        import xxhash

        r = self.rows
        out = []
        for b in range(self.bands):
            h = xxhash.xxh64_intdigest(sig[b * r : (b + 1) * r].tobytes())
            out.append(h - (1 << 64) if h >= (1 << 63) else h)  # int64
        return out

    def schema(self) -> pa.Schema:
        bands = [pa.field(f"band_{i:02d}", pa.int64()) for i in range(self.bands)]
        return pa.schema([*SIG_BASE[:1], pa.field("sig", pa.binary()), *bands, *SIG_BASE[1:]])

    def rows_for(self, items: Iterable[tuple[str, Any, str | None]]) -> list[dict[str, Any]]:
        """Layer rows for ``(key, caption, caption_status)``; unusable captions get a failed row."""
        out = []
        for key, cap, status in items:
            if status not in (None, "ok") or not isinstance(cap, str) or not cap.strip():
                out.append({"key": key, "status": "failed", "error": "no usable caption"})
                continue
            sig = self.signature(cap)
            row: dict[str, Any] = {"key": key, "sig": sig.astype(np.uint32).tobytes(), "status": "ok"}
            for i, h in enumerate(self.band_hashes(sig)):
                row[f"band_{i:02d}"] = h
            out.append(row)
        return out


PHASH_BITS = (64, 256)
PHASH_SCHEMA = pa.schema([SIG_BASE[0], pa.field("phash", pa.int64()), *SIG_BASE[1:]])


def phash_schema(bits: int = 64) -> pa.Schema:
    """A 64-bit hash is one int64 (``PHASH_SCHEMA``); a wider one a list of ``bits / 64`` int64 words."""
    if bits == 64:
        return PHASH_SCHEMA
    return pa.schema([SIG_BASE[0], pa.field("phash", pa.list_(pa.int64(), bits // 64)), *SIG_BASE[1:]])


def phash_int(image: Any, bits: int = 64) -> int | list[int]:
    """imagehash's DCT hash (``hash_size`` 8 for 64 bits, 16 for 256) as signed int64 word(s).

    The 64-bit hash sees a 32x32 grey thumbnail: a small object on a plain background barely
    moves it, so different scenes of one small object land within a few bits of each other (on
    the demo's scenes 292 of 411 one-object images fell into one cluster at distance 4). The
    256-bit hash (a 64x64 thumbnail) kept 500 demo scenes >= 40 bits apart, while a JPEG
    re-encode (q 50), a resize (0.6) or a brightness change (1.2) of 60 of them stayed within 16."""
    import imagehash

    flat = imagehash.phash(image, hash_size=int(bits**0.5)).hash.flatten()
    words = []
    for w in range(0, len(flat), 64):
        v = 0
        for b in flat[w : w + 64]:
            v = (v << 1) | int(b)
        words.append(v - (1 << 64) if v >= (1 << 63) else v)
    return words[0] if bits == 64 else words


# ---------------------------------------------------------------- clusters


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        p = self.parent.setdefault(x, x)
        while p != self.parent[p]:
            self.parent[p] = self.parent[self.parent[p]]
            p = self.parent[p]
        self.parent[x] = p
        return p

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller key is the root: the cluster's kept row
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo

    def dropped(self) -> dict[str, str]:
        """Every non-root member -> its cluster's kept (smallest) key."""
        return {k: r for k in self.parent if (r := self.find(k)) != k}


def _list(uris: list[str]) -> str:
    return "[" + ", ".join("'" + u.replace("'", "''") + "'" for u in uris) + "]"


def exact_image_dups(con: Any, shard_parquets: list[str]) -> dict[str, str]:
    """key -> the smaller key whose image has the same ``sha256``."""
    if not shard_parquets:
        return {}
    rows = con.execute(
        f"SELECT key, first_key FROM (SELECT key, min(key) OVER (PARTITION BY sha256) AS first_key "
        f"FROM read_parquet({_list(shard_parquets)}) WHERE status = 'success' AND sha256 IS NOT NULL) "
        f"WHERE key <> first_key"
    ).fetchall()
    return dict(rows)


def near_image_dups(
    con: Any, phash_parquets: list[str], max_distance: int, exclude: set[str], bits: int = 64
) -> dict[str, str]:
    """key -> the kept (smallest) key of its cluster of images within ``max_distance`` bits."""
    if not phash_parquets:
        return {}
    nw = bits // 64
    # pigeonhole: >= max_distance + 1 slices in all, each inside one 64-bit word
    per_word = -(-(max_distance + 1) // nw)
    width = 64 // per_word
    slices = []
    for j in range(nw):
        for i in range(per_word):
            off = i * width
            w = 64 - off if i == per_word - 1 else width
            mask = (1 << w) - 1 if w < 64 else -1
            slices.append(f"SELECT *, {j * per_word + i} AS s, (w{j} >> {off}) & {mask} AS v FROM h")
    words = ", ".join("phash AS w0" if nw == 1 else f"phash[{j + 1}] AS w{j}" for j in range(nw))
    dist = " + ".join(f"bit_count(xor(a.w{j}, b.w{j}))::INTEGER" for j in range(nw))
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE h AS SELECT key, {words} FROM read_parquet({_list(phash_parquets)}) "
        f"WHERE status = 'ok'"
    )
    pairs = con.execute(
        f"WITH sl AS ({' UNION ALL '.join(slices)}) "
        f"SELECT DISTINCT a.key, b.key, {dist} AS d FROM sl a JOIN sl b "
        f"ON a.s = b.s AND a.v = b.v AND a.key < b.key WHERE {dist} <= {max_distance}"
    ).fetchall()
    uf = UnionFind()
    for a, b, _d in pairs:
        if a in exclude or b in exclude:
            continue
        uf.union(a, b)
    return uf.dropped()


def near_caption_dups(
    con: Any, minhash_parquets: list[str], hasher: MinHasher, threshold: float
) -> dict[str, str]:
    """key -> the kept (smallest) key of its LSH cluster (pairs verified: Jaccard >= threshold)."""
    if not minhash_parquets:
        return {}
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE mh AS SELECT * FROM read_parquet({_list(minhash_parquets)}) "
        f"WHERE status = 'ok'"
    )
    bands = [f"band_{i:02d}" for i in range(hasher.bands)]
    groups = con.execute(
        "SELECT list(key ORDER BY key) FROM (UNPIVOT (SELECT key, "
        + ", ".join(bands)
        + " FROM mh) ON "
        + ", ".join(bands)
        + " INTO NAME b VALUE v) GROUP BY b, v HAVING count(*) > 1"
    ).fetchall()
    if not groups:
        return {}
    cand = sorted({k for (g,) in groups for k in g})
    con.execute("CREATE OR REPLACE TEMP TABLE cand AS SELECT unnest($1::VARCHAR[]) AS key", [cand])
    sigs = {
        k: np.frombuffer(s, dtype=np.uint32)
        for k, s in con.execute("SELECT key, sig FROM mh JOIN cand USING (key)").fetchall()
    }
    uf = UnionFind()
    checked: set[tuple[str, str]] = set()
    for (g,) in groups:
        g = list(dict.fromkeys(g))
        pairs = (
            [(g[i], g[j]) for i in range(len(g)) for j in range(i + 1, len(g))]
            if len(g) <= 16
            else [(g[0], x) for x in g[1:]] + list(zip(g[1:], g[2:], strict=False))
        )
        for a, b in pairs:
            if (a, b) in checked:
                continue
            checked.add((a, b))
            if float(np.mean(sigs[a] == sigs[b])) >= threshold:
                uf.union(a, b)
    return uf.dropped()
