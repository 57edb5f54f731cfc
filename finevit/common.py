"""What every ``finevit`` command shares: exit codes, the one error printer, the config flags.

::

    EXIT_OK 0   EXIT_FAILED 1 (ran, but a shard failed: rerun to retry)   EXIT_USAGE 2 (bad input)
    EXIT_INTERRUPTED 130
    fail(msg) -> EXIT_USAGE         prints ``finevit: error: <msg>`` (one line) on stderr
    warn(msg)                       prints ``finevit: warning: <msg>`` on stderr
    config_args(parser, *, ray=True)   --config, --set, --s3-endpoint-url (and --ray-address)
    build_config(args, extra, model=FineVitConfig)   the config tree from those flags + ``extra``
    literal_choices(model, "a.b.c") the values a ``Literal`` config field allows (for ``choices=``)
    user_errors()                   the library errors that mean bad input (exit 2, no traceback)
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def fail(msg: str) -> int:
    """Print the one-line error every command prints for bad input; returns :data:`EXIT_USAGE`."""
    print(f"finevit: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def warn(msg: str) -> None:
    print(f"finevit: warning: {msg}", file=sys.stderr)


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message names what was wrong with the input: printed by :func:`fail`."""
    from engine.config import ConfigError
    from engine.layout import LayoutError
    from engine.sources.base import SourceError
    from engine.store import StorageError

    return (ConfigError, LayoutError, SourceError, StorageError)


def config_args(p: argparse.ArgumentParser, *, ray: bool = True) -> None:
    """The flags every command takes; ``ray=False`` for commands that do not run on Ray."""
    p.add_argument("--config", help="YAML recipe (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set ingest.timeout=30 (repeatable)",
    )
    if ray:
        p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--s3-endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL or boto3's chain)")


def build_config(args: argparse.Namespace, extra: dict[str, Any], model: Any = None) -> Any:
    """The config tree from ``--config``, ``--set`` and the command's own flags (``extra``)."""
    from engine.config import FineVitConfig, load_config

    overrides = list(args.overrides)
    if getattr(args, "ray_address", None):
        overrides.append(f"ray.address={args.ray_address}")
    if args.s3_endpoint_url:
        overrides.append(f"storage.endpoint_url={args.s3_endpoint_url}")
    for key, value in extra.items():
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides, model or FineVitConfig)


def literal_choices(model: Any, path: str) -> list[str]:
    """The values of a ``Literal[...]`` field, e.g. ``literal_choices(FineVitConfig, "ingest.image.encode_format")``.

    ``choices=`` lists come from here, so the CLI and the config cannot drift apart.
    """
    annotation: Any = model
    for name in path.split("."):
        annotation = _unwrap(annotation).model_fields[name].annotation
    values = [v for v in typing.get_args(_unwrap(annotation)) if v is not None]
    if not values:
        raise TypeError(f"{path} is not a Literal field")
    return [str(v) for v in values]


def _unwrap(annotation: Any) -> Any:
    """``X | None`` -> ``X``; anything else unchanged."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is not typing.Literal and len(args) == 1:
        return args[0]
    return annotation
