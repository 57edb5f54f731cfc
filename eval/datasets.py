"""Eval datasets from local files in the standard formats, and from FineViT datasets + layers.

Every loader returns one of three shapes (:class:`ClassificationSet`, :class:`CaptionSet`,
:class:`BoxSet`); images are :class:`ImageRef` (a path, or bytes read from a FineViT shard).
An image an annotation file names but that does not exist is counted in ``missing`` (with a
few examples) and left out; it is never fatal. A file in the wrong format raises
:class:`FormatError` naming the field that was expected.

Formats (``fmt``):

=================  =========================================================================
imagefolder        ``ROOT/<class>/<image>``; class name = folder name, ``_`` read as a space
csv                header ``image,label`` (paths relative to the CSV's folder or ``images``)
json               a list of ``{"image": ..., "label": ...}``
coco-captions      COCO ``captions_*.json``: ``images[{id, file_name}]``, ``annotations[{image_id, caption}]``
karpathy           ``dataset_coco.json`` / ``dataset_flickr30k.json``: ``images[{filename, filepath?,
                   split, sentences[{raw}]}]``, one ``split`` kept (default test)
dci                DCI's ``annotations/*.json`` (one per image: ``image``, ``short_caption``,
                   ``extra_caption``) or a folder of them; text = short + extra (default) or extra only
urban1k            Long-CLIP's Urban-1k folder: ``image/<n>.jpg`` + ``caption/<n>.txt``
sharegpt4v         a list of ``{"image", "conversations": [..., {"from": "gpt", "value": caption}]}``
                   (or ``"caption"``); Long-CLIP's ShareGPT4V-1k is the first 1000 (``limit``)
coco-instances     COCO ``instances_*.json`` read with pycocotools (non-crowd boxes)
finevit            a FineViT dataset root; captions from ``layer`` (``alt-text``: the shard
                   captions; several layers: several captions per image), boxes from a region layer
=================  =========================================================================

Every path (the data, ``images``) may be a local path or an ``s3://`` URI, read through the
project's storage layer (:mod:`engine.store`, configured by ``storage``: endpoint, keys, region;
boto3's chain for what is unset). On S3 a folder of images is listed once (ListObjectsV2 pages)
to tell missing images from present ones, and each image is read when it is embedded.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DCI_TEXTS = ("short+extra", "extra")


class FormatError(ValueError):
    """An annotation file is not in the format asked for; the message names the expected field."""


@dataclass(frozen=True)
class ImageRef:
    """Where one image is: a file ``path`` (local or ``s3://``), or ``data`` bytes (from a shard)."""

    name: str
    path: str | None = None
    data: bytes | None = None
    storage: Any = field(default=None, compare=False, repr=False)  # StorageConfig for s3:// paths

    def open(self) -> Image.Image:
        if self.path is not None and _is_s3(self.path):
            src: Any = io.BytesIO(Files(self.storage).read_bytes(self.path))
        else:
            src = self.path if self.path is not None else io.BytesIO(self.data or b"")
        with Image.open(src) as im:
            return im.convert("RGB")


def _is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def _norm(uri: str | Path) -> str:
    """A local path as ``pathlib`` spells it (no trailing slash); an ``s3://`` URI without one."""
    uri = str(uri)
    return uri.rstrip("/") if _is_s3(uri) else str(Path(uri))


class Files:
    """The few file operations the loaders need, on a local path or an ``s3://`` URI alike.

    Local paths go through ``os``; S3 through :func:`engine.store.filesystem_for` (s3fs), with each
    folder listed at most once (``isfile`` of every image of an annotation file is a set lookup,
    not a request per image)."""

    def __init__(self, storage: Any = None) -> None:
        self.storage = storage
        self._listed: dict[str, dict[str, bool]] = {}  # s3 folder -> {name: is_dir}

    def _fs(self, uri: str) -> tuple[Any, str]:
        from engine.store import filesystem_for

        return filesystem_for(uri, self.storage)

    # ---- paths ------------------------------------------------------------------------------
    @staticmethod
    def join(base: str, rel: str) -> str:
        if _is_s3(rel) or os.path.isabs(rel):
            return rel
        return posixpath.join(base.rstrip("/"), rel) if _is_s3(base) else str(Path(base) / rel)

    @staticmethod
    def parent(uri: str) -> str:
        return uri.rstrip("/").rsplit("/", 1)[0] if _is_s3(uri) else str(Path(uri).parent)

    @staticmethod
    def name(uri: str) -> str:
        return uri.rstrip("/").rsplit("/", 1)[-1] if _is_s3(uri) else Path(uri).name

    @staticmethod
    def suffix(uri: str) -> str:
        return posixpath.splitext(Files.name(uri))[1].lower()

    # ---- listing ----------------------------------------------------------------------------
    def _entries(self, uri: str) -> dict[str, bool]:
        """``{name: is_dir}`` directly under an s3 folder ({} if none), listed once."""
        uri = uri.rstrip("/")
        if uri not in self._listed:
            fs, path = self._fs(uri)
            try:
                entries = fs.ls(path, detail=True)
            except FileNotFoundError:
                entries = []
            except Exception as e:  # credentials, endpoint, permissions: one line naming the URI
                from engine.store import StorageError

                raise StorageError(f"cannot list {uri}: {type(e).__name__}: {e}") from None
            self._listed[uri] = {
                e["name"].rstrip("/").rsplit("/", 1)[-1]: e.get("type") == "directory"
                for e in entries
                if e["name"].rstrip("/") != path.rstrip("/")
            }
        return self._listed[uri]

    def isdir(self, uri: str) -> bool:
        if not _is_s3(uri):
            return os.path.isdir(uri)
        return bool(self._entries(uri)) or self._entries(self.parent(uri)).get(self.name(uri), False)

    def isfile(self, uri: str) -> bool:
        if not _is_s3(uri):
            return os.path.isfile(uri)
        return self._entries(self.parent(uri)).get(self.name(uri)) is False

    def listdir(self, uri: str) -> list[tuple[str, bool]]:
        """Sorted ``(name, is_dir)`` under a folder."""
        if not _is_s3(uri):
            return sorted((e.name, e.is_dir()) for e in os.scandir(uri))
        return sorted(self._entries(uri).items())

    # ---- reading ----------------------------------------------------------------------------
    def read_bytes(self, uri: str) -> bytes:
        if not _is_s3(uri):
            return Path(uri).read_bytes()
        fs, path = self._fs(uri)
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            raise
        except Exception as e:
            from engine.store import StorageError

            raise StorageError(f"cannot read {uri}: {type(e).__name__}: {e}") from None

    def read_text(self, uri: str) -> str:
        try:
            return self.read_bytes(uri).decode("utf-8")
        except FileNotFoundError:
            raise FormatError(f"{uri}: no such file") from None

    def image(self, uri: str, name: str | None = None) -> ImageRef:
        return ImageRef(name or self.name(uri), path=uri, storage=self.storage if _is_s3(uri) else None)


@dataclass
class _Base:
    source: str
    images: list[ImageRef]
    missing: int = 0
    missing_examples: list[str] = field(default_factory=list)
    split: str = "-"
    notes: list[str] = field(default_factory=list)

    def _missing(self, path: str) -> None:
        self.missing += 1
        if len(self.missing_examples) < 5:
            self.missing_examples.append(path)


@dataclass
class ClassificationSet(_Base):
    labels: list[int] = field(default_factory=list)
    classnames: list[str] = field(default_factory=list)


@dataclass
class CaptionSet(_Base):
    captions: list[list[str]] = field(default_factory=list)


@dataclass
class BoxSet(_Base):
    boxes: list[list[tuple[float, float, float, float]]] = field(default_factory=list)  # normalized x0y0x1y1
    labels: list[list[int]] = field(default_factory=list)
    classnames: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ helpers


def _load_json(path: str | Path, files: Files | None = None) -> Any:
    text = (files or Files()).read_text(str(path))
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None


def _need(obj: Any, key: str, where: str, kind: type | tuple[type, ...] = object) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise FormatError(f"{where}: expected field {key!r}")
    if not isinstance(obj[key], kind):
        raise FormatError(f"{where}: field {key!r} must be a {getattr(kind, '__name__', kind)}")
    return obj[key]


def _resolve(base: str | Path, rel: str) -> str:
    return Files.join(str(base), rel)


def _add_image(ds: _Base, path: str, files: Files | None = None) -> bool:
    files = files or Files()
    if not files.isfile(path):
        ds._missing(path)
        return False
    ds.images.append(files.image(path))
    return True


# ------------------------------------------------------------------------------- classification


def load_classification(
    path: str, fmt: str = "auto", images: str | None = None, storage: Any = None
) -> ClassificationSet:
    f = Files(storage)
    path = _norm(path)
    if fmt == "auto":
        fmt = "imagefolder" if f.isdir(path) else ("csv" if f.suffix(path) in (".csv", ".tsv") else "json")
    if fmt == "imagefolder":
        if not f.isdir(path):
            raise FormatError(f"{path}: imagefolder format needs a folder of class folders")
        classes = [name for name, is_dir in f.listdir(path) if is_dir]
        if not classes:
            raise FormatError(f"{path}: imagefolder format: no class folders found")
        ds = ClassificationSet(path, [], classnames=[c.replace("_", " ") for c in classes])
        for i, c in enumerate(classes):
            folder = f.join(path, c)
            for name, is_dir in f.listdir(folder):
                if not is_dir and f.suffix(name) in IMAGE_EXTS:
                    ds.images.append(f.image(f.join(folder, name), f"{c}/{name}"))
                    ds.labels.append(i)
        return ds
    base = images or f.parent(path)
    if fmt == "csv":
        import csv

        text = f.read_text(path)
        reader = csv.DictReader(
            io.StringIO(text, newline=""), delimiter="\t" if f.suffix(path) == ".tsv" else ","
        )
        for col in ("image", "label"):
            if reader.fieldnames is None or col not in reader.fieldnames:
                raise FormatError(f"{path}: expected a header with column {col!r} (image,label)")
        rows = [(r["image"], r["label"]) for r in reader]
    elif fmt == "json":
        data = _load_json(path, f)
        if not isinstance(data, list):
            raise FormatError(f"{path}: expected a list of {{'image': ..., 'label': ...}} objects")
        rows = [
            (_need(r, "image", f"{path}[{i}]", str), str(_need(r, "label", f"{path}[{i}]")))
            for i, r in enumerate(data)
        ]
    else:
        raise FormatError(f"zeroshot: unknown format {fmt!r} (imagefolder, csv, json)")
    classnames = sorted({label for _, label in rows})
    index = {c: i for i, c in enumerate(classnames)}
    ds = ClassificationSet(path, [], classnames=classnames)
    for image, label in rows:
        if _add_image(ds, _resolve(base, image), f):
            ds.labels.append(index[label])
    return ds


# ------------------------------------------------------------------------------------ captions


def load_captions(
    path: str,
    fmt: str = "auto",
    images: str | None = None,
    split: str = "test",
    layers: list[str] | None = None,
    dci_text: str = "short+extra",
    limit: int | None = None,
    storage: Any = None,
) -> CaptionSet:
    """Retrieval and long-caption retrieval sets: images with one or more captions each."""
    f = Files(storage)
    path = _norm(path)
    if fmt == "auto":
        fmt = _guess_caption_format(path, f)
    if fmt == "finevit":
        ds = load_finevit(path, layers or ["alt-text"], storage)
    elif fmt == "coco-captions":
        ds = _coco_captions(path, images or f.parent(path), f)
    elif fmt == "karpathy":
        ds = _karpathy(path, images or f.parent(path), split, f)
    elif fmt == "dci":
        ds = _dci(path, images, dci_text, f)
    elif fmt == "urban1k":
        ds = _urban1k(path, f)
    elif fmt == "sharegpt4v":
        ds = _sharegpt4v(path, images or f.parent(path), f)
    else:
        raise FormatError(
            f"unknown caption format {fmt!r} (coco-captions, karpathy, dci, urban1k, sharegpt4v, finevit)"
        )
    if limit:
        ds.images, ds.captions = ds.images[:limit], ds.captions[:limit]
    if not ds.images:
        raise FormatError(f"{path}: no usable image with a caption ({ds.missing} missing images)")
    return ds


def _guess_caption_format(p: str, f: Files) -> str:
    if f.isdir(p):
        if f.isfile(f.join(p, "dataset.json")):
            return "finevit"
        if f.isdir(f.join(p, "image")) and f.isdir(f.join(p, "caption")):
            return "urban1k"
        return "dci"
    data = _load_json(p, f)
    if isinstance(data, list):
        return "sharegpt4v"
    if isinstance(data, dict) and "annotations" in data:
        return "coco-captions"
    if isinstance(data, dict) and "images" in data:
        return "karpathy"
    return "dci"


def _coco_captions(p: str, base: str, f: Files) -> CaptionSet:
    data = _load_json(p, f)
    imgs = _need(data, "images", str(p), list)
    anns = _need(data, "annotations", str(p), list)
    caps: dict[Any, list[str]] = {}
    for i, a in enumerate(anns):
        caps.setdefault(_need(a, "image_id", f"{p} annotations[{i}]"), []).append(
            _need(a, "caption", f"{p} annotations[{i}]", str).strip()
        )
    ds = CaptionSet(str(p), [])
    for i, im in enumerate(imgs):
        iid = _need(im, "id", f"{p} images[{i}]")
        if iid in caps and _add_image(ds, _resolve(base, _need(im, "file_name", f"{p} images[{i}]", str)), f):
            ds.captions.append(caps[iid])
    return ds


def _karpathy(p: str, base: str, split: str, f: Files) -> CaptionSet:
    data = _load_json(p, f)
    imgs = _need(data, "images", str(p), list)
    ds = CaptionSet(str(p), [], split=split)
    for i, im in enumerate(imgs):
        where = f"{p} images[{i}]"
        if _need(im, "split", where, str) != split and not (split == "train" and im["split"] == "restval"):
            continue
        rel = _need(im, "filename", where, str)
        if im.get("filepath"):
            rel = posixpath.join(im["filepath"], rel)
        sents = [
            _need(s, "raw", f"{where} sentences", str).strip() for s in _need(im, "sentences", where, list)
        ]
        if _add_image(ds, _resolve(base, rel), f):
            ds.captions.append(sents)
    return ds


def _dci(p: str, images: str | None, dci_text: str, f: Files) -> CaptionSet:
    if dci_text not in DCI_TEXTS:
        raise FormatError(f"--dci-text must be one of {DCI_TEXTS}, got {dci_text!r}")
    if f.isdir(p):
        ann = f.join(p, "annotations") if f.isdir(f.join(p, "annotations")) else p
        files = [f.join(ann, n) for n, is_dir in f.listdir(ann) if not is_dir and n.endswith(".json")]
        img_base = images or (f.join(p, "photos") if f.isdir(f.join(p, "photos")) else ann)
    else:
        files, img_base = [p], images or f.parent(p)
    ds = CaptionSet(str(p), [], split="dci", notes=[f"DCI text: {dci_text}"])
    for fp in files:
        d = _load_json(fp, f)
        where = str(fp)
        image = _need(d, "image", where, str)
        extra = _need(d, "extra_caption", where, str).strip()
        text = (
            extra
            if dci_text == "extra"
            else f"{_need(d, 'short_caption', where, str).strip()} {extra}".strip()
        )
        if _add_image(ds, _resolve(img_base, image), f):
            ds.captions.append([text])
    return ds


def _urban1k(p: str, f: Files) -> CaptionSet:
    if not f.isdir(f.join(p, "image")) or not f.isdir(f.join(p, "caption")):
        raise FormatError(f"{p}: urban1k format expects folders 'image/' and 'caption/'")
    ds = CaptionSet(str(p), [], split="urban1k")
    for name, is_dir in f.listdir(f.join(p, "caption")):
        if is_dir or not name.endswith(".txt"):
            continue
        stem = name[: -len(".txt")]
        candidates = [f.join(f.join(p, "image"), stem + e) for e in IMAGE_EXTS]
        found = next((c for c in candidates if f.isfile(c)), None)
        if found is None:
            ds._missing(candidates[0])
            continue
        _add_image(ds, found, f)
        ds.captions.append([f.read_text(f.join(f.join(p, "caption"), name)).strip()])
    return ds


def _sharegpt4v(p: str, base: str, f: Files) -> CaptionSet:
    data = _load_json(p, f)
    if not isinstance(data, list):
        raise FormatError(f"{p}: expected a list of {{'image', 'conversations'}} objects")
    ds = CaptionSet(str(p), [], split="sharegpt4v")
    for i, r in enumerate(data):
        where = f"{p}[{i}]"
        image = _need(r, "image", where, str)
        if "caption" in r:
            text = str(r["caption"])
        else:
            conv = _need(r, "conversations", where, list)
            gpt = [c.get("value", "") for c in conv if isinstance(c, dict) and c.get("from") == "gpt"]
            if not gpt:
                raise FormatError(
                    f"{where}: expected field 'conversations' with a {{'from': 'gpt', 'value'}} turn"
                )
            text = gpt[0]
        if _add_image(ds, _resolve(base, image), f):
            ds.captions.append([text.strip()])
    return ds


# -------------------------------------------------------------------------------------- boxes


def load_boxes(
    path: str, fmt: str = "auto", images: str | None = None, layer: str = "gt-regions", storage: Any = None
) -> BoxSet:
    f = Files(storage)
    p = _norm(path)
    if fmt == "auto":
        fmt = "finevit" if f.isdir(p) else "coco-instances"
    if fmt == "finevit":
        return _finevit_boxes(p, layer, storage)
    if fmt != "coco-instances":
        raise FormatError(f"boxcls: unknown format {fmt!r} (coco-instances, finevit)")
    data = _load_json(p, f)
    for key in ("images", "annotations", "categories"):
        _need(data, key, str(p), list)
    for i, a in enumerate(data["annotations"][:1]):
        _need(a, "bbox", f"{p} annotations[{i}]", list)
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    coco.createIndex()
    cat_ids = sorted(coco.getCatIds())
    cat_index = {c: i for i, c in enumerate(cat_ids)}
    base = images or f.parent(p)
    ds = BoxSet(str(p), [], classnames=[coco.loadCats(c)[0]["name"] for c in cat_ids])
    for iid in sorted(coco.getImgIds()):
        info = coco.loadImgs(iid)[0]
        W, H = float(info.get("width") or 0), float(info.get("height") or 0)
        if W <= 0 or H <= 0:
            raise FormatError(f"{p} images id={iid}: expected fields 'width' and 'height' (> 0)")
        anns = [
            a
            for a in coco.loadAnns(coco.getAnnIds(imgIds=iid, iscrowd=False))
            if a["bbox"][2] > 0 and a["bbox"][3] > 0
        ]
        if not anns:
            continue
        if not _add_image(ds, _resolve(base, info["file_name"]), f):
            continue
        ds.boxes.append(
            [
                (x / W, y / H, min(1.0, (x + w) / W), min(1.0, (y + h) / H))
                for x, y, w, h in (a["bbox"] for a in anns)
            ]
        )
        ds.labels.append([cat_index[a["category_id"]] for a in anns])
    return ds


# ------------------------------------------------------------------------------------- FineViT


def _shard_images(ds: Any, shard: str) -> Iterable[tuple[str, bytes]]:
    with ds.shards.open(f"{shard}.tar") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.rpartition("/")[2].partition(".")
            if "." + ext.lower() in IMAGE_EXTS:
                yield key, tar.extractfile(m).read()


def _layer_rows(ds: Any, name: str, shard: str, columns: list[str]) -> dict[str, list[Any]]:
    import pyarrow.parquet as pq

    if name == "alt-text":
        with ds.shards.open(f"{shard}.parquet") as f:
            t = pq.read_table(f, columns=["key", "caption", "status"]).to_pydict()
        t["status"] = ["ok" if s == "success" else "failed" for s in t["status"]]
        return t
    layer = ds.layer(name)
    with layer.store.open(layer.parquet(shard)) as f:
        return pq.read_table(f, columns=columns).to_pydict()


def _finevit_shards(ds: Any, layers: list[str]) -> list[str]:
    from engine.layout import LayoutError

    shards = ds.committed_shards()
    for name in layers:
        if name == "alt-text":
            continue
        done = set(ds.layer(name).committed())
        if not done:
            raise LayoutError(f"layer {name!r} has no committed shards under {ds.root}")
        shards = [s for s in shards if s in done]
    if not shards:
        raise LayoutError(f"no shard of {ds.root} is committed in every layer of {layers}")
    return shards


def load_finevit(root: str, layers: list[str], storage: Any = None) -> CaptionSet:
    """Images of a FineViT dataset with captions from ``layers`` (rows not ok are skipped)."""
    from engine.layout import Dataset

    ds = Dataset(root, storage)
    out = CaptionSet(root, [], split="+".join(layers))
    for shard in _finevit_shards(ds, layers):
        caps: dict[str, list[str]] = {}
        for name in layers:
            t = _layer_rows(ds, name, shard, ["key", "caption", "status"])
            for k, c, s in zip(t["key"], t["caption"], t["status"], strict=True):
                if s == "ok" and c:
                    caps.setdefault(k, []).append(c)
        for key, data in _shard_images(ds, shard):
            if key in caps:
                out.images.append(ImageRef(key, data=data))
                out.captions.append(caps[key])
    return out


def _finevit_boxes(root: str, layer: str, storage: Any = None) -> BoxSet:
    from engine.layout import Dataset

    ds = Dataset(root, storage)
    rows: list[tuple[str, list[dict]]] = []
    shard_keys: dict[str, list[str]] = {}
    for shard in _finevit_shards(ds, [layer]):
        t = _layer_rows(ds, layer, shard, ["key", "regions", "status"])
        for k, regions, s in zip(t["key"], t["regions"], t["status"], strict=True):
            if s == "ok" and regions:
                for r in regions:
                    for f in ("x0", "y0", "x1", "y1", "label"):
                        _need(r, f, f"{root} layer {layer} key {k} region")
                rows.append((k, regions))
                shard_keys.setdefault(shard, []).append(k)
    classnames = sorted({r["label"] for _, regs in rows for r in regs if r["label"]})
    index = {c: i for i, c in enumerate(classnames)}
    by_key = dict(rows)
    out = BoxSet(root, [], split=layer, classnames=classnames)
    for shard, keys in shard_keys.items():
        wanted = set(keys)
        for key, data in _shard_images(ds, shard):
            if key not in wanted:
                continue
            regs = [r for r in by_key[key] if r["label"] and r["x1"] > r["x0"] and r["y1"] > r["y0"]]
            if not regs:
                continue
            out.images.append(ImageRef(key, data=data))
            out.boxes.append([(r["x0"], r["y0"], r["x1"], r["y1"]) for r in regs])
            out.labels.append([index[r["label"]] for r in regs])
    return out
