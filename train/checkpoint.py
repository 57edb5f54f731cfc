"""Checkpoints with ``torch.distributed.checkpoint`` (model + optimizer, sharded under FSDP2) plus
per-rank extras (scheduler, step, loader state, RNG) in ``extra_rank<r>.pt``.

Layout: ``<dir>/step_<NNNNNNNN>/`` holding DCP files, the extras, ``config.json`` (the run's
resolved config: ``data.mean`` / ``data.std`` are the normalization the model was trained with,
``data.normalize`` says where they came from) and ``done`` (written last by rank 0 after every
rank finished: the commit marker; a folder without it is ignored). With an EMA of the weights
(``ema.decay``), ``ema/`` holds it as a checkpoint of its own (DCP files whose ``model`` entry is
the averaged model): ``step_<N>/ema`` loads wherever a step folder does (eval, export, stage 2).
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from train.distributed import is_dist, rank

DONE = "done"
EMA_DIR = "ema"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def latest(root: str) -> str | None:
    """The newest committed checkpoint folder under ``root``, or None."""
    if not os.path.isdir(root):
        return None
    done = sorted(
        n for n in os.listdir(root) if n.startswith("step_") and os.path.exists(os.path.join(root, n, DONE))
    )
    return os.path.join(root, done[-1]) if done else None


def save(
    root: str,
    step: int,
    model: torch.nn.Module,
    optim: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 2,
    config: dict[str, Any] | None = None,
    ema: dict[str, torch.Tensor] | None = None,
) -> str:
    path = _step_dir(root, step)
    os.makedirs(path, exist_ok=True)
    msd, osd = get_state_dict(model, optim)
    try:
        with warnings.catch_warnings():  # single process: DCP warns that it saves without a group
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
            if ema is not None:
                dcp.save({"model": ema}, checkpoint_id=os.path.join(path, EMA_DIR))
        torch.save({**extra, "rng": rng_state()}, os.path.join(path, f"extra_rank{rank()}.pt"))
    except (OSError, RuntimeError, CheckpointException) as e:  # DCP's is a BaseException
        raise _save_error(path, e) from e
    if is_dist():
        dist.barrier()
    if rank() == 0:
        if config is not None:
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(config, f, indent=1)
            if ema is not None:  # the EMA folder is a checkpoint of its own: it carries the config too
                with open(os.path.join(path, EMA_DIR, "config.json"), "w") as f:
                    json.dump(config, f, indent=1)
        with open(os.path.join(path, DONE), "w") as f:
            f.write(str(step))
        old = sorted(n for n in os.listdir(root) if n.startswith("step_"))[:-keep]
        for n in old:
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    if is_dist():
        dist.barrier()
    return path


def _save_error(path: str, e: BaseException) -> OSError:
    """A failed checkpoint write, said plainly: torch's zip writer turns ENOSPC into
    "[enforce fail at inline_container.cc] unexpected pos". The step folder has no ``done``
    marker, so a resume never picks it."""
    free = shutil.disk_usage(path).free
    why = os.strerror(errno.ENOSPC) if free < 64 * 2**20 else "write failed"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return OSError(f"could not write checkpoint {path}: {why} ({free / 2**20:.1f} MiB free there): {first}")


def load(
    path: str,
    model: torch.nn.Module,
    optim: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Restore model + optimizer (and the EMA tensors ``ema``, in place, when given) in place;
    return this rank's extras (RNG restored too), with ``ema_loaded`` saying whether the checkpoint
    had an EMA (one saved without it leaves ``ema`` as given)."""
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd}
    ema_dir = os.path.join(path, EMA_DIR)
    ema_loaded = ema is not None and os.path.exists(os.path.join(ema_dir, ".metadata"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path)
        if ema_loaded:
            dcp.load({"model": ema}, checkpoint_id=ema_dir)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra_path = os.path.join(path, f"extra_rank{rank()}.pt")
    if not os.path.exists(extra_path):
        raise FileNotFoundError(extra_path)
    extra = torch.load(extra_path, weights_only=False)
    set_rng_state(extra.pop("rng"))
    extra["ema_loaded"] = ema_loaded
    return extra


def resume(
    ckpt_dir: str,
    enabled: bool,
    model: torch.nn.Module,
    optim: torch.optim.Optimizer,
    sched: Any,
    load_loader: Any,
    ema: Any = None,
) -> tuple[str | None, int]:
    """Restore the newest checkpoint under ``ckpt_dir`` (model, optimizer, schedule, loader state,
    and the :class:`train.ema.EMA` ``ema`` when given).

    ``load_loader`` receives the loader's saved state (each stage's loader restores differently).
    Returns ``(path, step)``; ``(None, 0)`` when resume is off or nothing was saved yet. A
    checkpoint saved without an EMA starts the EMA from the restored weights (with a warning).
    """
    last = latest(ckpt_dir) if enabled else None
    if not last:
        return None, 0
    ema_sd = ema.state_dict(model) if ema is not None else None
    extra = load(last, model, optim, ema_sd)
    if ema is not None:
        if extra["ema_loaded"]:
            ema.load_state_dict(ema_sd)
        else:
            warnings.warn(f"{last} has no EMA: the EMA starts from its weights", stacklevel=2)
            ema.reset(model)
    sched.load_state_dict(extra["sched"])
    load_loader(extra["loader"])
    return last, int(extra["step"])


def ema_checkpoint(path: str) -> str:
    """The EMA checkpoint (``step_<N>/ema``) of a run folder, checkpoints folder or step folder (the
    newest committed step); ``--ema`` of ``finevit eval`` / ``finevit export``. ValueError if the
    run kept no EMA (``ema.decay`` was 0)."""
    from train.model.encoder import resolve_checkpoint

    step = resolve_checkpoint(path)
    ema = step / EMA_DIR
    if not (ema / ".metadata").is_file():
        raise ValueError(f"{step} has no EMA weights ({EMA_DIR}/): the run was trained with ema.decay=0")
    return str(ema)
