"""The ``finevit`` command: the parser and the one place errors become exit codes.

This is the one place that knows every stage; library code never imports it, and neither
does any command. Each command lives in its own module (``finevit/cmd_<command>.py``)
exposing ``register(subparsers, config_args)``, which adds its parser with
``set_defaults(func=...)``; what they share is in :mod:`finevit.common`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from finevit.common import EXIT_INTERRUPTED, config_args, fail, user_errors

STAGE_COMMAND_MODULES: list[str] = [
    "finevit.cmd_ingest",
    "finevit.cmd_audit",
    "finevit.cmd_recaption",
    "finevit.cmd_train",
    "finevit.cmd_filter",
    "finevit.cmd_eval",
    "finevit.cmd_export",
    "finevit.cmd_plan",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finevit", description="FineViT data engine and trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STAGE_COMMAND_MODULES:
        importlib.import_module(name).register(sub, config_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except user_errors() as e:
        return fail(str(e))
    except FileNotFoundError as e:
        return fail(f"not found: {e.filename or e}")
    except KeyboardInterrupt:
        print("\ninterrupted: committed shards are kept; rerun the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
