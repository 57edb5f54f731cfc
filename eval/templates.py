"""Prompt templates for zero-shot and box classification (``{c}``: the class name)."""

from __future__ import annotations

from pathlib import Path

TEMPLATES: dict[str, list[str]] = {
    "simple": ["a photo of a {c}."],
    # a short ensemble in the style of CLIP's ImageNet prompts
    "ensemble": [
        "a photo of a {c}.",
        "a bad photo of a {c}.",
        "a photo of the large {c}.",
        "a photo of the small {c}.",
        "a cropped photo of a {c}.",
        "a drawing of a {c}.",
        "itap of a {c}.",
    ],
    # for synthetic scenes: the words the dense captions use
    "shapes": ["a {c}.", "a shape: a {c}.", "an image of a {c}."],
}


def load_templates(spec: str) -> tuple[str, list[str]]:
    """``(name, templates)`` from a built-in name or a file with one template per line."""
    if spec in TEMPLATES:
        return spec, TEMPLATES[spec]
    p = Path(spec)
    if not p.is_file():
        raise ValueError(
            f"--templates: {spec!r} is neither a built-in set ({', '.join(TEMPLATES)}) nor a file"
        )
    lines = [x.strip() for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
    bad = [x for x in lines if "{c}" not in x]
    if not lines or bad:
        raise ValueError(f"--templates {p}: every line must hold '{{c}}' (bad: {bad[:2]})")
    return p.name, lines
