"""``finevit export CKPT OUT_DIR --part encoder|vlm``: parse, call train/export.py."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def register(sub: argparse._SubParsersAction, config_args: Callable[..., None]) -> None:
    p = sub.add_parser(
        "export",
        help="export a checkpoint: the encoder (safetensors + AutoModel remote code) or the stage-2 VLM",
    )
    p.add_argument(
        "checkpoint", help="a stage-1 or stage-2 checkpoint (step folder, checkpoints folder or log dir)"
    )
    p.add_argument("out", help="output directory")
    p.add_argument("--part", choices=["encoder", "vlm"], default="encoder")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (a run trained with ema.decay)")
    p.add_argument(
        "--run-config",
        help="the stage-1 recipe (YAML/JSON) when no run config sits beside a stage-1 checkpoint",
    )
    config_args(p, ray=False)
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from finevit.common import fail
    from train.export import export
    from train.model.encoder import EncoderError

    try:
        ckpt = args.checkpoint
        if args.ema:
            from train.checkpoint import ema_checkpoint

            ckpt = ema_checkpoint(ckpt)
        out = export(ckpt, args.out, args.part, args.run_config)
    except (EncoderError, ValueError) as e:
        return fail(str(e))
    print(f"{args.part} exported to {out}")
    return 0
