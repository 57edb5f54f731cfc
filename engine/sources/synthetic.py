"""``synthetic://scenes?n=N&seed=S&size=W[&grid=G]``: procedurally drawn scenes with an exact scene graph.

The shard caption is coarse alt-text; the dense description and the region boxes are
written as the ``gt-global`` and ``gt-regions`` layers. A sample depends on (seed, index,
size, grid) alone, so keys, pixels and captions are the same whatever the shard plan's workers.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from engine.config import FineVitConfig
from engine.sources.base import LayerSpec, RawSample, Source, SourceError, register

GT_MODEL = "synthetic-scene-graph"


@register
class SyntheticSource(Source):
    kind = "synthetic"
    priority = 0
    layers = (
        LayerSpec("gt-global", "caption", {"stage": "ingest", "backend": "synthetic", "model": GT_MODEL}),
        LayerSpec("gt-regions", "regions", {"stage": "ingest", "backend": "synthetic", "model": GT_MODEL}),
    )

    def __init__(self, uri: str, cfg: FineVitConfig) -> None:
        super().__init__(uri, cfg)
        from engine.synthetic import parse_synthetic_uri

        try:
            self.params = parse_synthetic_uri(uri)
        except ValueError as e:
            raise SourceError(str(e)) from None

    @classmethod
    def matches(cls, uri: str, cfg: FineVitConfig) -> bool:
        return uri.startswith("synthetic://")

    def plan(self, samples_per_shard: int) -> Iterator[Any]:
        n = self.params["n"]
        for start in range(0, n, samples_per_shard):
            yield (start, min(samples_per_shard, n - start))

    def read(self, payload: tuple[int, int]) -> Iterator[RawSample]:
        from engine.synthetic import (
            alt_text,
            dense_caption,
            make_scene,
            region_annotations,
            render_scene,
            world_query,
        )

        start, count = payload
        seed, size, grid = self.params["seed"], self.params["size"], self.params["grid"]
        world = world_query(seed, size, grid)
        for index in range(start, start + count):
            scene = make_scene(seed, index, size, grid)
            buf = io.BytesIO()
            render_scene(scene).save(buf, format="PNG", compress_level=1)
            regions = region_annotations(scene)
            yield RawSample(
                url=f"synthetic://scenes?{world}&index={index}",
                data=buf.getvalue(),
                caption=alt_text(scene),
                meta={"seed": seed, "index": index, "objects": len(scene.objects)},
                layers={
                    "gt-global": {
                        "caption": dense_caption(scene),
                        "model": GT_MODEL,
                        "prompt_id": "ground-truth",
                        "n_tokens": None,
                        "finish_reason": "stop",
                        "latency_ms": 0.0,
                        "status": "ok",
                        "error": None,
                    },
                    "gt-regions": {
                        "regions": regions,
                        "model": GT_MODEL,
                        "prompt_id": "ground-truth",
                        "status": "ok",
                        "error": None,
                    },
                },
            )

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.params}
