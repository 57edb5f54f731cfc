"""Constants and the CLI command line shared by the recaption tests."""

from __future__ import annotations

import io
import shutil
import sys
import tarfile
from pathlib import Path

N_IMAGES, SPS = 24, 8  # the small test dataset: 3 shards

# the CLI in a subprocess
CLI = [sys.executable, "-m", "finevit"]


def duplicate_image(ds: Path, src: str, dst: str) -> None:
    """Make sample ``dst`` the same image as ``src``: its tar member gets ``src``'s bytes and
    its index row ``src``'s sha256 (of the original bytes, as ingest writes it for two equal
    images)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tarfile.open(ds / "shards" / f"{src[:5]}.tar") as t:
        data = next(t.extractfile(m).read() for m in t.getmembers() if m.name.startswith(src + "."))
    p = ds / "shards" / f"{dst[:5]}.tar"
    out = p.with_suffix(".new")
    with tarfile.open(p) as a, tarfile.open(out, "w") as b:
        for m in a.getmembers():
            body = a.extractfile(m).read() if m.isfile() else None
            if m.name.startswith(dst + ".") and m.name.endswith((".jpg", ".png", ".webp")):
                body, m.size = data, len(data)
            b.addfile(m, io.BytesIO(body) if body is not None else None)
    shutil.move(out, p)
    sha = {r["key"]: r["sha256"] for r in pq.read_table(ds / "shards" / f"{src[:5]}.parquet").to_pylist()}
    q = ds / "shards" / f"{dst[:5]}.parquet"
    t = pq.read_table(q)
    rows = t.to_pylist()
    for r in rows:
        if r["key"] == dst:
            r["sha256"] = sha[src]
    pq.write_table(pa.Table.from_pylist(rows, schema=t.schema), q)
