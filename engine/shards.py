"""The one Ray shard runner: every stage spreads its per-shard work through it.

A stage's unit of work is one shard (see :mod:`engine.layout`). The driver lists what to do,
submits one Ray task (or actor call) per item, keeps at most ``max_in_flight`` of them
running, and hands each result back as it arrives. A task that raises fails its shard only:
the error is recorded and the run goes on; a rerun redoes the shard (its marker is missing).
This is img2dataset's ``distributor.py`` for us: one place decides how shards are spread.

::

    run_shard_tasks(todo: Iterable[T], submit: Callable[[T], ray.ObjectRef],
                    on_done: Callable[[T, Any], None], *, max_in_flight: int,
                    on_error: Callable[[T, BaseException], None] | None = None,
                    progress: Progress | None = None) -> None
        submit(item) starts the task and returns its ref; on_done(item, result) runs on the
        driver when it ends; on_error(item, exc) when it raised (default: the first error is
        raised once every task in flight has ended). ``progress`` is closed at the end.

    ShardTask(shard: str, kind: TaskKind = "shard", payload: Any = None)     a usual T
        kind "shard": build the shard; "retry": redo the failed rows of a committed one

    StageReport(shards_planned, shards_written, shards_skipped, shards_retried,
                shards_failed: dict[shard, reason], count, ok, reasons: Counter, seconds)
        .failed (rows)   .rows_per_second   .add_rows(count, ok, reasons)
        .shard_failed(shard, exc) -> the one-line reason it records
        Each stage's report extends it (IngestReport, RecaptionReport, ...), keyword-only.

    Progress(desc, *, unit="img", total=None, enabled=True)    a tqdm bar
        .update(n, **postfix)   .close()

    error_line(exc) -> str     the last line of an error (Ray wraps a task's traceback)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")
TaskKind = Literal["shard", "retry"]


@dataclass(frozen=True)
class ShardTask:
    """One unit of a stage's work: a shard to build, or a committed shard to retry."""

    shard: str
    kind: TaskKind = "shard"
    payload: Any = None


def error_line(exc: BaseException) -> str:
    """The last line of an error's message: Ray wraps a task's traceback around it."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


@dataclass(kw_only=True)
class StageReport:
    """What a stage did, shard by shard and row by row. Stages extend it with their own counters."""

    shards_planned: int = 0
    shards_written: int = 0
    shards_skipped: int = 0  # already committed
    shards_retried: int = 0
    shards_failed: dict[str, str] = field(default_factory=dict)  # shard -> reason
    count: int = 0  # rows in the shards written this run
    ok: int = 0
    reasons: Counter = field(default_factory=Counter)  # failure reason -> rows
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return self.count - self.ok

    @property
    def rows_per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0

    def add_rows(self, count: int, ok: int, reasons: Iterable[tuple[str, int]] | dict[str, int]) -> None:
        self.count += count
        self.ok += ok
        self.reasons.update(dict(reasons))

    def shard_failed(self, shard: str, exc: BaseException) -> str:
        """Record that a shard's task raised; returns the one-line reason."""
        msg = error_line(exc)
        self.shards_failed[shard] = msg
        return msg


class Progress:
    """A progress bar over rows (tqdm); the runner closes it when the last task has ended."""

    def __init__(
        self, desc: str, *, unit: str = "img", total: int | None = None, enabled: bool = True
    ) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(desc=desc, unit=unit, total=total or None, disable=not enabled, dynamic_ncols=True)

    def update(self, n: int, **postfix: Any) -> None:
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()


def run_shard_tasks(
    todo: Iterable[T],
    submit: Callable[[T], Any],
    on_done: Callable[[T, Any], None],
    *,
    max_in_flight: int,
    on_error: Callable[[T, BaseException], None] | None = None,
    progress: Progress | None = None,
) -> None:
    """Run one Ray task per item of ``todo``, at most ``max_in_flight`` at once.

    ``todo`` is consumed lazily (a source's shard plan may be long): the next item is taken
    only when a slot is free. Results are handed to ``on_done`` in completion order, on the
    driver. If ``todo`` itself raises, the tasks already in flight are waited for first.
    """
    import ray

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
    pending: dict[Any, T] = {}
    first_error: BaseException | None = None

    def wait_until(n_left: int) -> None:
        nonlocal first_error
        while len(pending) > n_left:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                item = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:
                    if on_error is None:
                        first_error = first_error or e
                    else:
                        on_error(item, e)
                    continue
                on_done(item, result)

    try:
        for item in todo:
            wait_until(max_in_flight - 1)
            pending[submit(item)] = item
        wait_until(0)
    finally:
        try:
            wait_until(0)  # also when ``todo`` or a callback raised: never leave a task behind
        finally:
            if progress is not None:
                progress.close()
    if first_error is not None:
        raise first_error
