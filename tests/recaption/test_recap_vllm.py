"""The vllm backend up to the engine call: config, request rows, answer parsing, and the
driver's streaming commit path with the engine replaced by a CPU stand-in (vLLM needs a GPU;
scripts/recaption_vllm_gpu.sh runs the real thing)."""

from __future__ import annotations

import pytest
from PIL import Image

from recaption.backends.base import CaptionRequest, SamplingParams
from recaption.backends.vllm_ray import (
    engine_kwargs,
    postprocess,
    request_row,
    result_from_row,
    sampling_params,
)
from recaption.config import RecaptionConfig, RecaptionRunConfig, VLLMConfig
from recaption.regions import GROUNDED_SCHEMA
from tests.recaption.recap_helpers import N_IMAGES


def _req(schema=None) -> CaptionRequest:
    import io

    buf = io.BytesIO()
    Image.new("RGB", (20, 10), (200, 0, 0)).save(buf, "JPEG")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]
    return CaptionRequest(
        "000000001#2", msgs, [buf.getvalue()], SamplingParams(77, 0.3, 0.8), json_schema=schema
    )


def test_request_rows_and_sampling_params():
    row = request_row(_req(GROUNDED_SCHEMA), "00000", "000000001")
    img = row["messages"][0]["content"][0]
    assert img["type"] == "image" and isinstance(img["image"], Image.Image) and img["image"].size == (20, 10)
    assert row["messages"][0]["content"][1] == {"type": "text", "text": "describe"}
    assert (row["shard"], row["key"], row["req_key"]) == ("00000", "000000001", "000000001#2")
    sp = row["sampling_params"]
    assert sp == {
        "max_tokens": 77,
        "temperature": 0.3,
        "top_p": 0.8,
        "structured_outputs": {"json": GROUNDED_SCHEMA},
    }
    assert "guided_decoding" not in sampling_params(_req(GROUNDED_SCHEMA))
    assert "structured_outputs" not in sampling_params(_req())


def test_processor_config_and_engine_kwargs():
    from recaption.backends.vllm_ray import processor_config

    cfg = RecaptionConfig(
        backend="vllm",
        model="/models/qwen2.5-vl-7b",
        vllm=VLLMConfig(
            tensor_parallel_size=2, concurrency=3, batch_size=16, engine_kwargs={"enforce_eager": True}
        ),
    )
    kw = engine_kwargs(cfg)
    assert (
        kw["tensor_parallel_size"] == 2
        and kw["enforce_eager"] is True
        and kw["limit_mm_per_prompt"] == {"image": 2}
    )
    pc = processor_config(cfg)
    assert pc.model_source == "/models/qwen2.5-vl-7b" and pc.batch_size == 16 and pc.concurrency == 3
    assert pc.engine_kwargs["tensor_parallel_size"] == 2
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
        }
    )
    assert (r.text, r.finish_reason, r.prompt_tokens, r.completion_tokens, r.latency_ms) == (
        "abc",
        "length",
        9,
        5,
        500.0,
    )
    assert (
        result_from_row(
            {"req_key": "k", "generated_text": "a", "num_generated_tokens": 1, "max_tokens": 5}
        ).finish_reason
        == "stop"
    )
    assert (
        result_from_row({"req_key": "k", "__inference_error__": "CUDA OOM"}).error == "engine error: CUDA OOM"
    )


@pytest.mark.slow
@pytest.mark.parametrize("task, mode", [("global", "grounded"), ("regions", "proposals")])
def test_driver_path_with_a_cpu_stand_in_engine(scenes, monkeypatch, task, mode):
    """Everything but the engine: expansion in Ray Data, streaming answers, per-shard commits."""
    import ray.data.llm

    from recaption.run import read_layer, recaption

    seen = []

    def fake_build_processor(config, postprocess=None, **_):
        assert config.model_source == "tiny-model" and config.engine_kwargs["max_model_len"] == 8192

        def answer(row):
            seen.append(row["req_key"])
            assert isinstance(row["messages"][0]["content"][0]["image"], Image.Image)
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

    monkeypatch.setattr(ray.data.llm, "build_processor", fake_build_processor)
    cfg = RecaptionRunConfig(
        recaption=RecaptionConfig(
            backend="vllm", model="tiny-model", task=task, region_mode=mode, layer="vl", image_max_side=64
        )
    )
    rep = recaption(str(scenes), cfg, progress=False)
    assert (rep.shards_written, rep.count, rep.ok) == (3, N_IMAGES, N_IMAGES - 1), rep
    rows = read_layer(str(scenes), "vl").to_pylist()
    assert len({r["key"] for r in rows}) == N_IMAGES
    for r in rows:
        if r["status"] != "ok":
            assert r["error"].startswith("image not available")
        elif task == "global":
            assert r["caption"] == f"A caption of {r['key']}." and r["n_tokens"] == 5
        else:
            assert [x["caption"] for x in r["regions"]] == [
                f"A caption of {r['key']}#{i}." for i in range(len(r["regions"]))
            ]
    again = recaption(str(scenes), cfg, progress=False)
    assert (again.shards_written, again.shards_skipped) == (0, 3)


def test_postprocess_keeps_ids():
    out = postprocess(
        {
            "shard": "00001",
            "key": "k",
            "req_key": "k#0",
            "generated_text": "t",
            "sampling_params": {"max_tokens": 3},
            "messages": ["big"],
            "num_generated_tokens": 1,
        }
    )
    assert (
        out["shard"] == "00001"
        and out["req_key"] == "k#0"
        and out["max_tokens"] == 3
        and "messages" not in out
    )
