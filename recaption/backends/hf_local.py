"""``hf`` backend: a transformers VLM from a local directory, CPU or GPU, batched generate.

``AutoProcessor`` + ``AutoModelForImageTextToText``: the processor's chat template turns
the request's messages (``{"type": "image"}`` placeholders, text parts) into the prompt;
requests that arrive within ``batch_wait_ms`` of each other (up to ``batch_size``, same
``max_tokens``) share one ``generate`` call, run in one dedicated thread so the asyncio loop
keeps accepting work. Temperature, ``top_p`` and ``seed`` are each row's own
(:mod:`.row_sampling`), as in vLLM. ``finish_reason`` is ``stop`` when the model ended the
answer, ``length`` when ``max_tokens`` cut it.

Transformers has no JSON-schema constrained decoding built in: a request's ``json_schema``
is not enforced here; the task's validation and retries handle off-schema answers (use the
``vllm`` / ``openai`` backends against vLLM or SGLang for constrained output).
"""

from __future__ import annotations

import asyncio
import io
import os
import time
from concurrent.futures import ThreadPoolExecutor

from recaption.backends.base import Backend, BackendError, CaptionRequest, CaptionResult, SamplingParams
from recaption.backends.row_sampling import RowSampler


def batch_key(sp: SamplingParams) -> SamplingParams:
    """What requests sharing one ``generate`` must agree on: ``max_tokens`` and the extra fields."""
    return SamplingParams(sp.max_tokens, extra=sp.extra)


def _torchvision_usable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # absent, or a build that does not match torch (KNOWN-TRAPS)
        return False
    return True


def image_only_processor(model_dir: str, trust_remote_code: bool = False):
    """The model's processor without its video part, with the PIL image processor: for
    processors (Qwen2-VL, Qwen2.5-VL, ...) whose video processor needs torchvision when
    torchvision is absent or broken. Raises ImportError when that is not the reason."""
    import json

    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    if _torchvision_usable():
        raise ImportError("AutoProcessor failed and torchvision is importable: not a torchvision problem")
    name = None
    for f in ("processor_config.json", "preprocessor_config.json"):
        p = os.path.join(model_dir, f)
        if os.path.isfile(p):
            with open(p) as fh:
                name = json.load(fh).get("processor_class") or name
        if name:
            break
    if name is None:
        with open(os.path.join(model_dir, "config.json")) as fh:
            name = PROCESSOR_MAPPING_NAMES.get(json.load(fh).get("model_type"))
    base = getattr(transformers, name or "", None)
    if base is None:
        raise ImportError(f"no processor class {name!r} in transformers for {model_dir}")

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        # ProcessorMixin takes its sub-processors from this signature: no video_processor
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    ImageOnlyProcessor.__name__ = f"ImageOnly{base.__name__}"
    return ImageOnlyProcessor.from_pretrained(model_dir, trust_remote_code=trust_remote_code)


class HFBackend(Backend):
    name = "hf"

    def __init__(
        self,
        model_dir: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        trust_remote_code: bool = False,
    ) -> None:
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise BackendError(
                f"{model_dir} is not a model directory (no config.json): the hf backend loads local models only"
            )
        self.model_dir = model_dir
        self.model = model_dir
        self.device_name = device
        self.dtype_name = dtype
        self.batch_size = batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.trust_remote_code = trust_remote_code
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hf-generate")
        self._queue: asyncio.Queue | None = None
        self._batcher: asyncio.Task | None = None
        self._start_lock: asyncio.Lock | None = None
        self.processor = None
        self.net = None

    @property
    def capacity(self) -> int:
        return self.batch_size * 2

    # ---- loading ---------------------------------------------------------------------------
    def _load(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dev = self.device_name
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {
            "auto": torch.bfloat16 if dev.startswith("cuda") else torch.float32,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
            "float16": torch.float16,
        }[self.dtype_name]
        try:
            try:
                self.processor = AutoProcessor.from_pretrained(
                    self.model_dir, trust_remote_code=self.trust_remote_code
                )
            except ImportError:
                # Qwen2-VL-style processors carry a video processor that needs torchvision
                self.processor = image_only_processor(self.model_dir, self.trust_remote_code)
            self.net = (
                AutoModelForImageTextToText.from_pretrained(
                    self.model_dir, dtype=dtype, trust_remote_code=self.trust_remote_code
                )
                .to(dev)
                .eval()
            )
        except Exception as e:
            raise BackendError(f"cannot load a VLM from {self.model_dir}: {type(e).__name__}: {e}") from e
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # decoder-only batched generation
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        self.device = dev

    async def start(self) -> None:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.net is None:
                await asyncio.get_running_loop().run_in_executor(self._pool, self._load)
            if self._batcher is None:
                self._queue = asyncio.Queue()
                self._batcher = asyncio.ensure_future(self._batch_loop())

    async def close(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            self._batcher = None
        self._pool.shutdown(wait=False)

    # ---- batching --------------------------------------------------------------------------
    async def generate(self, request: CaptionRequest) -> CaptionResult:
        if self._batcher is None:
            await self.start()
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((request, fut))
        return await fut

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self._queue.get()
            batch = [first]
            deadline = loop.time() + self.batch_wait
            while len(batch) < self.batch_size:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except TimeoutError:
                    break
            # one generate per max_tokens and extra fields: temperature, top_p and seed are per row
            groups: dict[SamplingParams, list] = {}
            for req, fut in batch:
                groups.setdefault(batch_key(req.sampling), []).append((req, fut))
            for items in groups.values():
                reqs = [r for r, _ in items]
                try:
                    results = await loop.run_in_executor(self._pool, self.generate_batch, reqs)
                except Exception as e:
                    results = [
                        CaptionResult(r.key, error=f"generation failed: {type(e).__name__}: {e}")
                        for r in reqs
                    ]
                for (_, fut), res in zip(items, results, strict=True):
                    if not fut.done():
                        fut.set_result(res)

    def generate_batch(self, reqs: list[CaptionRequest]) -> list[CaptionResult]:
        """One ``generate`` for requests that share ``max_tokens`` (blocking). Each row is greedy
        or sampled with its own temperature, ``top_p`` and seed (:mod:`.row_sampling`): a seeded
        request gets the same answer whatever else shares its batch."""
        import torch
        from PIL import Image
        from transformers import LogitsProcessorList

        t0 = time.perf_counter()
        proc, net = self.processor, self.net
        texts = [
            proc.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False) for r in reqs
        ]
        images = [Image.open(io.BytesIO(b)).convert("RGB") for r in reqs for b in r.images]
        inputs = proc(images=images or None, text=texts, padding=True, return_tensors="pt").to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(net.dtype)
        sampler = RowSampler(
            [r.sampling.temperature for r in reqs],
            [r.sampling.top_p for r in reqs],
            [r.sampling.seed for r in reqs],
        )
        tok = proc.tokenizer
        with torch.inference_mode():
            out = net.generate(
                **inputs,
                max_new_tokens=max(r.sampling.max_tokens for r in reqs),
                do_sample=False,  # RowSampler has chosen each row's token; greedy keeps it
                logits_processor=LogitsProcessorList([sampler]),
                pad_token_id=tok.pad_token_id,
            )
        n_in = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        eos = net.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
        eos_ids.discard(None)
        latency = (time.perf_counter() - t0) * 1000
        results = []
        for i, r in enumerate(reqs):
            new = out[i, n_in:].tolist()
            stop_at = next((j for j, t in enumerate(new) if t in eos_ids), None)
            used = new if stop_at is None else new[:stop_at]
            text = tok.decode(used, skip_special_tokens=True)
            finish = "stop" if stop_at is not None else "length"
            results.append(
                CaptionResult(
                    r.key, text, finish, int(prompt_tokens[i]), len(used), latency, 1, None, "local"
                )
            )
        return results
