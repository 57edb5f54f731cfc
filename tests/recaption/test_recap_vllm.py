"""The vLLM driver up to the Ray Data LLM processor boundary (vLLM needs a GPU; it does not
install here; scripts/recaption_vllm_gpu.sh runs the real thing).

The contract below is vLLM's, not ours: every request row must pass it, and the driver test's
processor stand-in applies it to every row it receives (it refuses what vLLM would refuse).
"""

from __future__ import annotations

import base64
import io
import shutil
import tarfile

import pytest
from PIL import Image

from recaption.backends.base import CaptionRequest, SamplingParams
from recaption.config import RecaptionConfig, RecaptionRunConfig, VLLMConfig
from recaption.regions import grounded_schema
from recaption.vllm_driver import (
    data_context,
    engine_kwargs,
    expand,
    postprocess,
    request_row,
    result_from_row,
    sampling_params,
)
from tests.recaption.recap_helpers import N_IMAGES

# ---- vLLM's chat content-part contract ------------------------------------------------------
# From vllm-project/vllm, vllm/entrypoints/chat_utils.py at commit
# 001eadcf295d90aa0664963cd6a9d93f38a2f3da (the 0.33 line; Ray Data LLM's prepare_multimodal
# stage calls its parse_chat_messages_async): MM_PARSER_MAP's keys are the part types a message
# may carry; any other ``type`` parses to "unknown part_type content" and the request fails.
VLLM_PART_TYPES = {
    "text",
    "thinking",
    "input_text",
    "output_text",
    "input_image",
    "image_url",
    "image_embeds",
    "audio_embeds",
    "prompt_embeds",
    "image_pil",
    "audio_url",
    "input_audio",
    "refusal",
    "video_url",
    "tool_reference",
}
# The two we send, with their fields (ChatCompletionContentPartTextParam /
# ChatCompletionContentPartImageParam, validated by pydantic TypeAdapter in vLLM):
#   {"type": "text", "text": str}
#   {"type": "image_url", "image_url": {"url": str (required), "detail": "auto"|"low"|"high"}}
IMAGE_URL_FIELDS = {"url", "detail"}


def check_vllm_part(part: object) -> None:
    assert isinstance(part, dict), f"a content part must be a dict, got {type(part).__name__}"
    # Ray Data stores a message list as Arrow structs: each part comes back with the union of the
    # parts' keys, the missing ones None. vLLM casts text parts and validates image parts with a
    # pydantic TypedDict adapter (extra keys ignored), so None-valued keys are fine.
    part = {k: v for k, v in part.items() if v is not None}
    t = part.get("type")
    assert t in VLLM_PART_TYPES, f"vLLM does not know the content-part type {t!r}"
    if t == "text":
        assert set(part) == {"type", "text"} and isinstance(part["text"], str), part
    elif t == "image_url":
        assert set(part) == {"type", "image_url"}, sorted(part)
        iu = part["image_url"]
        assert isinstance(iu, dict) and set(iu) <= IMAGE_URL_FIELDS and isinstance(iu.get("url"), str), iu
        assert iu["url"].startswith("data:image/jpeg;base64,"), iu["url"][:40]
        Image.open(io.BytesIO(base64.b64decode(iu["url"].split(",", 1)[1]))).verify()
    else:
        raise AssertionError(f"the recaption driver sends only text and image_url parts, not {t!r}")


def check_vllm_messages(messages: list) -> None:
    assert messages, "no messages"
    for m in messages:
        assert m.get("role") in ("system", "user", "assistant"), m.get("role")
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                check_vllm_part(part)
        else:
            assert isinstance(content, str), type(content)


def _jpeg(size=(20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 0, 0)).save(buf, "JPEG")
    return buf.getvalue()


def _req(schema=None, extra=()) -> CaptionRequest:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    return CaptionRequest(
        "000000001#2", msgs, [_jpeg()], SamplingParams(77, 0.3, 0.8, extra=extra), json_schema=schema
    )


def test_contract_rejects_what_vllm_rejects():
    """The checker itself: the part the old driver sent (type "image" with a PIL image) fails."""
    with pytest.raises(AssertionError, match="content-part type 'image'"):
        check_vllm_part({"type": "image", "image": Image.new("RGB", (4, 4))})
    with pytest.raises(AssertionError):
        check_vllm_part({"type": "image_url", "image_url": "data:image/jpeg;base64,AAAA"})


def test_request_rows_follow_vllms_contract():
    schema = grounded_schema(8)
    row = request_row(_req(schema), "00000", {"key": "000000001", "w": 20, "h": 10})
    check_vllm_messages(row["messages"])
    url = row["messages"][0]["content"][0]["image_url"]["url"]
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (20, 10)
    assert (row["shard"], row["key"], row["req_key"]) == ("00000", "000000001", "000000001#2")
    assert row["sampling_params"] == {
        "max_tokens": 77,
        "temperature": 0.3,
        "top_p": 0.8,
        "structured_outputs": {"json": schema},
    }
    assert "structured_outputs" not in sampling_params(_req())


def test_extra_fields_pass_through_to_vllm():
    extra = (
        ("chat_template_kwargs", {"enable_thinking": False}),
        ("mm_processor_kwargs", {"max_pixels": 200704}),
        ("repetition_penalty", 1.05),
        ("stop", ["</s>"]),
    )
    row = request_row(_req(extra=extra), "00000", {"key": "000000001"})
    assert row["sampling_params"]["repetition_penalty"] == 1.05 and row["sampling_params"]["stop"] == ["</s>"]
    assert row["mm_processor_kwargs"] == {"max_pixels": 200704}
    assert "chat_template_kwargs" not in row["sampling_params"]
    from recaption.vllm_driver import processor_config

    cfg = RecaptionConfig(backend="vllm", model="m", extra_body=dict(extra))
    assert processor_config(cfg).chat_template_stage["chat_template_kwargs"] == {"enable_thinking": False}


def test_processor_config_continues_on_error():
    from recaption.vllm_driver import processor_config

    cfg = RecaptionConfig(
        backend="vllm",
        model="/models/qwen2.5-vl-7b",
        vllm=VLLMConfig(
            tensor_parallel_size=2,
            concurrency=3,
            batch_size=16,
            engine_kwargs={"enforce_eager": True},
            trust_remote_code=True,
        ),
    )
    kw = engine_kwargs(cfg)
    assert kw["tensor_parallel_size"] == 2 and kw["enforce_eager"] is True and kw["trust_remote_code"] is True
    pc = processor_config(cfg)
    assert pc.should_continue_on_error is True
    assert pc.model_source == "/models/qwen2.5-vl-7b" and pc.batch_size == 16 and pc.concurrency == 3
    with pytest.raises(ValueError, match="--model"):
        processor_config(RecaptionConfig(backend="vllm"))


def test_result_from_row():
    r = result_from_row(
        {
            "req_key": "k",
            "generated_text": "abc",
            "num_generated_tokens": 5,
            "num_input_tokens": 9,
            "time_taken_llm": 0.5,
            "max_tokens": 5,
            "__inference_error__": "",
        }
    )
    assert (r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.latency_ms, r.ok) == (
        "abc",
        "length",
        9,
        5,
        500.0,
        True,
    )
    # an error row as Ray Data LLM hands it back (the whole row, the user's postprocess bypassed)
    err = result_from_row({"req_key": "k", "messages": [], "__inference_error__": "prompt too long"})
    assert err.error == "engine error: prompt too long"


def test_postprocess_keeps_ids_and_meta():
    out = postprocess(
        {
            "shard": "00001",
            "key": "k",
            "req_key": "k#0",
            "meta": "{}",
            "generated_text": "t",
            "sampling_params": {"max_tokens": 3},
            "messages": ["big"],
            "num_generated_tokens": 1,
        }
    )
    assert (
        out["req_key"] == "k#0" and out["meta"] == "{}" and out["max_tokens"] == 3 and "messages" not in out
    )


# ---- the driver, with Ray Data and a processor stand-in that enforces the contract ----------


def _corrupt_one_image(ds, shard: str = "00001") -> str:
    """Replace one image of ``shard``'s tar by bytes no decoder takes; returns its key."""
    p = ds / "shards" / f"{shard}.tar"
    out = p.with_suffix(".new")
    bad = None
    with tarfile.open(p) as src, tarfile.open(out, "w") as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read() if m.isfile() else None
            if bad is None and m.name.endswith(".jpg"):
                bad = m.name.rsplit("/", 1)[-1].rsplit(".", 1)[0]
                data = b"not an image at all"
                m.size = len(data)
            dst.addfile(m, io.BytesIO(data) if data is not None else None)
    shutil.move(out, p)
    return bad


def test_expand_counts_what_it_emits(scenes):
    """A corrupt image emits no request; the count reported is the requests emitted (finding 3)."""
    bad = _corrupt_one_image(scenes)
    cfg = RecaptionConfig(backend="vllm", model="m", image_max_side=64)
    told = []
    rows = list(
        expand({"shard": "00001"}, str(scenes), None, cfg, on_expanded=lambda s, n, p: told.append((s, n, p)))
    )
    ((shard, n, premade),) = told
    assert shard == "00001" and n == len(rows) and n >= 1
    assert [r["key"] for r in premade] == [bad] and premade[0]["error"].startswith("image not decodable")
    for r in rows:
        check_vllm_messages(r["messages"])


def _stand_in(fail_flag, log=None, seen=None):
    """A processor with the interface of ray.data.llm.build_processor's result. It refuses (with
    AssertionError, failing the job) any row vLLM would refuse, and answers the others; while
    ``fail_flag`` exists, the first sample's request comes back as an engine error row. ``log``:
    a file that gets one line per request answered; ``seen``: a dict that gets the Ray Data
    limits in force when the processor is built (on the driver)."""

    def build(config, postprocess=None, **_):
        assert config.should_continue_on_error is True
        if seen is not None:
            from ray.data import DataContext

            ctx = DataContext.get_current()
            seen["object_store_memory"] = ctx.execution_options.resource_limits.object_store_memory
            seen["block"] = ctx.target_max_block_size

        def answer(row):
            check_vllm_messages(row["messages"])
            if log is not None:
                with open(log, "a") as f:
                    f.write(row["req_key"] + "\n")
            if fail_flag.exists() and row["key"].endswith("00"):
                return {**row, "__inference_error__": "CUDA error: simulated"}
            return postprocess(
                {
                    **row,
                    "generated_text": f"A caption of {row['req_key']}.",
                    "num_generated_tokens": 5,
                    "num_input_tokens": 12,
                    "time_taken_llm": 0.01,
                }
            )

        return lambda ds: ds.map(answer)

    return build


@pytest.mark.slow
def test_vllm_driver_end_to_end(scenes, tmp_path, monkeypatch):
    """Errors become failed rows (2), a shard with a corrupt image commits (3), the commit reads
    no image (4), --retry-failed redoes the failed rows (4) and accumulates counts (7)."""
    import ray.data.llm

    import recaption.samples as samples_mod
    from engine.layers import read_layer
    from engine.layout import Dataset
    from recaption.run import recaption

    flag = tmp_path / "fail"
    flag.write_text("1")
    monkeypatch.setattr(ray.data.llm, "build_processor", _stand_in(flag))

    def no_tar(*a, **k):
        raise AssertionError("the driver read an image tar: the commit must use the answers' meta")

    monkeypatch.setattr(samples_mod, "iter_tar_images", no_tar)  # the driver process only
    bad = _corrupt_one_image(scenes)
    cfg = RecaptionRunConfig(
        recaption=RecaptionConfig(backend="vllm", model="tiny-model", layer="vl", image_max_side=64)
    )
    rep = recaption(str(scenes), cfg, progress=False)
    assert (rep.shards_written, rep.count) == (3, N_IMAGES), rep
    rows = {r["key"]: r for r in read_layer(str(scenes), "vl").to_pylist()}
    engine_failed = [k for k, r in rows.items() if (r["error"] or "").startswith("engine error")]
    assert engine_failed and all(
        rows[k]["error"] == "engine error: CUDA error: simulated" for k in engine_failed
    )
    assert rows[bad]["error"].startswith("image not decodable")
    layer = Dataset(str(scenes)).layer("vl")
    before = {s: layer.read_stats(s).extra["requests"] for s in layer.committed()}

    flag.unlink()
    again = recaption(
        str(scenes),
        cfg.model_copy(update={"recaption": cfg.recaption.model_copy(update={"retry_failed": True})}),
        progress=False,
    )
    assert again.shards_retried == len({k[:5] for k in engine_failed}) and again.requests == len(
        engine_failed
    )
    rows = {r["key"]: r for r in read_layer(str(scenes), "vl").to_pylist()}
    assert all(rows[k]["status"] == "ok" for k in engine_failed)
    after = {s: layer.read_stats(s).extra["requests"] for s in layer.committed()}
    assert sum(after.values()) == sum(before.values()) + len(engine_failed)
    assert rows[bad]["error"].startswith("image not decodable")


@pytest.mark.slow
def test_vllm_proposals_wait_for_their_layer(scenes, monkeypatch, tmp_path):
    import ray.data.llm

    from engine.layout import Dataset
    from recaption.run import recaption

    monkeypatch.setattr(ray.data.llm, "build_processor", _stand_in(tmp_path / "never"))
    Dataset(str(scenes)).layer("gt-regions").store.rm("00002_stats.json")  # not committed yet
    cfg = RecaptionRunConfig(
        recaption=RecaptionConfig(
            backend="vllm", model="m", task="regions", region_mode="proposals", layer="vp", image_max_side=64
        )
    )
    rep = recaption(str(scenes), cfg, progress=False)
    assert rep.shards_waiting == ["00002"] and rep.shards_written == 2, rep
    assert sorted(Dataset(str(scenes)).layer("vp").committed()) == ["00000", "00001"]


def test_data_context_bounds_the_bytes():
    """Finding 8 on the vLLM driver: Ray Data's object-store budget is max_bytes_in_flight and
    blocks are cut at 1/16 of it (so one shard's images do not pile up in a 128 MiB block)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old = (ctx.execution_options.resource_limits, ctx.target_max_block_size)
    try:
        data_context(RecaptionConfig(max_bytes_in_flight="64MiB"))
        assert ctx.execution_options.resource_limits.object_store_memory == 64 * 2**20
        assert ctx.target_max_block_size == 4 * 2**20
        data_context(RecaptionConfig(max_bytes_in_flight="4MiB"))
        assert ctx.target_max_block_size == 2**20  # never below 1 MiB
    finally:
        ctx.execution_options.resource_limits, ctx.target_max_block_size = old


@pytest.mark.slow
def test_vllm_driver_response_cache_and_budget(scenes, tmp_path, monkeypatch):
    """The vLLM driver keeps ok answers across runs (a new layer with the same settings sends
    0 requests, its rows equal the first layer's, hits counted), --no-persistent-cache sends
    again, and the pipeline runs under the byte budget."""
    import ray.data.llm

    from engine.layers import read_layer
    from recaption.run import recaption

    log, seen = tmp_path / "answered.txt", {}
    monkeypatch.setattr(ray.data.llm, "build_processor", _stand_in(tmp_path / "never", log, seen))

    def run(layer: str, **kw):
        rc = RecaptionConfig(
            backend="vllm", model="m", layer=layer, image_max_side=64, max_bytes_in_flight="32MiB", **kw
        )
        return recaption(str(scenes), RecaptionRunConfig(recaption=rc), progress=False)

    def answered() -> int:
        return len(log.read_text().splitlines()) if log.exists() else 0

    first = run("v1")
    assert answered() == N_IMAGES - 1 and first.cache_hits == 0
    assert seen == {"object_store_memory": 32 * 2**20, "block": 2 * 2**20}
    assert (scenes / "cache" / "recaption").exists()
    second = run("v2")
    assert answered() == N_IMAGES - 1, "the second layer sent requests"
    assert second.cache_hits == N_IMAGES - 1 and second.ok == first.ok == N_IMAGES - 1
    strip = lambda t: sorted((r["key"], r["caption"], r["status"]) for r in t.to_pylist())  # noqa: E731
    assert strip(read_layer(str(scenes), "v2")) == strip(read_layer(str(scenes), "v1"))
    run("v3", persistent_cache=False)
    assert answered() == 2 * (N_IMAGES - 1)
