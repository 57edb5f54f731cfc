"""``finevit plan``: GPU-hours, wall time and S3 bytes of a run, from per-GPU figures you measured
(a thin wrapper over :mod:`engine.capacity`). A rate not given on the command line is taken from
what the benchmarks recorded (``bench/results.jsonl``), and the output says where each came from."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import asdict

from finevit.common import EXIT_OK, fail

RESULTS = os.path.join("bench", "results.jsonl")
# the figures a flag sets, and the flag that sets it (for "source" and error messages)
FLAGS = {
    "caption_tok_s": "--gpu-throughput",
    "region_tok_s": "--region-tok-s",
    "train_img_s": "--train-img-s",
    "image_bytes": "--image-bytes",
}
DEFAULT_IMAGE_BYTES = 150_000.0


def register(sub: argparse._SubParsersAction, config_args: Callable[..., None]) -> None:
    p = sub.add_parser(
        "plan",
        help="estimate GPU-hours, wall time and S3 bytes from measured per-GPU figures",
        description=(
            "Every rate is yours: measure it on one GPU of the target fleet (bench/recaption_*.py, "
            "a short `finevit recaption --limit` run, a few stage-1 steps) and pass it here. "
            "GPU-hours = work / rate / efficiency; wall time = GPU-hours / --gpus. A rate you do not give "
            "is read from the benchmarks' records (bench/results.jsonl: bench/gpu_stage1.py on a GPU "
            "writes train_img_s), and the output names the source of every figure."
        ),
    )
    p.add_argument("--images", type=float, required=True, help="images in the dataset, e.g. 2e9")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per stage (wall time = GPU-hours / GPUs)")
    p.add_argument("--efficiency", type=float, default=0.8, help="share of the measured rate kept (0-1]")
    p.add_argument(
        "--image-bytes",
        type=float,
        help=f"stored bytes per image (shards; default: bench record, else {DEFAULT_IMAGE_BYTES:,.0f})",
    )
    p.add_argument("--caption-tokens", type=float, default=0, help="generated tokens per global caption")
    p.add_argument(
        "--gpu-throughput",
        "--caption-tok-s",
        dest="caption_tok_s",
        type=float,
        help="generated tokens/s per GPU (global captions, at serving batch size; default: bench record)",
    )
    p.add_argument("--regions-per-image", type=float, default=0)
    p.add_argument("--region-tokens", type=float, default=0, help="generated tokens per region caption")
    p.add_argument(
        "--region-tok-s", type=float, help="tokens/s per GPU (default: bench record, else --gpu-throughput)"
    )
    p.add_argument("--epochs", type=float, default=0, help="stage-1 passes over the images")
    p.add_argument("--train-img-s", type=float, help="stage-1 images/s per GPU (default: bench record)")
    p.add_argument("--model-params", type=float, default=0, help="stage-1 parameters (checkpoint bytes)")
    p.add_argument("--checkpoints", type=int, default=3, help="checkpoints kept")
    p.add_argument("--gpu-hour-price", type=float, default=0, help="cost per GPU-hour (optional)")
    p.add_argument(
        "--bench-results",
        help=f"the benchmarks' records (default: ./{RESULTS}, else the checkout's {RESULTS})",
    )
    p.add_argument(
        "--bench-device", default="", help="use bench records of this GPU only (name contains it, e.g. H100)"
    )
    p.add_argument("--no-bench", action="store_true", help="read no bench records: every rate from flags")
    p.add_argument("--json", action="store_true", help="print the estimates and figures as JSON")
    p.set_defaults(func=cmd_plan)


def _results_path(given: str | None) -> str:
    if given:
        return given
    if os.path.exists(RESULTS):
        return RESULTS
    checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), RESULTS)
    return checkout if os.path.exists(checkout) else RESULTS


def figures(args: argparse.Namespace) -> tuple[dict[str, float], dict[str, str], list[str]]:
    """Every rate plan needs: ``(values, sources, missing)``. A flag wins; else the latest bench
    record (of ``--bench-device``); else it is missing. Only the figures the asked stages use
    are looked up."""
    from engine.capacity import read_bench_figures

    needed = {"image_bytes"}
    if args.caption_tokens:
        needed.add("caption_tok_s")
    if args.regions_per_image and args.region_tokens:
        needed.add("region_tok_s")
    if args.epochs:
        needed.add("train_img_s")
    path = _results_path(args.bench_results)
    recorded = {} if args.no_bench else read_bench_figures(path, args.bench_device)
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    for name in sorted(needed):
        flag = getattr(args, name)
        if flag is not None:
            values[name], sources[name] = flag, FLAGS[name]
        elif name in recorded:
            values[name], sources[name] = recorded[name].value, recorded[name].source(path)
        elif name == "image_bytes":
            values[name], sources[name] = DEFAULT_IMAGE_BYTES, "default (not measured)"
    if "region_tok_s" in needed and "region_tok_s" not in values and "caption_tok_s" in values:
        values["region_tok_s"] = values["caption_tok_s"]
        sources["region_tok_s"] = f"the global caption rate ({sources['caption_tok_s']})"
    return values, sources, sorted(needed - set(values))


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from engine.capacity import BENCH_FIGURES, CapacityError, CapacityInputs, human_bytes, human_hours, plan

    if args.images != int(args.images):
        return fail(f"--images must be a whole number, got {args.images}")
    if args.bench_results and not os.path.isfile(args.bench_results):
        return fail(f"--bench-results: no such file: {args.bench_results}")
    try:
        values, sources, missing = figures(args)
    except CapacityError as e:
        return fail(f"--bench-results: {e}")
    if missing:
        name = missing[0]
        where = "" if args.no_bench else f", and {_results_path(args.bench_results)} records none"
        device = f" of a device named like {args.bench_device!r}" if args.bench_device and where else ""
        return fail(f"{FLAGS[name]}: the plan needs {BENCH_FIGURES[name]}: not given{where}{device}")
    x = CapacityInputs(
        images=int(args.images),
        gpus=args.gpus,
        efficiency=args.efficiency,
        image_bytes=values["image_bytes"],
        caption_tokens=args.caption_tokens,
        caption_tok_s=values.get("caption_tok_s", 0.0),
        regions_per_image=args.regions_per_image,
        region_tokens=args.region_tokens,
        region_tok_s=values.get("region_tok_s", 0.0),
        epochs=args.epochs,
        train_img_s=values.get("train_img_s", 0.0),
        model_params=args.model_params,
        checkpoints=args.checkpoints,
        gpu_hour_price=args.gpu_hour_price,
    )
    try:
        estimates = plan(x)
    except CapacityError as e:
        flag = "--" + str(e).split(" ", 1)[0].replace("_", "-")
        return fail(f"{flag}: {e}")
    if not estimates:
        return fail("nothing to plan: give --caption-tokens, --region-tokens or --epochs with their rates")
    used = {k: {"value": values[k], "source": sources[k]} for k in sorted(values)}
    if args.json:
        print(json.dumps({"estimates": [asdict(e) for e in estimates], "figures": used}, indent=2))
        return EXIT_OK
    t = Table(title=f"plan: {x.images:.3g} images on {x.gpus} GPUs at {x.efficiency:.0%} efficiency")
    for col in ("stage", "work", "GPU-hours", "wall time", "S3 read", "S3 written"):
        t.add_column(col)
    if x.gpu_hour_price:
        t.add_column("cost")
    for e in estimates:
        row = [e.stage, e.work, f"{e.gpu_hours:,.0f}" if e.gpu_hours >= 10 else f"{e.gpu_hours:.3g}"]
        row += [human_hours(e.wall_hours), human_bytes(e.s3_read_bytes), human_bytes(e.s3_written_bytes)]
        if e.cost is not None:
            row.append(f"{e.cost:,.0f}")
        t.add_row(*row)
    f = Table(title="figures used")
    for col in ("figure", "value", "from"):
        f.add_column(col, overflow="fold")
    for k, v in used.items():
        f.add_row(k, f"{v['value']:,.4g}", v["source"])
    console = Console()
    console.print(t)
    console.print(f)
    return EXIT_OK
