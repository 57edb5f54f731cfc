"""A batch of rows as columns, computed once and shared by the filters' ``check_batch``.

::

    Batch(samples)           the rows (``filtering.base.Sample``); for the text filters every
                             row has a usable caption (the runner checked it first)
      .captions              list[str]
      .arr                   the captions as one Arrow ``large_string`` array
      .exact                 bool[m]: the column code matches Python's str methods on this row
                             (valid UTF-8); the others go to ``Filter.check`` row by row
      .plain                 bool[m]: ASCII with no \\x1c-\\x1f (which ``str.split`` and
                             ``str.strip`` treat as whitespace): byte-level code is exact here
      .byte_counts           int64[m, 4]: letters, spaces, non-printable bytes, bytes
                             (ASCII rows)
      .word_offsets, .token_ids, .vocab
                             the words of each caption, exactly ``caption.split()``, as one flat
                             array of ids into ``vocab`` (Arrow's dictionary encoding), rows
                             cut by ``word_offsets`` (int64[m + 1])

Why columns: per row, Python spends microseconds on interpreter overhead for work that Arrow's
string kernels and numpy do in nanoseconds per byte or word. The text filters reach about 3x
the per-row throughput this way (``bench/filter_throughput.py``, ``bench/README.md``).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from filtering.base import Sample

_LETTERS = np.zeros(256, np.uint8)  # ASCII letters, for the letter count of the ASCII rows
_LETTERS[[*range(65, 91), *range(97, 123)]] = 1


class Batch:
    """The rows of one batch as columns (see the module docstring); each is computed on first use."""

    def __init__(self, samples: list[Sample]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    @cached_property
    def captions(self) -> list[str]:
        return [s.caption for s in self.samples]

    @cached_property
    def _arr_exact(self) -> tuple[pa.Array, np.ndarray]:
        caps = self.captions
        try:
            return pa.array(caps, pa.large_string()), np.ones(len(caps), bool)
        except (UnicodeEncodeError, pa.ArrowException):  # lone surrogates: not UTF-8
            ok = np.zeros(len(caps), bool)
            fixed = []
            for i, c in enumerate(caps):
                try:
                    c.encode()
                    ok[i] = True
                    fixed.append(c)
                except UnicodeEncodeError:
                    fixed.append(" ")
            return pa.array(fixed, pa.large_string()), ok

    @property
    def arr(self) -> pa.Array:
        return self._arr_exact[0]

    @property
    def exact(self) -> np.ndarray:
        return self._arr_exact[1]

    @cached_property
    def byte_counts(self) -> np.ndarray:
        """Per row: ASCII letters, spaces, non-printable characters (a control character other
        than \\t and \\n, or DEL), \\x1c-\\x1f (Python's extra whitespace); byte-exact on ASCII rows."""
        arr = self.arr
        out = np.zeros((len(arr), 4), np.int64)
        if not len(arr):
            return out
        off = np.frombuffer(arr.buffers()[1], np.int64)[arr.offset : arr.offset + len(arr) + 1]
        data = np.frombuffer(arr.buffers()[2], np.uint8)[off[0] : off[-1]]
        nonempty = np.diff(off) > 0  # reduceat would give an empty row its next row's first byte
        if nonempty.any():
            out[nonempty, 0] = np.add.reduceat(_LETTERS[data], (off[:-1] - off[0])[nonempty], dtype=np.int64)
        out[:, 1] = pc.count_substring(arr, " ").to_numpy(zero_copy_only=False)
        bad = pc.count_substring_regex(arr, "[\\x00-\\x08\\x0b-\\x1f\\x7f]")
        out[:, 2] = bad.to_numpy(zero_copy_only=False)
        caps = self.captions
        for i in np.nonzero(out[:, 2])[0]:  # rare: the separators are among the non-printables
            out[i, 3] = sum(caps[i].count(c) for c in "\x1c\x1d\x1e\x1f")
        return out

    @cached_property
    def ascii(self) -> np.ndarray:
        return pc.string_is_ascii(self.arr).to_numpy(zero_copy_only=False) & self.exact

    @cached_property
    def plain(self) -> np.ndarray:
        return self.ascii & (self.byte_counts[:, 3] == 0)

    @cached_property
    def _words(self) -> tuple[np.ndarray, np.ndarray, pa.Array]:
        arr = self.arr
        odd = np.nonzero(~self.plain & self.exact)[0]
        if len(odd):  # Python's whitespace is wider than ASCII's: split those rows as Python does
            caps = self.captions
            fixed = arr.to_pylist()
            for i in odd:
                fixed[i] = " ".join(caps[i].split())
            arr = pa.array(fixed, pa.large_string())
        trimmed = pc.ascii_trim_whitespace(arr)
        words = pc.ascii_split_whitespace(trimmed)
        off = words.offsets.to_numpy().astype(np.int64)
        off -= off[0]
        enc = pc.dictionary_encode(words.flatten())
        ids = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        # Arrow splits "" into [""], Python into []
        empty = np.nonzero(pc.binary_length(trimmed).to_numpy(zero_copy_only=False) == 0)[0]
        if len(empty):
            drop = np.zeros(len(ids), bool)
            drop[off[empty]] = True
            n = np.diff(off)
            n[empty] -= 1
            ids, off = ids[~drop], np.concatenate([[0], np.cumsum(n)])
        return off, ids, enc.dictionary

    @property
    def word_offsets(self) -> np.ndarray:
        return self._words[0]

    @property
    def token_ids(self) -> np.ndarray:
        return self._words[1]

    @property
    def vocab(self) -> pa.Array:
        return self._words[2]

    @cached_property
    def n_words(self) -> np.ndarray:
        return np.diff(self.word_offsets)

    @cached_property
    def token_rows(self) -> np.ndarray:
        """The row of each token."""
        return np.repeat(np.arange(len(self)), self.n_words)

    def column(self, name: str) -> list[Any]:
        return [getattr(s, name) for s in self.samples]


def ngram_codes(ids: np.ndarray, n: int, vocab_size: int) -> np.ndarray:
    """One int64 code per position ``i`` for the n-gram ``ids[i:i+n]``, equal codes exactly when
    the n-grams are equal (ids packed into 63 bits; re-encoded densely when they would not fit)."""
    bits = max(int(vocab_size - 1).bit_length(), 1)
    codes, width = ids.astype(np.int64), bits
    for k in range(1, n):
        if width + bits > 63:
            enc = pc.dictionary_encode(pa.array(codes))
            codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            width = max(int(len(enc.dictionary) - 1).bit_length(), 1)
        codes = (codes[: len(ids) - k] << bits) | ids[k:]
        width += bits
    return codes


def distinct_per_row(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """How many distinct values each row has (row ``r``: ``values[starts[r]:starts[r]+counts[r]]``).

    Rows are padded into matrices of a few widths (16, 32, 64, ...) with distinct negative
    fillers and sorted along the row: small sorts that stay in cache, no hash table."""
    out = np.zeros(len(counts), np.int64)
    if not len(counts) or counts.max() == 0:
        return out
    width = 16
    lo = 0
    while lo < counts.max():
        sel = np.nonzero((counts > lo) & (counts <= width))[0]
        if len(sel):
            c = counts[sel]
            mat = np.full((len(sel), width), -1, np.int64) - np.arange(width)
            r = np.repeat(np.arange(len(sel)), c)
            p = np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
            mat[r, p] = values[np.repeat(starts[sel], c) + p]
            mat.sort(axis=1)
            out[sel] = c - (mat[:, 1:] == mat[:, :-1]).sum(axis=1)
        lo, width = width, width * 2
    return out


def longest_repeats(
    ids: np.ndarray, starts: np.ndarray, counts: np.ndarray, lo: np.ndarray, hi: np.ndarray
) -> np.ndarray:
    """Per row, the largest ``k`` in ``[lo, hi]`` such that some word k-gram occurs twice in
    ``ids[starts:starts+counts]`` (a ``lo``-gram is known to repeat): ``filtering.text.longest_repeat``
    for many rows at once, a scan over ``k`` (rows leave when no k-gram repeats: then no longer one does)."""
    res = lo.astype(np.int64)
    hi = np.minimum(hi, counts - 1)
    alive = res < hi
    if not alive.any():
        return res
    sub_starts = np.cumsum(counts) - counts
    sub = ids[np.repeat(starts - sub_starts, counts) + np.arange(int(counts.sum()))]
    bits = max(int(sub.max(initial=0)).bit_length(), 1)
    codes, width = sub.astype(np.int64), bits
    for k in range(2, int(hi[alive].max()) + 1):
        if width + bits > 63:
            enc = pc.dictionary_encode(pa.array(codes))
            codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            width = max(int(len(enc.dictionary) - 1).bit_length(), 1)
        codes = (codes[: len(sub) - k + 1] << bits) | sub[k - 1 :]
        width += bits
        cand = np.nonzero(alive & (k > res) & (k <= hi))[0]
        if not len(cand):
            continue
        total = counts[cand] - k + 1
        rep = distinct_per_row(codes, sub_starts[cand], total) < total
        res[cand[rep]] = k
        alive[cand[~rep]] = False
    return res
