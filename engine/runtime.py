"""Ray start-up: a local cluster by default, a real one through ``RAY_ADDRESS`` / ``--ray-address``."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from engine.config import RayConfig

# What every worker needs in its environment (img2dataset's imports check for updates online).
WORKER_ENV = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
    "RAY_AUTH_MODE": "disabled",
}


def init_ray(cfg: RayConfig | None = None) -> dict[str, Any]:
    """Start or join Ray once per process; returns the cluster's resources.

    Local runs turn token auth off (Ray 2.60 turns it on by default and writes a token into
    the home folder) and keep session files in ``cfg.temp_dir`` (default: the system temp
    folder). Ray needs short paths there: its Unix sockets live under it.
    """
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return ray.cluster_resources()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for k, v in WORKER_ENV.items():
        os.environ.setdefault(k, v)
    kwargs: dict[str, Any] = {
        "runtime_env": {"env_vars": dict(WORKER_ENV)},
        "log_to_driver": True,
        "logging_level": logging.WARNING,
    }
    if address:
        ray.init(address=address, **kwargs)
    else:
        temp_dir = cfg.temp_dir or os.path.join(tempfile.gettempdir(), "finevit-ray")
        os.makedirs(temp_dir, exist_ok=True)
        ray.init(
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            _temp_dir=temp_dir,
            configure_logging=True,
            **kwargs,
        )
    return ray.cluster_resources()
