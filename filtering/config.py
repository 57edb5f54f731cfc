"""Typed filter configs: a YAML list of filters, each ``type: <name>`` plus its parameters.

A discriminated union on ``type``: an unknown filter or an unknown / bad parameter stops at
start-up with a message that names it (``filter.filters.2.length.min_chars: ...``). A config
file is either the list itself or a mapping with ``filters:`` (and optionally the other
fields of :class:`FilterStageConfig`). Each model's ``build()`` makes the filter object; a
filter whose library is missing fails there, naming the package to install.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from engine.config import (
    ConfigError,
    RayConfig,
    StorageConfig,
    StrictModel,
    _format_validation_error,
    apply_overrides,
)
from filtering.base import Filter


class _F(StrictModel):
    def build(self) -> Filter:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return self.model_dump(exclude={"type"})


class LengthCfg(_F):
    type: Literal["length"]
    min_chars: int = Field(default=0, ge=0)
    max_chars: int | None = Field(default=None, ge=1)
    min_words: int = Field(default=0, ge=0)
    max_words: int | None = Field(default=None, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)

    def build(self) -> Filter:
        from filtering.text import LengthFilter

        return LengthFilter(**self.params())


class RepetitionCfg(_F):
    type: Literal["repetition"]
    ngram: int = Field(default=3, ge=1, le=10)
    max_dup_ngram_ratio: float = Field(default=0.3, ge=0, le=1)
    max_repeated_words: int = Field(default=16, ge=1)
    max_sentence_repeats: int = Field(default=2, ge=1)

    def build(self) -> Filter:
        from filtering.text import RepetitionFilter

        return RepetitionFilter(**self.params())


class TruncationCfg(_F):
    type: Literal["truncation"]
    finish_reason: bool = True
    require_final_punctuation: bool = True

    def build(self) -> Filter:
        from filtering.text import TruncationFilter

        return TruncationFilter(**self.params())


def _check_regexes(patterns: list[str] | None, field: str) -> None:
    import re

    for p in patterns or []:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{field}: {p!r} is not a valid regular expression ({e})") from None


class RefusalCfg(_F):
    type: Literal["refusal"]
    patterns: list[str] | None = Field(
        default=None, description="regexes (default: filtering.text.DEFAULT_REFUSALS)"
    )
    boilerplate: list[str] | None = Field(default=None, description="regexes matched at the start")
    window: int = Field(default=300, ge=1)

    @model_validator(mode="after")
    def _re(self) -> RefusalCfg:
        _check_regexes(self.patterns, "patterns")
        _check_regexes(self.boilerplate, "boilerplate")
        return self

    def build(self) -> Filter:
        from filtering.text import RefusalFilter

        return RefusalFilter(**self.params())


class GarbledCfg(_F):
    type: Literal["garbled"]
    min_letter_ratio: float = Field(default=0.6, ge=0, le=1)
    max_replacement_chars: int = Field(default=0, ge=0)

    def build(self) -> Filter:
        from filtering.text import GarbledFilter

        return GarbledFilter(**self.params())


class LanguageCfg(_F):
    type: Literal["language"]
    keep: list[str] = Field(default_factory=lambda: ["en"], min_length=1, description="ISO 639-1 codes")
    candidates: list[str] | None = Field(
        default=None, description="languages the detector chooses among (default: all lingua knows)"
    )
    min_confidence: float = Field(default=0.5, ge=0, le=1)
    stopword_shortcut: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="English only: this share of English function words skips the model",
    )
    max_chars: int = Field(default=400, ge=16)

    def build(self) -> Filter:
        try:
            from filtering.text import LanguageFilter

            return LanguageFilter(**self.params())
        except ImportError:
            raise ConfigError(
                "filter 'language' needs lingua: pip install lingua-language-detector (or finevit[filter])"
            ) from None
        except ValueError as e:
            raise ConfigError(f"filter 'language': {e}") from None


class BlocklistCfg(_F):
    type: Literal["blocklist"]
    patterns: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _re(self) -> BlocklistCfg:
        _check_regexes(self.patterns, "patterns")
        return self

    def build(self) -> Filter:
        from filtering.text import BlocklistFilter

        return BlocklistFilter(**self.params())


class ImageStatusCfg(_F):
    type: Literal["image_status"]

    def build(self) -> Filter:
        from filtering.image import ImageStatusFilter

        return ImageStatusFilter()


class ImageSizeCfg(_F):
    type: Literal["image_size"]
    min_side: int = Field(default=0, ge=0)
    max_aspect: float | None = Field(default=None, ge=1)
    original: bool = False

    def build(self) -> Filter:
        from filtering.image import ImageSizeFilter

        return ImageSizeFilter(**self.params())


class ExactDupImageCfg(_F):
    type: Literal["exact_dup_image"]

    def build(self) -> Filter:
        from filtering.dedup import ExactDupImageFilter

        return ExactDupImageFilter()


class NearDupImageCfg(_F):
    type: Literal["near_dup_image"]
    max_distance: int = Field(
        default=4, ge=0, le=64, description="Hamming distance of two pHashes (of hash_bits bits)"
    )
    hash_bits: Literal[64, 256] = Field(
        default=64,
        description="64 (imagehash's 8x8 DCT hash) or 256 (16x16: tells apart images of one small "
        "object on a plain background, which 64 bits cluster together)",
    )

    @model_validator(mode="after")
    def _distance_within_hash(self) -> NearDupImageCfg:
        if self.max_distance > self.hash_bits // 4:
            raise ValueError(
                f"max_distance {self.max_distance} is over a quarter of a {self.hash_bits}-bit hash: "
                "unrelated images match"
            )
        return self

    def build(self) -> Filter:
        try:
            import imagehash  # noqa: F401
        except ImportError:
            raise ConfigError("filter 'near_dup_image' needs imagehash: pip install imagehash") from None
        from filtering.dedup import NearDupImageFilter

        return NearDupImageFilter(self.max_distance, self.hash_bits)


class NearDupCaptionCfg(_F):
    type: Literal["near_dup_caption"]
    threshold: float = Field(default=0.7, gt=0, lt=1, description="Jaccard similarity of word n-gram sets")
    num_perm: int = Field(default=128, ge=16, le=1024)
    ngram: int = Field(default=3, ge=1, le=10)
    seed: int = 1

    def build(self) -> Filter:
        try:
            import datasketch  # noqa: F401
        except ImportError:
            raise ConfigError("filter 'near_dup_caption' needs datasketch: pip install datasketch") from None
        from filtering.dedup import NearDupCaptionFilter

        return NearDupCaptionFilter(**self.params())


class RegionsCfg(_F):
    type: Literal["regions"]
    min_area: float = Field(default=0.0005, ge=0, le=1)
    max_area: float = Field(default=1.0, gt=0, le=1)
    max_boxes: int = Field(default=100, ge=1)
    min_boxes: int = Field(default=1, ge=0)
    dup_iou: float = Field(default=0.9, gt=0, le=1)
    min_caption_chars: int = Field(default=0, ge=0)
    max_caption_chars: int | None = Field(default=None, ge=1)

    def build(self) -> Filter:
        from filtering.regions import RegionFilter

        return RegionFilter(**self.params())


class AlignmentCfg(_F):
    type: Literal["alignment"]
    checkpoint: str = Field(description="a FineViT encoder: stage-1 checkpoint dir or exported dir")
    min_score: float | None = Field(default=None, ge=-1, le=1, description="drop below; None: score only")
    drop_percentile: float | None = Field(
        default=None,
        gt=0,
        lt=100,
        description="drop the lowest p % of scores over the whole layer (2 passes)",
    )
    batch_size: int = Field(default=32, ge=1)

    def build(self) -> Filter:
        from filtering.align import AlignmentFilter

        return AlignmentFilter(**self.params())


FilterSpec = Annotated[
    LengthCfg
    | RepetitionCfg
    | TruncationCfg
    | RefusalCfg
    | GarbledCfg
    | LanguageCfg
    | BlocklistCfg
    | ImageStatusCfg
    | ImageSizeCfg
    | ExactDupImageCfg
    | NearDupImageCfg
    | NearDupCaptionCfg
    | RegionsCfg
    | AlignmentCfg,
    Field(discriminator="type"),
]


class FilterStageConfig(StrictModel):
    layer: str | None = Field(default=None, description="the filter layer to write")
    on: list[str] = Field(
        default_factory=list, description="layers read: one caption layer, one region layer"
    )
    filters: list[FilterSpec] = Field(default_factory=list)
    workers: int | None = Field(default=None, ge=1, description="shard tasks in flight (default: 2 per CPU)")
    task_cpus: float = Field(default=1.0, gt=0)
    progress: bool = True

    @model_validator(mode="after")
    def _unique(self) -> FilterStageConfig:
        seen: set[str] = set()
        for f in self.filters:
            if f.type in seen:
                raise ValueError(f"filter {f.type!r} is listed twice: one entry per filter type")
            seen.add(f.type)
        return self


class FilterRunConfig(StrictModel):
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    filter: FilterStageConfig = FilterStageConfig()


DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "filters" / "default.yaml"


def load_filter_config(path: str | Path | None, overrides: list[str] | None = None) -> FilterRunConfig:
    """A filter config file (a list of filters, or a mapping with ``filters:``) + ``--set`` overrides.

    ``path=None``: ``configs/filters/default.yaml``. Raises :class:`ConfigError` naming the field."""
    p = Path(path) if path is not None else DEFAULT_CONFIG
    if not p.is_file():
        raise ConfigError(f"filter config not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"filter config {p} is not valid YAML: {e}") from None
    if isinstance(loaded, list):
        data: dict[str, Any] = {"filter": {"filters": loaded}}
    elif isinstance(loaded, dict) and "filters" in loaded:
        data = {"filter": loaded}
    elif isinstance(loaded, dict) and "filter" in loaded:
        data = loaded
    else:
        raise ConfigError(f"filter config {p} must be a list of filters or a mapping with 'filters:'")
    origin = str(p)
    if overrides:
        data = apply_overrides(data, overrides)
        origin += " + overrides"
    try:
        cfg = FilterRunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None
    if not cfg.filter.filters:
        raise ConfigError(f"{origin}: no filters listed")
    return cfg


def build_filters(cfg: FilterStageConfig) -> list[Filter]:
    """The filter objects, in config order; a bad parameter raises ConfigError naming the filter."""
    out = []
    for i, spec in enumerate(cfg.filters):
        try:
            out.append(spec.build())
        except ConfigError:
            raise
        except (ValueError, TypeError) as e:
            raise ConfigError(f"filter.filters.{i}.{spec.type}: {e}") from None
    return out
