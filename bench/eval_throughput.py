"""Eval throughput on the CPU: our harness vs LAION's CLIP_benchmark, same OpenCLIP model, same data.

Both run zero-shot classification (10 classes x 7 templates) and image-text retrieval (one
caption per image) over the same JPEGs (640x480, photo-like) with the same OpenCLIP model (a
ViT w192/d6/p16 at 224 px with a w192/d6 text tower, random weights, fp32): ours through
``eval.run.evaluate`` on :class:`eval.openclip.OpenClipEncoder` (two loader threads decode and
prepare the next batches while the model runs, ``eval.embed.prefetch_images``), theirs through
``clip_benchmark.metrics.zeroshot_classification.evaluate`` / ``zeroshot_retrieval.evaluate``
with a torch DataLoader (batch 64) as its CLI builds one, ``amp=False`` (its default autocast is
bf16 on CPU; we embed fp32), with 0 and 2 loader workers (its CLI default is 4; this machine
has 2 cores). Images/s = images / wall time of the whole task (decode, preprocess, both towers,
metrics). Needs ``make bench-deps``.

    python bench/eval_throughput.py [--quick] [--n N] [--repeats R]

Prints the table and, last, the ratio of ours to clip_benchmark's best configuration.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image

from bench._common import alternate, print_table, size_args, write_images
from eval.openclip import import_open_clip, load_openclip
from eval.run import evaluate

CLASSES = ["cat", "dog", "car", "tree", "boat", "house", "bird", "plane", "horse", "truck"]
TEMPLATES = [
    "a photo of a {c}.",
    "a bad photo of a {c}.",
    "a photo of the large {c}.",
    "a photo of the small {c}.",
    "a cropped photo of a {c}.",
    "a drawing of a {c}.",
    "itap of a {c}.",
]
MODEL = {
    "embed_dim": 192,
    "vision_cfg": {"image_size": 224, "layers": 6, "width": 192, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 192, "heads": 3, "layers": 6},
}


class _Set(torch.utils.data.Dataset):
    def __init__(self, items, preprocess, classes=None):
        self.items, self.preprocess, self.classes = items, preprocess, classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, y = self.items[i]
        with Image.open(path) as im:
            return self.preprocess(im.convert("RGB")), y


def _collate_captions(batch):
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch]


def _accuracy(output, target, topk=(1,)):
    # clip_benchmark 1.6.2's accuracy() does float(<1-element array>), an error under numpy >= 2.4
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def main() -> None:
    args, n, repeats = size_args(full_n=256, quick_n=32)
    torch.set_num_threads(2)
    import_open_clip()
    try:
        from clip_benchmark.metrics import zeroshot_classification as zc
        from clip_benchmark.metrics import zeroshot_retrieval as zr
    except ImportError as e:
        raise SystemExit(f"clip_benchmark is not importable ({e}): run `make bench-deps`") from None
    zc.accuracy = _accuracy
    tmp = Path(tempfile.mkdtemp(prefix="eval-bench-"))
    paths = write_images(tmp / "src", n, (640, 480))
    items, caps, anns, images = [], [], [], []
    for i, p in enumerate(paths):
        c = i % len(CLASSES)
        d = tmp / "folder" / CLASSES[c]
        d.mkdir(parents=True, exist_ok=True)
        (d / p.name).symlink_to(p)
        items.append((d / p.name, c))
        images.append({"id": i, "file_name": str(p)})
        anns.append({"image_id": i, "caption": f"a photo of a {CLASSES[c]}, number {i}"})
        caps.append((p, [anns[-1]["caption"]]))
    (tmp / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    (tmp / "model.json").write_text(json.dumps(MODEL))
    (tmp / "templates.txt").write_text("\n".join(TEMPLATES))
    enc = load_openclip(f"openclip:{tmp / 'model.json'}")
    model, tok, pre = enc.model, enc.tokenizer, enc.preprocess
    numbers: dict[str, dict] = {}

    def ours() -> float:
        t = time.perf_counter()
        a = evaluate(
            enc, "zeroshot", str(tmp / "folder"), templates=str(tmp / "templates.txt"), batch_size=64
        )
        b = evaluate(enc, "retrieval", str(tmp / "captions.json"), batch_size=64)
        numbers["ours"] = {"top1": a.metrics["top1"], "R@1": b.metrics["t2i_R@1"]}
        return 2 * n / (time.perf_counter() - t)

    def theirs(workers: int):
        def run() -> float:
            t = time.perf_counter()
            dl = torch.utils.data.DataLoader(_Set(items, pre, CLASSES), batch_size=64, num_workers=workers)
            a = zc.evaluate(model, dl, tok, CLASSES, TEMPLATES, "cpu", amp=False)
            dl = torch.utils.data.DataLoader(
                _Set(caps, pre), batch_size=64, num_workers=workers, collate_fn=_collate_captions
            )
            b = zr.evaluate(model, dl, tok, "cpu", amp=False, recall_k_list=[1])
            numbers[f"cb{workers}"] = {"top1": a["acc1"], "R@1": b["image_retrieval_recall@1"]}
            return 2 * n / (time.perf_counter() - t)

        return run

    results = alternate(
        {
            "finevit eval": ours,
            "clip_benchmark (0 workers)": theirs(0),
            "clip_benchmark (2 workers)": theirs(2),
        },
        repeats,
    )
    print(f"{n} images x 2 tasks (zeroshot + retrieval), OpenCLIP ViT w192/d6/p16 @224, fp32, 2 threads")
    print_table(results, "img/s")
    print("same numbers:", numbers)
    best = max(statistics.median(v) for k, v in results.items() if k.startswith("clip_benchmark"))
    ours_med = statistics.median(results["finevit eval"])
    print(
        f"eval throughput: {ours_med:.1f} img/s, {ours_med / best:.2f}x clip_benchmark's best ({best:.1f} img/s)"
    )


if __name__ == "__main__":
    main()
