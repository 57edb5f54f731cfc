#!/usr/bin/env python3
"""Render the chaos suite's figures (JSON written by tests/chaos/conftest.py) as a markdown table.

    FINEVIT_CHAOS_FIGURES=/tmp/chaos.json make test-chaos
    python scripts/reliability_table.py /tmp/chaos.json                        # print the table
    python scripts/reliability_table.py /tmp/chaos.json --update RELIABILITY.md  # replace it there

``--update`` replaces what lies between the ``<!-- figures:begin -->`` and
``<!-- figures:end -->`` lines of the file, so the table in RELIABILITY.md is the output of a
run, never typed by hand. With ``--keep``, rows of the file's current table whose scenario the
JSON lacks are kept (a partial run, ``-k``, adds its rows to the published ones):

    python scripts/reliability_table.py /tmp/chaos.json --update RELIABILITY.md --keep
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
COLUMNS = (
    "scenario",
    "trials",
    "faults injected",
    "ok",
    "failed (with reason)",
    "lost",
    "duplicated",
    "unaccounted",
    "wall s (faulty runs)",
    "wall s (clean run)",
    "notes",
)


def _cell(v: object) -> str:
    if v is None:
        return "—"
    return str(v).replace("|", "\\|").replace("\n", " ")


NUMBERS = ("trials", "faults", "ok", "failed", "lost", "duplicated", "unaccounted")
RECORDED = re.compile(r"^Recorded (\S+) … (\S+) \(UTC\)")


def published_rows(doc: str) -> list[dict]:
    """The rows of the table between the markers of ``doc`` (the inverse of :func:`table`)."""
    if BEGIN not in doc or END not in doc:
        return []
    block = doc.split(BEGIN, 1)[1].split(END, 1)[0]
    recorded = [m.groups() for m in map(RECORDED.match, block.splitlines()) if m]
    rows = []
    for line in block.splitlines():
        if not line.startswith("| ") or line.startswith("| scenario |"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        if len(cells) != len(COLUMNS):
            continue
        row: dict = {"scenario": cells[0], **{k: int(v) for k, v in zip(NUMBERS, cells[1:8], strict=True)}}
        row["wall_s"] = float(cells[8])
        row["clean_wall_s"] = None if cells[9] == "—" else float(cells[9])
        row["note"] = cells[10]
        if recorded:  # one stamp per table: the span of the earlier run
            row["recorded_span"] = recorded[0]
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in sorted(rows, key=lambda r: r["scenario"]):
        cells = [
            r["scenario"],
            r["trials"],
            r["faults"],
            r["ok"],
            r["failed"],
            r["lost"],
            r["duplicated"],
            r["unaccounted"],
            r["wall_s"],
            r.get("clean_wall_s"),
            r.get("note", ""),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    recorded = sorted(r["recorded"] for r in rows if r.get("recorded"))
    recorded += sorted(t for r in rows for t in r.get("recorded_span", ()))
    if recorded:
        lines.append("")
        lines.append(f"Recorded {min(recorded)} … {max(recorded)} (UTC).")
    totals = {k: sum(int(r[k]) for r in rows) for k in ("faults", "lost", "duplicated", "unaccounted")}
    lines.append(
        f"Totals over {len(rows)} scenarios: {totals['faults']} faults injected, "
        f"{totals['lost']} lost, {totals['duplicated']} duplicated, {totals['unaccounted']} unaccounted."
    )
    return "\n".join(lines)


def update(path: Path, text: str) -> None:
    doc = path.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} block to replace")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("figures", help="the JSON file the chaos suite wrote ($FINEVIT_CHAOS_FIGURES)")
    p.add_argument("--update", metavar="MD", help="replace the figures block of this markdown file")
    p.add_argument(
        "--keep",
        action="store_true",
        help="with --update: keep the file's rows of scenarios the JSON lacks",
    )
    args = p.parse_args(argv)
    rows = json.loads(Path(args.figures).read_text())["rows"]
    if args.keep and args.update:
        have = {r["scenario"] for r in rows}
        rows += [r for r in published_rows(Path(args.update).read_text()) if r["scenario"] not in have]
    if not rows:
        print(f"{args.figures}: no rows", file=sys.stderr)
        return 2
    text = table(rows)
    if args.update:
        update(Path(args.update), text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
