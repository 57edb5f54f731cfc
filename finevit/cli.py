"""The ``finevit`` command: parses arguments, builds the config, calls library functions.

This is the one place that knows every stage; library code never imports it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

EXIT_USAGE = 2


def _fail(msg: str) -> int:
    print(f"finevit: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe (see configs/)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set ingest.timeout=30 (repeatable)",
    )
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local one)")
    p.add_argument("--s3-endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL or boto3's chain)")


def build_config(args: argparse.Namespace, extra: dict[str, Any], model: Any = None) -> Any:
    """The config tree from ``--config``, ``--set`` and the command's own flags (``extra``)."""
    from engine.config import FineVitConfig, load_config

    overrides = list(args.overrides)
    if args.ray_address:
        overrides.append(f"ray.address={args.ray_address}")
    if args.s3_endpoint_url:
        overrides.append(f"storage.endpoint_url={args.s3_endpoint_url}")
    for key, value in extra.items():
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides, model or FineVitConfig)


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="turn an image source into img2dataset-format shards",
        description=(
            "SOURCE: a folder of images, a URL list (.txt/.csv/.tsv/.jsonl/.parquet), WebDataset tars "
            "(path, glob or {000..009} pattern), Parquet with image bytes, s3://bucket/prefix/, "
            "synthetic://scenes?n=N&seed=S&size=W, or an existing img2dataset output folder (registered, "
            "not copied). OUTPUT: a local path or s3://bucket/prefix."
        ),
    )
    p.add_argument("source")
    p.add_argument("output")
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--image-size", type=int, help="target side (default 1024: the long side, never upscaled)")
    p.add_argument(
        "--resize-mode", choices=["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
    )
    p.add_argument("--resize-only-if-bigger", choices=["true", "false"])
    p.add_argument("--encode-format", choices=["jpg", "png", "webp"])
    p.add_argument("--encode-quality", type=int)
    p.add_argument("--max-pixels", type=int, help="refuse images whose declared size exceeds this")
    p.add_argument(
        "--workers", type=int, help="shard tasks in flight (default: one running per CPU, as many queued)"
    )
    p.add_argument("--timeout", type=float, help="per-URL download timeout, seconds")
    p.add_argument("--retries", type=int, help="download retries per URL")
    p.add_argument(
        "--retry-failed", action="store_true", help="re-attempt transient failures of committed shards"
    )
    p.add_argument(
        "--allow-private-network",
        action="store_true",
        help="allow URLs that resolve to loopback/private/link-local addresses (refused by default)",
    )
    p.add_argument("--no-progress", action="store_true")
    _config_args(p)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from engine.ingest import ingest

    cfg = build_config(
        args,
        {
            "ingest.samples_per_shard": args.samples_per_shard,
            "ingest.image.image_size": args.image_size,
            "ingest.image.resize_mode": args.resize_mode,
            "ingest.image.resize_only_if_bigger": args.resize_only_if_bigger,
            "ingest.image.encode_format": args.encode_format,
            "ingest.image.encode_quality": args.encode_quality,
            "ingest.image.max_pixels": args.max_pixels,
            "ingest.workers": args.workers,
            "ingest.timeout": args.timeout,
            "ingest.retries": args.retries,
            "ingest.retry_failed": "true" if args.retry_failed else None,
            "ingest.allow_private_network": "true" if args.allow_private_network else None,
        },
    )
    report = ingest(
        args.source,
        args.output,
        cfg,
        progress=not args.no_progress,
        on_event=lambda m: print(m, file=sys.stderr),
    )
    from finevit.render import print_ingest_report

    print_ingest_report(report)
    return 1 if report.shards_failed else 0


def _cmd_info(args: argparse.Namespace) -> int:
    from engine.layout import Dataset
    from finevit.render import print_dataset_summary

    cfg = build_config(args, {})
    ds = Dataset(args.dataset, cfg.storage)
    print_dataset_summary(ds)
    return 0


# Stage commands live in their own modules (finevit/cmd_<stage>.py), each exposing
# ``register(subparsers)`` that adds its parser with ``set_defaults(func=...)``.
STAGE_COMMAND_MODULES: list[str] = ["finevit.cmd_audit", "finevit.cmd_recaption", "finevit.cmd_train"]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="finevit", description="FineViT data engine and trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_ingest(sub)
    sub.choices["ingest"].set_defaults(func=_cmd_ingest)
    p = sub.add_parser("info", help="summarise a dataset: shards, samples, failures, layers")
    p.add_argument("dataset")
    _config_args(p)
    p.set_defaults(func=_cmd_info)
    for name in STAGE_COMMAND_MODULES:
        importlib.import_module(name).register(sub, _config_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from engine.config import ConfigError
    from engine.layout import LayoutError
    from engine.sources.base import SourceError
    from engine.store import StorageError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, LayoutError, SourceError, StorageError) as e:
        return _fail(str(e))
    except FileNotFoundError as e:
        return _fail(f"not found: {e.filename or e}")
    except KeyboardInterrupt:
        print("\ninterrupted: committed shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
