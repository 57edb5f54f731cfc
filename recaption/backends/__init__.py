"""Captioner backends behind one interface (:mod:`recaption.backends.base`).

============  =====================================================================
``openai``    any OpenAI-compatible server over HTTP (vLLM, SGLang, serve-captioner)
``sglang``    SGLang's server (``python -m sglang.launch_server``) through ``openai``
``hf``        transformers from a local model directory, in process
============  =====================================================================
"""

from __future__ import annotations

from recaption.backends.base import (
    Backend,
    BackendError,
    CaptionRequest,
    CaptionResult,
    CircuitOpen,
    SamplingParams,
)

__all__ = [
    "Backend",
    "BackendError",
    "CircuitOpen",
    "CaptionRequest",
    "CaptionResult",
    "SamplingParams",
    "make_backend",
]


def make_backend(cfg, model: str | None = None) -> Backend:
    """The async backend for a :class:`recaption.config.RecaptionConfig` (not ``vllm``: that one
    is a Ray Data pipeline, see :mod:`recaption.vllm_driver`)."""
    if cfg.backend in ("openai", "sglang"):
        from recaption.backends.openai_http import OpenAIBackend

        return OpenAIBackend(
            cfg.endpoints,
            model or cfg.model,
            max_in_flight=cfg.max_in_flight,
            timeout=cfg.timeout,
            retries=cfg.retries,
            backoff_base=cfg.backoff_base,
            backoff_max=cfg.backoff_max,
            eject_after=cfg.eject_after,
            probe_interval=cfg.probe_interval,
            api_key=cfg.api_key,
            outage_s=cfg.breaker_outage_s,
            breaker_http400=cfg.breaker_http400,
        )
    if cfg.backend == "hf":
        from recaption.backends.hf_local import HFBackend

        if not cfg.model:
            raise BackendError("the hf backend needs --model /path/to/local/model/dir")
        return HFBackend(
            cfg.model,
            device=cfg.hf.device,
            dtype=cfg.hf.dtype,
            batch_size=cfg.hf.batch_size,
            batch_wait_ms=cfg.hf.batch_wait_ms,
            trust_remote_code=cfg.hf.trust_remote_code,
        )
    raise BackendError(f"backend {cfg.backend!r} has no async client: it runs as a Ray Data pipeline")
