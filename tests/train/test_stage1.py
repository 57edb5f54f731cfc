"""The stage 1 loop: config checks, the CLI, loss falls, exact resume (with EMA, gradient accumulation
and eval.every); torchrun DDP and FSDP2, FSDP2 bf16 mixed precision on gloo (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from finevit.cli import main as finevit_cli
from train.config import Stage1Config, check_fits

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "model.vision.width=32",
    "model.vision.depth=2",
    "model.vision.heads=2",
    "model.text.width=32",
    "model.text.depth=1",
    "model.text.heads=2",
    "model.text.context=96",
    "model.embed_dim=32",
    "data.max_patches=32",
    "data.seq_len=64",
    "data.rows=2",
    "data.max_images=8",
    "data.shuffle_buffer=16",
    "data.pack_buffer=8",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "log.every=1",
    "log.progress=false",
]


def _args(ds, log_dir: Path, steps: int, *extra: str) -> list[str]:
    sets = [*TINY, f"data.tokenizer={ds.tokenizer}", *extra]
    return [
        "train",
        "stage1",
        "--config",
        str(REPO / "configs" / "stage1_tiny_cpu.yaml"),
        "--dataset",
        str(ds.root),
        "--steps",
        str(steps),
        "--log-dir",
        str(log_dir),
    ] + [a for s in sets for a in ("--set", s)]


def _rows(log_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(log_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _rows(log_dir) if "loss" in r}  # eval rows carry no loss


def test_config_that_cannot_fit_stops_with_reason() -> None:
    cfg = load_config(
        REPO / "configs" / "stage1_tiny_cpu.yaml",
        ["data.dataset=x", "data.tokenizer=y", "data.max_patches=512"],
        Stage1Config,
    )
    with pytest.raises(ConfigError, match=r"data.max_patches \(512\) > data.seq_len"):
        check_fits(cfg)
    with pytest.raises(ConfigError, match="model.vision.widht"):
        load_config(None, ["model.vision.widht=3"], Stage1Config)


@pytest.mark.parametrize("words", ["missing", "shape: [star]\n"])
def test_a_hard_negative_words_file_that_cannot_be_read_stops_at_start(tmp_path: Path, words: str) -> None:
    """A missing file, or a class of one word, stops at start-up naming stage 1's own field (the
    loader met it mid-run before, in an error that named stage 2's field)."""
    path = tmp_path / "words.yaml"
    if words != "missing":
        path.write_text(words)
    sets = [
        "data.dataset=x",
        "data.tokenizer=y",
        "data.hard_negatives=true",
        f"data.hard_negative_words={path}",
    ]
    cfg = load_config(REPO / "configs" / "stage1_tiny_cpu.yaml", sets, Stage1Config)
    with pytest.raises(ConfigError, match=r"data\.hard_negative_words: .*words\.yaml") as e:
        check_fits(cfg)
    assert "loss." not in str(e.value)
    path.write_text("shape: [star, circle]\n")
    check_fits(cfg)  # a good file passes


RECIPES = ["stage1_tiny_cpu", "stage1_vit_b16", "stage1_vit_l16", "stage1_vit_0p9b"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_build_on_the_meta_device(recipe: str) -> None:
    """Each recipe loads, fits, and builds its model on the meta device (no memory) with the
    parameter count its header states."""
    import re

    import torch

    from train.stage1 import build_model

    path = REPO / "configs" / f"{recipe}.yaml"
    cfg = load_config(path, ["data.dataset=x", "data.tokenizer=y"], Stage1Config)
    check_fits(cfg)
    header = path.read_text()
    assert header.startswith("#")
    with torch.device("meta"):
        model = build_model(cfg, 32000, torch.device("meta"))
    vision = sum(p.numel() for p in model.vision.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    m = re.search(r"params: ([\d.]+)M vision, ([\d.]+)M total", header)
    assert m, f"{path.name}: the header should state 'params: <v>M vision, <t>M total'"
    assert (round(vision / 1e6, 2), round(total / 1e6, 2)) == (float(m[1]), float(m[2])), (vision, total)


def test_train_resume_reproduces_uninterrupted_losses(stage1_data, tmp_path: Path) -> None:
    full = tmp_path / "full"
    assert finevit_cli(_args(stage1_data, full, 6, "data.workers=1")) == 0
    want = _losses(full)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    assert (full / "checkpoints" / "step_00000006" / "done").exists()

    part = tmp_path / "part"
    assert finevit_cli(_args(stage1_data, part, 6, "data.workers=1", "loop.stop_at=3")) == 0  # "killed" at 3
    assert finevit_cli(_args(stage1_data, part, 6, "data.workers=1")) == 0
    got = _losses(part)
    assert [got[s] for s in range(1, 7)] == [want[s] for s in range(1, 7)]  # bit-exact


EVAL = ["eval.every=2", "eval.finegrained=synthetic://scenes?n=6&seed=1000&size=64", "eval.negatives=1"]


@pytest.mark.slow
def test_resume_is_exact_with_ema_grad_accum_and_eval(stage1_data, tmp_path: Path) -> None:
    """With an EMA, 2 micro-batches per step and an eval every 2 steps: stop at 2 + resume to 4 gives
    the uninterrupted losses bit for bit and the same EMA; the EMA checkpoint (step_N/ema) loads as an
    encoder and is not the live weights; eval rows (no loss) land in the metrics file and
    TensorBoard at steps 2 and 4."""
    import torch

    from train.model.encoder import load_encoder

    extra = ["data.workers=1", "ema.decay=0.8", "optim.grad_accum=2", *EVAL, "log.tensorboard=true"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert finevit_cli(_args(stage1_data, full, 4, *extra)) == 0
    assert finevit_cli(_args(stage1_data, part, 4, *extra, "loop.stop_at=2")) == 0
    assert finevit_cli(_args(stage1_data, part, 4, *extra)) == 0
    want, got = _losses(full), _losses(part)
    assert sorted(want) == [1, 2, 3, 4] and got == want  # bit-exact

    step = "checkpoints/step_00000004"
    ema_full, ema_part = (load_encoder(d / step / "ema").state_dict() for d in (full, part))
    live = load_encoder(full / step).state_dict()
    assert ema_full.keys() == ema_part.keys() == live.keys()
    assert all(torch.equal(ema_full[k], ema_part[k]) for k in ema_full)  # the EMA resumed exactly
    assert not all(torch.equal(ema_full[k], live[k]) for k in live)

    evals = [r for r in _rows(full) if any(k.startswith("eval/finegrained/") for k in r)]
    assert [r["step"] for r in evals] == [2, 4] and all("loss" not in r for r in evals)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full))
    acc.Reload()
    tags = [t for t in acc.Tags()["scalars"] if t.startswith("eval/finegrained/")]
    assert tags and [e.step for e in acc.Scalars(tags[0])] == [2, 4]


def _top1(log_dir: Path, last: int) -> float:
    rows = [json.loads(x) for x in (log_dir / "metrics.jsonl").read_text().splitlines()]
    vals = [r["batch_top1"] for r in rows if "batch_top1" in r][-last:]
    return sum(vals) / len(vals)


# 150 steps at 1e-3: at 60 steps and 3e-3 the run sat at chance on a fresh machine (0.23-0.27 over
# three seeds, 2026-11-29), so the old threshold of 0.3 was passed or failed by noise
RETRIEVAL = ["optim.lr=1e-3", "loss.kind=softmax", "data.normalize=dataset", "data.stats_samples=48"]


@pytest.mark.slow
@pytest.mark.parametrize("blind", [False, True])
def test_training_learns_in_batch_retrieval(stage1_data, tmp_path: Path, blind: bool) -> None:
    """In-batch image->text top-1 (about 4 images a step: 2 packed rows of 64 tokens, chance 0.25)
    ends well above chance, and the same run with the image tower blinded (every patch ~0: mean/std
    far off) must not: a loss that falls by collapse alone fails this test (it passed the old "loss
    falls" check). Measured over the last 30 steps: 0.43-0.475 in three seeds, 0.25 blinded."""
    extra = ["data.normalize=fixed", "data.std=[1e6,1e6,1e6]"] if blind else []
    log = tmp_path / "ret"
    assert finevit_cli(_args(stage1_data, log, 150, *RETRIEVAL, *extra)) == 0
    top1 = _top1(log, 30)
    if blind:
        assert top1 < 0.3, top1
    else:
        assert top1 > 0.38, top1


def _torchrun(ds, log_dir: Path, steps: int, *extra: str) -> subprocess.CompletedProcess:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            torchrun,
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            "finevit",
            *_args(ds, log_dir, steps, *extra),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
def test_torchrun_ddp_and_fsdp_agree_and_fsdp_resumes(stage1_data, tmp_path: Path) -> None:
    ddp = tmp_path / "ddp"
    r = _torchrun(stage1_data, ddp, 3, "loop.parallel=ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    fsdp = tmp_path / "fsdp"
    r = _torchrun(stage1_data, fsdp, 3, "loop.parallel=fsdp", "loop.stop_at=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _torchrun(stage1_data, fsdp, 3, "loop.parallel=fsdp")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr
    want, got = _losses(ddp), _losses(fsdp)
    for s in range(1, 4):
        assert got[s] == pytest.approx(want[s], rel=1e-4, abs=1e-5), (s, got, want)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_non_finite_step_is_skipped_and_logged(stage1_data, tmp_path: Path, monkeypatch) -> None:
    import torch

    from train import stage1

    real = stage1.sigmoid_loss
    calls = {"n": 0}

    def flaky(*a, **k):
        loss, value = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            return loss * float("nan"), value * float("nan")
        return loss, value

    monkeypatch.setattr(stage1, "sigmoid_loss", flaky)
    sets = [
        *TINY,
        f"data.tokenizer={stage1_data.tokenizer}",
        f"data.dataset={stage1_data.root}",
        "loss.kind=sigmoid",
        "loop.steps=3",
        f"log.dir={tmp_path}",
        "log.tensorboard=false",
    ]
    cfg = load_config(REPO / "configs" / "stage1_tiny_cpu.yaml", sets, Stage1Config)
    result = stage1.train_stage1(cfg, on_event=lambda m: None)
    assert result.steps == 3 and result.skipped_steps == 1
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "skipped" in r] == [2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "skipped" not in r)


FSDP_MP_PROBE = r"""
import copy, json, sys
import torch, torch.distributed as dist
from train.config import ModelConfig, TextConfig, VisionConfig
from train.data.packing import assemble
from train.model.towers import Stage1Model
from train.stage1 import shard_fsdp

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
cfg = ModelConfig(
    vision=VisionConfig(width=32, depth=2, heads=2, patch_size=4),
    text=TextConfig(width=32, depth=1, heads=2, context=8),
    embed_dim=16,
    attention="sdpa_docs",
)
model = Stage1Model(cfg, 64, "sdpa_docs")
ref = copy.deepcopy(model)


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    pos = lambda n: torch.stack(torch.meshgrid(torch.arange(1), torch.arange(n), indexing="ij"), -1)
    rows = [[(torch.randn(n, 48, generator=g), pos(n).reshape(-1, 2)) for n in (6, 5)] for _ in range(2)]
    vision, _ = assemble(rows, 12, 4, 48)
    return vision, torch.randint(4, 64, (4, 8), generator=g), torch.ones(4, 8, dtype=torch.bool)


def loss_of(m, b):
    img, txt, scale, bias = m(*b)
    return -(img * txt).sum(-1).mean() * scale.exp() + (img @ txt.T).pow(2).mean()


shard_fsdp(model, torch.bfloat16)
seen = {}
lin = next(x for x in model.vision.blocks[0].modules() if isinstance(x, torch.nn.Linear))
lin.register_forward_pre_hook(lambda mod, a: seen.setdefault("forward_weight", str(mod.weight.dtype)) and None)
with torch.autocast("cpu", dtype=torch.bfloat16):  # as the loop runs a bf16 forward
    loss = loss_of(model, batch(rank))
loss.backward()
first = next(model.parameters())
grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
out = {
    "forward_weight": seen["forward_weight"],
    "param": str(first.dtype),
    "param_type": type(first).__name__,
    "grad": str(first.grad.dtype),
}
refs = []  # fp32, unsharded: the mean over ranks of each rank's gradient
for r in range(world):
    ref.zero_grad()
    loss_of(ref, batch(r)).backward()
    refs.append({n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None})
errs = {}
for n, g in grads.items():
    want = sum(x[n] for x in refs) / world
    errs[n] = ((g.float() - want).norm() / want.norm().clamp_min(1e-12)).item()
out["max_rel_grad_err"], out["n_grads"] = max(errs.values()), len(grads)
if rank == 0:
    print("RESULT " + json.dumps(out), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_on_gloo(tmp_path: Path) -> None:
    """FSDP2 with the bf16 MixedPrecisionPolicy runs on CPU/gloo (torchrun, 2 processes): blocks compute
    with bf16 weights while the sharded parameters and the reduced gradients stay fp32 DTensors, and
    the gradient is the mean over ranks of the fp32 gradient within bf16 rounding."""
    script = tmp_path / "fsdp_mp_probe.py"
    script.write_text(FSDP_MP_PROBE)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [torchrun, "--standalone", "--nproc-per-node", "2", str(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[7:])
    assert out["forward_weight"] == "torch.bfloat16", out  # gathered and computed in bf16
    assert (out["param"], out["param_type"], out["grad"]) == ("torch.float32", "DTensor", "torch.float32")
    assert out["n_grads"] > 20 and out["max_rel_grad_err"] < 0.06, out
