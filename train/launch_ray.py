"""Stage 1 on a Ray cluster: Ray Train's ``TorchTrainer`` as a thin launcher around our own loop.

Ray Train places ``num_workers`` processes (one per GPU, or per CPU slot on a CPU cluster),
sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``MASTER_ADDR`` and opens the torch process
group (nccl on GPUs, gloo on CPUs); :func:`train.stage1.train_stage1` sees an initialised group
and runs exactly as it does under ``torchrun``. Nothing of the loop changes: checkpoints go
where ``checkpoint.dir`` / ``log.dir`` say (a shared filesystem or a mounted bucket on a real
cluster: every rank writes its part there), and a rerun resumes from the latest one.

::

    python -m train.launch_ray --ray-address auto --workers 16 --gpu \\
        --config configs/stage1_vit_b16.yaml --dataset s3://bucket/datasets/web-v1 --log-dir /shared/runs/b16

Returns (and prints) rank 0's summary plus the Ray node id of every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from train.config import Stage1Config

SUMMARY = "launch_ray.json"  # rank 0's summary, in log.dir


def _worker_loop(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: our stage-1 loop, then one report with its node."""
    import ray
    import ray.train
    import torch.distributed as dist

    from train.stage1 import train_stage1

    cfg = Stage1Config.model_validate(config["stage1"])
    result = train_stage1(cfg, on_event=lambda m: print(m, file=sys.stderr, flush=True))
    node = ray.get_runtime_context().get_node_id()
    nodes: list[Any] = [None] * (dist.get_world_size() if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(nodes, node)
    else:
        nodes = [node]
    summary = {
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


def launch_stage1(
    cfg: Stage1Config,
    *,
    num_workers: int,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    placement: str = "PACK",
    storage_path: str | None = None,
) -> dict[str, Any]:
    """Run stage 1 with ``num_workers`` Ray Train workers on the connected cluster (call
    :func:`engine.runtime.init_ray` first); returns rank 0's metrics."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"stage1": cfg.model_dump(mode="json")},
        scaling_config=ScalingConfig(
            num_workers=num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=placement,
        ),
        run_config=RunConfig(
            name="finevit-stage1",
            storage_path=storage_path or os.path.abspath(os.path.join(cfg.log.dir, "ray")),
        ),
    )
    trainer.fit()
    with open(os.path.join(cfg.log.dir, SUMMARY)) as f:
        return json.load(f)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.launch_ray", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--config", required=True, help="stage-1 recipe (configs/stage1_*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dataset")
    p.add_argument("--steps", type=int)
    p.add_argument("--log-dir", help="shared by every worker (a shared filesystem on a real cluster)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (one per GPU with --gpu)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--placement", default="PACK", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"])
    p.add_argument("--ray-address", help="join this Ray cluster (default: RAY_ADDRESS, else a local one)")
    return p


def main(argv: list[str] | None = None) -> int:
    from engine.config import RayConfig, load_config
    from engine.runtime import init_ray

    args = build_parser().parse_args(argv)
    sets = list(args.overrides)
    log_dir = os.path.abspath(args.log_dir) if args.log_dir else None  # workers run elsewhere
    for key, value in (("data.dataset", args.dataset), ("loop.steps", args.steps), ("log.dir", log_dir)):
        if value is not None:
            sets.append(f"{key}={value}")
    cfg = load_config(args.config, sets, Stage1Config)
    init_ray(RayConfig(address=args.ray_address))
    metrics = launch_stage1(
        cfg,
        num_workers=args.workers,
        use_gpu=args.gpu,
        cpus_per_worker=args.cpus_per_worker,
        placement=args.placement,
    )
    print(json.dumps(metrics, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
