"""The vLLM driver up to the Ray Data LLM processor boundary (vLLM needs a GPU; it does not
install here; scripts/recaption_vllm_gpu.sh runs the real thing).

The contract below is vLLM's, not ours: every request row must pass it, and the driver test's
processor stand-in applies it to every row it receives (it refuses what vLLM would refuse).
"""

from __future__ import annotations

import base64
import io
import json
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
from tests.recaption.recap_helpers import N_IMAGES, duplicate_image

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
    rows = list(expand({"shard": "00001"}, str(scenes), None, cfg, on_expanded=lambda *a: told.append(a)))
    ((shard, layer, n, premade),) = told
    assert (shard, layer) == ("00001", 0) and n == len(rows) and n >= 1
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
            text = f"A caption of {row['req_key']}."
            if (row["sampling_params"] or {}).get("structured_outputs"):  # grounded regions
                text = json.dumps({"regions": [{"bbox": [50, 50, 400, 450], "label": "x", "caption": text}]})
            return postprocess(
                {
                    **row,
                    "generated_text": text,
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


# ---- duplicate images in one run, several layers in one pass ---------------------------------


@pytest.mark.slow
def test_vllm_driver_sends_each_duplicate_image_once(scenes, tmp_path, monkeypatch):
    """Duplicate images within one run (one pair in a shard, one across shards, one image three
    times): each distinct request reaches the engine once and its answer is fanned out to every
    duplicate's row (counted as cache hits); a shard waits for the shard its answers come from."""
    import ray.data.llm

    from engine.layers import read_layer
    from recaption.run import recaption

    duplicate_image(scenes, "000002", "000005")  # within shard 00000
    duplicate_image(scenes, "000003", "000024")  # across shards
    duplicate_image(scenes, "000003", "000017")  # three times
    duplicate_image(scenes, "000000", "000026")  # its answer fails (engine error) in the first run
    log, flag = tmp_path / "answered.txt", tmp_path / "fail"
    flag.write_text("1")
    monkeypatch.setattr(ray.data.llm, "build_processor", _stand_in(flag, log))
    rc = RecaptionConfig(backend="vllm", model="m", layer="vd", image_max_side=64, persistent_cache=False)
    rep = recaption(str(scenes), RecaptionRunConfig(recaption=rc), progress=False)
    sent = log.read_text().splitlines()
    assert len(sent) == len(set(sent)) == N_IMAGES - 1 - 4, "a duplicate image was sent again"
    assert rep.requests == N_IMAGES - 5 and rep.cache_hits == 4 and rep.ok == N_IMAGES - 3
    rows = {r["key"]: r for r in read_layer(str(scenes), "vd").to_pylist()}
    assert rows["000005"]["caption"] == rows["000002"]["caption"] == "A caption of 000002."
    for k in ("000024", "000017"):
        assert rows[k]["caption"] == "A caption of 000003." and rows[k]["status"] == "ok"
    assert rows["000026"]["error"] == rows["000000"]["error"] == "engine error: CUDA error: simulated"
    # --retry-failed: the failed pair is asked once again and both rows end ok
    flag.unlink()
    again = recaption(
        str(scenes),
        RecaptionRunConfig(recaption=rc.model_copy(update={"retry_failed": True})),
        progress=False,
    )
    assert (again.requests, again.cache_hits, again.shards_retried) == (1, 1, 2)
    assert log.read_text().splitlines()[len(sent) :] == ["000000"]
    rows = {r["key"]: r for r in read_layer(str(scenes), "vd").to_pylist()}
    assert rows["000026"]["caption"] == rows["000000"]["caption"] == "A caption of 000000."


def test_plan_duplicates_per_question():
    """The primary is the first sample of its group that the layer asks for; in proposals mode
    equal images with other boxes are other questions."""
    from recaption.dedupe import plan_duplicates

    groups = [[("00000", "a1"), ("00001", "b1"), ("00002", "c1")]]
    assert plan_duplicates(groups, {"00000": None, "00001": None, "00002": None}) == {
        "00001": {"b1": ["00000", "a1"]},
        "00002": {"c1": ["00000", "a1"]},
    }
    # a retry asks only for some keys; a shard not in the run is no primary
    assert plan_duplicates(groups, {"00001": {"b1"}, "00002": None}) == {"00002": {"c1": ["00001", "b1"]}}
    boxes = {
        "00000": {"a1": {"status": "ok", "regions": [1]}},
        "00001": {"b1": {"status": "ok", "regions": [2]}},
        "00002": {"c1": {"status": "ok", "regions": [1]}},
    }
    assert plan_duplicates(groups, {"00000": None, "00001": None, "00002": None}, boxes) == {
        "00002": {"c1": ["00000", "a1"]}
    }


@pytest.mark.slow
def test_vllm_expand_reads_each_image_once_for_several_layers(scenes, monkeypatch):
    """One expansion serves every layer of the pass: each image decoded once, one request per
    layer, rows tagged with their layer, one ledger entry per layer."""
    import recaption.samples as samples_mod

    decoded = []
    prepare = samples_mod.prepare
    monkeypatch.setattr(samples_mod, "prepare", lambda *a, **k: decoded.append(1) or prepare(*a, **k))
    cfg = RecaptionConfig(
        backend="vllm",
        model="m",
        image_max_side=64,
        layers=[{"task": "global", "layer": "g"}, {"task": "regions", "layer": "r"}],
    )
    plan = {
        "wants": [[0, "shard", None], [1, "shard", None]],
        "dups": {"1": {"000013": ["00001", "000012"]}},
    }
    told = []
    rows = list(
        expand(
            {"shard": "00001", "plan": json.dumps(plan)}, str(scenes), None, cfg, lambda *a: told.append(a)
        )
    )
    assert len(decoded) == 8
    assert sorted(r["layer"] for r in rows) == [0] * 8 + [1] * 7
    assert all("structured_outputs" in r["sampling_params"] for r in rows if r["layer"] == 1)
    for r in rows:
        check_vllm_messages(r["messages"])
    assert [(s, i, n) for s, i, n, _ in told] == [("00001", 0, 8), ("00001", 1, 7)]
    assert told[1][3] == [{"key": "000013", "__dup_of__": ["00001", "000012"]}]


@pytest.mark.slow
def test_vllm_driver_writes_several_layers_in_one_pass(scenes, tmp_path, monkeypatch):
    """recaption.layers on the vLLM driver: a global caption and grounded regions from one pass,
    each layer committed with its own rows, stats and run id (its lease); a later pass with one
    more layer asks only for that layer; the response cache is per layer."""
    import ray.data.llm

    from engine.layers import read_layer
    from engine.layout import Dataset
    from recaption.run import recaption_layers

    log = tmp_path / "answered.txt"
    monkeypatch.setattr(ray.data.llm, "build_processor", _stand_in(tmp_path / "never", log))
    specs = [{"task": "global", "layer": "g"}, {"task": "regions", "layer": "r"}]

    def run(specs):
        rc = RecaptionConfig(backend="vllm", model="m", image_max_side=64, layers=specs)
        return recaption_layers(str(scenes), RecaptionRunConfig(recaption=rc), progress=False)

    rg, rr = run(specs)
    assert len(log.read_text().splitlines()) == 2 * (N_IMAGES - 1)
    ds = Dataset(str(scenes))
    g, r = ds.layer("g"), ds.layer("r")
    assert g.committed() == r.committed() == ["00000", "00001", "00002"]
    assert (rg.layer, rg.ok, rg.requests, rr.layer, rr.ok, rr.requests) == ("g", 23, 23, "r", 23, 23)
    assert g.info()["task"] == "global" and r.info()["region_mode"] == "grounded"
    ids = {layer.read_stats(s).extra["run_id"] for layer in (g, r) for s in layer.committed()}
    assert len(ids) == 2  # one lease (run id) per layer
    assert all(
        x["caption"].startswith("A caption of")
        for x in read_layer(str(scenes), "g").to_pylist()
        if x["status"] == "ok"
    )
    assert all(
        len(x["regions"]) == 1 for x in read_layer(str(scenes), "r").to_pylist() if x["status"] == "ok"
    )
    marks = {p: p.stat().st_mtime_ns for p in (scenes / "layers").glob("[gr]/*_stats.json")}
    # a third layer (another prompt) and a copy of "g" under a new name: only the third is sent
    more = [
        *specs,
        {"task": "global", "layer": "g2", "prompt": "short-v1"},
        {"task": "global", "layer": "g3"},
    ]
    reps = run(more)
    assert len(log.read_text().splitlines()) == 3 * (N_IMAGES - 1)
    assert [x.requests for x in reps] == [0, 0, 23, 0] and reps[3].cache_hits == 23
    assert {p: p.stat().st_mtime_ns for p in marks} == marks
