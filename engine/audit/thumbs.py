"""Random samples for the report: thumbnails read out of the shard tars, with region boxes drawn."""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

from engine.audit.views import Audit, quote_ident, quote_str

MAX_SIDE = 160  # thumbnail long side, pixels: keeps the report small
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# colour-blind friendly (Okabe-Ito), repeated for more boxes
BOX_COLOURS = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"]


@dataclass
class Box:
    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None
    caption: str | None
    colour: str = ""


@dataclass
class Sample:
    key: str
    shard: str
    width: int | None
    height: int | None
    alt_text: str | None
    captions: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # layer, caption, status
    region_layer: str | None = None
    boxes: list[Box] = field(default_factory=list)
    thumb: str | None = None  # path relative to the report folder
    problem: str | None = None  # why there is no thumbnail


def pick(audit: Audit, n: int = 20, seed: int = 0) -> list[Sample]:
    """``n`` successful samples in a random order that depends only on the keys and ``seed``."""
    rows = audit.con.execute(
        "SELECT key, shard, width, height, caption FROM samples WHERE status = 'success' "
        f"ORDER BY hash(key || {quote_str(str(seed))}), key LIMIT {int(n)}"
    ).fetchall()
    samples = [Sample(k, s, w, h, c) for k, s, w, h, c in rows]
    if not samples:
        return samples
    keys = "[" + ", ".join(quote_str(s.key) for s in samples) + "]"
    by_key = {s.key: s for s in samples}
    for lv in audit.layers_of("caption"):
        for key, cap, status in audit.con.execute(
            f"SELECT key, caption, status FROM {quote_ident(lv.view)} WHERE list_contains({keys}, key)"
        ).fetchall():
            by_key[key].captions.append((lv.name, cap, status))
    regions = audit.layers_of("regions")
    if regions:
        lv = regions[0]  # boxes of the first region layer are drawn; the others are in their sections
        for key, regs in audit.con.execute(
            f"SELECT key, regions FROM {quote_ident(lv.view)} WHERE status = 'ok' AND list_contains({keys}, key)"
        ).fetchall():
            s = by_key[key]
            s.region_layer = lv.name
            for i, r in enumerate(regs or []):
                s.boxes.append(
                    Box(
                        r["x0"],
                        r["y0"],
                        r["x1"],
                        r["y1"],
                        r.get("label"),
                        r.get("caption"),
                        BOX_COLOURS[i % len(BOX_COLOURS)],
                    )
                )
    return samples


def _read_images(audit: Audit, shard: str, keys: set[str]) -> dict[str, bytes]:
    """The image bytes of ``keys`` from ``<shard>.tar``, stopping once all are found."""
    found: dict[str, bytes] = {}
    store = audit.dataset.shards
    with store.open(f"{shard}.tar", "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = member.name.rpartition("/")[2].partition(".")
            if stem in keys and ext.lower() in IMAGE_EXTS and stem not in found:
                found[stem] = tar.extractfile(member).read()
                if len(found) == len(keys):
                    break
    return found


def render(audit: Audit, samples: list[Sample], out_dir: str, rel_dir: str = "thumbs") -> None:
    """Write one PNG per sample under ``out_dir/rel_dir`` (long side <= MAX_SIDE), boxes drawn."""
    os.makedirs(os.path.join(out_dir, rel_dir), exist_ok=True)
    by_shard: dict[str, list[Sample]] = {}
    for s in samples:
        by_shard.setdefault(s.shard, []).append(s)
    for shard, group in sorted(by_shard.items()):
        try:
            images = _read_images(audit, shard, {s.key for s in group})
        except (OSError, tarfile.TarError) as e:
            for s in group:
                s.problem = f"cannot read {audit.dataset.shards.uri(shard + '.tar')}: {e}"
            continue
        for s in group:
            data = images.get(s.key)
            if data is None:
                s.problem = f"no image for key {s.key} in {shard}.tar"
                continue
            try:
                s.thumb = _thumbnail(data, s.boxes, os.path.join(out_dir, rel_dir, f"{s.key}.png"))
                s.thumb = f"{rel_dir}/{s.key}.png"
            except Exception as e:
                s.problem = f"cannot decode the image of {s.key}: {e}"


def _thumbnail(data: bytes, boxes: list[Box], path: str) -> str:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = MAX_SIDE / max(w, h)
        tw, th = max(1, round(w * scale)), max(1, round(h * scale))
        im = im.resize((tw, th), Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(im)
    for b in boxes:
        x0, y0 = b.x0 * tw, b.y0 * th
        x1, y1 = b.x1 * tw, b.y1 * th
        if x1 <= x0 or y1 <= y0:
            continue
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline="white", width=3)
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=b.colour, width=2)
    im.save(path, format="PNG", optimize=True)
    return path
