"""Typed config of ``finevit recaption`` / ``serve-captioner`` (a branch of the config tree).

Every field can be set in a YAML recipe under ``recaption:`` or with ``--set recaption.X=...``;
the CLI flags are shorthands for the common ones.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from engine.config import RayConfig, StorageConfig, StrictModel
from recaption.presets import PRESETS, ModelFamily

BBoxFormat = Literal["pixels", "norm1000", "norm1"]


class HFConfig(StrictModel):
    """The ``hf`` backend: transformers from a local model directory."""

    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(default=8, ge=1)
    batch_wait_ms: float = Field(default=5.0, ge=0)
    trust_remote_code: bool = Field(
        default=False, description="run the model directory's own code (InternVL, MiniCPM-V, Phi-3.5-V)"
    )
    num_gpus: float | None = Field(
        default=None,
        ge=0,
        description="GPUs per hf actor (default: 1 when CUDA is visible and device is auto/cuda)",
    )


class VLLMConfig(StrictModel):
    """The ``vllm`` backend: vLLM engines in the Ray cluster through Ray Data LLM."""

    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    concurrency: int = Field(default=1, ge=1, description="engine replicas")
    batch_size: int = Field(default=64, ge=1)
    max_model_len: int = Field(default=8192, ge=256)
    max_num_seqs: int = Field(default=256, ge=1)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    engine_kwargs: dict = Field(default_factory=dict)
    trust_remote_code: bool = False


class LayerSpec(StrictModel):
    """One layer of a multi-layer pass (``recaption.layers``): what differs from the top-level
    settings. Images (size, JPEG quality, model family), the backend and the orchestration are
    the pass's own: one read and decode of each image serves every layer."""

    task: Literal["global", "regions"]
    layer: str | None = None
    prompt: str | None = None
    region_mode: Literal["grounded", "proposals"] | None = None
    proposals_layer: str | None = None
    box_hint: Literal["coords", "draw", "crop"] | None = None
    bbox_format: BBoxFormat | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0)
    keep_truncated: bool | None = None
    max_regions: int | None = Field(default=None, ge=1)
    extra_body: dict | None = None


class RecaptionConfig(StrictModel):
    task: Literal["global", "regions"] = "global"
    layer: str | None = None
    backend: Literal["openai", "vllm", "sglang", "hf"] = "openai"
    endpoints: list[str] = Field(default_factory=list)
    model: str | None = Field(
        default=None, description="served model name (openai/sglang) or a local directory (hf/vllm)"
    )
    prompt: str | None = Field(
        default=None, description="prompt id (recaption/prompts/<id>.txt) or a file; default per task"
    )
    # sampling
    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = Field(
        default=None,
        ge=0,
        description="sampled answers (temperature > 0) are reproducible: each request carries its own "
        "seed, made from this one and the image (its bytes' sha256), so a rerun samples the same answer "
        "whatever the batching and order; unset, the server samples at random",
    )
    keep_truncated: bool = Field(
        default=False, description="keep captions cut by max_tokens (status ok) instead of failing them"
    )
    model_family: ModelFamily = Field(
        default="generic", description="box convention and resize grid of the model (recaption/presets.py)"
    )
    extra_body: dict = Field(
        default_factory=dict,
        description="extra request fields passed to the engine: chat_template_kwargs, mm_processor_kwargs, "
        "repetition_penalty, stop, top_p, seed, ...",
    )
    # images
    image_max_side: int = Field(default=768, ge=16)
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    # regions
    region_mode: Literal["grounded", "proposals"] = "grounded"
    proposals_layer: str = "gt-regions"
    box_hint: Literal["coords", "draw", "crop"] = "coords"
    bbox_format: BBoxFormat = "norm1000"
    min_box_area: float = Field(default=1e-4, ge=0, le=1, description="as a fraction of the image")
    dedup_iou: float = Field(default=0.9, gt=0, le=1)
    max_regions: int = Field(default=64, ge=1)
    # HTTP client (openai / sglang)
    max_in_flight: int = Field(default=64, ge=1, description="requests in flight per endpoint")
    max_bytes_in_flight: int = Field(
        default=512 * 2**20,
        ge=1,
        description="per client actor: bytes of prepared images waiting plus request bodies in flight "
        "(e.g. 512MiB); bounds memory whatever the image sizes (recaption/budget.py)",
    )
    timeout: float = Field(default=120.0, gt=0, description="per-request seconds")
    retries: int = Field(default=3, ge=0)
    backoff_base: float = Field(default=0.5, ge=0)
    backoff_max: float = Field(default=30.0, ge=0)
    eject_after: int = Field(default=5, ge=1, description="consecutive failures that take an endpoint out")
    probe_interval: float = Field(default=2.0, gt=0)
    api_key: str | None = Field(default=None, repr=False)  # a secret: never in a repr or a file
    # response cache across runs (recaption/cache.py)
    persistent_cache: bool = Field(
        default=True, description="reuse and store answers across runs (content-addressed)"
    )
    cache_dir: str | None = Field(
        default=None, description="where answers are kept (default <dataset>/cache/recaption; local or s3://)"
    )
    # orchestration
    shards: list[str] | None = None
    limit: int | None = Field(default=None, ge=1, description="at most this many images (whole shards)")
    retry_failed: bool = False
    clients: int = Field(default=1, ge=1, description="client actors (one asyncio loop each)")
    shards_in_flight: int = Field(default=4, ge=1, description="shards per client processed at once")
    client_cpus: float = Field(default=0.25, gt=0, description="Ray CPUs reserved per client actor")
    progress: bool = True
    lease_ttl: float = Field(
        default=120.0, gt=0, description="seconds a layer lease lives without a heartbeat"
    )
    breaker_outage_s: float = Field(
        default=120.0, gt=0, description="stop the run after this long with no endpoint in rotation"
    )
    breaker_http400: int = Field(
        default=32, ge=1, description="stop the run after this many HTTP 400 in a row with no success"
    )
    layers: list[LayerSpec] = Field(
        default_factory=list,
        description="several layers from one image pass (e.g. a global caption and grounded regions); "
        "each entry overrides task/layer/prompt/sampling of the settings above (recaption/plan.py)",
    )
    hf: HFConfig = HFConfig()
    vllm: VLLMConfig = VLLMConfig()

    @field_validator("max_bytes_in_flight", mode="before")
    @classmethod
    def _bytes(cls, v):
        from recaption.budget import parse_bytes

        return parse_bytes(v) if isinstance(v, str) else v

    @field_validator("shards", mode="before")
    @classmethod
    def _split(cls, v):
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        if isinstance(v, int):
            return [str(v)]
        return v

    @model_validator(mode="after")
    def _preset(self):
        if "bbox_format" not in self.model_fields_set:
            self.bbox_format = PRESETS[self.model_family].bbox_format  # type: ignore[assignment]
        return self

    @field_validator("endpoints", mode="before")
    @classmethod
    def _split_endpoints(cls, v):
        if isinstance(v, str):
            return [s.strip() for s in v.split(",") if s.strip()]
        return v


class RecaptionRunConfig(StrictModel):
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    recaption: RecaptionConfig = RecaptionConfig()
