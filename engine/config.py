"""The typed config tree: YAML recipes in ``configs/`` plus ``--set a.b=c`` overrides.

Every model forbids unknown fields, so a typo in a recipe or an override stops at
start-up with a message that names the field (``ingest.samples_per_shard: ...``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the reason."""


class StrictModel(BaseModel):
    """Base of every config model: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SECRET_FIELDS = frozenset({"access_key_id", "secret_access_key", "session_token", "api_key"})


def redact_secrets(dump: Any) -> Any:
    """A config dump (``model_dump(mode="json")``) with every secret field set to None, for
    writing beside outputs (checkpoints, run folders): credentials stay in the environment or
    the command line that gave them, never in a file a dataset or a model is shared with."""
    if isinstance(dump, dict):
        return {k: None if k in SECRET_FIELDS else redact_secrets(v) for k, v in dump.items()}
    if isinstance(dump, list):
        return [redact_secrets(v) for v in dump]
    return dump


class StorageConfig(StrictModel):
    """How ``s3://`` URIs are reached. Unset fields fall back to boto3's standard chain.

    ``endpoint_url`` defaults to ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` from the
    environment (read when the filesystem is built, so Ray workers see the driver's value
    through this config, not through their own environment).
    """

    endpoint_url: str | None = None
    # secrets: never in a repr (error messages, logs); redact_secrets() before a config is written
    access_key_id: str | None = Field(default=None, repr=False)
    secret_access_key: str | None = Field(default=None, repr=False)
    session_token: str | None = Field(default=None, repr=False)
    region: str | None = None
    anon: bool = False

    def resolved_endpoint(self) -> str | None:
        return (
            self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        )

    def resolved(self) -> StorageConfig:
        """A copy with environment fallbacks filled in, safe to ship to remote workers."""
        return self.model_copy(
            update={
                "endpoint_url": self.resolved_endpoint(),
                "access_key_id": self.access_key_id or os.environ.get("AWS_ACCESS_KEY_ID"),
                "secret_access_key": self.secret_access_key or os.environ.get("AWS_SECRET_ACCESS_KEY"),
                "session_token": self.session_token or os.environ.get("AWS_SESSION_TOKEN"),
                "region": self.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            }
        )


class RayConfig(StrictModel):
    """``address=None`` starts a local cluster; ``RAY_ADDRESS`` or ``--ray-address`` joins one."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    temp_dir: str | None = None


class ImageConfig(StrictModel):
    """How source images become shard images. Defaults suit native-resolution training:
    keep the aspect ratio, cap the long side at 1024, never upscale."""

    image_size: int = Field(default=1024, ge=1)
    resize_mode: Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"] = (
        "keep_ratio_largest"
    )
    resize_only_if_bigger: bool = True
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = Field(default=95, ge=1, le=100)
    # Decompression-bomb guard: refuse images whose *declared* size exceeds this, before decoding.
    max_pixels: int = Field(default=100_000_000, ge=1)


class IngestConfig(StrictModel):
    samples_per_shard: int = Field(default=10_000, ge=1)
    workers: int | None = Field(
        default=None,
        ge=1,
        description="shard tasks in flight; default: twice the cluster's CPUs, one running per CPU",
    )
    image: ImageConfig = ImageConfig()
    retry_failed: bool = False
    lease_ttl: float = Field(
        default=120.0, gt=0, description="seconds the dataset's lease lives without a heartbeat"
    )
    allow_private_network: bool = False
    # hosts (as written in URLs) that may resolve to private addresses, e.g. an internal mirror
    allow_hosts: list[str] = []
    # URL downloads (img2dataset's downloader)
    download_threads: int = Field(default=32, ge=1)
    timeout: float = Field(default=10.0, gt=0)  # per socket operation (connect, each read)
    # per download: a larger body is refused, a slower download (a drip under `timeout`) is cut off
    max_download_bytes: int = Field(default=64 * 2**20, ge=1)
    download_deadline_s: float = Field(default=60.0, gt=0)
    retries: int = Field(default=0, ge=0)
    user_agent_token: str | None = None

    @field_validator("samples_per_shard")
    @classmethod
    def _not_absurd(cls, v: int) -> int:
        if v > 10_000_000:
            raise ValueError("more than 10,000,000 samples per shard would not fit one task's memory")
        return v


class FineVitConfig(StrictModel):
    """The root of the tree. Each stage reads its own branch; storage and ray are shared."""

    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()
    ingest: IngestConfig = IngestConfig()


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config ({origin}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {field}: {e['msg']}")
    return "\n".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {item!r} has an empty key")
    value = yaml.safe_load(raw) if raw.strip() else None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    model: type[BaseModel] = FineVitConfig,
) -> Any:
    """Load a YAML recipe (or defaults), apply overrides, validate. Raises ConfigError."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
        origin = str(p)
    if overrides:
        data = apply_overrides(data, overrides)
        origin += " + --set overrides"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, origin)) from None
