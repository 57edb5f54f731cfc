"""``finevit plan``: GPU-hours, wall time and S3 bytes of a run, from per-GPU figures you measured
(a thin wrapper over :mod:`engine.capacity`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict

from finevit.common import EXIT_OK, fail


def register(sub: argparse._SubParsersAction, config_args: Callable[..., None]) -> None:
    p = sub.add_parser(
        "plan",
        help="estimate GPU-hours, wall time and S3 bytes from measured per-GPU figures",
        description=(
            "Every rate is yours: measure it on one GPU of the target fleet (bench/recaption_*.py, "
            "a short `finevit recaption --limit` run, a few stage-1 steps) and pass it here. "
            "GPU-hours = work / rate / efficiency; wall time = GPU-hours / --gpus."
        ),
    )
    p.add_argument("--images", type=float, required=True, help="images in the dataset, e.g. 2e9")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per stage (wall time = GPU-hours / GPUs)")
    p.add_argument("--efficiency", type=float, default=0.8, help="share of the measured rate kept (0-1]")
    p.add_argument("--image-bytes", type=float, default=150_000, help="stored bytes per image (shards)")
    p.add_argument("--caption-tokens", type=float, default=0, help="generated tokens per global caption")
    p.add_argument(
        "--gpu-throughput",
        "--caption-tok-s",
        dest="caption_tok_s",
        type=float,
        default=0,
        help="generated tokens/s per GPU (global captions, at serving batch size)",
    )
    p.add_argument("--regions-per-image", type=float, default=0)
    p.add_argument("--region-tokens", type=float, default=0, help="generated tokens per region caption")
    p.add_argument(
        "--region-tok-s", type=float, default=0, help="tokens/s per GPU (default: --gpu-throughput)"
    )
    p.add_argument("--epochs", type=float, default=0, help="stage-1 passes over the images")
    p.add_argument("--train-img-s", type=float, default=0, help="stage-1 images/s per GPU")
    p.add_argument("--model-params", type=float, default=0, help="stage-1 parameters (checkpoint bytes)")
    p.add_argument("--checkpoints", type=int, default=3, help="checkpoints kept")
    p.add_argument("--gpu-hour-price", type=float, default=0, help="cost per GPU-hour (optional)")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from engine.capacity import CapacityError, CapacityInputs, human_bytes, human_hours, plan

    if args.images != int(args.images):
        return fail(f"--images must be a whole number, got {args.images}")
    x = CapacityInputs(
        images=int(args.images),
        gpus=args.gpus,
        efficiency=args.efficiency,
        image_bytes=args.image_bytes,
        caption_tokens=args.caption_tokens,
        caption_tok_s=args.caption_tok_s,
        regions_per_image=args.regions_per_image,
        region_tokens=args.region_tokens,
        region_tok_s=args.region_tok_s,
        epochs=args.epochs,
        train_img_s=args.train_img_s,
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
    if args.json:
        print(json.dumps([asdict(e) for e in estimates], indent=2))
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
    Console().print(t)
    return EXIT_OK
