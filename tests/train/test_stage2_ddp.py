"""Stage 2 under torchrun on 2 CPU processes (gloo): DDP keeps the ranks' weights equal and writes a
checkpoint; FSDP2 (stopped in the projector phase, resumed into ``all``) reproduces DDP's losses.
Packed LM rows (data.pack) on, so the loop's packed path runs too."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.train.conftest import Stage1Data
from tests.train.test_stage2 import Setup, recipe

REPO = Path(__file__).resolve().parents[2]
STEPS = 3  # 2 in the projector phase, 1 in 'all' (the recipe's schedule)

PROBE = r"""
import json, sys
import torch
import torch.distributed as dist
from engine.config import load_config
from train.stage2 import Stage2Config, train_stage2

config, out, *sets = sys.argv[1:]
cfg = load_config(config, sets, Stage2Config)
res = train_stage2(cfg, on_event=lambda m: print(m, file=sys.stderr, flush=True))
rank = dist.get_rank()
same = None
if cfg.loop.parallel == "ddp":  # every rank's full copy of the weights, compared across ranks
    flat = torch.cat([p.detach().reshape(-1) for p in res.model.parameters()])
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    same = all(torch.equal(parts[0], q) for q in parts[1:])
json.dump({"losses": res.losses, "same": same, "checkpoint": res.checkpoint, "steps": res.steps},
          open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def torchrun(setup: Setup, tmp: Path, log_dir: Path, *sets: str) -> list[dict]:
    config = tmp / "stage2.yaml"
    config.write_text(yaml.safe_dump(recipe(loop={"steps": STEPS, "seed": 0, "threads": 1})))
    probe = tmp / "probe.py"
    probe.write_text(PROBE)
    out = log_dir / "probe"
    out.mkdir(parents=True, exist_ok=True)
    sets = (
        f"init.checkpoint={setup.stage1}",
        f"lm.path={setup.lm}",
        f"data.dataset={setup.data.root}",
        f"log.dir={log_dir}",
        "data.pack=true",
        *sets,
    )
    r = subprocess.run(
        [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node", "2"]
        + [str(probe), str(config), str(out), *sets],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr.split("torch.distributed.elastic")[0][-4000:]
    return [json.loads((out / f"rank{k}.json").read_text()) for k in range(2)]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three 2-process launches: ~1.5 min CPU, ~10 min wall under load
def test_stage2_ddp_and_fsdp_on_two_processes(
    tmp_path_factory: pytest.TempPathFactory, stage1_data: Stage1Data
) -> None:
    base = tmp_path_factory.mktemp("stage2ddp")
    setup = Setup(base, stage1_data)
    ddp = torchrun(setup, base, base / "ddp", "loop.parallel=ddp")
    for r in ddp:
        assert r["steps"] == STEPS and len(r["losses"]) == STEPS, r
        assert all(math.isfinite(x) for x in r["losses"]), r
        assert r["same"] is True, "the ranks' weights differ after DDP steps"
    assert ddp[0]["losses"] == ddp[1]["losses"]  # the loss is all-reduced
    assert (base / "ddp" / "checkpoints" / f"step_{STEPS:08d}").is_dir()
    assert (base / "ddp" / "checkpoints" / "stage2_config.json").is_file()

    fsdp = base / "fsdp"
    first = torchrun(setup, base, fsdp, "loop.parallel=fsdp", "loop.stop_at=2")  # in the projector phase
    assert first[0]["steps"] == 2
    second = torchrun(setup, base, fsdp, "loop.parallel=fsdp")  # resumed into phase 'all'
    got = first[0]["losses"] + second[0]["losses"]
    assert got == pytest.approx(ddp[0]["losses"], rel=1e-4, abs=1e-5), (got, ddp[0]["losses"])
