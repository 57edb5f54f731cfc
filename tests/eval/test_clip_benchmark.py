"""Cross-check with LAION's CLIP_benchmark: the same small random OpenCLIP model and tiny datasets
(written here), zero-shot classification and retrieval through clip_benchmark's own functions and
through ours; the numbers agree.

Needs ``make bench-deps`` (open_clip, clip_benchmark and scikit-learn in ``.bench-deps``, installed
with --no-deps); skipped with that reason otherwise.

Protocol notes (documented in README "Eval"): clip_benchmark runs under ``torch.autocast`` by default
(bf16 on CPU), so it is called with ``amp=False`` here (we embed in fp32); it ranks with
``torch.topk`` (ties broken by index) where we count strictly higher scores (optimistic on ties;
no ties with float embeddings); it reports acc5 as NaN below 5 classes, we report None; its
retrieval needs k <= the number of images; its ``accuracy`` helper fails under numpy >= 2.4 and is
replaced here by the same formula (see ``_accuracy_numpy2``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from eval.run import evaluate

SIX = ["cat", "dog", "car", "tree", "boat", "house"]
TINY_OPENCLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory):
    from eval.openclip import import_open_clip

    try:
        import_open_clip()
        from clip_benchmark.metrics import zeroshot_classification, zeroshot_retrieval
    except ImportError as e:
        pytest.skip(f"clip_benchmark/open_clip not installed ({e}): run `make bench-deps`")
    from eval.openclip import load_openclip

    cfg = tmp_path_factory.mktemp("oc") / "tiny-clip.json"
    cfg.write_text(json.dumps(TINY_OPENCLIP))
    return load_openclip(f"openclip:{cfg}", seed=0), zeroshot_classification, zeroshot_retrieval


def _noise(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> None:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 255, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


class _Set(torch.utils.data.Dataset):
    def __init__(self, items, preprocess, classes=None):
        self.items, self.preprocess, self.classes = items, preprocess, classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        path, y = self.items[i]
        with Image.open(path) as im:
            return self.preprocess(im.convert("RGB")), y


def _accuracy_numpy2(output, target, topk=(1,)):
    """clip_benchmark 1.6.2's ``accuracy`` with ``.item()``: its ``float(<1-element array>)`` raises under
    numpy >= 2.4. The formula is theirs, unchanged."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum().item() / n for k in topk]


def test_zeroshot_matches_clip_benchmark(peer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    enc, zc, _ = peer
    monkeypatch.setattr(zc, "accuracy", _accuracy_numpy2)
    items = []
    for c, name in enumerate(SIX):
        for i in range(3):
            p = tmp_path / "folder" / name / f"{i}.png"
            _noise(p, 10 * c + i)
            items.append((p, c))
    templates = ["a photo of a {c}.", "a drawing of the {c}."]
    (tmp_path / "t.txt").write_text("\n".join(templates))
    ours = evaluate(enc, "zeroshot", str(tmp_path / "folder"), templates=str(tmp_path / "t.txt"))
    loader = torch.utils.data.DataLoader(_Set(items, enc.preprocess, SIX), batch_size=5)
    theirs = zc.evaluate(enc.model, loader, enc.tokenizer, SIX, templates, "cpu", amp=False)
    assert ours.metrics["top1"] == pytest.approx(theirs["acc1"], abs=1e-6)
    assert ours.metrics["top5"] == pytest.approx(theirs["acc5"], abs=1e-6)
    assert ours.metrics["mean_per_class_recall"] == pytest.approx(theirs["mean_per_class_recall"], abs=1e-6)
    assert 0 < theirs["acc5"] < 1  # a random model: not a degenerate all-or-nothing case


def test_retrieval_matches_clip_benchmark(peer, tmp_path: Path) -> None:
    enc, _, zr = peer
    words = ["red", "blue", "big", "small", "round", "square", "old", "new", "dark", "light", "soft", "hard"]
    images, anns, items = [], [], []
    for i, w in enumerate(words):
        _noise(tmp_path / f"{i}.png", 100 + i, (40 + 3 * i, 36))
        images.append({"id": i, "file_name": f"{i}.png"})
        caps = [f"a {w} thing", f"the {w} one, number {i}"]
        anns += [{"image_id": i, "caption": c} for c in caps]
        items.append((tmp_path / f"{i}.png", caps))
    (tmp_path / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    ours = evaluate(enc, "retrieval", str(tmp_path / "captions.json"))

    def collate(batch):
        return torch.stack([b[0] for b in batch]), [b[1] for b in batch]

    loader = torch.utils.data.DataLoader(_Set(items, enc.preprocess), batch_size=5, collate_fn=collate)
    theirs = zr.evaluate(enc.model, loader, enc.tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k in (1, 5, 10):
        assert ours.metrics[f"t2i_R@{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"], abs=1e-6)
        assert ours.metrics[f"i2t_R@{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"], abs=1e-6)
    assert 0 < theirs["image_retrieval_recall@5"] < 1
