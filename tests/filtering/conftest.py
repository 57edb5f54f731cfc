"""A tiny dataset with planted bad cases, for ``finevit filter`` end to end.

Images: synthetic scenes saved as files (a folder source), plus an exact copy of one file,
a resized re-encode of another (a near-duplicate image) and a file that is not an image.
A caption layer ``recap`` (written here, as a captioner would) holds dense captions of the
scenes with refusals, loops, truncations, wrong-language captions, a near-duplicate
caption and empty / null / failed captions planted at known files. ``PLANTED`` says which
file gets what and which filter must drop it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from engine.config import StorageConfig
from engine.layout import Dataset
from engine.schemas import GLOBAL_CAPTION_SCHEMA
from engine.synthetic import dense_caption, make_scene, render_scene

SEED, SIZE, SPS = 3, 160, 8
N_SCENES = 26


def default_phash_layer() -> str:
    """The signature layer the default filter config's ``near_dup_image`` writes (``phash-<bits>``)."""
    from filtering.config import build_filters, load_filter_config

    (name,) = {
        f.layer_name for f in build_filters(load_filter_config(None).filter) if f.name == "near_dup_image"
    }
    return name


REFUSAL = "I'm sorry, but I can't help with describing people in this image."
LOOP = (
    "A large red circle sits in the top left corner. " + "The red circle is next to the red circle and " * 20
)
GERMAN = (
    "Auf einem hellgrünen Hintergrund sind vier Formen angeordnet: zwei Kreise, eine Raute und ein Ring. "
    "In der oberen rechten Ecke befindet sich ein großer brauner Kreis mit gepunkteter Füllung."
)

# file index -> (what is planted, the filter whose reason must appear)
PLANTED: dict[int, tuple[str, str]] = {
    1: ("refusal", "refusal"),
    2: ("loop", "repetition"),
    4: ("truncated", "truncation"),
    6: ("german", "language"),
    9: ("cut", "truncation"),  # no finish_reason, but ends mid-sentence
    11: ("null", "caption"),
    12: ("empty", "caption"),
    14: ("failed", "caption"),
    26: ("exact copy of 3", "exact_dup_image"),
    27: ("resized copy of 5", "near_dup_image"),
    28: ("not an image", "image_status"),
    29: ("caption of 7, one word changed", "near_dup_caption"),
}
N_FILES = 30


def scene_caption(i: int) -> str:
    return dense_caption(make_scene(SEED, i, SIZE))


def write_images(folder: Path) -> None:
    folder.mkdir(parents=True)
    for i in range(N_SCENES):
        render_scene(make_scene(SEED, i, SIZE)).convert("RGB").save(folder / f"img_{i:03d}.png")
    (folder / "img_026.png").write_bytes((folder / "img_003.png").read_bytes())
    from PIL import Image

    im = Image.open(folder / "img_005.png")
    im.resize((int(im.width * 0.9), int(im.height * 0.9)), Image.LANCZOS).save(
        folder / "img_027.jpg", quality=85
    )
    (folder / "img_028.jpg").write_bytes(b"\xff\xd8\xff not a jpeg at all")
    render_scene(make_scene(SEED + 1, 29, SIZE)).convert("RGB").save(folder / "img_029.png")


def file_index(url: str) -> int:
    return int(url.rsplit("img_", 1)[1][:3])


def planted_caption(i: int) -> dict[str, Any]:
    """The caption layer row (without key) for file ``i``."""
    row: dict[str, Any] = {
        "caption": None,
        "model": "planted",
        "prompt_id": "dense-v1",
        "n_tokens": None,
        "finish_reason": "stop",
        "latency_ms": 1.0,
        "status": "ok",
        "error": None,
    }
    what = PLANTED.get(i, ("clean", ""))[0]
    if i < N_SCENES:
        row["caption"] = scene_caption(i)
    elif i == 26:
        row["caption"] = scene_caption(3) + " The scene is shown twice."
    elif i == 27:
        row["caption"] = "A resized view. " + scene_caption(5)
    elif i == 29:
        row["caption"] = scene_caption(7).replace(" background", " backdrop", 1)
    if what == "refusal":
        row["caption"] = REFUSAL
    elif what == "loop":
        row["caption"] = LOOP
        row["finish_reason"] = "stop"
    elif what == "truncated":
        row["caption"] = scene_caption(i)[:-1]
        row["finish_reason"] = "length"
    elif what == "cut":
        row["caption"] = scene_caption(i).rsplit(" ", 3)[0]
    elif what == "german":
        row["caption"] = GERMAN
    elif what == "null":
        row["caption"] = None
    elif what == "empty":
        row["caption"] = "   "
    elif what == "failed":
        row["caption"], row["status"], row["error"] = None, "failed", "timeout after 60 s"
    return row


def write_caption_layer(
    root: str, storage: StorageConfig | None = None, skip_shards: tuple[str, ...] = ()
) -> None:
    """The planted caption layer ``recap`` over every committed shard but ``skip_shards``."""
    from engine.layers import write_layer_shard

    ds = Dataset(root, storage)
    layer = ds.layer("recap")
    layer.write_info({"kind": "caption", "stage": "recaption", "model": "planted"})
    for shard in ds.committed_shards():
        if shard in skip_shards:
            continue
        with ds.shards.open(f"{shard}.parquet") as f:
            meta = pq.read_table(f, columns=["key", "url"]).to_pylist()
        rows = [{"key": m["key"], **planted_caption(file_index(m["url"]))} for m in meta]
        with layer.store.staging(f"t-{shard}") as staging:
            write_layer_shard(layer, shard, rows, GLOBAL_CAPTION_SCHEMA, staging, time.time())


def ingest_folder(folder: Path, out: str, env: dict[str, str] | None = None) -> None:
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "finevit",
            "ingest",
            str(folder),
            out,
            "--samples-per-shard",
            str(SPS),
            "--no-progress",
        ],
        check=True,
        cwd=repo,
        capture_output=True,
        env={**os.environ, **(env or {})},
    )


@dataclass
class Planted:
    images: Path
    root: Path


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Planted:
    base = tmp_path_factory.mktemp("filtering")
    write_images(base / "images")
    root = base / "ds"
    ingest_folder(base / "images", str(root))
    write_caption_layer(str(root))
    return Planted(base / "images", root)


def key_to_file(root: str, storage: StorageConfig | None = None) -> dict[str, int]:
    ds = Dataset(root, storage)
    out = {}
    for shard in ds.committed_shards():
        with ds.shards.open(f"{shard}.parquet") as f:
            for m in pq.read_table(f, columns=["key", "url"]).to_pylist():
                out[m["key"]] = file_index(m["url"])
    return out


def read_filter_layer(
    root: str, name: str, storage: StorageConfig | None = None
) -> dict[str, dict[str, Any]]:
    ds = Dataset(root, storage)
    lay = ds.layer(name)
    out = {}
    for shard in lay.committed():
        with lay.store.open(lay.parquet(shard)) as f:
            for r in pq.read_table(f).to_pylist():
                out[r["key"]] = r
    return out
