"""``finevit recaption`` and ``finevit serve-captioner``: thin wrappers over :mod:`recaption`."""

from __future__ import annotations

import argparse
import sys
from typing import Any, get_args

from recaption.presets import ModelFamily

EXIT_USAGE = 2


def register(sub: argparse._SubParsersAction, config_args) -> None:
    p = sub.add_parser(
        "recaption",
        help="caption every image of a dataset with a VLM into a new layer",
        description=(
            "Reads committed image shards of DATASET (local path or s3://) and writes layers/NAME/<shard>.parquet. "
            "Resumable: a rerun skips committed layer shards; --retry-failed redoes failed rows."
        ),
    )
    p.add_argument("dataset")
    p.add_argument(
        "--layer",
        action="append",
        help="layer name (default: recap-global / recap-regions-<mode>); with several --task, one per task",
    )
    p.add_argument(
        "--task",
        action="append",
        choices=["global", "regions"],
        help="repeat to write several layers from one read of each image (e.g. --task global --task regions)",
    )
    p.add_argument("--backend", choices=["openai", "vllm", "sglang", "hf"])
    p.add_argument(
        "--endpoint",
        action="append",
        dest="endpoints",
        metavar="URL",
        help="OpenAI-compatible server, e.g. http://gpu1:8000 (repeatable; openai/sglang)",
    )
    p.add_argument(
        "--model",
        help="served model name (openai/sglang; default: what the server lists) or a local directory (hf/vllm)",
    )
    p.add_argument(
        "--prompt",
        help="prompt id (dense-v1, short-v1, regions-grounded-v1, region-proposal-v1) or a text file",
    )
    p.add_argument("--region-mode", choices=["grounded", "proposals"])
    p.add_argument(
        "--proposals-layer",
        help="region layer whose boxes are captioned (proposals mode; default gt-regions)",
    )
    p.add_argument(
        "--bbox-format", choices=["pixels", "norm1000", "norm1"], help="how the model writes boxes"
    )
    p.add_argument(
        "--box-hint", choices=["coords", "draw", "crop"], help="how a proposal box is shown to the model"
    )
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument(
        "--seed",
        type=int,
        help="reproducible sampling (temperature > 0): each request gets a seed made from this and its image",
    )
    p.add_argument("--keep-truncated", action="store_true", help="keep captions cut by --max-tokens as ok")
    p.add_argument("--max-in-flight", type=int, help="requests in flight per endpoint")
    p.add_argument(
        "--max-bytes-in-flight",
        help="per client actor: bytes of images waiting + requests in flight (e.g. 512MiB; bounds memory)",
    )
    p.add_argument("--image-max-side", type=int, help="downscale images to this long side before sending")
    p.add_argument("--timeout", type=float, help="per-request timeout, seconds")
    p.add_argument("--retries", type=int, help="retries per request (transport faults and bad answers)")
    p.add_argument("--shards", help="comma-separated shard ids to process (default: all committed)")
    p.add_argument("--limit", type=int, help="process at most this many images (whole shards)")
    p.add_argument("--clients", type=int, help="client actors (one asyncio loop each)")
    p.add_argument("--retry-failed", action="store_true", help="redo failed rows of committed layer shards")
    p.add_argument(
        "--model-family",
        choices=list(get_args(ModelFamily)),
        help="box convention and resize grid of the model (recaption/presets.py; default generic)",
    )
    p.add_argument(
        "--trust-remote-code", action="store_true", help="hf/vllm: run the model directory's own code"
    )
    p.add_argument(
        "--cache-dir",
        help="where the response cache keeps answers across runs (default <dataset>/cache/recaption; "
        "local or s3://)",
    )
    p.add_argument(
        "--no-persistent-cache",
        action="store_true",
        help="neither reuse nor store answers across runs (duplicates within a run are still sent once)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (shards, images, requests, cache hits, tokens); send nothing, write nothing",
    )
    config_args(p)
    p.set_defaults(func=cmd_recaption)

    s = sub.add_parser(
        "serve-captioner",
        help="serve a local transformers VLM as an OpenAI-compatible server",
        description="POST /v1/chat/completions (images as data URLs), GET /v1/models, GET /health.",
    )
    s.add_argument("model_dir")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", help="model id in /v1/models (default: the directory name)")
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model directory's own code (exported FineViT VLMs: finevit export --part vlm)",
    )
    config_args(s)
    s.set_defaults(func=cmd_serve)


def _fail(msg: str) -> int:
    print(f"finevit: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _q(v: Any) -> Any:
    """A value for a ``--set`` override (YAML-parsed): lists and strings quoted safely."""
    if v is None:
        return None
    import json

    return json.dumps(v) if isinstance(v, list | str) else v


def cmd_recaption(args: argparse.Namespace) -> int:
    from finevit.common import build_config
    from recaption.backends.base import BackendError
    from recaption.config import RecaptionRunConfig
    from recaption.prompts import PromptError
    from recaption.run import recaption_layers

    shards = [s.strip() for s in args.shards.split(",") if s.strip()] if args.shards else None
    flag = lambda b: "true" if b else None  # noqa: E731
    tasks, names = args.task or [], args.layer or []
    layers = None
    if len(tasks) > 1 or len(names) > 1:
        if len(names) > 1 and len(names) != len(tasks):
            return _fail(
                f"{len(names)} --layer for {len(tasks)} --task: give one --layer per --task (or none)"
            )
        layers = [{"task": t, **({"layer": names[i]} if names else {})} for i, t in enumerate(tasks)]
    cfg = build_config(
        args,
        {
            "recaption.layer": _q(names[0]) if names and layers is None else None,
            "recaption.task": tasks[0] if tasks and layers is None else None,
            "recaption.layers": _q(layers),
            "recaption.backend": args.backend,
            "recaption.endpoints": _q(args.endpoints),
            "recaption.model": _q(args.model),
            "recaption.prompt": _q(args.prompt),
            "recaption.region_mode": args.region_mode,
            "recaption.proposals_layer": _q(args.proposals_layer),
            "recaption.bbox_format": args.bbox_format,
            "recaption.box_hint": args.box_hint,
            "recaption.max_tokens": args.max_tokens,
            "recaption.temperature": args.temperature,
            "recaption.seed": args.seed,
            "recaption.keep_truncated": flag(args.keep_truncated),
            "recaption.max_in_flight": args.max_in_flight,
            "recaption.max_bytes_in_flight": _q(args.max_bytes_in_flight),
            "recaption.image_max_side": args.image_max_side,
            "recaption.timeout": args.timeout,
            "recaption.retries": args.retries,
            "recaption.shards": _q(shards),
            "recaption.limit": args.limit,
            "recaption.clients": args.clients,
            "recaption.retry_failed": flag(args.retry_failed),
            "recaption.progress": "false" if args.no_progress else None,
            "recaption.cache_dir": _q(args.cache_dir),
            "recaption.persistent_cache": "false" if args.no_persistent_cache else None,
            "recaption.model_family": args.model_family,
            "recaption.hf.trust_remote_code": flag(args.trust_remote_code),
            "recaption.vllm.trust_remote_code": flag(args.trust_remote_code),
        },
        model=RecaptionRunConfig,
    )
    if args.dry_run:
        from engine.layout import Dataset
        from recaption.plan import dry_run, layer_configs

        try:
            ds = Dataset(args.dataset, cfg.storage.resolved())
            plans = [dry_run(ds, c) for c in layer_configs(cfg.recaption)]
        except PromptError as e:
            return _fail(str(e))
        for plan in plans:
            print_plan(plan)
        return 0
    try:
        reports = recaption_layers(args.dataset, cfg, on_event=lambda m: print(m, file=sys.stderr))
    except (BackendError, PromptError) as e:
        return _fail(str(e))
    for report in reports:
        print_report(report)
    stopped = next((r.stopped for r in reports if r.stopped), None)
    if stopped:
        print(f"finevit: recaption stopped: {stopped}", file=sys.stderr)
    return 1 if stopped or any(r.shards_failed for r in reports) else 0


def print_plan(plan: dict[str, Any]) -> None:
    from rich.table import Table

    from finevit.render import console

    t = Table(title="recaption plan (dry run: nothing sent, nothing written)", show_header=False)
    for k, v in plan.items():
        if v is not None and v != []:
            t.add_row(k.replace("_", " "), str(v))
    console.print(t)


def print_report(report: Any) -> None:
    from rich.table import Table

    from finevit.render import console, print_failures

    t = Table(title="recaption summary", show_header=False, title_justify="left")
    t.add_row("dataset", report.dataset)
    t.add_row("layer", report.layer)
    t.add_row(
        "shards",
        f"{report.shards_written} written, {report.shards_skipped} already committed"
        + (f", {report.shards_retried} retried" if report.shards_retried else "")
        + (f", {len(report.shards_waiting)} waiting for proposals" if report.shards_waiting else "")
        + (f", [red]{len(report.shards_failed)} failed[/red]" if report.shards_failed else ""),
    )
    t.add_row("samples", f"{report.count}  ok {report.ok}  failed {report.failed}")
    t.add_row(
        "requests",
        f"{report.requests}  retries {report.retries}  completion tokens {report.completion_tokens}"
        + (f"  cache hits {report.cache_hits}" if report.cache_hits else ""),
    )
    if report.count:
        t.add_row(
            "speed",
            f"{report.images_per_second:.1f} images/s, {report.tokens_per_second:.0f} tokens/s "
            f"over {report.seconds:.1f} s",
        )
    console.print(t)
    if report.endpoints:
        e = Table(title="endpoints", title_justify="left")
        for c in ("endpoint", "requests", "ok", "failures", "ejections", "p50 ms", "p90 ms", "p99 ms"):
            e.add_column(c, justify="left" if c == "endpoint" else "right")
        for url, s in sorted(report.endpoints.items()):
            e.add_row(
                url,
                *(str(s.get(k, 0)) for k in ("requests", "ok", "failures", "ejections")),
                *(
                    "-" if s.get(k) is None else f"{s[k]:.0f}"
                    for k in ("latency_ms_p50", "latency_ms_p90", "latency_ms_p99")
                ),
            )
        console.print(e)
    print_failures(report.reasons, report.shards_failed)


def cmd_serve(args: argparse.Namespace) -> int:
    from recaption.backends.base import BackendError
    from recaption.server import serve

    try:
        serve(
            args.model_dir,
            args.host,
            args.port,
            args.served_model_name,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            trust_remote_code=args.trust_remote_code,
        )
    except BackendError as e:
        return _fail(str(e))
    return 0
