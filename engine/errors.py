"""Which failure reasons are transient (worth ``--retry-failed``) and which are final."""

from __future__ import annotations

import re

_TRANSIENT = re.compile(
    r"timed? ?out|timeout|HTTP Error (429|5\d\d)|\b(429|5\d\d)\b.*(error|unavailable|gateway)"
    r"|connection (reset|refused|aborted)|remote end closed|temporary failure|"
    r"reset by peer|broken pipe|incompleteread|service unavailable|try again|slow ?down",
    re.IGNORECASE,
)


def is_transient(reason: str | None) -> bool:
    """True for timeouts, 429/5xx answers and dropped connections; False for bad content."""
    return bool(reason) and bool(_TRANSIENT.search(reason))
