"""The dataset layout and the one commit protocol every stage uses.

::

    <root>/dataset.json                     manifest (layout version, sources, samples per shard, ...)
    <root>/shards/<shard>.tar|.parquet      image shards, img2dataset format
    <root>/shards/<shard>_stats.json        written last: the shard's commit marker
    <root>/layers/<layer>/<shard>.parquet   one row per sample of the shard, keyed by ``key``
    <root>/layers/<layer>/<shard>_stats.json
    <root>/layers/<layer>/layer.json        what produced the layer

An img2dataset output folder keeps its shards at its root; ``dataset.json``'s
``shard_root`` says where the shards are (``"shards"`` by default, ``"."`` for such a
folder), so an existing download is a dataset without copying a byte.

Commit protocol (:func:`commit_parts`): data parts are moved into place under their
final names, then ``<shard>_stats.json`` is written. Readers only see shards whose stats
file exists; a rerun redoes every shard without one.
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.config import StorageConfig
from engine.stats import LayerStats, ShardStats
from engine.store import Store

LAYOUT_VERSION = 1
SHARD_DIGITS = 5
MANIFEST = "dataset.json"
STATS_SUFFIX = "_stats.json"
_SHARD_RE = re.compile(r"^(\d+)_stats\.json$")
_LAYER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class LayoutError(RuntimeError):
    """The dataset at a root is missing, malformed or incompatible; the message names the path."""


def shard_name(index: int, digits: int = SHARD_DIGITS) -> str:
    return f"{index:0{digits}d}"


def sample_digits(samples_per_shard: int) -> int:
    """Digits of the in-shard index in a key: img2dataset's ``ceil(log10(samples_per_shard))``."""
    return math.ceil(math.log10(samples_per_shard)) if samples_per_shard > 1 else 0


def make_key(shard: int, index: int, samples_per_shard: int, shard_digits: int = SHARD_DIGITS) -> str:
    """img2dataset's key: the shard id then the zero-padded index in the shard (``000010005``)."""
    d = sample_digits(samples_per_shard)
    return f"{(10**d) * shard + index:0{d + shard_digits}d}"


def check_layer_name(name: str) -> str:
    if not _LAYER_NAME_RE.match(name):
        raise LayoutError(
            f"invalid layer name {name!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("finevit")
    except PackageNotFoundError:
        return "unknown"


def commit_parts(
    store: Store, parts: Mapping[str, str], stats_rel: str, stats: ShardStats | LayerStats | Mapping[str, Any]
) -> None:
    """Move finished local files into place under ``store``, then write the commit marker last.

    ``parts`` maps destination paths (relative to ``store``) to local files, which are consumed.
    """
    for rel, local in parts.items():
        store.put_file(local, rel)
    if isinstance(stats, ShardStats | LayerStats):
        stats.write(store, stats_rel)
    else:
        store.write_json(stats_rel, dict(stats))


@dataclass
class LayerDir:
    """One layer of a dataset: ``layers/<name>/``."""

    store: Store
    name: str

    def parquet(self, shard: str) -> str:
        return f"{shard}.parquet"

    def stats(self, shard: str) -> str:
        return f"{shard}{STATS_SUFFIX}"

    def committed(self) -> list[str]:
        return _committed(self.store)

    def is_committed(self, shard: str) -> bool:
        return self.store.exists(self.stats(shard))

    def read_stats(self, shard: str) -> LayerStats:
        """The committed layer shard's marker."""
        return LayerStats.read(self.store, self.stats(shard))

    def info(self) -> dict[str, Any] | None:
        return self.store.read_json("layer.json") if self.store.exists("layer.json") else None

    def write_info(self, info: Mapping[str, Any]) -> None:
        self.store.write_json("layer.json", {"name": self.name, "code_version": code_version(), **info})


def _committed(store: Store) -> list[str]:
    names = []
    for n in store.listdir():
        m = _SHARD_RE.match(n)
        if m:
            names.append(m.group(1))
    return sorted(names)


class Dataset:
    """A dataset root (local path or ``s3://``) and everything the layout says about it."""

    def __init__(self, root: str, storage: StorageConfig | None = None) -> None:
        self.store = Store(root, storage)
        self.root = self.store.root
        self._manifest: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Dataset({self.root!r})"

    # ---- manifest ------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.store.exists(MANIFEST)

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            if not self.exists():
                raise LayoutError(
                    f"no dataset at {self.root}: {MANIFEST} not found (run `finevit ingest` first)"
                )
            try:
                self._manifest = self.store.read_json(MANIFEST)
            except ValueError as e:
                raise LayoutError(f"{self.store.uri(MANIFEST)} is not valid JSON: {e}") from None
            version = self._manifest.get("layout_version")
            if version != LAYOUT_VERSION:
                raise LayoutError(
                    f"{self.store.uri(MANIFEST)} has layout_version {version!r}; this code reads {LAYOUT_VERSION}"
                )
        return self._manifest

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        data = {"layout_version": LAYOUT_VERSION, **manifest, "updated_at": time.time()}
        self.store.write_json(MANIFEST, data)
        self._manifest = data

    @property
    def samples_per_shard(self) -> int:
        return int(self.manifest["samples_per_shard"])

    # ---- shards --------------------------------------------------------------------------
    @property
    def shards(self) -> Store:
        """The folder holding image shards (``shards/`` or wherever ``shard_root`` points)."""
        root = self.manifest.get("shard_root", "shards") if self.exists() else "shards"
        if "://" in root or root.startswith("/"):
            return Store(root, self.store.storage)
        return self.store if root in (".", "") else self.store.child(root)

    def committed_shards(self) -> list[str]:
        """Shard ids whose commit marker exists, sorted. Uncommitted shards are invisible."""
        return _committed(self.shards)

    def shard_tar(self, shard: str) -> str:
        return self.shards.uri(f"{shard}.tar")

    def shard_parquet(self, shard: str) -> str:
        return self.shards.uri(f"{shard}.parquet")

    def shard_stats(self, shard: str) -> ShardStats:
        """The committed image shard's marker."""
        return ShardStats.read(self.shards, f"{shard}{STATS_SUFFIX}")

    # ---- layers --------------------------------------------------------------------------
    def layer(self, name: str) -> LayerDir:
        return LayerDir(self.store.child(f"layers/{check_layer_name(name)}"), name)

    def layers(self) -> list[str]:
        return self.store.listdir("layers")

    # ---- summary -------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Totals over committed shards and layers, from the stats files alone (no data read)."""
        totals: dict[str, Any] = {"shards": 0, "count": 0, "successes": 0, "failed": 0, "reasons": {}}
        nodes: Counter[str] = Counter()  # Ray node id -> shards it built ("" when built outside Ray)
        for shard in self.committed_shards():
            s = self.shard_stats(shard)
            nodes[s.node or ""] += 1
            totals["shards"] += 1
            totals["count"] += s.count
            totals["successes"] += s.successes
            for reason, n in s.reasons.items():
                totals["reasons"][reason] = totals["reasons"].get(reason, 0) + n
        totals["failed"] = totals["count"] - totals["successes"]
        totals["nodes"] = dict(nodes)
        layers = {}
        for name in self.layers():
            layer = self.layer(name)
            ok = failed = 0
            layer_nodes: Counter[str] = Counter()
            committed = layer.committed()
            for shard in committed:
                st = layer.read_stats(shard)
                ok += st.ok
                failed += st.failed
                layer_nodes[st.node or ""] += 1
            layers[name] = {
                "shards": len(committed),
                "ok": ok,
                "failed": failed,
                "info": layer.info(),
                "nodes": dict(layer_nodes),
            }
        totals["layers"] = layers
        return totals
