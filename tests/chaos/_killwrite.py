"""A SIGKILL aimed inside a write: run a program and kill it at the k-th step of its writes.

A kill timed from outside (a poll of the folder, a delay) lands inside a write of a few KB
(tens of microseconds) almost never on a loaded machine, so a write that a reader could see
torn would pass such a test. Here the process kills itself (``os.kill(getpid(), SIGKILL)``: a
real kill -9, no handler, no flush of Python's buffers) at a chosen step:

* an audit hook (``sys.addaudithook``) watches for the first file opened for writing under
  ``OUT`` (step 0); from then on a profile function (``sys.setprofile``,
  this thread) counts every call, return and C call: json.dump's chunks, each ``write``,
  ``close``, ``os.replace``; the step count is deterministic for the same results;
* ``--record FILE``: nothing is killed; the steps at which each file under ``OUT`` was opened
  for writing, renamed or removed (the landmarks) and the last step of the writer function
  (``--until``, by default ``eval/report.py``'s ``write``) are saved as JSON;
* ``--kill-at K``: SIGKILL at step K (drawn by the test between landmarks).

    python -m tests.chaos._killwrite OUT (--record FILE | --kill-at K) -- finevit ARGS...
    python -m tests.chaos._killwrite OUT (--record FILE | --kill-at K) --results RESULTS_JSON

The second form calls ``eval.report.write`` on the rows of a results.json (a cheap process:
many kills of the write itself without an evaluation each time).
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import signal
import sys
from typing import Any


def arm(out: str, kill_at: int | None, record: str | None, until: tuple[str, str]) -> None:
    out = os.path.realpath(out)
    steps = 0
    marks: list[dict[str, Any]] = []
    on = False

    def under(p: Any) -> bool:
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        if not isinstance(p, str):
            return False
        p = os.path.realpath(p)
        return p == out or p.startswith(out + os.sep)

    def save() -> None:
        if record:
            with open(record + ".tmp", "w") as f:
                json.dump({"marks": marks, "end": steps}, f)
            os.replace(record + ".tmp", record)

    def profile(frame, event: str, arg: Any) -> None:
        nonlocal steps
        steps += 1
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if (
            event == "return"
            and frame.f_code.co_name == until[1]
            and frame.f_code.co_filename.endswith(until[0])
        ):
            sys.setprofile(None)
            marks.append({"step": steps, "event": "writer returned", "path": ""})
            save()

    def audit(event: str, args: tuple) -> None:
        nonlocal on
        if event == "open":
            path, mode, flags = args
            writing = (mode and any(c in str(mode) for c in "wax+")) or (
                flags and flags & (os.O_WRONLY | os.O_RDWR)
            )
            if not (writing and under(path)):
                return
        elif event in ("os.rename", "os.remove") and on:
            path = args[1] if event == "os.rename" else args[0]
            if not (under(args[0]) or under(path)):
                return
        else:
            return
        marks.append({"step": steps, "event": event, "path": os.path.basename(str(path))})
        if not on:
            on = True
            sys.setprofile(profile)

    sys.addaudithook(audit)


def main() -> None:
    argv = sys.argv[1:]
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--record")
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--results", help="call eval.report.write on these rows instead of a program")
    ap.add_argument("--until", default="eval/report.py:write", help="FILE_SUFFIX:FUNCTION of the writer")
    args = ap.parse_args(argv)
    suffix, _, func = args.until.rpartition(":")
    arm(args.out, args.kill_at, args.record, (suffix, func))
    if args.results:
        from eval.report import TaskResult, write

        with open(args.results) as f:
            rows = json.load(f)
        write([TaskResult(**r) for r in rows], args.out)
        return
    prog, *prog_args = rest
    sys.argv = [prog, *prog_args]
    runpy.run_module(prog, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
