"""Stage 1 loader: time to the first batch after a resume, at step 0 vs a late step.

The loader saves each stream's state (epoch, segment, offset, shuffle RNG, buffered keys) with
every checkpoint; restoring it reopens one segment and re-reads the buffered samples only, so
the time to the first batch should not grow with the step (target: late / step 0 <= 1.5).

The late state is made honestly: a stream plans ``--step`` steps (metadata + tar reads, no
decoding, exactly what training would have planned) and the state it reaches is what the
loader would have saved. Candidates, alternated after a warm-up (medians of ``--repeats``):
  * ``fresh``     a new loader's first batch (step 0)
  * ``resume@N``  ``load_state_dict`` of the step-N state + first batch
  * ``replay@N``  what the old loader did: re-plan N steps from step 0, then the first batch

    python bench/train_resume.py [--quick] [--step 1600] [--n 512]

Builds its own dataset (synthetic scenes) and tokenizer under ``--work``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import StorageConfig
from engine.layout import Dataset
from train.config import CaptionSource, DataConfig
from train.data.loader import PlanStream, ShardReader, Stage1Loader

PATCH, CONTEXT = 16, 192


def prepare(work: Path, n: int) -> tuple[Path, Path]:
    root, tok = work / f"scenes{n}", work / f"tok{n}"
    py = [sys.executable, "-m", "finevit"]
    if not (root / "dataset.json").exists():
        src = f"synthetic://scenes?n={n}&seed=0&size=128"
        subprocess.run(
            [*py, "ingest", src, str(root), "--samples-per-shard", "64", "--no-progress"], check=True
        )
    if not (tok / "tokenizer.json").exists():
        subprocess.run(
            [*py, "train-tokenizer", str(root), "--layer", "gt-global", "--vocab", "1024", str(tok)],
            check=True,
        )
    return root, tok


def data_config(root: Path, tok: Path) -> DataConfig:
    # the tiny recipe's data section (configs/stage1_tiny_cpu.yaml), one worker
    return DataConfig(
        dataset=str(root),
        tokenizer=str(tok),
        captions=[
            CaptionSource(source="gt-global", weight=0.8),
            CaptionSource(source="alt-text", weight=0.2),
        ],
        max_patches=64,
        seq_len=256,
        rows=4,
        max_images=32,
        shuffle_buffer=128,
        pack_buffer=32,
        workers=1,
    )


def first_batch(data: DataConfig, state: dict | None) -> float:
    t = time.perf_counter()
    loader = Stage1Loader(data.dataset, StorageConfig(), data, PATCH, CONTEXT)
    if state is not None:
        loader.load_state_dict(state)
    loader.next()
    return time.perf_counter() - t


def late_state(data: DataConfig, step: int) -> tuple[dict, float]:
    """The loader state after ``step`` steps, and how long planning them took (the old resume's replay)."""
    loader = Stage1Loader(data.dataset, StorageConfig(), data, PATCH, CONTEXT)
    t = time.perf_counter()
    stream = PlanStream(
        loader.plan.segments(0), 0, data, ShardReader(Dataset(data.dataset), data, PATCH, Counter())
    )
    for _ in range(step):
        stream.next_plan()
    replay = time.perf_counter() - t
    state = {**loader.state_dict(), "batches": step, "streams": {0: stream.state()}}
    return state, replay


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--step", type=int)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default="/tmp/finevit-bench-resume")
    args = ap.parse_args()
    step = args.step or (200 if args.quick else 1600)
    repeats = 2 if args.quick else args.repeats
    root, tok = prepare(Path(args.work), args.n)
    data = data_config(root, tok)
    state, replay = late_state(data, step)
    first_batch(data, None)  # warm-up (page cache, imports)
    times: dict[str, list[float]] = {"fresh": [], f"resume@{step}": []}
    for _ in range(repeats):
        times["fresh"].append(first_batch(data, None))
        times[f"resume@{step}"].append(first_batch(data, state))
    fresh = statistics.median(times["fresh"])
    times[f"replay@{step}"] = [replay + fresh]  # planning N steps, then the first batch
    print(f"{'candidate':<16}{'median':>10}{'min':>10}{'max':>10}  unit")
    for name, ts in times.items():
        print(f"{name:<16}{statistics.median(ts):>10.3f}{min(ts):>10.3f}{max(ts):>10.3f}  s to first batch")
    late = statistics.median(times[f"resume@{step}"])
    print(
        f"resume: {late / fresh:.2f}x step 0 at step {step} ({late:.3f} s vs {fresh:.3f} s; target <= 1.5), "
        f"{(replay + fresh) / late:.1f}x faster than replaying"
    )


if __name__ == "__main__":
    main()
