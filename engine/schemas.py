"""Arrow schemas of the dataset layout: the contract between every stage (ARCHITECTURE.md)."""

from __future__ import annotations

import pyarrow as pa

from engine.stats import ImageStatus, RowStatus

# Shard metadata: img2dataset's columns (in the order its Downloader writes them for our
# input columns url, caption, source, meta) so every shard reads like an img2dataset shard.
# ``meta`` carries a source's own per-sample metadata as a JSON string (e.g. a WebDataset
# sample's .json/.cls members); null when there is none.
SHARD_INPUT_COLUMNS = ["url", "caption", "source", "meta"]
SHARD_SCHEMA = pa.schema(
    [
        pa.field("url", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("source", pa.string()),
        pa.field("meta", pa.string()),
        pa.field("key", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("original_width", pa.int32()),
        pa.field("original_height", pa.int32()),
        pa.field("sha256", pa.string()),
    ]
)

# Row statuses as plain strings (the enums live in engine.stats, with the failure reasons).
STATUS_SUCCESS: str = ImageStatus.SUCCESS.value
STATUS_FAILED_DOWNLOAD: str = ImageStatus.FAILED_TO_DOWNLOAD.value
STATUS_FAILED_RESIZE: str = ImageStatus.FAILED_TO_RESIZE.value

# Layer rows: every layer has key, status ('ok' | 'failed') and error.
LAYER_OK: str = RowStatus.OK.value
LAYER_FAILED: str = RowStatus.FAILED.value

GLOBAL_CAPTION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("model", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("n_tokens", pa.int32()),
        pa.field("finish_reason", pa.string()),
        pa.field("latency_ms", pa.float32()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
    ]
)

REGION_STRUCT = pa.struct(
    [
        pa.field("x0", pa.float32()),
        pa.field("y0", pa.float32()),
        pa.field("x1", pa.float32()),
        pa.field("y1", pa.float32()),
        pa.field("caption", pa.string()),
        pa.field("label", pa.string()),
    ]
)

REGION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("regions", pa.list_(REGION_STRUCT)),
        pa.field("model", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
    ]
)

# Filter layers add their own score columns after these.
FILTER_BASE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("keep", pa.bool_()),
        pa.field("reasons", pa.list_(pa.string())),
    ]
)

# Signature layers (filtering's perceptual hashes, MinHash bands): computed once, reused by
# every filter run that asks for the same parameters; their own columns follow these.
SIGNATURE_BASE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
    ]
)

LAYER_SCHEMAS: dict[str, pa.Schema] = {
    "caption": GLOBAL_CAPTION_SCHEMA,
    "regions": REGION_SCHEMA,
    "filter": FILTER_BASE_SCHEMA,
    "signatures": SIGNATURE_BASE_SCHEMA,
}
