"""``finevit eval MODEL --task T --data PATH``: parse, load, call eval/, print + write the table.

::

    finevit eval runs/stage1_tiny --task finegrained --data 'synthetic://scenes?n=64&seed=1000&size=128'
    finevit eval CKPT --task zeroshot --data imagenet/val --templates ensemble --out results/
    finevit eval CKPT --task retrieval --data captions_val2017.json --images val2017/
    finevit eval CKPT --task long-retrieval --data dci/ --dci-text extra
    finevit eval CKPT --task boxcls --data instances_val2017.json --images val2017/
    finevit eval CKPT --task retrieval --data s3://bucket/ds --format finevit --layer gt-global
    finevit eval openclip:ViT-B-32 --weights open_clip_model.safetensors --task zeroshot --data ...
    finevit eval openclip:ViT-B-16 --weights ... --task boxcls --data instances_val2017.json --images val2017/
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from finevit.common import EXIT_OK, fail, warn


def register(sub: argparse._SubParsersAction, config_args: Any) -> None:
    p = sub.add_parser(
        "eval",
        help="zero-shot, retrieval, long-caption retrieval, box classification, fine-grained synthetic suite",
        description=(
            "MODEL: a stage-1 run folder / checkpoints folder / step folder, an exported encoder folder, "
            "or openclip:NAME / openclip:/path/model_config.json (with --weights for local weights). "
            "A stage-1 checkpoint's config is read from config.json/config.yaml beside it, else give the "
            "recipe with --config and the --set overrides used to train."
        ),
    )
    p.add_argument("model")
    p.add_argument(
        "--ema", action="store_true", help="evaluate the EMA weights (a run trained with ema.decay)"
    )
    p.add_argument(
        "--task",
        required=True,
        action="append",
        help="zeroshot | retrieval | long-retrieval | boxcls | finegrained (repeatable, same --data)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="dataset path, annotation file or FineViT dataset root, local or s3://bucket/prefix (S3: "
        "--s3-endpoint-url, --set storage.*, else the AWS_* environment); synthetic://scenes?... (finegrained)",
    )
    p.add_argument(
        "--format",
        default="auto",
        help="imagefolder, csv, json (zeroshot); coco-captions, karpathy, finevit (retrieval); dci, urban1k, "
        "sharegpt4v, finevit (long-retrieval); coco-instances, finevit (boxcls); default: guessed",
    )
    p.add_argument(
        "--images", help="image folder for annotation files, local or s3:// (default: the file's folder)"
    )
    p.add_argument("--split", default="test", help="Karpathy split (default test)")
    p.add_argument(
        "--layer", action="append", help="FineViT caption layer(s) (alt-text: shard captions) or region layer"
    )
    p.add_argument(
        "--templates",
        default="ensemble",
        help="built-in set (simple, ensemble, shapes) or a file, one '{c}' template a line",
    )
    p.add_argument(
        "--dci-text",
        default="short+extra",
        choices=["short+extra", "extra"],
        help="DCI text: short_caption + extra_caption (default) or extra_caption only",
    )
    p.add_argument("--limit", type=int, help="first N images only (ShareGPT4V-1k: 1000)")
    p.add_argument(
        "--negatives", type=int, default=3, help="finegrained: hard negatives per scene and attribute"
    )
    p.add_argument("--max-patches", type=int, help="patch budget at eval (default: the training budget)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the run config's data.tokenizer)")
    p.add_argument("--weights", help="openclip: local weights file")
    p.add_argument(
        "--region-features",
        default="fgclip",
        choices=["fgclip", "final"],
        help="openclip boxcls: FG-CLIP's dense features (last block's value path, default) or the final tokens",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="write results.json + results.md into this folder")
    p.add_argument("--no-progress", action="store_true")
    config_args(p, ray=False)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    from engine.store import StorageError
    from eval.datasets import FormatError
    from eval.embed import TaskError
    from eval.report import markdown, write
    from eval.run import TASKS, evaluate, load_model
    from train.model.encoder import EncoderError

    bad = [t for t in args.task if t not in TASKS]
    if bad:
        return fail(f"--task {bad[0]!r}: expected one of {', '.join(TASKS)}")
    if args.ema:
        from train.checkpoint import ema_checkpoint

        try:
            args.model = ema_checkpoint(args.model)
        except (EncoderError, ValueError) as e:
            return fail(str(e))
    try:
        storage = _storage(args)
        enc = load_model(
            args.model,
            args.config,
            args.overrides,
            args.tokenizer,
            args.max_patches,
            args.weights,
            args.device,
            args.region_features,
        )
        results = []
        for task in args.task:
            r = evaluate(
                enc,
                task,
                args.data,
                args.format,
                args.images,
                args.split,
                args.layer,
                args.templates,
                args.dci_text,
                args.limit,
                args.negatives,
                args.batch_size,
                progress=not args.no_progress and sys.stderr.isatty(),
                storage=storage,
            )
            if r.missing_images or r.unreadable_images:
                warn(
                    f"{task}: {r.missing_images} missing and {r.unreadable_images} unreadable images left out "
                    f"(e.g. {', '.join(r.missing_examples[:3])})"
                )
            results.append(r)
    except (FormatError, EncoderError, TaskError, ImportError, ValueError, StorageError) as e:
        return fail(str(e))
    except (OSError, *_boto_errors()) as e:  # storage refused or unreachable (S3 403, no credentials, ...)
        return fail(f"cannot read {args.data}: {type(e).__name__}: {e}")
    print(markdown(results), end="")
    if args.out:
        jpath, mpath = write(results, args.out)
        print(f"wrote {jpath} and {mpath}")
    else:
        print(json.dumps([r.metrics for r in results]))
    return EXIT_OK


def _storage(args: argparse.Namespace) -> Any:
    """S3 access for ``s3://`` data: ``--s3-endpoint-url`` and the ``--set storage.*`` overrides (the
    others are the model's), then the environment and boto3's chain."""
    from engine.config import FineVitConfig, load_config

    sets = [o for o in args.overrides if o.startswith("storage.")]
    if args.s3_endpoint_url:
        sets.append(f"storage.endpoint_url={args.s3_endpoint_url}")
    return load_config(None, sets, FineVitConfig).storage


def _boto_errors() -> tuple[type[BaseException], ...]:
    try:
        from botocore.exceptions import BotoCoreError

        return (BotoCoreError,)
    except ImportError:
        return ()
