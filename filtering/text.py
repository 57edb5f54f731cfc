"""Caption text filters: how dense recaptions from VLMs fail.

::

    LengthFilter        chars / words / tokens out of bounds             scores n_chars, n_words
    RepetitionFilter    loops: repeated word n-grams, longest repeated   scores dup_ngram_ratio,
                        word run, the same sentence again                 longest_repeat (null when
                                                                          too few n-grams repeat for
                                                                          a long run; capped at the
                                                                          limit + 1), sentence_repeats
    TruncationFilter    finish_reason=length, or no final punctuation
    RefusalFilter       "I'm sorry", "I cannot", "As an AI", chatty boilerplate openings
    GarbledFilter       control characters, U+FFFD, too few letters       scores letter_ratio
    LanguageFilter      lingua (models ship in the wheel; no download)   scores lang_score
    BlocklistFilter     user regexes

Each has two ways in. ``check`` (one row) is the readable reference. ``check_batch`` (a whole
:class:`filtering.batch.Batch`) is what the runner calls: Arrow string kernels and numpy over
the batch's columns (n-gram repetition by exact n-gram codes sorted per row, letters and
control characters by byte classes, refusal cues by substring kernels, the stopword test on
the vocabulary), then ``check`` on the few rows that a cheap column test flags or the column
code cannot answer exactly (non-ASCII text for the byte-level tests, lingua's candidates).
Both give the same verdicts and scores (``tests/filtering/test_batch.py``).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filtering.base import KEEP, Filter, Sample, Verdict, Verdicts
from filtering.batch import Batch, distinct_per_row, longest_repeats, ngram_codes

_NON_LETTER = re.compile(r"[\W\d_]+")
_ASCII_NON_LETTERS = bytes(i for i in range(128) if not chr(i).isalpha())


class LengthFilter(Filter):
    name = "length"

    def __init__(
        self,
        min_chars: int = 0,
        max_chars: int | None = None,
        min_words: int = 0,
        max_words: int | None = None,
        min_tokens: int = 0,
        max_tokens: int | None = None,
    ) -> None:
        self.min_chars, self.max_chars = min_chars, max_chars
        self.min_words, self.max_words = min_words, max_words
        self.min_tokens, self.max_tokens = min_tokens, max_tokens

    def score_columns(self) -> dict[str, pa.DataType]:
        return {"n_chars": pa.int32(), "n_words": pa.int32()}

    def check(self, s: Sample) -> Verdict:
        n_chars, n_words = len(s.caption), len(s.words)
        sc = {"n_chars": n_chars, "n_words": n_words}
        if n_chars < self.min_chars:
            return self.drop(f"fewer than {self.min_chars} chars", sc)
        if self.max_chars is not None and n_chars > self.max_chars:
            return self.drop(f"more than {self.max_chars} chars", sc)
        if n_words < self.min_words:
            return self.drop(f"fewer than {self.min_words} words", sc)
        if self.max_words is not None and n_words > self.max_words:
            return self.drop(f"more than {self.max_words} words", sc)
        if self.min_tokens or self.max_tokens is not None:
            # the captioner's own count when the layer has it, else ~4 chars per token
            n_tok = s.n_tokens if s.n_tokens else (n_chars + 3) // 4
            if n_tok < self.min_tokens:
                return self.drop(f"fewer than {self.min_tokens} tokens", sc)
            if self.max_tokens is not None and n_tok > self.max_tokens:
                return self.drop(f"more than {self.max_tokens} tokens", sc)
        return Verdict(True, None, sc)

    def check_batch(self, b: Batch) -> Verdicts:
        n_chars = pc.utf8_length(b.arr).to_numpy(zero_copy_only=False).astype(np.int64)
        n_words = b.n_words.copy()  # a score column: rows left to check() are written into it
        tests = [
            (n_chars < self.min_chars, f"fewer than {self.min_chars} chars"),
            (
                n_chars > (self.max_chars if self.max_chars is not None else np.inf),
                f"more than {self.max_chars} chars",
            ),
            (n_words < self.min_words, f"fewer than {self.min_words} words"),
            (
                n_words > (self.max_words if self.max_words is not None else np.inf),
                f"more than {self.max_words} words",
            ),
        ]
        if self.min_tokens or self.max_tokens is not None:
            given = np.array([t or 0 for t in b.column("n_tokens")], np.int64)
            n_tok = np.where(given > 0, given, (n_chars + 3) // 4)
            hi = self.max_tokens if self.max_tokens is not None else np.inf
            tests += [
                (n_tok < self.min_tokens, f"fewer than {self.min_tokens} tokens"),
                (n_tok > hi, f"more than {self.max_tokens} tokens"),
            ]
        out = Verdicts(np.ones(len(b), bool), {}, {"n_chars": n_chars, "n_words": n_words})
        _first_reasons(out, self.name, tests)
        for i in np.nonzero(~b.exact)[0]:
            out.set(i, self.check(b.samples[i]))
        return out


def dup_ngram_ratio(words: list[str], n: int) -> float:
    """Share of word n-grams that repeat an earlier one (0: all distinct, near 1: a loop)."""
    total = len(words) - n + 1
    if total <= 1:
        return 0.0
    if n == 3:  # the default: no generator in the way
        grams = set(zip(words, words[1:], words[2:], strict=False))
    else:
        grams = set(zip(*(words[i:] for i in range(n)), strict=False))
    return 1.0 - len(grams) / total


def longest_repeat(words: list[str], lo: int = 0, hi: int | None = None) -> int:
    """Length in words of the longest word sequence that occurs twice (may overlap).

    Binary search on the length in ``[lo, hi]`` (bounds the caller knows: a repeated n-gram
    means ``lo >= n``; ``d`` repeated n-grams mean ``hi <= d + n - 1``): if a k-gram repeats,
    so does every shorter one."""
    hi = len(words) - 1 if hi is None else min(hi, len(words) - 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        total = len(words) - mid + 1
        if len(set(zip(*(words[i:] for i in range(mid)), strict=False))) < total:
            lo = mid
        else:
            hi = mid - 1
    return lo


def sentence_repeats(text: str) -> int:
    """How often the most repeated sentence (over 8 characters) occurs, case-insensitive."""
    low = text.lower().replace("! ", ". ").replace("? ", ". ").replace("\n", " ")
    parts = [p.strip(" .") for p in low.split(". ")]
    parts = [p for p in parts if len(p) > 8]
    if len(set(parts)) == len(parts):
        return 1 if parts else 0
    return max(Counter(parts).values())


class RepetitionFilter(Filter):
    """Degeneration: the loops a captioner falls into until max_tokens."""

    name = "repetition"

    def __init__(
        self,
        ngram: int = 3,
        max_dup_ngram_ratio: float = 0.3,
        max_repeated_words: int = 16,
        max_sentence_repeats: int = 2,
    ) -> None:
        self.n = ngram
        self.max_ratio = max_dup_ngram_ratio
        self.max_run = max_repeated_words
        self.max_sent = max_sentence_repeats

    def score_columns(self) -> dict[str, pa.DataType]:
        return {"dup_ngram_ratio": pa.float32(), "longest_repeat": pa.int32(), "sentence_repeats": pa.int32()}

    def check(self, s: Sample) -> Verdict:
        words = s.words
        n_grams = len(words) - self.n + 1
        ratio = dup_ngram_ratio(words, self.n)
        n_dup = round(ratio * n_grams) if n_grams > 1 else 0
        # A repeated run of L words repeats L - n + 1 n-grams: with fewer repeated n-grams
        # than a run over the limit needs, skip the search (most captions); score left null.
        run: int | None = None
        if n_dup >= self.max_run - self.n + 2:  # searched up to max_run + 1: the score is capped there
            run = longest_repeat(words, self.n, min(n_dup + self.n - 1, self.max_run + 1))
        sent = sentence_repeats(s.caption) if n_dup else 1
        sc = {"dup_ngram_ratio": ratio, "longest_repeat": run, "sentence_repeats": sent}
        if ratio > self.max_ratio:
            return self.drop(f"repeated {self.n}-grams above {self.max_ratio}", sc)
        if run is not None and run > self.max_run:
            return self.drop(f"a repeated run longer than {self.max_run} words", sc)
        if sent > self.max_sent:
            return self.drop(f"a sentence repeated more than {self.max_sent} times", sc)
        return Verdict(True, None, sc)

    def check_batch(self, b: Batch) -> Verdicts:
        m, n = len(b), self.n
        total = np.maximum(b.n_words - n + 1, 0)
        codes = ngram_codes(b.token_ids, n, len(b.vocab))
        distinct = distinct_per_row(codes, b.word_offsets[:-1], total)
        many = total > 1
        ratio = np.where(many, 1.0 - distinct / np.maximum(total, 1), 0.0)
        n_dup = np.where(many, total - distinct, 0)
        run = np.ma.masked_all(m, np.int64)
        long = np.nonzero(n_dup >= self.max_run - n + 2)[0]
        if len(long):
            off = b.word_offsets
            hi = np.minimum(n_dup[long] + n - 1, self.max_run + 1)
            run[long] = longest_repeats(b.token_ids, off[long], b.n_words[long], np.full(len(long), n), hi)
        sent = np.ones(m, np.int64)
        some = n_dup > 0
        sent[some & b.plain] = sentence_repeats_ascii(b.arr.filter(pa.array(some & b.plain)))
        for i in np.nonzero(some & ~b.plain)[0]:
            sent[i] = sentence_repeats(b.captions[i])
        out = Verdicts(
            np.ones(m, bool), {}, {"dup_ngram_ratio": ratio, "longest_repeat": run, "sentence_repeats": sent}
        )
        _first_reasons(
            out,
            self.name,
            [
                (ratio > self.max_ratio, f"repeated {self.n}-grams above {self.max_ratio}"),
                (run.filled(0) > self.max_run, f"a repeated run longer than {self.max_run} words"),
                (sent > self.max_sent, f"a sentence repeated more than {self.max_sent} times"),
            ],
        )
        for i in np.nonzero(~b.exact)[0]:
            out.set(i, self.check(b.samples[i]))
        return out


def sentence_repeats_ascii(arr: pa.Array) -> np.ndarray:
    """:func:`sentence_repeats` for each of many ASCII captions, with Arrow string kernels."""
    low = pc.ascii_lower(arr)
    for a, z in (("! ", ". "), ("? ", ". "), ("\n", " ")):
        low = pc.replace_substring(low, a, z)
    parts = pc.split_pattern(low, ". ")
    rows = pc.list_parent_indices(parts).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.utf8_trim(parts.flatten(), " .")
    long = pc.greater(pc.binary_length(flat), 8).to_numpy(zero_copy_only=False)
    rows = rows[long]
    ids = pc.dictionary_encode(flat.filter(pa.array(long))).indices.to_numpy(zero_copy_only=False)
    out = np.zeros(len(arr), np.int64)
    if len(rows):
        keys, counts = np.unique((rows << 32) | ids.astype(np.int64), return_counts=True)
        np.maximum.at(out, keys >> 32, counts)
    return out


def _first_reasons(out: Verdicts, name: str, tests: list[tuple[np.ndarray, str]]) -> None:
    """Drop each row with the first test (in order) it fails, as ``check`` returns the first."""
    for mask, detail in reversed(tests):  # the first test written last: it wins
        for i in np.nonzero(mask)[0].tolist():
            out.reasons[i] = f"{name}: {detail}"
    out.keep[list(out.reasons)] = False


class TruncationFilter(Filter):
    """Captions cut by the token limit (``finish_reason=length``) or ending mid-sentence."""

    name = "truncation"
    ENDINGS: ClassVar[tuple[str, ...]] = (".", "!", "?", '"', "'", ")", "]", "\u201d", "\u3002")

    def __init__(self, finish_reason: bool = True, require_final_punctuation: bool = True) -> None:
        self.finish_reason = finish_reason
        self.final_punct = require_final_punctuation

    def check(self, s: Sample) -> Verdict:
        if self.finish_reason and s.finish_reason == "length":
            return self.drop("finish_reason=length")
        if self.final_punct and not s.caption.rstrip().endswith(self.ENDINGS):
            return self.drop("ends mid-sentence")
        return KEEP

    def check_batch(self, b: Batch) -> Verdicts:
        m = len(b)
        cut = np.zeros(m, bool)
        if self.final_punct:
            e = self.ENDINGS
            cut = np.fromiter((not c.rstrip().endswith(e) for c in b.captions), bool, m)
        length = np.zeros(m, bool)
        if self.finish_reason:
            length = np.fromiter((f == "length" for f in b.column("finish_reason")), bool, m)
        out = Verdicts(np.ones(m, bool), {}, {})
        _first_reasons(out, self.name, [(length, "finish_reason=length"), (cut, "ends mid-sentence")])
        return out


DEFAULT_REFUSALS = (
    r"i'?m sorry",
    r"i am sorry",
    r"i apologi[sz]e",
    r"i can(?:no|')t",
    r"i am (?:unable|not able)",
    r"i'?m (?:unable|not able)",
    r"as an ai\b",
    r"as a language model",
    r"unable to (?:view|see|process|analy[sz]e) (?:the |this )?image",
    r"no image (?:was |has been )?(?:provided|attached|uploaded)",
)
# Words one of the default refusal patterns needs: a caption with none of them skips the regex.
_REFUSAL_CUES = (
    "sorry",
    "apologi",
    "can't",
    "cannot",
    "unable",
    "not able",
    " ai",
    "language model",
    "no image",
)
DEFAULT_BOILERPLATE = (
    r"(?:sure|certainly|of course)[,!.]? here(?:'s| is)",
    r"here(?:'s| is) (?:a|the) (?:detailed |dense )?(?:description|caption)",
)


class RefusalFilter(Filter):
    """Refusals anywhere in the first ``window`` characters; chatty openings at the start."""

    name = "refusal"

    def __init__(
        self,
        patterns: list[str] | None = None,
        boilerplate: list[str] | None = None,
        window: int = 300,
    ) -> None:
        self.patterns = list(DEFAULT_REFUSALS if patterns is None else patterns)
        self.boilerplate = list(DEFAULT_BOILERPLATE if boilerplate is None else boilerplate)
        self.window = window
        self._cues = _REFUSAL_CUES if patterns is None else None
        # the default boilerplate openings begin with one of these letters
        self._boiler_first = "schoa" if boilerplate is None else None
        self._refusal = (
            re.compile("|".join(f"(?:{p})" for p in self.patterns), re.I) if self.patterns else None
        )
        self._boiler = (
            re.compile("|".join(f"(?:{p})" for p in self.boilerplate), re.I) if self.boilerplate else None
        )

    def check(self, s: Sample) -> Verdict:
        head = s.caption[: self.window].replace("\u2019", "'")
        low = head.lower()
        if self._refusal is not None and (self._cues is None or any(c in low for c in self._cues)):
            m = self._refusal.search(head)
            if m:
                return self.drop("refusal")
        first = low.lstrip()[:1]
        if self._boiler is not None and (
            self._boiler_first is None or (first and first in self._boiler_first)
        ):
            m = self._boiler.match(head.lstrip())
            if m:
                return self.drop("boilerplate opening")
        return KEEP

    def check_batch(self, b: Batch) -> Verdicts:
        m = len(b)
        if self._cues is None or self._boiler_first is None:  # user patterns: no cheap cue test
            return super().check_batch(b)
        # the cue test of check(), on ASCII rows with Arrow: only flagged rows run the regexes
        head = pc.ascii_lower(pc.utf8_slice_codeunits(b.arr, 0, self.window))
        cues = "|".join(re.escape(c) for c in self._cues)  # RE2: one pass for all cues
        flag = ~b.plain | pc.match_substring_regex(head, cues).to_numpy(zero_copy_only=False)
        first = pc.utf8_slice_codeunits(pc.ascii_ltrim_whitespace(head), 0, 1)
        flag |= pc.is_in(first, pa.array(list(self._boiler_first))).to_numpy(zero_copy_only=False)
        out = Verdicts(np.ones(m, bool), {}, {})
        for i in np.nonzero(flag)[0]:
            v = self.check(b.samples[i])
            if not v.keep:
                out.set(i, v)
        return out


class GarbledFilter(Filter):
    """Non-printable characters, replacement characters, or too few letters."""

    name = "garbled"

    def __init__(self, min_letter_ratio: float = 0.6, max_replacement_chars: int = 0) -> None:
        self.min_letter_ratio = min_letter_ratio
        self.max_repl = max_replacement_chars

    def score_columns(self) -> dict[str, pa.DataType]:
        return {"letter_ratio": pa.float32()}

    def check(self, s: Sample) -> Verdict:
        text = s.caption
        n = len(text)
        spaces = text.count(" ")
        letters = (
            len(text.encode().translate(None, _ASCII_NON_LETTERS))
            if text.isascii()
            else len(_NON_LETTER.sub("", text))
        )
        ratio = letters / max(n - spaces, 1)
        sc = {"letter_ratio": ratio}
        if not text.isprintable() and not text.replace("\n", " ").replace("\t", " ").isprintable():
            return self.drop("non-printable characters", sc)
        if text.count("\ufffd") > self.max_repl:
            return self.drop("replacement characters (U+FFFD)", sc)
        if ratio < self.min_letter_ratio:
            return self.drop(f"letters below {self.min_letter_ratio} of the text", sc)
        return Verdict(True, None, sc)

    def check_batch(self, b: Batch) -> Verdicts:
        counts = b.byte_counts  # letters, spaces, non-printable, \x1c-\x1f (exact on ASCII rows)
        n = np.diff(np.frombuffer(b.arr.buffers()[1], np.int64)[b.arr.offset : b.arr.offset + len(b) + 1])
        ratio = counts[:, 0] / np.maximum(n - counts[:, 1], 1)
        out = Verdicts(np.ones(len(b), bool), {}, {"letter_ratio": ratio})
        _first_reasons(
            out,
            self.name,
            [
                (counts[:, 2] + counts[:, 3] > 0, "non-printable characters"),
                (ratio < self.min_letter_ratio, f"letters below {self.min_letter_ratio} of the text"),
            ],
        )
        for i in np.nonzero(~b.ascii)[0]:
            out.set(i, self.check(b.samples[i]))
        return out


# English function words: a caption whose words are this often among them is English without
# asking the model (a cascade: the detector runs only on the rest).
_EN_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "of",
        "in",
        "on",
        "at",
        "with",
        "and",
        "to",
        "is",
        "are",
        "its",
        "it",
        "this",
        "that",
        "by",
        "from",
        "near",
        "for",
        "as",
        "or",
        "two",
        "three",
        "left",
        "right",
        "top",
        "bottom",
        "center",
        "middle",
        "there",
        "which",
        "one",
    ]
)


class LanguageFilter(Filter):
    """Language identification with lingua (``lingua-language-detector``: models in the wheel)."""

    name = "language"

    def __init__(
        self,
        keep: list[str] | None = None,
        candidates: list[str] | None = None,
        min_confidence: float = 0.5,
        stopword_shortcut: float = 0.25,
        max_chars: int = 400,
    ) -> None:
        from lingua import IsoCode639_1, Language, LanguageDetectorBuilder

        def lang(code: str) -> Any:
            try:
                return Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))
            except AttributeError:
                raise ValueError(f"unknown ISO 639-1 language code {code!r}") from None

        self.keep_codes = [c.lower() for c in (keep or ["en"])]
        self.keep = {lang(c) for c in self.keep_codes}
        cands = {lang(c) for c in (candidates or [])} | self.keep
        builder = (
            LanguageDetectorBuilder.from_languages(*cands)
            if len(cands) > 1 and candidates
            else LanguageDetectorBuilder.from_all_languages()
        )
        self.detector = builder.with_low_accuracy_mode().build()
        self.min_conf = min_confidence
        self.shortcut = stopword_shortcut if self.keep_codes == ["en"] else 0.0
        self.max_chars = max_chars

    def score_columns(self) -> dict[str, pa.DataType]:
        return {"lang": pa.string(), "lang_score": pa.float32()}

    def check(self, s: Sample) -> Verdict:
        if self.shortcut and s.words:
            ws = s.words[:80]
            hits = sum(map(_EN_STOPWORDS.__contains__, map(str.lower, ws)))
            if hits / len(ws) >= self.shortcut:
                return Verdict(True, None, {"lang": "en", "lang_score": None})
        return self._decide(self.detector.compute_language_confidence_values(self._text(s.caption)))

    def check_batch(self, b: Batch) -> Verdicts:
        m = len(b)
        out = Verdicts(
            np.ones(m, bool), {}, {"lang": ["en"] * m, "lang_score": np.ma.masked_all(m, np.float64)}
        )
        ask = np.ones(m, bool)
        if self.shortcut:
            # the stopword share of each caption's first 80 words, over the vocabulary once
            stop = np.fromiter((w.lower() in _EN_STOPWORDS for w in b.vocab.to_pylist()), bool, len(b.vocab))
            rows = b.token_rows
            first = (np.arange(len(rows)) - b.word_offsets[rows]) < 80
            hits = np.bincount(rows[first], weights=stop[b.token_ids[first]], minlength=m)
            seen = np.minimum(b.n_words, 80)
            ask = ~((seen > 0) & (hits / np.maximum(seen, 1) >= self.shortcut))
        idx = np.nonzero(ask & b.exact)[0].tolist()
        caps = b.captions
        # lingua's batch call (threads in Rust; their CPU time counts in the bench's figure)
        texts = [caps[i][: self.max_chars] for i in idx]
        values = self.detector.compute_language_confidence_values_in_parallel(texts) if texts else []
        for i, vals in zip(idx, values, strict=True):
            out.set(i, self._decide(vals))
        for i in np.nonzero(~b.exact)[0]:
            out.set(i, self.check(b.samples[i]))
        return out

    def _text(self, caption: str) -> str:
        """The head the model reads; lone surrogates (not UTF-8, lingua refuses them) as U+FFFD."""
        head = caption[: self.max_chars]
        try:
            head.encode()
        except UnicodeEncodeError:
            head = head.encode("utf-8", "replace").decode().replace("?", "\ufffd")
        return head

    def _decide(self, values: list[Any]) -> Verdict:
        if not values:
            return self.drop("language unknown", {"lang": None, "lang_score": 0.0})
        top = values[0]
        code = top.language.iso_code_639_1.name.lower()
        sc = {"lang": code, "lang_score": float(top.value)}
        if top.language not in self.keep:
            return self.drop(f"language {code} (not {','.join(self.keep_codes)})", sc)
        if top.value < self.min_conf:
            return self.drop(f"language {code} below confidence {self.min_conf}", sc)
        return Verdict(True, None, sc)


class BlocklistFilter(Filter):
    """Drop captions matching any of the given regular expressions (case-insensitive)."""

    name = "blocklist"

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = patterns
        self._re = re.compile("|".join(f"(?:{p})" for p in patterns), re.I)

    def check(self, s: Sample) -> Verdict:
        m = self._re.search(s.caption)
        return self.drop(f"matches {self._which(m.group(0))!r}") if m else KEEP

    def _which(self, text: str) -> str:
        """The pattern that matched (a category), not the matched text."""
        return next((p for p in self.patterns if re.search(p, text, re.I)), text)


def caption_problem(s: Sample) -> str | None:
    """Why a row has no usable caption (checked once, before any text filter), or None."""
    if s.caption_status is not None and s.caption_status != "ok":
        return f"caption: failed in the caption layer ({s.caption_error or 'no reason given'})"
    if s.caption is None:
        return "caption: missing (null)"
    if not isinstance(s.caption, str):
        return f"caption: not a string ({type(s.caption).__name__})"
    if not s.caption.strip():
        return "caption: empty"
    return None
