"""Unit tests: prompts, box conventions and validation, answer judging, payloads, backoff."""

from __future__ import annotations

import json
import random

import pytest

from recaption.backends.base import CaptionRequest, CaptionResult, SamplingParams
from recaption.backends.openai_http import (
    backoff_delay,
    build_payload,
    normalize_endpoint,
    parse_completion,
    parse_retry_after,
)
from recaption.prompts import PromptError, available, load_prompt
from recaption.regions import (
    GROUNDED_SCHEMA,
    RegionError,
    from_unit,
    parse_grounded,
    to_unit,
    validate_regions,
)
from recaption.tasks import AnswerError, judge_text


def test_prompts_load_by_id_and_file(tmp_path):
    assert {"dense-v1", "short-v1", "regions-grounded-v1", "region-proposal-v1"} <= set(available())
    p = load_prompt("dense-v1")
    assert p.task == "global" and "Describe" in p.text and not p.text.startswith("#")
    g = load_prompt("regions-grounded-v1").render(width=10, height=20, bbox_convention="X")
    assert "10 x 20" in g and '{"regions"' in g  # literal braces survive
    f = tmp_path / "mine.txt"
    f.write_text("Say what you see.\n")
    mine = load_prompt(str(f))
    assert mine.id.startswith("mine@") and mine.text == "Say what you see."
    with pytest.raises(PromptError, match="unknown prompt id"):
        load_prompt("nope-v9")
    with pytest.raises(PromptError, match="needs"):
        load_prompt("regions-grounded-v1").render(width=1)


@pytest.mark.parametrize(
    "fmt, bbox, size, want",
    [
        ("pixels", [10, 20, 60, 80], (100, 200), (0.1, 0.1, 0.6, 0.4)),
        ("norm1000", [100, 250, 500, 1000], (640, 480), (0.1, 0.25, 0.5, 1.0)),
        ("norm1", [0.1, 0.2, 0.3, 0.4], (7, 9), (0.1, 0.2, 0.3, 0.4)),
    ],
)
def test_box_conventions_round_trip(fmt, bbox, size, want):
    got = to_unit(bbox, fmt, *size)
    assert got == pytest.approx(want)
    assert from_unit(got, fmt, *size) == pytest.approx(bbox)


def test_validation_clamps_drops_and_dedups():
    items = [
        {"bbox": [-10, 0, 500, 500], "label": "a", "caption": "clamped"},  # slightly out: clamped
        {"bbox": [2000, 2000, 3000, 3000], "label": "b", "caption": "outside"},
        {"bbox": [500, 500, 400, 600], "label": "c", "caption": "x1 < x0"},
        {"bbox": [100, 100, 101, 101], "label": "d", "caption": "tiny"},
        {"bbox": [0, 0, 500, 500], "label": "a", "caption": "duplicate of the first"},
        {"bbox": [0, 0, 500, 500], "label": "other", "caption": "same box, other label: kept"},
        {"bbox": [1, 2, 3], "label": "e", "caption": "3 numbers"},
        {"bbox": [600, 600, 900, 900], "label": "f", "caption": ""},
    ]
    kept, dropped = validate_regions(items, "norm1000", 100, 100)
    assert [k["caption"] for k in kept] == ["clamped", "same box, other label: kept"]
    assert kept[0]["x0"] == 0.0 and kept[0]["x1"] == 0.5
    assert dropped == {
        "out_of_image": 1,
        "degenerate": 1,
        "too_small": 1,
        "duplicate": 1,
        "bad_bbox": 1,
        "no_caption": 1,
    }


def test_parse_grounded_reasons():
    ok = json.dumps({"regions": [{"bbox": [10, 10, 50, 50], "label": "circle", "caption": "a red circle"}]})
    regions, _ = parse_grounded("```json\n" + ok + "\n```", "pixels", 100, 100)
    assert regions[0]["x1"] == pytest.approx(0.5)
    with pytest.raises(RegionError, match="malformed JSON"):
        parse_grounded('{"regions": [', "pixels", 100, 100)
    with pytest.raises(RegionError, match="wrong JSON"):
        parse_grounded('{"objects": []}', "pixels", 100, 100)
    with pytest.raises(RegionError, match="invalid boxes: none of 1 kept \\(1 out of image\\)"):
        parse_grounded(
            json.dumps({"regions": [{"bbox": [500, 500, 900, 900], "label": "x", "caption": "y"}]}),
            "pixels",
            100,
            100,
        )
    assert parse_grounded('{"regions": []}', "pixels", 100, 100) == ([], {})


@pytest.mark.parametrize(
    "text, finish, keep, reason",
    [
        ("", "stop", False, "empty answer"),
        ("   ", "stop", False, "empty answer"),
        ("I'm sorry, but I can't describe this.", "stop", False, "refusal"),
        ("nothing", "refusal", False, "refusal"),
        ("a red circle and", "length", False, "truncated"),
        ("a red circle and", "length", True, None),
        ("A red circle.", "stop", False, None),
    ],
)
def test_judge_text(text, finish, keep, reason):
    r = CaptionResult("k", text, finish)
    if reason is None:
        assert judge_text(r, keep) == text.strip()
    else:
        with pytest.raises(AnswerError, match=reason):
            judge_text(r, keep)


def test_payload_uses_response_format_json_schema_and_data_urls():
    req = CaptionRequest(
        "k",
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        [b"\xff\xd8jpeg"],
        SamplingParams(64, 0.2, 0.9),
        json_schema=GROUNDED_SCHEMA,
        schema_name="regions",
    )
    body = build_payload(req, "m")
    assert body["model"] == "m" and body["max_tokens"] == 64 and body["temperature"] == 0.2
    part = body["messages"][0]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/jpeg;base64,/9hq")
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == GROUNDED_SCHEMA
    assert "guided_json" not in json.dumps(body)
    assert req.messages[0]["content"][0] == {"type": "image"}  # the request itself is not modified


def test_parse_completion_and_helpers():
    assert parse_completion(
        {
            "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
    ) == ("hi", "stop", 3, 1)
    assert parse_completion(
        {"choices": [{"message": {"content": None, "refusal": "no"}, "finish_reason": "stop"}]}
    )[:2] == ("no", "refusal")
    with pytest.raises(ValueError):
        parse_completion({"error": "x"})
    assert normalize_endpoint("127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert (
        parse_retry_after("2.5") == 2.5
        and parse_retry_after(None) is None
        and parse_retry_after("soon") is None
    )
    assert 0 < parse_retry_after("Wed, 21 Oct 2099 07:28:00 GMT") <= 300
    rng = random.Random(0)
    ds = [backoff_delay(a, 0.5, 4.0, rng) for a in range(6)]
    assert all(0.25 <= ds[0] <= 0.5 for _ in [0]) and all(2.0 <= d <= 4.0 for d in ds[3:])


def _parser():
    from finevit import cli

    return cli


def test_cli_flags_build_the_config(monkeypatch):
    import finevit.cmd_recaption as cr
    import recaption.run as run_mod

    cli = _parser()
    args = cli.build_parser().parse_args(
        [
            "recaption",
            "DS",
            "--endpoint",
            "http://a:1",
            "--endpoint",
            "http://b:2/v1",
            "--shards",
            "00000,00002",
            "--task",
            "regions",
            "--region-mode",
            "proposals",
            "--prompt",
            "short-v1",
            "--max-in-flight",
            "7",
            "--retry-failed",
            "--keep-truncated",
            "--model",
            "org/model:v1",
            "--cache-dir",
            "s3://b/answers",
            "--no-persistent-cache",
            "--seed",
            "3",
        ]
    )
    assert args.func is cr.cmd_recaption
    seen = {}

    class Stop(Exception):
        pass

    def fake(root, cfg, **kw):
        seen["root"], seen["cfg"] = root, cfg
        raise Stop

    monkeypatch.setattr(run_mod, "recaption_layers", fake)
    with pytest.raises(Stop):
        cr.cmd_recaption(args)
    r = seen["cfg"].recaption
    assert seen["root"] == "DS"
    assert r.endpoints == ["http://a:1", "http://b:2/v1"] and r.shards == ["00000", "00002"]
    assert (r.task, r.region_mode, r.prompt, r.max_in_flight, r.retry_failed, r.keep_truncated, r.model) == (
        "regions",
        "proposals",
        "short-v1",
        7,
        True,
        True,
        "org/model:v1",
    )
    assert (r.cache_dir, r.persistent_cache, r.seed) == ("s3://b/answers", False, 3)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["recaption", "DS", "--set", "recaption.bogus=1"], "recaption.bogus"),
        (["recaption", "DS", "--set", "recaption.bbox_format=inches"], "recaption.bbox_format"),
        (["recaption", "/no/such/dataset", "--endpoint", "http://127.0.0.1:9"], "dataset.json not found"),
        (["recaption", "/no/such/dataset", "--prompt", "nope-v0"], "dataset.json not found"),
    ],
)
def test_cli_bad_input_is_one_clear_line(argv, needle, capsys):
    cli = _parser()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
