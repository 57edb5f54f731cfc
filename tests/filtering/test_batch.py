"""The column code (``check_batch``) gives each row the verdict and scores ``check`` gives it.

The rows cover what the fast paths special-case: ASCII and non-ASCII text, Python-only
whitespace (\\x1c-\\x1f, NBSP, em space), control characters, a lone surrogate, loops (long
repeated runs, repeated sentences), refusals and boilerplate openings (straight and curly
apostrophes), German and French, captions of one word, token counts, finish reasons.
"""

from __future__ import annotations

import math
import random

import pytest

from filtering.base import Sample
from filtering.batch import Batch
from filtering.config import DEFAULT_CONFIG, build_filters, load_filter_config
from filtering.run import apply_filters
from filtering.text import LengthFilter, RepetitionFilter

CLEAN = (
    "Three shapes lie on a pale blue background. In the top left there is a large red circle with a "
    "striped fill. A small green triangle sits in the bottom right, below and to the right of the circle."
)
ODD = [
    CLEAN,
    "  " + CLEAN + "\n",
    "A red circle.",
    "circle",
    "A large red circle sits in the top left corner. " + "The red circle is next to the red circle and " * 20,
    "There is a red circle. There is a red circle! There is a red circle? " + CLEAN,
    "There is a red circle.\nThere is a red circle.\nthere is a red circle. " + CLEAN,
    " ".join(f"word{i} here" for i in range(80)) + " a small green triangle with a dotted fill is "
    "placed in the bottom right corner and a small green triangle with a dotted fill is placed "
    "in the bottom right corner.",
    "I'm sorry, but I can't describe this image.",
    "I\u2019m sorry, I cannot help with that.",
    "As an AI language model, I do not see images.",
    "Sure, here is a detailed description of the image: a red circle.",
    "  certainly! Here's the caption: three shapes.",
    "A sorry-looking grey cat sits on a mat near the air vent.",
    "Auf einem hellgrünen Hintergrund befindet sich ein großer brauner Kreis mit Punkten.",
    "Sur un fond vert pâle, un grand cercle brun à pois se trouve en haut à droite.",
    "Ein großer Kreis auf grünem Grund. Ein großer Kreis auf grünem Grund. Ein großer Kreis auf grünem Grund.",
    "A red\x1ccircle\x1dsits\x1ein the\x1ftop left corner of the image.",
    "A red\u00a0circle\u2003sits in the top left corner of the image, next to a caf\u00e9 sign.",
    "bad \x00\x07 control characters in the middle of a caption.",
    "Line one of the caption.\nLine two\tof the caption.",
    "caf\ufffd au lait on a red table in the top left corner.",
    "1234 5678 ### !!! 99.9% 42 7 8 9 10.",
    "A zigzag of 12 dazzling zebra stripes: 40% fill, a 7x9 grid, sizes 3-5 px (2024).",
    "A lone surrogate \ud800 in a caption about a red circle.",
    "\u3053\u308c\u306f\u8d64\u3044\u5186\u3067\u3059\u3002",
    "A red circle and a blue square and a red circle and a blue square and a red circle and a blue",
    "word " * 3 + "word.",
]


def _samples() -> list[Sample]:
    rng = random.Random(0)
    out = [
        Sample(key=f"{i:06d}", caption=c, finish_reason=rng.choice(["stop", "length", None]), n_tokens=n)
        for i, (c, n) in enumerate(zip(ODD, [None, 0, 5, 90, 30] * 10, strict=False))
    ]
    # plus shuffled mixes of the odd ones' sentences, so batches are not all special cases
    sents = [x for c in ODD for x in c.split(". ")]
    for i in range(200):
        text = ". ".join(rng.choice(sents) for _ in range(rng.randint(1, 12)))
        out.append(Sample(key=f"{len(ODD) + i:06d}", caption=text, finish_reason="stop"))
    return out


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and math.isclose(a, b, rel_tol=0, abs_tol=1e-12)
    return a == b


def _filters():
    cfg = load_filter_config(DEFAULT_CONFIG, ["filter.layer=t"])
    return [f for f in build_filters(cfg.filter) if f.needs == "caption"] + [
        LengthFilter(min_chars=30, max_chars=300, min_words=3, max_words=60, min_tokens=4, max_tokens=80),
        RepetitionFilter(ngram=2, max_repeated_words=6, max_dup_ngram_ratio=0.5),
    ]


@pytest.mark.parametrize("f", _filters(), ids=lambda f: f.name)
def test_check_batch_agrees_with_check_row_by_row(f) -> None:
    samples = _samples()
    got = f.check_batch(Batch(samples))
    for i, s in enumerate(samples):
        want = f.check(s)
        assert bool(got.keep[i]) == want.keep, (i, s.caption, want)
        assert got.reasons.get(i) == (None if want.keep else want.reason), (i, s.caption)
        for name, col in got.scores.items():
            x = col[i]
            x = None if x is __import__("numpy").ma.masked else (x.item() if hasattr(x, "item") else x)
            assert _same(x, (want.scores or {}).get(name)), (i, name, s.caption, x, want.scores)


def test_apply_filters_batches_agree_with_one_batch(monkeypatch) -> None:
    """Rows split over several batches (and rows with no caption) give the same table."""
    import filtering.run as run

    samples = _samples() + [Sample(key="x1", caption=None), Sample(key="x2", caption="  ")]
    fs = _filters()
    one, stats1 = apply_filters(fs, samples)
    monkeypatch.setattr(run, "BATCH_ROWS", 7)
    many, stats7 = apply_filters(fs, samples)
    assert one.equals(many) and stats1 == stats7
    assert one.column("reasons").to_pylist()[-1] == ["caption: empty"]
