"""Each filter on hand-made cases: what it keeps, what it drops, and the reason it gives."""

from __future__ import annotations

import pytest

from filtering.base import Sample, reason_filter
from filtering.image import ImageSizeFilter, ImageStatusFilter
from filtering.regions import RegionFilter, iou
from filtering.run import apply_filters
from filtering.text import (
    BlocklistFilter,
    GarbledFilter,
    LanguageFilter,
    LengthFilter,
    RefusalFilter,
    RepetitionFilter,
    TruncationFilter,
    caption_problem,
    dup_ngram_ratio,
    longest_repeat,
    sentence_repeats,
)

CLEAN = (
    "Three shapes lie on a pale blue background. In the top left there is a large red circle with a "
    "striped fill. A small green triangle sits in the bottom right, below and to the right of the circle. "
    "The word 'sun' is written in the center."
)


def s(caption, **kw) -> Sample:
    return Sample(key="000000", caption=caption, **kw)


def test_length_bounds() -> None:
    f = LengthFilter(min_chars=10, max_chars=300, min_words=3, max_words=60, max_tokens=80)
    assert f.check(s(CLEAN)).keep
    assert f.check(s("a circle")).reason == "length: fewer than 10 chars"
    assert "fewer than 3 words" in f.check(s("a_big_circle")).reason
    assert "more than 300 chars" in f.check(s(CLEAN * 2)).reason
    assert "more than 80 tokens" in f.check(s(CLEAN, n_tokens=81)).reason
    assert f.check(s(CLEAN, n_tokens=40)).scores["n_words"] == len(CLEAN.split())


def test_repetition_catches_loops_not_dense_captions() -> None:
    f = RepetitionFilter(ngram=3, max_dup_ngram_ratio=0.3, max_repeated_words=12, max_sentence_repeats=2)
    assert f.check(s(CLEAN)).keep
    loop = "A red circle is on the left. " + "The circle is red and the circle is round and " * 12
    v = f.check(s(loop))
    assert not v.keep and v.reason == "repetition: repeated 3-grams above 0.3"
    # a long caption whose tail repeats one 14-word run: few repeated n-grams overall, a long run
    tail = "a small green triangle with a dotted fill is placed in the bottom right corner"
    long = " ".join(f"word{i} here" for i in range(80)) + " " + tail + " and " + tail + "."
    v = f.check(s(long))
    assert (
        not v.keep
        and v.reason == "repetition: a repeated run longer than 12 words"
        and v.scores["longest_repeat"] == 13  # the run is 14 words; searched up to limit + 1
    )
    # the same sentence three times, nothing else repeated much
    rep = "There is a red circle. There is a red circle. There is a red circle. " + CLEAN
    v = RepetitionFilter(max_dup_ngram_ratio=0.9).check(s(rep))
    assert not v.keep and v.reason == "repetition: a sentence repeated more than 2 times"


def test_repetition_helpers() -> None:
    assert dup_ngram_ratio(["a", "b", "c", "a", "b", "c"], 3) == pytest.approx(1 - 3 / 4)
    assert dup_ngram_ratio(["a", "b", "c", "d"], 3) == 0.0
    assert longest_repeat(["x", "a", "b", "c", "d", "y", "a", "b", "c", "d", "z"]) == 4
    assert longest_repeat(["a", "b", "c", "d"]) == 0
    assert sentence_repeats("Hi there you. Hi there you. Other one here.") == 2


def test_truncation() -> None:
    f = TruncationFilter()
    assert f.check(s(CLEAN)).keep
    assert f.check(s(CLEAN, finish_reason="length")).reason == "truncation: finish_reason=length"
    assert f.check(s("A red circle in the top left and a")).reason == "truncation: ends mid-sentence"
    assert f.check(s('He said "stop."')).keep
    assert TruncationFilter(require_final_punctuation=False).check(s("no period")).keep


@pytest.mark.parametrize(
    "text",
    [
        "I'm sorry, but I can't describe this image.",
        "I\u2019m sorry, I cannot help with that.",
        "As an AI language model, I do not see images.",
        "The picture shows a dog. I am unable to identify the person.",
        "Sure, here is a detailed description of the image: a red circle.",
        "Certainly! Here's the caption: three shapes.",
    ],
)
def test_refusals_and_boilerplate_dropped(text: str) -> None:
    v = RefusalFilter().check(s(text))
    assert not v.keep and reason_filter(v.reason) == "refusal"


def test_refusal_keeps_clean_and_custom_patterns() -> None:
    assert RefusalFilter().check(s(CLEAN)).keep
    assert RefusalFilter().check(s("A sorry-looking grey cat sits on a mat.")).keep  # cue word, no pattern
    assert not RefusalFilter(patterns=["sun"], boilerplate=[]).check(s(CLEAN)).keep


def test_garbled() -> None:
    f = GarbledFilter(min_letter_ratio=0.6)
    assert f.check(s(CLEAN)).keep
    assert f.check(s("Line one.\nLine two.")).keep
    assert f.check(s("bad \x00\x07 control")).reason == "garbled: non-printable characters"
    assert "replacement" in f.check(s("caf\ufffd au lait")).reason
    assert "letters below 0.6" in f.check(s("1234 5678 ### !!! 99.9%")).reason
    assert f.check(s("Ein großer Kreis auf grünem Grund.")).keep  # non-ASCII letters count


def test_language() -> None:
    f = LanguageFilter(keep=["en"], min_confidence=0.5)
    assert f.check(s(CLEAN)).keep
    v = f.check(s("Auf einem hellgrünen Hintergrund befindet sich ein großer brauner Kreis mit Punkten."))
    assert not v.keep and v.reason.startswith("language: language de") and v.scores["lang"] == "de"
    v = f.check(s("Sur un fond vert pâle, un grand cercle brun à pois se trouve en haut à droite."))
    assert not v.keep and v.scores["lang"] == "fr"
    # without the stopword shortcut the model decides English too
    v = LanguageFilter(stopword_shortcut=0).check(s(CLEAN))
    assert v.keep and v.scores["lang"] == "en" and v.scores["lang_score"] > 0.5
    fr = LanguageFilter(keep=["fr"], candidates=["en", "fr", "de"])
    assert not fr.check(s(CLEAN)).keep
    with pytest.raises(ValueError, match="xx"):
        LanguageFilter(keep=["xx"])


def test_blocklist() -> None:
    f = BlocklistFilter([r"\bwatermark\b", r"shutterstock"])
    assert f.check(s(CLEAN)).keep
    assert f.check(s("A photo with a Shutterstock watermark.")).reason == "blocklist: matches 'shutterstock'"


@pytest.mark.parametrize(
    ("caption", "status", "want"),
    [
        (None, "ok", "caption: missing (null)"),
        ("", "ok", "caption: empty"),
        ("  \n", "ok", "caption: empty"),
        (42, "ok", "caption: not a string (int)"),
        (None, "failed", "caption: failed in the caption layer (boom)"),
        (CLEAN, "ok", None),
    ],
)
def test_bad_captions_dropped_with_a_reason(caption, status, want) -> None:
    smp = Sample(
        key="k", caption=caption, caption_status=status, caption_error="boom" if status != "ok" else None
    )
    assert caption_problem(smp) == want
    table, stats = apply_filters([LengthFilter(min_words=1), RefusalFilter()], [smp])
    row = table.to_pylist()[0]
    assert row["keep"] is (want is None)
    assert row["reasons"] == ([want] if want else [])


def test_apply_keeps_every_reason_and_counts_per_filter() -> None:
    filters = [LengthFilter(min_words=10), TruncationFilter(), RefusalFilter()]
    samples = [s(CLEAN), s("I'm sorry, I can't"), s(None)]
    table, stats = apply_filters(filters, samples)
    rows = table.to_pylist()
    assert [r["keep"] for r in rows] == [True, False, False]
    assert [reason_filter(x) for x in rows[1]["reasons"]] == ["length", "truncation", "refusal"]
    assert stats["kept"] == 1 and stats["dropped"] == 2
    assert stats["filters"]["refusal"] == {"checked": 2, "dropped": 1}
    assert stats["filters"]["caption"]["dropped"] == 1
    assert rows[0]["n_words"] == len(CLEAN.split()) and rows[2]["n_words"] is None


def test_image_filters() -> None:
    ok = {"status": "success", "width": 300, "height": 100}
    assert ImageStatusFilter().check(Sample("k", meta=ok)).keep
    v = ImageStatusFilter().check(Sample("k", meta={"status": "failed_to_download", "error_message": "404"}))
    assert v.reason == "image_status: failed ingest (failed_to_download: 404)"
    f = ImageSizeFilter(min_side=64, max_aspect=2.5)
    v = f.check(Sample("k", meta=ok))
    assert not v.keep and v.reason == "image_size: aspect ratio 3.0 > 2.5" and v.scores["min_side"] == 100
    assert f.check(Sample("k", meta={"status": "success", "width": 63, "height": 64})).reason == (
        "image_size: side 63 px < 64"
    )
    assert f.check(Sample("k", meta={"status": "success", "width": 64, "height": 128})).keep
    orig = ImageSizeFilter(min_side=500, original=True)
    assert orig.check(Sample("k", meta={**ok, "original_width": 900, "original_height": 600})).keep


def box(x0, y0, x1, y1, label="circle", caption="a red circle"):
    return {"x0": x0, "y0": y0, "x1": x1, "y1": y1, "label": label, "caption": caption}


def test_regions_per_box_mask_and_per_image() -> None:
    f = RegionFilter(min_area=0.01, max_area=0.9, max_boxes=5, min_boxes=1, dup_iou=0.8, min_caption_chars=3)
    regions = [
        box(0.1, 0.1, 0.4, 0.4),  # fine
        box(0.5, 0.5, 0.4, 0.9),  # x0 > x1: invalid
        box(0.1, 0.1, 0.41, 0.4),  # same label, IoU ~0.97 with the first: duplicate
        box(0.1, 0.1, 0.41, 0.4, label="square"),  # other label: kept
        box(0.0, 0.0, 0.05, 0.05),  # area 0.0025 < 0.01
        box(0.0, 0.0, 1.0, 1.0),  # area 1 > 0.9
    ]
    v = f.check(Sample("k", regions=regions[:5], regions_status="ok"))
    assert v.keep and v.scores["region_keep"] == [True, False, False, True, False]
    assert v.scores["n_regions_kept"] == 2
    assert f.check(Sample("k", regions=regions[5:], regions_status="ok")).reason.startswith(
        "regions: 0 usable"
    )
    assert f.check(Sample("k", regions=[box(0.1, 0.1, 0.5, 0.5, caption="x")])).scores["region_keep"] == [
        False
    ]
    many = [box(i / 10, 0, i / 10 + 0.1, 0.5, label=str(i)) for i in range(6)]
    assert f.check(Sample("k", regions=many)).reason == "regions: 6 boxes > 5"
    assert (
        f.check(Sample("k", regions=None, regions_status="failed")).reason
        == "regions: failed in the region layer"
    )
    assert f.check(Sample("k", regions=[box(float("nan"), 0, 0.5, 0.5)])).scores["region_keep"] == [False]
    assert iou((0, 0, 1, 1), (0, 0, 0.5, 1)) == pytest.approx(0.5)
