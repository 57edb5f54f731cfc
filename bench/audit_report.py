"""Benchmark: the standard audit report's queries over 1,000,000 caption rows.

Question: does ``finevit audit --report`` stay interactive on a corpus-sized dataset?
Target (issue 3): the report's queries (not thumbnails, not plots) in under 3 s.

Input, generated here with pyarrow (no network, about 10 s): 100 committed shards of
10,000 samples (shard Parquet in img2dataset's schema, 3 % failed rows), a caption layer
(``GLOBAL_CAPTION_SCHEMA``, ~60 words per caption, 2 % failed, some exact duplicates),
a region layer (``REGION_SCHEMA``, 1 to 9 boxes per image, ~5 on average: 5,000,000
boxes) and a filter layer with a score column; every part committed by its
``_stats.json``. No tars: the report's queries never read images.

Candidates, run alternately after a warm-up, each on a fresh connection
(``open_audit`` + :func:`engine.audit.stats.collect`):

``report``       the whole standard report: views built from the committed-file lists
                 (listing + schema checks) plus every query of the report
``queries``      the queries alone, on an already opened audit
``scan floor``   one ``count(*)`` + ``sum(length(caption))`` over the caption layer
                 and ``sum(len(regions))`` over the region layer: reading the columns the
                 report needs once, the floor any report on these views pays

Usage::

    python bench/audit_report.py            # 1,000,000 rows, 5 runs
    python bench/audit_report.py --quick    # 100,000 rows, 3 runs (< 1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.audit import open_audit
from engine.audit.stats import collect
from engine.schemas import FILTER_BASE_SCHEMA, GLOBAL_CAPTION_SCHEMA, REGION_SCHEMA, SHARD_SCHEMA

TARGET_S = 3.0
COLOURS = [
    "red",
    "orange",
    "yellow",
    "green",
    "cyan",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "grey",
]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "hexagon", "diamond", "heart", "arrow"]
SIZES = ["small", "medium", "large"]
TEXTURES = ["solid", "striped", "dotted"]
PLACES = [f"{v} {h}" for v in ("top", "center", "bottom") for h in ("left", "center", "right")]


def _phrase_pool(rng: np.random.Generator, n: int) -> list[str]:
    out = []
    for _ in range(n):
        c, s, z, t, p = (rng.choice(x) for x in (COLOURS, SHAPES, SIZES, TEXTURES, PLACES))
        out.append(f"There is a {z} {c} {s} with a {t} fill in the {p} of the image.")
    return out


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd")


def _stats(path: Path, stats: dict) -> None:
    path.write_text(json.dumps(stats))


def generate(root: Path, shards: int, per_shard: int, seed: int = 0) -> int:
    """Write the synthetic dataset; returns the number of samples."""
    rng = np.random.default_rng(seed)
    (root / "shards").mkdir(parents=True)
    for layer, kind in (("recap", "caption"), ("regions", "regions"), ("quality", "filter")):
        (root / "layers" / layer).mkdir(parents=True)
        (root / "layers" / layer / "layer.json").write_text(json.dumps({"name": layer, "kind": kind}))
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "layout_version": 1,
                "name": "bench",
                "samples_per_shard": per_shard,
                "shard_root": "shards",
                "sources": [],
            }
        )
    )
    phrases = pa.array(_phrase_pool(rng, 4000))
    region_caps = pa.array([f"a {z} {c} {s}" for c in COLOURS for s in SHAPES for z in SIZES])
    labels = pa.array(SHAPES)
    openers = pa.array(["The image shows", "A picture of", "On a plain background,", "This scene holds"])
    alt = pa.array(["shapes", "abstract art", "a picture", "geometric pattern", "clipart", "image"])
    digits = len(str(per_shard - 1))
    for s in range(shards):
        name = f"{s:05d}"
        n = per_shard
        keys = pa.array([f"{name}{i:0{digits}d}" for i in range(n)])
        failed = rng.random(n) < 0.03
        w = rng.choice([256, 384, 512, 640, 768, 1024], n).astype(np.int32)
        h = rng.choice([256, 384, 512, 640, 768, 1024], n).astype(np.int32)
        status = np.where(failed, "failed_to_download", "success")
        err = np.where(failed, rng.choice(["HTTP Error 404", "timed out", "HTTP Error 503"], n), None)
        shas = [f"{x:064x}" for x in rng.integers(0, 2**62, n)]
        for j in np.flatnonzero(rng.random(n) < 0.01):  # 1 % exact image duplicates
            shas[j] = shas[(j + 1) % n]
        samples = pa.table(
            {
                "url": pa.array([f"https://example.com/{k}.jpg" for k in keys.to_pylist()]),
                "caption": alt.take(rng.integers(0, len(alt), n)),
                "source": pa.array(np.where(rng.random(n) < 0.5, "web-a", "web-b")),
                "meta": pa.nulls(n, pa.string()),
                "key": keys,
                "status": pa.array(status),
                "error_message": pa.array(err, pa.string()),
                "width": pa.array(np.where(failed, None, w), pa.int32()),
                "height": pa.array(np.where(failed, None, h), pa.int32()),
                "original_width": pa.array(np.where(failed, None, w * 2), pa.int32()),
                "original_height": pa.array(np.where(failed, None, h * 2), pa.int32()),
                "sha256": pa.array(np.where(failed, None, shas), pa.string()),
            },
            schema=SHARD_SCHEMA,
        )
        _write(samples, root / "shards" / f"{name}.parquet")
        _stats(
            root / "shards" / f"{name}_stats.json",
            {"count": n, "successes": int((~failed).sum()), "status_dict": {"success": int((~failed).sum())}},
        )

        # caption layer: an opener + 5 phrases (~60 words); 0.5 % reuse the previous caption exactly
        cfail = rng.random(n) < 0.02
        parts = [openers.take(rng.integers(0, len(openers), n))]
        parts += [phrases.take(rng.integers(0, len(phrases), n)) for _ in range(5)]
        cap = pa.compute.binary_join_element_wise(*parts, " ").to_numpy(zero_copy_only=False)
        dup = np.flatnonzero(rng.random(n) < 0.005)
        cap[dup] = cap[dup - 1]
        caption = pa.array(np.where(cfail, None, cap), pa.string())
        caps = pa.table(
            {
                "key": keys,
                "caption": caption,
                "model": pa.array(["qwen2.5-vl-7b"] * n),
                "prompt_id": pa.array(["dense-v1"] * n),
                "n_tokens": pa.array(np.where(cfail, None, rng.integers(40, 200, n)), pa.int32()),
                "finish_reason": pa.array(
                    np.where(cfail, None, np.where(rng.random(n) < 0.01, "length", "stop"))
                ),
                "latency_ms": pa.array(rng.gamma(4.0, 150.0, n).astype(np.float32)),
                "status": pa.array(np.where(cfail, "failed", "ok")),
                "error": pa.array(
                    np.where(cfail, rng.choice(["timeout after 60 s", "HTTP 503"], n), None), pa.string()
                ),
            },
            schema=GLOBAL_CAPTION_SCHEMA,
        )
        _write(caps, root / "layers" / "recap" / f"{name}.parquet")
        _stats(
            root / "layers" / "recap" / f"{name}_stats.json",
            {"count": n, "ok": int((~cfail).sum()), "failed": int(cfail.sum())},
        )

        # region layer: 1..9 boxes per image (~5)
        nb = rng.integers(1, 10, n)
        total = int(nb.sum())
        x0 = rng.random(total, dtype=np.float32) * 0.7
        y0 = rng.random(total, dtype=np.float32) * 0.7
        x1 = x0 + rng.random(total, dtype=np.float32) * 0.3 + 0.01
        y1 = y0 + rng.random(total, dtype=np.float32) * 0.3 + 0.01
        ci = rng.integers(0, len(region_caps), total)
        structs = pa.StructArray.from_arrays(
            [
                pa.array(x0),
                pa.array(y0),
                pa.array(x1),
                pa.array(y1),
                region_caps.take(ci),
                labels.take(pa.array(ci % len(SHAPES))),
            ],
            fields=list(REGION_SCHEMA.field("regions").type.value_type),
        )
        offsets = pa.array(np.concatenate([[0], np.cumsum(nb)]).astype(np.int32))
        regions = pa.table(
            {
                "key": keys,
                "regions": pa.ListArray.from_arrays(offsets, structs),
                "model": pa.array(["qwen2.5-vl-7b"] * n),
                "prompt_id": pa.array(["regions-v1"] * n),
                "status": pa.array(["ok"] * n),
                "error": pa.nulls(n, pa.string()),
            },
            schema=REGION_SCHEMA,
        )
        _write(regions, root / "layers" / "regions" / f"{name}.parquet")
        _stats(root / "layers" / "regions" / f"{name}_stats.json", {"count": n, "ok": n, "failed": 0})

        score = rng.random(n).astype(np.float32)
        keep = score > 0.2
        reasons = [
            [] if k else (["low_score"] + (["too_short"] if sc < 0.05 else []))
            for k, sc in zip(keep, score, strict=True)
        ]
        filt = pa.table(
            {
                "key": keys,
                "keep": pa.array(keep),
                "reasons": pa.array(reasons, pa.list_(pa.string())),
                "score": pa.array(score),
            },
            schema=FILTER_BASE_SCHEMA.append(pa.field("score", pa.float32())),
        )
        _write(filt, root / "layers" / "quality" / f"{name}.parquet")
        _stats(root / "layers" / "quality" / f"{name}_stats.json", {"count": n, "ok": n, "failed": 0})
    return shards * per_shard


def run_report(root: str) -> float:
    t = time.perf_counter()
    audit = open_audit(root)
    data = collect(audit)
    audit.close()
    assert data.samples > 0 and data.captions and data.regions and data.filters
    return time.perf_counter() - t


def run_queries(root: str) -> float:
    audit = open_audit(root)
    t = time.perf_counter()
    collect(audit)
    dt = time.perf_counter() - t
    audit.close()
    return dt


def run_floor(root: str) -> float:
    audit = open_audit(root)
    t = time.perf_counter()
    audit.con.execute("SELECT count(*), sum(length(caption)) FROM layer_recap").fetchall()
    audit.con.execute("SELECT sum(len(regions)) FROM layer_regions").fetchall()
    dt = time.perf_counter() - t
    audit.close()
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100,000 rows, 3 runs")
    ap.add_argument("--runs", type=int)
    ap.add_argument("--shards", type=int)
    ap.add_argument("--per-shard", type=int)
    ap.add_argument("--keep", help="generate into (or reuse) this folder instead of a temporary one")
    args = ap.parse_args()
    shards = args.shards or (20 if args.quick else 100)
    per_shard = args.per_shard or (5_000 if args.quick else 10_000)
    runs = args.runs or (3 if args.quick else 5)

    tmp = None
    if args.keep:
        root = Path(args.keep)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="fv-bench-audit-")
        root = Path(tmp.name) / "ds"
    if not (root / "dataset.json").exists():
        t = time.perf_counter()
        n = generate(root, shards, per_shard)
        print(
            f"generated {n:,} samples in {shards} shards at {root} in {time.perf_counter() - t:.1f} s",
            flush=True,
        )
    audit = open_audit(str(root))
    n = audit.con.execute("SELECT count(*) FROM layer_recap").fetchall()[0][0]
    boxes = audit.con.execute("SELECT count(*) FROM regions").fetchall()[0][0]
    size = sum(p.stat().st_size for p in root.rglob("*.parquet"))
    audit.close()
    print(
        f"{n:,} caption rows, {boxes:,} boxes, {size / 1e6:.0f} MB of Parquet; "
        f"{os.cpu_count()} CPUs; duckdb threads = default",
        flush=True,
    )

    candidates = {"report": run_report, "queries": run_queries, "scan floor": run_floor}
    for fn in candidates.values():  # warm-up (page cache, first-use costs)
        fn(str(root))
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(runs):
        for name, fn in candidates.items():  # alternate A B C A B C ...
            times[name].append(fn(str(root)))

    a = open_audit(str(root))
    per_query = collect(a).timings
    a.close()
    print(f"\n{'candidate':<14}{'median':>10}{'min':>10}{'max':>10}  unit")
    for name, ts in times.items():
        print(f"{name:<14}{statistics.median(ts):>10.3f}{min(ts):>10.3f}{max(ts):>10.3f}  s")
    print("\nper query (one run):")
    for name, dt in sorted(per_query.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<28}{dt:>8.3f} s")
    med = statistics.median(times["report"])
    floor = statistics.median(times["scan floor"])
    print(
        f"\naudit report: {med / TARGET_S:.2f} of the {TARGET_S:.0f} s target ({med:.2f} s for {n:,} caption rows, "
        f"{boxes:,} boxes), {med / floor:.1f}x the single-scan floor ({floor:.2f} s)"
    )
    if tmp:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
