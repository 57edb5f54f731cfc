"""Task results, written as JSON and a Markdown table (one row per task)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TaskResult:
    task: str
    data: str
    split: str
    n: int  # images (or boxes, or scenes) scored
    metrics: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)  # resolution, text length, templates, checkpoint
    missing_images: int = 0
    missing_examples: list[str] = field(default_factory=list)
    unreadable_images: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{100 * v:.1f}" if 0.0 <= v <= 1.0 else f"{v:.3g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def markdown(results: list[TaskResult]) -> str:
    """One row per task: metrics (in %, except counts), then the settings that change results."""
    head = "| task | data | split | n | metrics (%) | resolution | text | templates | checkpoint | missing |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        metrics = "; ".join(f"{k} {_fmt(v)}" for k, v in r.metrics.items() if not isinstance(v, dict))
        per = [f"{k}: {_fmt(v)}" for k, v in r.metrics.items() if isinstance(v, dict)]
        if per:
            metrics += ("; " if metrics else "") + "; ".join(per)
        s = r.settings
        lines.append(
            "| "
            + " | ".join(
                [
                    r.task,
                    os.path.basename(r.data.rstrip("/")) or r.data,
                    r.split,
                    str(r.n),
                    metrics,
                    str(s.get("resolution", "-")),
                    str(s.get("text", "-")),
                    str(s.get("templates", "-")),
                    str(s.get("checkpoint", "-")),
                    str(r.missing_images + r.unreadable_images),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def write(results: list[TaskResult], out_dir: str) -> tuple[str, str]:
    """``results.md`` then ``results.json`` in ``out_dir``, each written whole under a temporary
    name and moved into place: a kill at any moment leaves each file absent, old or whole, and a
    ``results.json`` is never newer than its ``results.md`` (tests/chaos/test_kill9.py)."""
    os.makedirs(out_dir, exist_ok=True)
    jpath, mpath = os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.md")
    rows = [r.to_dict() for r in results]
    with open(mpath + ".tmp", "w") as f:
        f.write(markdown(results))
    os.replace(mpath + ".tmp", mpath)
    with open(jpath + ".tmp", "w") as f:
        json.dump(rows, f, indent=2)
        f.write("\n")
    os.replace(jpath + ".tmp", jpath)
    return jpath, mpath
