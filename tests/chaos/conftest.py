"""The chaos suite's one shared piece: the figures each scenario reports (RELIABILITY.md).

Every test under ``tests/chaos/`` is marked ``chaos`` at collection. A scenario records what
it did through the session fixture ``chaos_figures``::

    def test_something(chaos_figures):
        ...
        chaos_figures.add(
            scenario="kill -9: ingest",   # one row per scenario; a later add replaces it
            trials=3,                     # runs of the scenario (each with its faults)
            faults=3,                     # faults injected in all (kills, 5xx, ...)
            ok=300,                       # samples that ended ok
            failed=0,                     # samples that ended failed, each with a reason
            lost=0,                       # expected samples missing at the end
            duplicated=0,                 # samples present more than once
            unaccounted=0,                # samples neither ok nor failed-with-reason
            wall_s=41.2,                  # wall time of the faulty runs (all trials, reruns included)
            clean_wall_s=12.3,            # wall time of one uninterrupted run, or None
            note="",                      # free text for the table (e.g. the fault rate)
        )

The rows are written to the JSON file named by ``FINEVIT_CHAOS_FIGURES`` (default:
``<tmp>/finevit-chaos-figures.json``) as each row is added; rows of other scenarios already in
the file are kept, so two partial runs (``-k``) add up. ``python scripts/reliability_table.py
FILE`` renders the file as RELIABILITY.md's table.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
FIGURE_FIELDS = (
    "trials",
    "faults",
    "ok",
    "failed",
    "lost",
    "duplicated",
    "unaccounted",
    "wall_s",
    "clean_wall_s",
)


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One Ray head for a module's CLI runs (each connects in about a second instead of starting
    a node of its own; tests/chaos/_faults.py's ``ray_head``). A module that kills its runs' Ray
    with them (test_kill9.py) does not use it."""
    from tests.chaos._faults import ray_head

    with ray_head(tmp_path_factory.mktemp("ray") / "head.log") as address:
        yield address


def figures_path() -> Path:
    env = os.environ.get("FINEVIT_CHAOS_FIGURES")
    return Path(env) if env else Path(tempfile.gettempdir()) / "finevit-chaos-figures.json"


class ChaosFigures:
    """Collects one row per scenario and keeps the JSON file up to date."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(
        self,
        *,
        scenario: str,
        trials: int,
        faults: int,
        ok: int,
        failed: int,
        lost: int,
        duplicated: int,
        unaccounted: int,
        wall_s: float,
        clean_wall_s: float | None = None,
        note: str = "",
    ) -> dict[str, Any]:
        row = {
            "scenario": scenario,
            "trials": int(trials),
            "faults": int(faults),
            "ok": int(ok),
            "failed": int(failed),
            "lost": int(lost),
            "duplicated": int(duplicated),
            "unaccounted": int(unaccounted),
            "wall_s": round(float(wall_s), 1),
            "clean_wall_s": None if clean_wall_s is None else round(float(clean_wall_s), 1),
            "note": note,
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        rows = [r for r in self.rows() if r.get("scenario") != scenario] + [row]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
        tmp.replace(self.path)
        return row

    def rows(self) -> list[dict[str, Any]]:
        try:
            return list(json.loads(self.path.read_text())["rows"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return []


@pytest.fixture(scope="session")
def chaos_figures() -> ChaosFigures:
    return ChaosFigures(figures_path())


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.chaos)
