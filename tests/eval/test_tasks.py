"""Every task on tiny generated datasets in each format (the tests write the annotation files),
bad input (missing images counted, wrong format names the field, vision-only checkpoint), the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from eval import datasets
from eval.datasets import FormatError
from eval.embed import TaskError
from eval.run import evaluate
from finevit.cli import main as finevit_cli
from tests.eval.conftest import TinyCkpt

COLORS = {"red": (220, 30, 30), "green": (30, 150, 50), "blue": (30, 70, 220)}


class ColourOracle:
    """A stand-in *encoder* (not the thing under test): an image is its mean RGB, a text the colour it names.

    With it every task's answer is known, so the tests check the eval wiring (alignment of images,
    captions and labels after missing images are left out), not a model."""

    has_text = True

    def encode_image(self, images):
        x = torch.stack(
            [torch.tensor(im.resize((4, 4)).getdata(), dtype=torch.float32).mean(0) for im in images]
        )
        return F.normalize(x - 100.0, dim=-1)

    def encode_text(self, texts):
        out = []
        for t in texts:
            hit = [c for c in COLORS if c in t]
            out.append(torch.tensor(COLORS[hit[0]], dtype=torch.float32) - 100.0 if hit else torch.ones(3))
        return F.normalize(torch.stack(out), dim=-1)

    def settings(self):
        return {"resolution": "mean colour", "text_context": None}

    def state_dict(self):
        return {"w": torch.zeros(1)}


def _solid(path: Path, colour: str, size: tuple[int, int] = (40, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLORS[colour]).save(path)
    return path.name


def _classification_files(root: Path) -> dict[str, Path]:
    rows = []
    for c in COLORS:
        for i in range(2):
            _solid(root / "folder" / c / f"{c}{i}.png", c)
            rows.append((f"folder/{c}/{c}{i}.png", c))
    rows.append(("folder/nowhere.png", "red"))  # missing: counted, not fatal
    (root / "set.csv").write_text("image,label\n" + "".join(f"{a},{b}\n" for a, b in rows))
    (root / "set.json").write_text(json.dumps([{"image": a, "label": b} for a, b in rows]))
    return {"imagefolder": root / "folder", "csv": root / "set.csv", "json": root / "set.json"}


@pytest.mark.parametrize("fmt", ["imagefolder", "csv", "json"])
def test_zeroshot_formats(tmp_path: Path, fmt: str) -> None:
    path = _classification_files(tmp_path)[fmt]
    r = evaluate(ColourOracle(), "zeroshot", str(path), fmt, templates="simple")
    assert r.n == 6 and r.metrics["top1"] == 1.0 and r.metrics["mean_per_class_recall"] == 1.0
    assert r.metrics["top5"] is None  # 3 classes
    assert r.missing_images == (0 if fmt == "imagefolder" else 1)


def _caption_files(root: Path) -> dict[str, Path]:
    imgs = root / "imgs"
    names = {c: _solid(imgs / f"{c}.jpg", c) for c in COLORS}
    coco = {
        "images": [{"id": i, "file_name": n} for i, n in enumerate(names.values())]
        + [{"id": 9, "file_name": "gone.jpg"}],
        "annotations": [
            {"image_id": i, "caption": cap}
            for i, c in enumerate(COLORS)
            for cap in (f"a {c} square", f"something {c}")
        ]
        + [{"image_id": 9, "caption": "a red lost image"}],
    }
    (imgs / "captions.json").write_text(json.dumps(coco))
    karpathy = {
        "images": [
            {
                "filename": n,
                "filepath": "imgs",
                "split": "test",
                "sentences": [{"raw": f"{c} thing"}, {"raw": f"all {c}"}],
            }
            for c, n in names.items()
        ]
        + [{"filename": "red.jpg", "filepath": "imgs", "split": "train", "sentences": [{"raw": "blue lie"}]}]
    }
    (root / "karpathy.json").write_text(json.dumps(karpathy))
    return {"coco-captions": imgs / "captions.json", "karpathy": root / "karpathy.json"}


@pytest.mark.parametrize("fmt", ["coco-captions", "karpathy"])
def test_retrieval_formats(tmp_path: Path, fmt: str) -> None:
    path = _caption_files(tmp_path)[fmt]
    r = evaluate(ColourOracle(), "retrieval", str(path), fmt)
    assert (
        r.n == 3 and r.metrics["texts"] == 6
    )  # 2 captions per image; the train image and the lost one left out
    assert r.metrics["i2t_R@1"] == 1.0 and r.metrics["t2i_R@1"] == 1.0
    assert r.missing_images == (1 if fmt == "coco-captions" else 0)


def _long_files(root: Path) -> dict[str, Path]:
    dci = root / "dci"
    (dci / "annotations").mkdir(parents=True)
    for c in COLORS:
        _solid(dci / "photos" / f"{c}.jpg", c)
        ann = {
            "image": f"{c}.jpg",
            "short_caption": "A plain picture.",
            "extra_caption": f"It is {c} everywhere.",
        }
        (dci / "annotations" / f"{c}.json").write_text(json.dumps(ann))
    urban = root / "urban"
    for i, c in enumerate(COLORS):
        _solid(urban / "image" / f"{i}.jpg", c)
        (urban / "caption").mkdir(exist_ok=True)
        (urban / "caption" / f"{i}.txt").write_text(f"A long description of a {c} scene.")
    (urban / "caption" / "9.txt").write_text("an image that is missing")
    share = [
        {
            "image": f"urban/image/{i}.jpg",
            "conversations": [
                {"from": "human", "value": "<image> describe"},
                {"from": "gpt", "value": f"so {c}"},
            ],
        }
        for i, c in enumerate(COLORS)
    ]
    (root / "share.json").write_text(json.dumps(share))
    return {"dci": dci, "urban1k": urban, "sharegpt4v": root / "share.json"}


@pytest.mark.parametrize("fmt", ["dci", "urban1k", "sharegpt4v"])
def test_long_retrieval_formats(tmp_path: Path, fmt: str) -> None:
    path = _long_files(tmp_path)[fmt]
    r = evaluate(ColourOracle(), "long-retrieval", str(path), fmt)
    assert r.n == 3 and r.metrics["i2t_R@1"] == 1.0 and r.metrics["t2i_R@1"] == 1.0
    assert r.missing_images == (1 if fmt == "urban1k" else 0)


def test_dci_text_fields(tmp_path: Path) -> None:
    dci = _long_files(tmp_path)["dci"]
    joined = datasets.load_captions(str(dci), "dci")
    extra = datasets.load_captions(str(dci), "dci", dci_text="extra")
    assert joined.captions[1] == ["A plain picture. It is green everywhere."]
    assert extra.captions[1] == ["It is green everywhere."]


def _coco_instances(root: Path) -> Path:
    im = Image.new("RGB", (80, 40), (240, 240, 240))
    im.paste(COLORS["red"], (0, 0, 40, 40))
    im.paste(COLORS["blue"], (40, 0, 80, 40))
    im.save(root / "two.png")
    data = {
        "images": [
            {"id": 1, "file_name": "two.png", "width": 80, "height": 40},
            {"id": 2, "file_name": "gone.png", "width": 8, "height": 8},
        ],
        "categories": [{"id": 3, "name": "red"}, {"id": 7, "name": "blue"}, {"id": 5, "name": "green"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [40, 0, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 7, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0},
        ],
    }
    (root / "instances.json").write_text(json.dumps(data))
    return root / "instances.json"


def test_boxcls_coco_instances_tiny_model(tmp_path: Path, tiny_ckpt: TinyCkpt) -> None:
    from train.model.encoder import load_encoder

    path = _coco_instances(tmp_path)
    ds = datasets.load_boxes(str(path))
    assert ds.classnames == ["red", "green", "blue"]  # by category id
    assert ds.boxes == [[(0.0, 0.0, 0.5, 1.0), (0.5, 0.0, 1.0, 1.0)]] and ds.labels == [[0, 2]]
    assert ds.missing == 1
    r = evaluate(load_encoder(tiny_ckpt.run), "boxcls", str(path), templates="simple")
    assert r.n == 2 and set(r.metrics) >= {"top1", "top5", "mean_per_class_recall"}
    assert r.settings["templates"] == "simple (1)" and len(r.settings["checkpoint"]) == 12
    with pytest.raises(TaskError, match="patch_features"):
        evaluate(ColourOracle(), "boxcls", str(path))


def test_every_task_runs_on_tiny_model(tmp_path: Path, tiny_ckpt: TinyCkpt) -> None:
    from train.model.encoder import load_encoder

    enc = load_encoder(tiny_ckpt.run)
    zs = evaluate(enc, "zeroshot", str(_classification_files(tmp_path)["imagefolder"]))
    rt = evaluate(enc, "retrieval", str(_caption_files(tmp_path)["coco-captions"]))
    lr = evaluate(enc, "long-retrieval", str(_long_files(tmp_path)["dci"]))
    fg = evaluate(enc, "finegrained", "synthetic://scenes?n=4&seed=1000&size=64", negatives=2)
    assert zs.n == 6 and rt.n == 3 and lr.n == 3
    assert "native" in lr.settings["resolution"] and "tokens" in lr.settings["text"]
    assert set(fg.metrics) >= {"colour", "shape", "position", "count", "t2i_mean", "i2t_mean", "chance"}
    assert all(0.0 <= fg.metrics[a]["t2i"] <= 1.0 for a in ("colour", "shape", "position", "count"))
    fg2 = evaluate(enc, "finegrained", "synthetic://scenes?n=4&seed=1000&size=64&grid=2", negatives=2)
    assert fg2.data.endswith("&grid=2") and fg.data == "synthetic://scenes?n=4&seed=1000&size=64"


def test_finegrained_scores_the_world_its_uri_names() -> None:
    from engine.synthetic import GRID_POSITIONS, dense_caption, make_scene
    from eval.tasks.finegrained import build

    items = build(1000, 6, 64, 2, ["count", "position"], grid=2)
    assert items and all(it["pos"][1] == dense_caption(make_scene(1000, it["scene"], 64, 2)) for it in items)
    # the hard negatives stay in the 2x2 world: moved objects land in a corner cell
    other = [p for p in GRID_POSITIONS[3] if p not in GRID_POSITIONS[2]]
    assert not any(f"the {p}" in tx for it in items for _, tx in it["negs"] for p in other)


def test_wrong_format_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "x.jpg"}]}))
    with pytest.raises(FormatError, match="'annotations'"):
        datasets.load_captions(str(tmp_path / "a.json"), "coco-captions")
    (tmp_path / "b.json").write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "test"}]}))
    with pytest.raises(FormatError, match="'sentences'"):
        datasets.load_captions(str(tmp_path / "b.json"), "karpathy")
    (tmp_path / "c.csv").write_text("path,label\nx.jpg,a\n")
    with pytest.raises(FormatError, match="'image'"):
        datasets.load_classification(str(tmp_path / "c.csv"))
    (tmp_path / "d.json").write_text(json.dumps({"images": [], "categories": [], "annotations": [{"id": 1}]}))
    with pytest.raises(FormatError, match="'bbox'"):
        datasets.load_boxes(str(tmp_path / "d.json"), "coco-instances")


def test_cli_results_and_bad_input(
    tmp_path: Path, tiny_ckpt: TinyCkpt, capsys: pytest.CaptureFixture
) -> None:
    from train.model.encoder import FineViTEncoder, load_encoder

    data = _classification_files(tmp_path)["csv"]
    out = tmp_path / "out"
    assert (
        finevit_cli(
            ["eval", str(tiny_ckpt.run), "--task", "zeroshot", "--data", str(data), "--out", str(out)]
        )
        == 0
    )
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["task"] == "zeroshot" and rows[0]["missing_images"] == 1 and rows[0]["n"] == 6
    md = (out / "results.md").read_text()
    assert "| zeroshot | set.csv | - | 6 |" in md and "ensemble (7)" in md
    assert "1 missing" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('[{"img": "x.jpg", "label": "a"}]')
    assert (
        finevit_cli(["eval", str(tiny_ckpt.run), "--task", "zeroshot", "--data", str(tmp_path / "bad.json")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "expected field 'image'" in err[0]
    enc = load_encoder(tiny_ckpt.run)
    FineViTEncoder(
        enc.model_cfg, {k: v for k, v in enc.state_dict().items() if k.startswith("vision.")}, enc.preprocess
    ).save(tmp_path / "vonly")
    assert finevit_cli(["eval", str(tmp_path / "vonly"), "--task", "zeroshot", "--data", str(data)]) == 2
    assert "needs a text tower" in capsys.readouterr().err
    assert (
        finevit_cli(["eval", str(tiny_ckpt.run), "--task", "finegrained", "--data", "synthetic://nope"]) == 2
    )
