"""``finevit train stage1|stage2|tiny-lm`` and ``finevit train-tokenizer``: parse, build the config, call train/."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def register(sub: argparse._SubParsersAction, config_args: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("train", help="train the encoder (stage 1: contrastive, native resolution)")
    stages = p.add_subparsers(dest="stage", required=True)
    s1 = stages.add_parser(
        "stage1",
        help="contrastive stage 1 (also under `torchrun --nproc-per-node N -m finevit train stage1`)",
    )
    s1.add_argument("--dataset", help="dataset root (overrides data.dataset)")
    s1.add_argument("--steps", type=int, help="overrides loop.steps")
    s1.add_argument("--log-dir", help="overrides log.dir")
    config_args(s1, ray=False)  # stage 1 runs under torchrun, not on Ray
    s1.set_defaults(func=_cmd_stage1)

    s2 = stages.add_parser(
        "stage2",
        help="stage 2: the stage-1 encoder + a projector + a causal LM on region and global captions",
    )
    s2.add_argument("--init", help="stage-1 checkpoint (overrides init.checkpoint)")
    s2.add_argument("--lm", help="local causal-LM directory (overrides lm.path)")
    s2.add_argument("--dataset", help="dataset root (overrides data.dataset)")
    s2.add_argument("--steps", type=int, help="overrides loop.steps")
    s2.add_argument("--log-dir", help="overrides log.dir")
    config_args(s2, ray=False)
    s2.set_defaults(func=_cmd_stage2)

    lm = stages.add_parser(
        "tiny-lm", help="write a tiny random causal LM with a project tokenizer (tests, tiny recipe)"
    )
    lm.add_argument("tokenizer", help="a tokenizer directory (finevit train-tokenizer)")
    lm.add_argument("out")
    lm.add_argument("--arch", default="llama", choices=["llama", "qwen2"])
    lm.add_argument("--hidden", type=int, default=64)
    lm.add_argument("--layers", type=int, default=2)
    lm.set_defaults(func=_cmd_tiny_lm)

    t = sub.add_parser("train-tokenizer", help="train a BPE tokenizer on caption layers")
    t.add_argument("dataset")
    t.add_argument(
        "--layer",
        action="append",
        required=True,
        help="caption layer to learn from (repeatable; 'alt-text' = the shards' own captions)",
    )
    t.add_argument("--vocab", type=int, default=8192)
    t.add_argument("out", help="output directory (a PreTrainedTokenizerFast)")
    config_args(t, ray=False)
    t.set_defaults(func=_cmd_tokenizer)


def _config(args: argparse.Namespace, extra: dict[str, Any]) -> Any:
    from finevit.common import build_config
    from train.config import Stage1Config

    return build_config(args, extra, Stage1Config)


def _cmd_stage1(args: argparse.Namespace) -> int:
    from train.distributed import shutdown
    from train.stage1 import train_stage1

    cfg = _config(args, {"data.dataset": args.dataset, "loop.steps": args.steps, "log.dir": args.log_dir})
    try:
        result = train_stage1(cfg, on_event=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        shutdown()
    if result.losses and result.rank == 0:
        print(
            f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over {result.steps} steps "
            f"({result.seconds:.1f} s); checkpoint {result.checkpoint}"
        )
    return 0


def _cmd_stage2(args: argparse.Namespace) -> int:
    from finevit.common import build_config
    from train.distributed import shutdown
    from train.stage2 import Stage2Config, train_stage2

    extra = {
        "init.checkpoint": args.init,
        "lm.path": args.lm,
        "data.dataset": args.dataset,
        "loop.steps": args.steps,
        "log.dir": args.log_dir,
    }
    cfg = build_config(args, extra, Stage2Config)
    try:
        result = train_stage2(cfg, on_event=lambda m: print(m, file=sys.stderr, flush=True))
    finally:
        shutdown()
    if result.losses and result.rank == 0:
        print(
            f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over {result.steps} steps "
            f"({result.seconds:.1f} s, {result.tokens_per_s:.0f} tokens/s); checkpoint {result.checkpoint}"
        )
    return 0


def _cmd_tiny_lm(args: argparse.Namespace) -> int:
    from train.stage2 import make_tiny_lm

    make_tiny_lm(args.tokenizer, args.out, args.arch, args.hidden, args.layers)
    print(f"tiny {args.arch} LM written to {args.out}")
    return 0


def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from train.tokenizer import train_tokenizer

    cfg = _config(args, {})
    n = train_tokenizer(args.dataset, args.layer, args.vocab, args.out, cfg.storage)
    print(f"tokenizer with {n} tokens written to {args.out}")
    return 0
