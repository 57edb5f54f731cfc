"""``finevit filter``: a thin wrapper over :func:`filtering.run.filter_dataset`."""

from __future__ import annotations

import argparse
import json
import sys

from finevit.common import EXIT_FAILED, EXIT_OK


def register(sub: argparse._SubParsersAction, config_args) -> None:
    p = sub.add_parser(
        "filter",
        help="write a keep/drop filter layer (with reasons and scores) over caption, image and region layers",
        description=(
            "Runs a list of filters (--config FILE, default configs/filters/default.yaml) over the committed "
            "shards of DATASET and the layers given with --on, and writes layers/NAME/<shard>.parquet "
            "(key, keep, reasons, scores). Nothing is deleted. Resumable: a rerun skips committed shards."
        ),
    )
    p.add_argument("dataset")
    p.add_argument("--layer", required=True, help="the filter layer to write")
    p.add_argument(
        "--on",
        action="append",
        default=[],
        metavar="LAYER",
        help="a caption or region layer the filters read (repeatable: one of each kind)",
    )
    p.add_argument("--workers", type=int, help="shard tasks in flight (default: 2 per CPU)")
    p.add_argument("--no-progress", action="store_true")
    config_args(p)
    for a in p._actions:
        if a.dest == "config":
            a.help = "filter config: a YAML list of filters (default: configs/filters/default.yaml)"
        elif a.dest == "overrides":
            a.help = "override a field, e.g. --set filter.task_cpus=0.5 (repeatable)"
    p.set_defaults(func=cmd_filter)


def cmd_filter(args: argparse.Namespace) -> int:
    from filtering.config import load_filter_config
    from filtering.run import filter_dataset

    overrides = list(args.overrides)
    overrides.append(f"filter.layer={json.dumps(args.layer)}")
    if args.on:
        overrides.append(f"filter.on={json.dumps(args.on)}")
    if args.workers:
        overrides.append(f"filter.workers={args.workers}")
    if args.no_progress:
        overrides.append("filter.progress=false")
    if getattr(args, "ray_address", None):
        overrides.append(f"ray.address={args.ray_address}")
    if args.s3_endpoint_url:
        overrides.append(f"storage.endpoint_url={args.s3_endpoint_url}")
    cfg = load_filter_config(args.config, overrides)
    report = filter_dataset(args.dataset, cfg, on_event=lambda m: print(m, file=sys.stderr))
    print_report(report)
    return EXIT_FAILED if report.shards_failed else EXIT_OK


def print_report(report) -> None:
    from rich.table import Table

    from finevit.render import console, print_failures

    t = Table(title="filter summary", show_header=False, title_justify="left")
    t.add_row("dataset", report.dataset)
    t.add_row("layer", report.layer)
    t.add_row(
        "shards",
        f"{report.shards_written} written, {report.shards_skipped} already committed"
        + (
            f", {len(report.shards_missing)} skipped (an --on layer lacks them)"
            if report.shards_missing
            else ""
        )
        + (f", [red]{len(report.shards_failed)} failed[/red]" if report.shards_failed else ""),
    )
    if report.count:
        t.add_row(
            "rows",
            f"{report.count}  kept {report.kept} ({report.kept / report.count:.1%})  dropped {report.dropped}",
        )
        t.add_row("speed", f"{report.rows_per_second:.0f} rows/s over {report.seconds:.1f} s")
    for name, n in report.by_filter.most_common():
        if n:
            t.add_row(f"  dropped by {name}", str(n))
    console.print(t)
    for s, why in sorted(report.shards_missing.items()):
        print(f"skipped shard {s}: {why}", file=sys.stderr)
    print_failures({}, report.shards_failed)
