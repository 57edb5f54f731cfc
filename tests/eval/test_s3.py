"""Eval reads its data from S3 (moto's server on 127.0.0.1): a FineViT dataset (written by the real
ingest code, no Ray), ImageFolder and CSV sets, COCO captions and instances JSON with their images,
each uploaded as it lies on disk; every task gives on S3 exactly what it gives on the local copy,
missing images are still counted, and a missing annotation object is a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.run import evaluate
from finevit.cli import main as finevit_cli
from tests.eval.conftest import TinyCkpt, ingest_synthetic
from tests.eval.test_tasks import (
    ColourOracle,
    _caption_files,
    _classification_files,
    _coco_instances,
    _long_files,
)

pytestmark = pytest.mark.s3


def _same(a, b) -> None:
    assert (a.n, a.metrics, a.missing_images) == (b.n, b.metrics, b.missing_images)


def test_annotation_files_and_folders_on_s3(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    local = tmp_path / "local"
    files = {**_classification_files(local), **_caption_files(local), **_long_files(local)}
    remote = s3.upload_dir(local, "sets")
    oracle = ColourOracle()
    for fmt in ("imagefolder", "csv", "json"):
        path = files[fmt]
        uri = f"{remote}/{path.relative_to(local).as_posix()}"
        got = evaluate(oracle, "zeroshot", uri, fmt)
        _same(got, evaluate(oracle, "zeroshot", str(path), fmt))
        assert got.metrics["top1"] == 1.0 and got.n == 6  # the oracle: every image read with its label
        assert got.missing_images == (0 if fmt == "imagefolder" else 1)
    for fmt in ("coco-captions", "karpathy"):
        path = files[fmt]
        uri = f"{remote}/{path.relative_to(local).as_posix()}"
        got = evaluate(oracle, "retrieval", uri, fmt)
        _same(got, evaluate(oracle, "retrieval", str(path), fmt))
        assert got.metrics["i2t_R@1"] == 1.0 and got.missing_images == (fmt == "coco-captions")
    for fmt in ("dci", "urban1k", "sharegpt4v"):  # folders listed on S3, and an annotation list
        path = files[fmt]
        uri = f"{remote}/{path.relative_to(local).as_posix()}"
        got = evaluate(oracle, "long-retrieval", uri, fmt)
        _same(got, evaluate(oracle, "long-retrieval", str(path), fmt))
        assert got.n == 3 and got.missing_images == (fmt == "urban1k")
    # images elsewhere than the annotation file: --images points at another prefix
    coco = json.loads(files["coco-captions"].read_text())
    s3.client().put_object(Bucket=s3.bucket, Key="ann/captions.json", Body=json.dumps(coco).encode())
    moved = evaluate(oracle, "retrieval", s3.uri("ann/captions.json"), images=f"{remote}/imgs/")
    _same(moved, evaluate(oracle, "retrieval", str(files["coco-captions"])))


def test_finevit_dataset_and_coco_instances_on_s3(
    s3, tmp_path: Path, tiny_ckpt: TinyCkpt, capsys: pytest.CaptureFixture
) -> None:
    from train.model.encoder import load_encoder

    data = ingest_synthetic(tmp_path / "scenes", 6, 4, seed=7, size=64)
    remote = s3.upload_dir(data, "ds/scenes")
    enc = load_encoder(tiny_ckpt.run)
    for task, layer in (("retrieval", "gt-global"), ("boxcls", "gt-regions")):
        got = evaluate(enc, task, remote, "finevit", layers=[layer], templates="shapes", storage=s3.storage)
        _same(got, evaluate(enc, task, str(data), "finevit", layers=[layer], templates="shapes"))
        assert got.n == (6 if task == "retrieval" else got.n) and got.n > 0
    boxes = _coco_instances(tmp_path)
    remote_boxes = s3.upload_dir(tmp_path, "coco")  # instances.json + two.png (gone.png stays missing)
    got = evaluate(enc, "boxcls", f"{remote_boxes}/instances.json", storage=s3.storage)
    _same(got, evaluate(enc, "boxcls", str(boxes)))
    assert got.n == 2 and got.missing_images == 1

    # the CLI: endpoint by flag, keys by --set storage.* (nothing from the environment)
    out = tmp_path / "out"
    keys = ["storage.access_key_id=testing", "storage.secret_access_key=testing", "storage.region=us-east-1"]
    flags = ["--s3-endpoint-url", s3.endpoint, *(a for k in keys for a in ("--set", k))]
    argv = ["eval", str(tiny_ckpt.run), "--task", "retrieval", "--data", remote, "--format", "finevit"]
    assert finevit_cli([*argv, "--layer", "gt-global", "--out", str(out), *flags]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["task"] == "retrieval" and rows[0]["n"] == 6 and rows[0]["split"] == "gt-global"
    nope = ["eval", str(tiny_ckpt.run), "--task", "boxcls", "--data", s3.uri("coco/nope.json")]
    assert finevit_cli([*nope, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.json" in err[0] and "no such file" in err[0]
    bad_keys = [
        "--s3-endpoint-url",
        s3.endpoint,
        "--set",
        "storage.access_key_id=x",
        "--set",
        "storage.anon=true",
    ]
    assert finevit_cli([*argv, "--layer", "gt-global", *bad_keys]) == 2  # anonymous: moto says 403
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and s3.bucket in err[0], err
