"""Kill -9 at seeded random moments, then rerun: every sample exactly once, no partial shard visible.

Each stage (ingest, recaption over a real OpenAI-compatible HTTP server, filter, stage-1
training) runs once uninterrupted (the reference and the clean wall time), then as a chain:
start, SIGKILL the whole process group at a moment drawn by a seeded RNG, start again, kill
again, ..., and a last run to completion. A moment is an observed point of progress (the k-th
commit marker, or the first file staged by this run, or the k-th logged training step) plus a
seeded delay of up to a few tenths of a second, so kills land mid-write as well as between
shards. After the chain the stage's output must equal the reference: the same key set, each
key once, whole committed shards only, the same verdicts/losses.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.chaos._chaos import (
    Proc,
    copy_dataset,
    n_markers,
    read_committed,
    run,
    start,
    tally,
    wait_until,
    written_skipped,
)
from tests.filtering.conftest import default_phash_layer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # minutes each on a loaded 2-core machine

SEED = 17


def _fresh_staging(folders: list[Path]) -> Callable[[float], Callable[[], bool]]:
    """Mid-shard: this run has staged a file (mtime after its start) under one of ``folders``."""
    return lambda since: _staged_since(folders, since)


def _staged_since(folders: list[Path], since: float) -> Callable[[], bool]:

    def check() -> bool:
        for f in folders:
            st = f / ".staging"
            if st.exists():
                for p in st.rglob("*"):
                    try:
                        if p.stat().st_mtime >= since:
                            return True
                    except FileNotFoundError:
                        pass
        return False

    return check


def _kill_chain(
    rng: random.Random,
    args: list[str],
    logdir: Path,
    progress: Callable[[], int],
    total: int,
    midway: Callable[[float], Callable[[], bool]] | None = None,
    *,
    kills: int = 2,
    max_delay: float = 0.1,
    margin: int = 2,
    timeout: float = 400,
    wait_s: float = 240,
) -> tuple[list[str], float, str]:
    """``kills`` killed runs, then one to completion. Returns (moments, wall seconds, last log).

    A kill aims at commit k drawn from [done + 1, total - margin * (kills left)], so each run
    has work left to be killed in; a run that still ends first (a burst under no load) is not
    counted as a fault, and at least one must land."""
    moments, wall = [], 0.0
    for i in range(kills):
        done = progress()
        proc: Proc = start(args, logdir / f"kill{i}.log")
        # a moment: the first file this run stages (mid-write), or the k-th commit, + a delay
        if midway and rng.random() < 0.4:
            what, pred = "mid-shard", midway(proc.started)
        else:
            k = rng.randint(done + 1, max(done + 1, total - margin * (kills - i)))
            what, pred = f"commit {k}/{total}", (lambda k=k: progress() >= k)
        delay = round(rng.uniform(0.0, max_delay), 3)
        if wait_until(proc, pred, wait_s) and delay:
            time.sleep(delay)
        if not proc.alive():
            rc, log, secs = proc.wait(1)
            assert rc == 0, log[-4000:]
            wall += secs
            moments.append(f"{what}: missed (the run ended first)")
            continue
        wall += proc.kill()
        moments.append(f"{what} +{delay}s (saw {progress()})")
    assert any("missed" not in m for m in moments), moments
    rc, log, secs = run(args, logdir / "final.log", timeout=timeout)
    assert rc == 0, log[-4000:]
    return moments, wall + secs, log


def _faults(moments: list[str]) -> int:
    return sum("missed" not in m for m in moments)


# ---------------------------------------------------------------- ingest

N_INGEST, SPS_INGEST = 64, 4
INGEST_SRC = f"synthetic://scenes?n={N_INGEST}&seed=7&size=384"  # ~0.1 s a shard: room for kills


def _ingest_args(out: Path) -> list[str]:
    return ["ingest", INGEST_SRC, str(out), "--samples-per-shard", str(SPS_INGEST)]


def _ingest_view(out: Path) -> dict[str, object]:
    shards = read_committed(out / "shards")
    layers = {p.name: read_committed(p) for p in sorted((out / "layers").iterdir()) if p.is_dir()}
    return {"shards": shards, "layers": layers}


def test_ingest_kill9_exactly_once(tmp_path, chaos_figures) -> None:
    n_shards = N_INGEST // SPS_INGEST
    rc, log, clean_s = run(
        [*_ingest_args(tmp_path / "clean"), "--workers", "1", "--no-progress"], tmp_path / "clean.log"
    )
    assert rc == 0, log
    ref = _ingest_view(tmp_path / "clean")

    out = tmp_path / "ds"
    args = [*_ingest_args(out), "--workers", "1", "--no-progress"]
    moments, wall, log = _kill_chain(
        random.Random(SEED),
        args,
        tmp_path,
        lambda: n_markers(out / "shards"),
        n_shards,
        _fresh_staging([out / "shards"]),
        kills=3,
    )
    written, skipped = written_skipped(log)
    assert written + skipped == n_shards, log

    got = _ingest_view(out)
    want = set(ref["shards"].keys)
    assert len(want) == N_INGEST
    assert not got["shards"].partial, got["shards"].partial
    assert sorted(got["shards"].keys) == sorted(ref["shards"].keys)  # each key once, none lost
    assert {k: r["sha256"] for k, r in got["shards"].rows.items()} == {
        k: r["sha256"] for k, r in ref["shards"].rows.items()
    }  # the same image bytes under each key
    assert set(got["layers"]) == set(ref["layers"]) == {"gt-global", "gt-regions"}
    for name, layer in got["layers"].items():
        assert not layer.partial, (name, layer.partial)
        assert sorted(layer.keys) == sorted(ref["layers"][name].keys), name
    assert not list((out / "shards" / ".staging").glob("*"))
    ok, failed, lost, dup, unacc = tally(
        got["shards"], want, lambda r: r["status"] != "success", lambda r: r["error_message"]
    )
    assert (lost, dup, unacc) == (0, 0, 0)
    chaos_figures.add(
        scenario="kill -9: ingest",
        trials=1,
        faults=_faults(moments),
        ok=ok,
        failed=failed,
        lost=lost,
        duplicated=dup,
        unaccounted=unacc,
        wall_s=wall,
        clean_wall_s=clean_s,
        note=f"{N_INGEST} samples, {n_shards} shards; kills at " + "; ".join(moments),
    )


# ---------------------------------------------------------------- a small dataset for the later stages

N_DS, SPS_DS = 48, 6


@pytest.fixture(scope="module")
def master(tmp_path_factory) -> Path:
    """48 synthetic scenes in 8 shards (gt-global captions), plus a tokenizer, built once."""
    base = tmp_path_factory.mktemp("chaos-master")
    root = base / "ds"
    rc, log, _ = run(
        [
            "ingest",
            f"synthetic://scenes?n={N_DS}&seed=0&size=128",
            str(root),
            "--samples-per-shard",
            str(SPS_DS),
            "--no-progress",
        ],
        base / "ingest.log",
    )
    assert rc == 0, log
    return root


def _shard_keys(root: Path) -> set[str]:
    return set(read_committed(root / "shards", ["key"]).keys)


# ---------------------------------------------------------------- recaption (openai backend, real HTTP)


def _recap_args(root: Path, url: str) -> list[str]:
    return [
        "recaption",
        str(root),
        "--endpoint",
        url,
        "--layer",
        "recap",
        "--max-in-flight",
        "2",
        "--timeout",
        "10",
        "--no-progress",
        "--set",
        "recaption.shards_in_flight=1",
    ]


def test_recaption_kill9_exactly_once(master, tmp_path, chaos_figures) -> None:
    from tests.recaption.recap_fault_server import FaultServer

    srv = FaultServer(service_s=0.05).start()

    def midway(_started: float) -> Callable[[], bool]:  # this run's requests are in flight
        n0 = sum(srv.modes.values())
        return lambda: sum(srv.modes.values()) > n0

    try:
        clean = copy_dataset(master, tmp_path / "clean")
        rc, log, clean_s = run(_recap_args(clean, srv.url), tmp_path / "clean.log")
        assert rc == 0, log
        ref = read_committed(clean / "layers" / "recap")

        root = copy_dataset(master, tmp_path / "ds")
        layer = root / "layers" / "recap"
        n_shards = N_DS // SPS_DS
        moments, wall, log = _kill_chain(
            random.Random(SEED + 1),
            _recap_args(root, srv.url),
            tmp_path,
            lambda: n_markers(layer),
            n_shards,
            midway,
        )
    finally:
        srv.stop()
    written, skipped = written_skipped(log)
    assert written + skipped == n_shards, log
    got = read_committed(layer)
    want = _shard_keys(root)
    assert not got.partial, got.partial
    assert sorted(got.keys) == sorted(ref.keys) and set(got.keys) == want
    assert {k: (r["status"], r["caption"]) for k, r in got.rows.items()} == {
        k: (r["status"], r["caption"]) for k, r in ref.rows.items()
    }
    assert not list((layer / ".staging").glob("*"))
    ok, failed, lost, dup, unacc = tally(got, want, lambda r: r["status"] != "ok", lambda r: r["error"])
    assert (lost, dup, unacc) == (0, 0, 0)
    chaos_figures.add(
        scenario="kill -9: recaption (openai, HTTP)",
        trials=1,
        faults=_faults(moments),
        ok=ok,
        failed=failed,
        lost=lost,
        duplicated=dup,
        unaccounted=unacc,
        wall_s=wall,
        clean_wall_s=clean_s,
        note=f"{N_DS} samples, {n_shards} shards; kills at " + "; ".join(moments),
    )


# ---------------------------------------------------------------- filter (signatures + filter passes)


def _filter_args(root: Path) -> list[str]:
    return ["filter", str(root), "--layer", "flt", "--on", "gt-global", "--workers", "1", "--no-progress"]


def test_filter_kill9_exactly_once(master, tmp_path, chaos_figures) -> None:
    clean = copy_dataset(master, tmp_path / "clean")
    rc, log, clean_s = run(_filter_args(clean), tmp_path / "clean.log")
    assert rc == 0, log
    ref = read_committed(clean / "layers" / "flt")

    root = copy_dataset(master, tmp_path / "ds")
    layers = root / "layers"
    n_shards = N_DS // SPS_DS
    sig = layers / default_phash_layer()

    def progress() -> int:  # both passes: signatures, then verdicts
        return n_markers(sig) + n_markers(layers / "flt")

    moments, wall, log = _kill_chain(
        random.Random(SEED + 2), _filter_args(root), tmp_path, progress, 2 * n_shards, kills=3
    )
    written, skipped = written_skipped(log)
    assert written + skipped == n_shards, log
    got = read_committed(layers / "flt")
    want = _shard_keys(root)
    assert not got.partial, got.partial
    assert sorted(got.keys) == sorted(ref.keys) and set(got.keys) == want
    assert {k: (r["keep"], r["reasons"]) for k, r in got.rows.items()} == {
        k: (r["keep"], r["reasons"]) for k, r in ref.rows.items()
    }
    for p in layers.iterdir():
        assert not list((p / ".staging").glob("*")), p
        assert not read_committed(p).partial, p
    ok, failed, lost, dup, unacc = tally(got, want, lambda r: False, lambda r: True)
    assert (lost, dup, unacc) == (0, 0, 0)
    chaos_figures.add(
        scenario="kill -9: filter (signatures + verdicts)",
        trials=1,
        faults=_faults(moments),
        ok=ok,
        failed=failed,
        lost=lost,
        duplicated=dup,
        unaccounted=unacc,
        wall_s=wall,
        clean_wall_s=clean_s,
        note=f"{N_DS} samples, {n_shards} shards x 2 passes; kills at " + "; ".join(moments),
    )


# ---------------------------------------------------------------- stage-1 training

STEPS = 10
TRAIN_SETS = [
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
    "data.workers=1",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "log.every=1",
    "log.progress=false",
    "log.tensorboard=false",
    "checkpoint.every=2",
    "loop.threads=1",
]


@pytest.fixture(scope="module")
def tokenizer(master: Path) -> Path:
    tok = master.parent / "tok"
    rc, log, _ = run(
        ["train-tokenizer", str(master), "--layer", "gt-global", "--vocab", "384", str(tok)],
        master.parent / "tok.log",
    )
    assert rc == 0, log
    return tok


def _train_args(root: Path, tok: Path, log_dir: Path, steps: int = STEPS) -> list[str]:
    from tests.chaos._chaos import REPO

    args = ["train", "stage1", "--config", str(REPO / "configs" / "stage1_tiny_cpu.yaml")]
    args += ["--dataset", str(root), "--steps", str(steps), "--log-dir", str(log_dir)]
    for s in [*TRAIN_SETS, f"data.tokenizer={tok}"]:
        args += ["--set", s]
    return args


def _metric_rows(log_dir: Path) -> list[dict]:
    f = log_dir / "metrics.jsonl"
    if not f.exists():
        return []
    out = []
    for line in f.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"torn": line})
    return out


def _losses_by_step(log_dir: Path) -> tuple[dict[int, list[float]], int]:
    """Every logged loss per step (a step redone after a resume is logged again); torn rows."""
    got: dict[int, list[float]] = {}
    rows = _metric_rows(log_dir)
    for r in rows:
        if "loss" in r:
            got.setdefault(r["step"], []).append(r["loss"])
    return got, sum("torn" in r for r in rows)


def _check_same_losses(
    run_dir: Path,
    want: dict[int, float],
    steps: int,
    chaos_figures,
    scenario: str,
    moments: list[str],
    wall: float,
    clean_s: float,
) -> None:
    """Every step logged; a step redone after a resume logged the bit-exact same loss as the clean
    run; the last whole checkpoint is the last step. Then the figures row."""
    got, torn = _losses_by_step(run_dir)
    assert not torn, "a torn metrics row"
    assert sorted(got) == sorted(want)
    mismatched = {s: (v, want[s]) for s, v in got.items() if any(x != want[s] for x in v)}
    assert not mismatched, mismatched
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "done").exists())
    assert ckpts[-1] == f"step_{steps:08d}"
    redone = sum(len(v) - 1 for v in got.values())
    chaos_figures.add(
        scenario=scenario,
        trials=1,
        faults=_faults(moments),
        ok=len(got),
        failed=0,
        lost=len(set(want) - set(got)),
        duplicated=0,
        unaccounted=len(mismatched),
        wall_s=wall,
        clean_wall_s=clean_s,
        note=f"units: steps ({steps}, checkpoint every 2; {redone} steps redone after resume, "
        "same loss bit for bit); kills at " + "; ".join(moments),
    )


def test_stage1_kill9_resumes_the_same_losses(master, tokenizer, tmp_path, chaos_figures) -> None:
    clean = tmp_path / "clean"
    rc, log, clean_s = run(_train_args(master, tokenizer, clean), tmp_path / "clean.log")
    assert rc == 0, log
    want = {r["step"]: r["loss"] for r in _metric_rows(clean) if "loss" in r}
    assert sorted(want) == list(range(1, STEPS + 1))

    run_dir = tmp_path / "run"

    def progress() -> int:  # logged steps of this run folder (rows of the last attempt included)
        return max((r.get("step", 0) for r in _metric_rows(run_dir)), default=0)

    moments, wall, log = _kill_chain(
        random.Random(SEED + 3), _train_args(master, tokenizer, run_dir), tmp_path, progress, STEPS, kills=3
    )
    assert "resumed from" in log, log[-3000:]
    _check_same_losses(
        run_dir, want, STEPS, chaos_figures, "kill -9: stage-1 training", moments, wall, clean_s
    )


# ---------------------------------------------------------------- stage-2 training

STEPS2 = 8


@pytest.fixture(scope="module")
def stage2_setup(master: Path, tokenizer: Path, tmp_path_factory) -> dict[str, Path]:
    """A random stage-1 checkpoint, a tiny random LM on the same tokenizer, and a 8-step recipe
    (tests/train/test_stage2.py's, checkpointing every 2 steps)."""
    import yaml

    from tests.eval.conftest import save_stage1_checkpoint
    from tests.train.test_stage2 import recipe
    from train.stage2 import make_tiny_lm

    base = tmp_path_factory.mktemp("chaos-stage2")
    stage1 = save_stage1_checkpoint(base / "stage1", tokenizer).run
    lm = Path(make_tiny_lm(str(tokenizer), str(base / "lm"), hidden=32, layers=1, heads=2))
    config = base / "stage2.yaml"
    config.write_text(
        yaml.safe_dump(recipe(loop={"steps": STEPS2, "seed": 0, "threads": 1}, checkpoint={"every": 2}))
    )
    return {"stage1": stage1, "lm": lm, "config": config}


def _stage2_args(s: dict[str, Path], root: Path, log_dir: Path) -> list[str]:
    args = ["train", "stage2", "--config", str(s["config"]), "--init", str(s["stage1"])]
    return [*args, "--lm", str(s["lm"]), "--dataset", str(root), "--log-dir", str(log_dir)]


def test_stage2_kill9_resumes_the_same_losses(master, stage2_setup, tmp_path, chaos_figures) -> None:
    clean = tmp_path / "clean"
    rc, log, clean_s = run(_stage2_args(stage2_setup, master, clean), tmp_path / "clean.log")
    assert rc == 0, log[-3000:]
    want = {s: v[0] for s, v in _losses_by_step(clean)[0].items()}
    assert sorted(want) == list(range(1, STEPS2 + 1))

    run_dir = tmp_path / "run"

    # the kill lands after the first whole checkpoint (step 2, the end of the recipe's 'projector'
    # phase), before the second: the resume crosses the phase change that unfreezes the encoder
    def progress() -> int:  # the last whole checkpoint
        done = [int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*") if (p / "done").exists()]
        return max(done, default=0)

    moments, wall, log = _kill_chain(
        random.Random(SEED + 4),
        _stage2_args(stage2_setup, master, run_dir),
        tmp_path,
        progress,
        STEPS2,
        kills=1,
        margin=STEPS2 - 2,
        wait_s=900,
        timeout=900,  # torch + transformers imports alone took minutes at load 16 on 2 cores
    )
    assert "resumed from" in log, log[-3000:]
    # stage 2 claims exact resume (tests/train/test_stage2.py): every step, the clean run's loss bit for bit
    _check_same_losses(
        run_dir, want, STEPS2, chaos_figures, "kill -9: stage-2 training", moments, wall, clean_s
    )


# ---------------------------------------------------------------- eval
#
# Eval writes nothing until it has every result, then ``eval/report.write`` writes
# results.md and results.json (a few KB, tens of microseconds). A kill timed from outside
# lands there almost never, so the kills are aimed at the write itself: the process kills
# itself with SIGKILL at a chosen step of it (tests/chaos/_killwrite.py). A record run lists
# the write's landmarks (each file opened for writing, each rename); each trial kills at a
# seeded step between two landmarks, so every stretch of the write is hit: inside a file's
# write, between a write and its rename, between the two files, after the last rename.

EVAL_DATA = "synthetic://scenes?n=16&seed=1000&size=128"
KILLWRITE = [sys.executable, "-m", "tests.chaos._killwrite"]


def _eval_args(model: Path, out: Path) -> list[str]:
    return ["eval", str(model), "--task", "finegrained", "--data", EVAL_DATA, "--out", str(out)]


def _no_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _visible(out: Path, at: str = "") -> tuple[list[dict] | None, str | None]:
    """What a reader of ``out`` sees: (results.json's rows or None, results.md's text or None).
    A results.json that does not parse fails the test with what it holds."""
    j, m = out / "results.json", out / "results.md"
    md = m.read_text() if m.exists() else None
    if not j.exists():
        return None, md
    raw = j.read_bytes()
    try:
        return json.loads(raw), md
    except ValueError:
        raise AssertionError(f"torn results.json visible {at}({len(raw)} bytes): {raw[-80:]!r}") from None


def _check_view(out: Path, want: list[dict], want_md: str, at: str) -> None:
    """After a kill: each file absent or whole, and results.json (written last) never without
    its whole results.md."""
    rows, md = _visible(out, f"after a kill {at}: ")
    assert md in (None, want_md), f"partial results.md visible after a kill {at}: {md!r}"
    if rows is not None:
        assert _no_timings(rows) == _no_timings(want), f"results.json of another run after a kill {at}"
        assert md == want_md, f"results.json visible without its whole results.md after a kill {at}"


def _segments(record: Path) -> list[tuple[str, int, int]]:
    """The write's stretches between consecutive landmarks: (name, first step, last step)."""
    marks = json.loads(record.read_text())["marks"]
    segs = []
    for a, b in zip(marks, marks[1:], strict=False):
        if b["step"] > a["step"] + 1:
            segs.append(
                (f"{a['event']} {a['path']} .. {b['event']} {b['path']}".strip(), a["step"] + 1, b["step"])
            )
    assert segs, marks
    return segs


def _sweep_rows() -> list[dict]:
    """Two task results shaped like finegrained's and boxcls's, one with 400 per-class scores:
    results.json (~25 KB) is larger than Python's 8 KB write buffer, so a torn one can be
    empty or cut mid-way."""
    from eval.report import TaskResult

    fine = TaskResult(
        task="finegrained",
        data="synthetic://scenes?n=16&seed=1000&size=128",
        split="held-out seed 1000",
        n=16,
        metrics={
            "t2i_mean": 0.212,
            "i2t_mean": 0.287,
            "chance": 0.262,
            "colour": {"t2i": 0.25, "i2t": 0.375},
        },
        settings={"resolution": "native", "text": "<= 64 tokens", "checkpoint": "f6a90c1a902b"},
        seconds=12.5,
    )
    box = TaskResult(
        task="boxcls",
        data="/data/boxes",
        split="val",
        n=400,
        metrics={"top1": 0.41, "per_class": {f"class_{i:03d}": round(i / 400, 4) for i in range(400)}},
        missing_examples=[f"img_{i}.jpg" for i in range(20)],
        notes=["20 images missing"],
        seconds=3.25,
    )
    return [fine.to_dict(), box.to_dict()]


def test_eval_results_write_killed_at_every_stretch(tmp_path, chaos_figures) -> None:
    """``eval.report.write`` in a small process, killed (SIGKILL) at a seeded step of each
    stretch of the write, twice: in an empty --out and over a previous run's whole results."""
    from eval.report import TaskResult, markdown

    rows = _sweep_rows()
    src = tmp_path / "rows.json"
    src.write_text(json.dumps(rows))
    want_md = markdown([TaskResult(**r) for r in rows])
    rec = tmp_path / "record.json"
    rc, log, clean_s = run(
        [str(tmp_path / "rec-out"), "--record", str(rec), "--results", str(src)],
        tmp_path / "rec.log",
        120,
        cli=KILLWRITE,
    )
    assert rc == 0, log
    rng, kills, wall = random.Random(SEED + 6), [], 0.0
    for name, lo, hi in _segments(rec):
        for start_with in ("empty", "previous results"):
            out = tmp_path / f"out{len(kills)}"
            if start_with != "empty":
                copy_dataset(tmp_path / "rec-out", out)
            k = rng.randint(lo, hi)
            at = f"at step {k} ({name}; {start_with})"
            rc, log, secs = run(
                [str(out), "--kill-at", str(k), "--results", str(src)],
                tmp_path / f"kill{len(kills)}.log",
                120,
                cli=KILLWRITE,
            )
            assert rc == -9, f"not killed {at}: rc {rc}\n{log}"
            _check_view(out, rows, want_md, at)
            rc, log, secs2 = run(
                [str(out), "--results", str(src)], tmp_path / f"rerun{len(kills)}.log", 120, cli=KILLWRITE
            )
            assert rc == 0, log
            assert _visible(out) == (rows, want_md), f"the rerun after a kill {at} differs"
            assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"], at
            kills.append(at)
            wall += secs + secs2
    chaos_figures.add(
        scenario="kill -9: eval results write (every stretch)",
        trials=len(kills),
        faults=len(kills),
        ok=2 * len(kills),
        failed=0,
        lost=0,
        duplicated=0,
        unaccounted=0,
        wall_s=wall,
        clean_wall_s=clean_s,
        note=f"units: result files (results.json + results.md) after each rerun; eval.report.write killed at a "
        f"seeded step of each of {len(kills) // 2} stretches between its landmarks, in an empty folder and over "
        "a previous run's results; after each kill each file absent or whole, results.json never without its "
        "whole results.md; each rerun whole, nothing else left",
    )


@pytest.fixture(scope="module")
def eval_model(tmp_path_factory) -> Path:
    """A random tiny stage-1 checkpoint with its own small tokenizer (no dataset, no Ray)."""
    from tests.eval.conftest import save_stage1_checkpoint, train_tokenizer

    base = tmp_path_factory.mktemp("chaos-eval")
    return save_stage1_checkpoint(base / "run", train_tokenizer(base / "tok")).run


def test_eval_kill9_inside_the_results_write_then_rerun(eval_model, tmp_path, chaos_figures) -> None:
    """``finevit eval`` killed inside its write of results.json (a seeded step between that
    file's open and its rename), then rerun: nothing torn visible, the rerun equals a clean run."""
    model, clean, rec = eval_model, tmp_path / "clean", tmp_path / "record.json"
    rc, log, clean_s = run(
        [str(clean), "--record", str(rec), "--", "finevit", *_eval_args(model, clean)],
        tmp_path / "clean.log",
        cli=KILLWRITE,
    )
    assert rc == 0, log[-3000:]
    want, want_md = _visible(clean)
    assert want and want[0]["n"] == 16 and want_md, want
    ((name, lo, hi),) = [s for s in _segments(rec) if s[0].startswith("open results.json")]
    k = random.Random(SEED + 5).randint(lo, hi)
    out = tmp_path / "out"
    rc, log, wall = run(
        [str(out), "--kill-at", str(k), "--", "finevit", *_eval_args(model, out)],
        tmp_path / "kill.log",
        cli=KILLWRITE,
    )
    assert rc == -9, f"not killed at step {k}: rc {rc}\n{log[-3000:]}"
    want_md_out = want_md.replace(str(clean), str(out))
    _check_view(out, want, want_md_out, f"at step {k} ({name})")
    rc, log, secs = run(_eval_args(model, out), tmp_path / "final.log")
    assert rc == 0, log[-3000:]
    got, md = _visible(out)
    assert got is not None and _no_timings(got) == _no_timings(want)
    assert md == want_md_out
    chaos_figures.add(
        scenario="kill -9: eval (finegrained)",
        trials=1,
        faults=1,
        ok=want[0]["n"],
        failed=0,
        lost=0,
        duplicated=0,
        unaccounted=0,
        wall_s=wall + secs,
        clean_wall_s=clean_s,
        note=f"units: scenes of the task ({want[0]['n']}); killed inside the write of results.json (step {k} of "
        f"{name}, steps {lo}-{hi}); nothing torn visible; the rerun's results equal the clean run's (timings aside)",
    )
