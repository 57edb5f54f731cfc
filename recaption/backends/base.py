"""One interface for every captioner backend.

A :class:`CaptionRequest` is a key, OpenAI-style chat messages whose images are
placeholders (``{"type": "image"}``) filled in order from ``images`` (encoded bytes),
sampling parameters and an optional JSON schema. Each backend renders that for its
engine (base64 data URLs for HTTP, PIL images for transformers and vLLM) and answers
with a :class:`CaptionResult`: text, finish reason, token usage, latency and, when the
request could not be served at all, ``error`` (the reason; ``text`` is then None).

Transport faults (timeouts, 429, 5xx, dropped connections) are retried inside the
backend; what the text says (malformed JSON, bad boxes, a refusal) is judged by the
task (:mod:`recaption.tasks`), which may ask again.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any


class BackendError(RuntimeError):
    """A backend cannot be used at all (bad model directory, unreachable endpoints, missing package)."""


class CircuitOpen(BackendError):
    """The run must stop: no endpoint for too long, or every request refused (HTTP 400). The
    shard in flight is not committed; a rerun redoes it once the fleet is back."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    extra: tuple[tuple[str, Any], ...] = ()  # extra request fields (config ``extra_body``), sorted


@dataclass
class CaptionRequest:
    key: str
    messages: list[dict[str, Any]]
    images: list[bytes] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    json_schema: dict[str, Any] | None = None
    schema_name: str = "output"


@dataclass
class CaptionResult:
    key: str
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0  # of the last (answered) attempt
    attempts: int = 1  # HTTP attempts, retries included
    error: str | None = None
    endpoint: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def fill_images(messages: list[dict[str, Any]], images: list[Any], render) -> list[dict[str, Any]]:
    """A copy of ``messages`` with the i-th ``{"type": "image"}`` replaced by ``render(images[i])``."""
    it = iter(images)
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [render(next(it)) if c.get("type") == "image" else c for c in content]
        out.append({**m, "content": content})
    return out


class Backend(abc.ABC):
    """Async: ``await start()`` once, then ``await generate(req)`` concurrently, then ``close()``."""

    name: str = "?"

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Check the backend is usable (raise :class:`BackendError` with the reason otherwise)."""

    @abc.abstractmethod
    async def generate(self, request: CaptionRequest) -> CaptionResult: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass

    @property
    def capacity(self) -> int:
        """How many requests it is worth having in flight at once."""
        return 8
