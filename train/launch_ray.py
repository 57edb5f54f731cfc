"""Stage 1 and stage 2 on a Ray cluster: Ray Train's ``TorchTrainer`` as a thin launcher around our
own loops.

Ray Train places ``num_workers`` processes (one per GPU, or per CPU slot on a CPU cluster),
sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` and opens the torch process
group (nccl on GPUs, gloo on CPUs); :func:`train.stage1.train_stage1` and
:func:`train.stage2.train_stage2` see an initialised group and run exactly as they do under
``torchrun``. Nothing of the loops changes: checkpoints go where ``checkpoint.dir`` /
``log.dir`` say (a shared filesystem or a mounted bucket on a real cluster: every rank writes
its part there), and a rerun resumes from the latest one.

::

    python -m train.launch_ray --ray-address auto --workers 16 --gpu \\
        --config configs/stage1_vit_b16.yaml --dataset s3://bucket/datasets/web-v1 --log-dir /shared/runs/b16
    python -m train.launch_ray --stage stage2 --ray-address auto --workers 16 --gpu \\
        --config STAGE2_RECIPE.yaml --init /shared/runs/b16 --lm /shared/models/LM \\
        --dataset s3://bucket/datasets/web-v1 --log-dir /shared/runs/b16-stage2

Returns (and prints) rank 0's summary plus the Ray node id of every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from pydantic import BaseModel

SUMMARY = "launch_ray.json"  # rank 0's summary, in log.dir
STAGES = ("stage1", "stage2")


def _stage(stage: str) -> tuple[type[BaseModel], Any]:
    """(config class, train function) of a stage; imported where they run (stage 2 pulls transformers)."""
    if stage == "stage1":
        from train.config import Stage1Config
        from train.stage1 import train_stage1

        return Stage1Config, train_stage1
    if stage == "stage2":
        from train.stage2 import Stage2Config, train_stage2

        return Stage2Config, train_stage2
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def _worker_loop(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: our stage loop, then one report with its node."""
    import ray
    import ray.train
    import torch.distributed as dist

    config_cls, train = _stage(config["stage"])
    cfg = config_cls.model_validate(config["config"])
    result = train(cfg, on_event=lambda m: print(m, file=sys.stderr, flush=True))
    node = ray.get_runtime_context().get_node_id()
    nodes: list[Any] = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(nodes, node)
    else:
        nodes = [node]
    summary = {
        "stage": config["stage"],
        "steps": result.steps,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "checkpoint": result.checkpoint,
        "seconds": result.seconds,
        "nodes": nodes,
    }
    if result.rank == 0:  # the launcher reads it back: log.dir is storage every rank shares
        with open(os.path.join(cfg.log.dir, SUMMARY), "w") as f:
            json.dump(summary, f)
    ray.train.report(summary)


def launch(
    stage: str,
    cfg: BaseModel,
    *,
    num_workers: int,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    placement: str = "PACK",
    storage_path: str | None = None,
) -> dict[str, Any]:
    """Run ``stage`` (``stage1`` or ``stage2``, its config ``cfg``) with ``num_workers`` Ray Train
    workers on the connected cluster (call :func:`engine.runtime.init_ray` first); returns rank 0's
    summary."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    _stage(stage)  # a bad name fails here, not in every worker
    log_dir = cfg.log.dir  # type: ignore[attr-defined]
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"stage": stage, "config": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=placement,
        ),
        run_config=RunConfig(
            name=f"finevit-{stage}",
            storage_path=storage_path or os.path.abspath(os.path.join(log_dir, "ray")),
        ),
    )
    summary = os.path.join(log_dir, SUMMARY)
    if os.path.exists(summary):  # a previous run's: never read it back as this one's
        os.remove(summary)
    trainer.fit()
    with open(summary) as f:
        return json.load(f)


def launch_stage1(cfg: BaseModel, **kw: Any) -> dict[str, Any]:
    """Stage 1 through :func:`launch`."""
    return launch("stage1", cfg, **kw)


def launch_stage2(cfg: BaseModel, **kw: Any) -> dict[str, Any]:
    """Stage 2 through :func:`launch`."""
    return launch("stage2", cfg, **kw)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.launch_ray", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--stage", default="stage1", choices=STAGES, help="which loop the workers run")
    p.add_argument(
        "--config", required=True, help="the stage's recipe (configs/stage1_*.yaml, stage2_*.yaml)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dataset")
    p.add_argument("--steps", type=int)
    p.add_argument("--log-dir", help="shared by every worker (a shared filesystem on a real cluster)")
    p.add_argument("--init", help="stage 2: the stage-1 checkpoint (overrides init.checkpoint)")
    p.add_argument("--lm", help="stage 2: a local causal-LM directory (overrides lm.path)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (one per GPU with --gpu)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local one)")
    return p


def _local(path: str | None) -> str | None:
    """Workers run in other folders (and on other nodes): local paths go absolute, URIs stay."""
    return path if path is None or "://" in path else os.path.abspath(path)


def main(argv: list[str] | None = None) -> int:
    from engine.config import RayConfig, load_config
    from engine.runtime import init_ray

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage == "stage1" and (args.init or args.lm):
        parser.error("--init and --lm are stage-2 flags (--stage stage2)")
    sets = list(args.overrides)
    flags = {
        "data.dataset": _local(args.dataset),
        "loop.steps": args.steps,
        "log.dir": _local(args.log_dir),
        "init.checkpoint": _local(args.init),
        "lm.path": _local(args.lm),
    }
    sets += [f"{key}={value}" for key, value in flags.items() if value is not None]
    config_cls, _ = _stage(args.stage)
    cfg = load_config(args.config, sets, config_cls)
    cfg.log.dir = _local(cfg.log.dir)  # the recipe's relative default too: rank 0 writes it elsewhere
    init_ray(RayConfig(address=args.ray_address))
    summary = launch(
        args.stage,
        cfg,
        num_workers=args.workers,
        use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        placement=args.placement,
    )
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
