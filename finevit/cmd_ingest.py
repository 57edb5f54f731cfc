"""``finevit ingest SOURCE OUTPUT`` and ``finevit info DATASET``: thin wrappers over :mod:`engine.ingest`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from finevit.common import EXIT_FAILED, EXIT_OK, build_config, literal_choices


def register(sub: argparse._SubParsersAction, config_args: Callable[..., None]) -> None:
    from engine.config import ImageConfig

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
    p.add_argument("--resize-mode", choices=literal_choices(ImageConfig, "resize_mode"))
    p.add_argument("--resize-only-if-bigger", choices=["true", "false"])
    p.add_argument("--encode-format", choices=literal_choices(ImageConfig, "encode_format"))
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
    config_args(p)
    p.set_defaults(func=cmd_ingest)

    i = sub.add_parser("info", help="summarise a dataset: shards, samples, failures, layers")
    i.add_argument("dataset")
    config_args(i)
    i.set_defaults(func=cmd_info)


def cmd_ingest(args: argparse.Namespace) -> int:
    from engine.ingest import ingest
    from finevit.render import print_ingest_report

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
    print_ingest_report(report)
    return EXIT_FAILED if report.shards_failed else EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    from engine.layout import Dataset
    from finevit.render import print_dataset_summary

    cfg = build_config(args, {})
    print_dataset_summary(Dataset(args.dataset, cfg.storage))
    return EXIT_OK
