"""Prompts live in text files here, one per version: ``<id>.txt`` (``dense-v1``, ``short-v1``,
``regions-grounded-v1``, ``region-proposal-v1``). A new wording is a new file and a new id,
so a layer's ``prompt_id`` always names the exact text that produced it.

A first line ``# task: ...`` says what the prompt is for and is not sent. ``{name}``
placeholders are filled per request (``{width}``, ``{height}``, ``{bbox_convention}``,
``{box_hint}``, and for region proposals ``{box_tag}``, the box as ``<box>(x0,y0),(x1,y1)</box>``
on the 0-1000 grid, the form this project's stage-2 captioners learn); other braces are literal.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
DEFAULTS = {"global": "dense-v1", "grounded": "regions-grounded-v1", "proposals": "region-proposal-v1"}
_PLACEHOLDER = re.compile(r"\{(width|height|bbox_convention|box_hint|box_tag)\}")


class PromptError(ValueError):
    pass


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    task: str | None = None

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]

    def render(self, **values: object) -> str:
        def sub(m: re.Match) -> str:
            if m.group(1) not in values:
                raise PromptError(f"prompt {self.id!r} needs {{{m.group(1)}}} but it was not given")
            return str(values[m.group(1)])

        return _PLACEHOLDER.sub(sub, self.text).strip()


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.txt"))


def _parse(pid: str, raw: str) -> Prompt:
    task = None
    lines = raw.splitlines()
    if lines and lines[0].startswith("# task:"):
        task = lines[0].split(":", 1)[1].strip()
        lines = lines[1:]
    text = "\n".join(lines).strip()
    if not text:
        raise PromptError(f"prompt {pid!r} is empty")
    return Prompt(pid, text, task)


def load_prompt(ref: str) -> Prompt:
    """A prompt by id (a file in this folder) or by path to a text file (its id: the file stem
    plus a short hash of its text, so two different files never share an id)."""
    if os.sep in ref or ref.endswith(".txt") or os.path.isfile(ref):
        p = Path(ref)
        if not p.is_file():
            raise PromptError(f"prompt file not found: {ref}")
        prompt = _parse(p.stem, p.read_text())
        return Prompt(f"{p.stem}@{prompt.sha}", prompt.text, prompt.task)
    p = HERE / f"{ref}.txt"
    if not p.is_file():
        raise PromptError(
            f"unknown prompt id {ref!r}: use one of {', '.join(available())} or a path to a text file"
        )
    return _parse(ref, p.read_text())
