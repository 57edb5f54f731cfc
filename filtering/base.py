"""A filter is a small object that looks at one sample and says keep, or drop and why.

::

    Sample(key, caption, caption_status, caption_error, finish_reason, n_tokens, meta, regions, ...)
        what one row of a shard looks like to the filters: the image shard's metadata row
        (``meta``: status, width, height, sha256, ...), the caption layer's row (``--on`` a
        caption layer) and the region layer's row (``--on`` a region layer)
    Verdict(keep, reason, scores)     what a filter returns; ``reason`` is ``"<name>: <detail>"``
    Filter                            the base class: ``name``, ``needs``, ``score_columns``, ``check``,
                                      ``check_batch``
    Verdicts(keep, reasons, scores)   a filter's answers for a batch of rows (``check_batch``)

Like datatrove's filters, each one returns keep or (drop, reason) and counts nothing itself:
the runner (:mod:`filtering.run`) applies the list in order, keeps every reason (a row can be
dropped by several filters) and counts per filter. Scores are columns of the filter layer so
the audit can draw kept vs dropped histograms and a user can re-threshold without rerunning.

``needs`` says what a filter reads: ``caption`` (the caption layer's text, checked present
first: a null, empty or non-string caption is dropped once by the runner with reason
``caption: ...``), ``image`` (shard metadata), ``regions`` (the region layer) or ``global``
(a whole-dataset view: exact and near duplicates, see :mod:`filtering.dedup`).

``check`` looks at one row and is the reference; ``check_batch`` answers for a whole
:class:`filtering.batch.Batch` at once. Its default calls ``check`` per row; the text filters
override it with column code (Arrow kernels and numpy over the whole batch) that gives the
same answers, row for row (``tests/filtering/test_batch.py`` holds them to it).

To add a filter: a subclass here (text.py, image.py, regions.py), a config model in
:mod:`filtering.config` with ``type: Literal["<name>"]`` and a ``build()``; nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, NamedTuple

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from filtering.batch import Batch

Needs = Literal["caption", "image", "regions", "global"]


class Verdict(NamedTuple):
    keep: bool
    reason: str | None = None
    scores: dict[str, Any] | None = None


KEEP = Verdict(True)


@dataclass
class Sample:
    """One row as the filters see it (see the module docstring)."""

    key: str
    caption: Any = None
    caption_status: str | None = None
    caption_error: str | None = None
    finish_reason: str | None = None
    n_tokens: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    regions: list[dict[str, Any]] | None = None
    regions_status: str | None = None
    # filled by the runner for filters that need it
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def words(self) -> list[str]:
        """The caption split on whitespace (computed once, shared by the text filters)."""
        w = self.cache.get("words")
        if w is None:
            w = self.cache["words"] = self.caption.split()
        return w


class Filter:
    """Base class. Subclasses set ``name`` and ``needs`` and implement :meth:`check`."""

    name: ClassVar[str] = "filter"
    needs: ClassVar[Needs] = "caption"

    def score_columns(self) -> dict[str, pa.DataType]:
        """Score columns this filter writes into the filter layer (name -> Arrow type)."""
        return {}

    def check(self, sample: Sample) -> Verdict:
        raise NotImplementedError

    def check_batch(self, batch: Batch) -> Verdicts:
        """Every row of ``batch`` at once (default: :meth:`check` per row)."""
        return Verdicts.of([self.check(s) for s in batch.samples], self)

    def drop(self, detail: str, scores: dict[str, Any] | None = None) -> Verdict:
        return Verdict(False, f"{self.name}: {detail}", scores)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


def reason_filter(reason: str) -> str:
    """The filter name of a reason (``"refusal: i'm sorry"`` -> ``"refusal"``)."""
    return reason.split(":", 1)[0]


@dataclass
class Verdicts:
    """A filter's answers for ``m`` rows: ``keep`` (bool[m]), ``reasons`` (row -> reason, dropped
    rows only) and ``scores`` (score column -> ``m`` values: a list, or a numpy (masked) array
    whose masked entries are nulls)."""

    keep: np.ndarray
    reasons: dict[int, str]
    scores: dict[str, Any]

    @classmethod
    def of(cls, verdicts: list[Verdict], f: Filter) -> Verdicts:
        names = list(f.score_columns())
        reasons = {i: v.reason or f.name for i, v in enumerate(verdicts) if not v.keep}
        scores = {n: [v.scores.get(n) if v.scores else None for v in verdicts] for n in names}
        return cls(np.fromiter((v.keep for v in verdicts), bool, len(verdicts)), reasons, scores)

    def set(self, i: int, v: Verdict) -> None:
        """Row ``i`` gets verdict ``v`` (a row the column code leaves to :meth:`Filter.check`)."""
        self.keep[i] = v.keep
        if v.keep:
            self.reasons.pop(i, None)
        else:
            self.reasons[i] = v.reason or ""
        for n, col in self.scores.items():
            x = v.scores.get(n) if v.scores else None
            col[i] = np.ma.masked if x is None and isinstance(col, np.ma.MaskedArray) else x
