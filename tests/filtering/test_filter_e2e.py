"""``finevit filter`` end to end on a dataset with planted bad cases, locally and on S3.

Each planted case is dropped with its filter's reason, every clean row is kept, a rerun
changes nothing, a shard that the caption layer lacks is skipped with a reason, the audit
report shows the layer, and the stage-1 loader skips exactly the dropped rows.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest

from engine.layout import Dataset
from filtering.base import reason_filter
from finevit import cli
from tests.filtering.conftest import PLANTED, key_to_file, read_filter_layer, write_caption_layer

pytestmark = pytest.mark.slow


def _filter(root: str, *extra: str) -> int:
    return cli.main(["filter", root, "--layer", "flt", "--on", "recap", "--no-progress", *extra])


def check_planted(root: str, storage=None) -> dict[str, dict]:
    """Every planted case dropped with its filter's reason, every other row kept."""
    k2f = key_to_file(root, storage)
    layer = read_filter_layer(root, "flt", storage)
    assert set(layer) == set(k2f)  # one row per sample, each once
    for key, row in layer.items():
        i = k2f[key]
        if i in PLANTED:
            want = PLANTED[i][1]
            assert not row["keep"], (i, PLANTED[i], row)
            assert want in [reason_filter(r) for r in row["reasons"]], (i, PLANTED[i], row["reasons"])
        else:
            assert row["keep"] and row["reasons"] == [], (i, row["reasons"])
    return layer


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("flt", "phash-*", "minhash-*"))
    return dst


def test_filter_drops_planted_cases_with_their_reasons(planted, ray_local, tmp_path, capsys) -> None:
    root = _copy(planted.root, tmp_path / "ds")
    assert _filter(str(root)) == 0
    layer = check_planted(str(root))
    ds = Dataset(str(root))
    lay = ds.layer("flt")
    # per-filter counters in each shard's marker add up to the layer's rows
    total: Counter = Counter()
    for shard in lay.committed():
        st = json.loads((root / "layers" / "flt" / f"{shard}_stats.json").read_text())
        assert st["kept"] + st["dropped"] == st["count"]
        for name, c in st["filters"].items():
            total[name] += c["dropped"]
    dropped = Counter(reason_filter(r) for row in layer.values() for r in row["reasons"])
    assert total == +dropped
    info = json.loads((root / "layers" / "flt" / "layer.json").read_text())
    assert info["kind"] == "filter" and info["on"]["caption"] == "recap"
    # signatures are layers of their own, computed once
    sig = sorted(p.name for p in (root / "layers").iterdir() if p.name.startswith(("phash", "minhash")))
    assert len(sig) == 2 and all(len(ds.layer(n).committed()) == 4 for n in sig)
    mtimes = {p: p.stat().st_mtime for p in (root / "layers").rglob("*.parquet")}
    capsys.readouterr()
    # a rerun: every shard already committed, nothing rewritten
    assert _filter(str(root)) == 0
    assert "4 already committed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime for p in (root / "layers").rglob("*.parquet")} == mtimes
    # a second filter layer reuses the signature layers
    assert cli.main(["filter", str(root), "--layer", "flt2", "--on", "recap", "--no-progress"]) == 0
    assert {
        p: p.stat().st_mtime for p in (root / "layers").rglob("*.parquet") if "flt2" not in str(p)
    } == mtimes

    # the audit report shows the filter layer: keep rate and reasons
    out = tmp_path / "report"
    assert cli.main(["audit", str(root), "--report", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "does not match" not in md  # the signature layers are a kind the audit knows
    assert "filter layer flt" in md and "refusal: refusal" in md and "near_dup_caption: near-duplicate" in md

    # stage 1's loader (data.filters: [flt]) skips exactly the rows the layer drops
    from train.config import CaptionSource, DataConfig
    from train.data.loader import ShardReader

    data = DataConfig(dataset=str(root), captions=[CaptionSource(source="recap")], filters=["flt"])
    stats: Counter = Counter()
    reader = ShardReader(ds, data, 16, stats)
    seen = set()
    for shard in ds.committed_shards():
        seen |= set(reader.metadata(shard))
    assert seen == {k for k, r in layer.items() if r["keep"]}
    n_failed_images = sum(
        1 for i in key_to_file(str(root)).values() if PLANTED.get(i, ("", ""))[1] == "image_status"
    )
    assert stats["dropped_filter"] == sum(1 for r in layer.values() if not r["keep"]) - n_failed_images
    assert stats["dropped_failed"] == n_failed_images


def test_missing_layer_shard_is_skipped_with_a_reason(planted, ray_local, tmp_path, capsys) -> None:
    root = _copy(planted.root, tmp_path / "ds")
    shutil.rmtree(root / "layers" / "recap")
    write_caption_layer(str(root), skip_shards=("00003",))
    assert _filter(str(root)) == 0
    cap = capsys.readouterr()
    assert "skipped shard 00003: layer 'recap' has not committed this shard" in cap.err
    assert Dataset(str(root)).layer("flt").committed() == ["00000", "00001", "00002"]


def test_bad_on_layer_and_bad_config_exit_2(planted, tmp_path, capsys) -> None:
    root = _copy(planted.root, tmp_path / "ds")
    assert cli.main(["filter", str(root), "--layer", "x", "--on", "nope", "--no-progress"]) == 2
    assert "layer 'nope' has no committed shards" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("- type: refusal\n  windw: 3\n")
    assert cli.main(["filter", str(root), "--layer", "x", "--on", "recap", "--config", str(bad)]) == 2
    assert "filter.filters.0.refusal.windw: Extra inputs are not permitted" in capsys.readouterr().err
    regions = tmp_path / "regions.yaml"
    regions.write_text("- type: regions\n")
    assert cli.main(["filter", str(root), "--layer", "x", "--on", "recap", "--config", str(regions)]) == 2
    assert "filter 'regions' reads regions: give a region layer with --on" in capsys.readouterr().err
    assert not (root / "layers" / "x").exists()


@pytest.mark.s3
def test_filter_on_s3(planted, ray_local, s3, tmp_path, monkeypatch) -> None:
    local = _copy(planted.root, tmp_path / "ds")
    uri = s3.upload_dir(local, "ds")
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    assert _filter(uri) == 0
    check_planted(uri, s3.storage)


def _write_region_layer(root: str) -> dict[int, list[dict]]:
    """Layer ``boxes``: the scenes' true boxes, with an invalid box added to file 0, only invalid
    boxes for file 1 and 30 boxes for file 2. Returns file index -> regions."""
    import time

    import pyarrow.parquet as pq

    from engine.layers import write_layer_shard
    from engine.schemas import REGION_SCHEMA
    from engine.synthetic import make_scene, region_annotations
    from tests.filtering.conftest import N_SCENES, SEED, SIZE, file_index

    ds = Dataset(root)
    layer = ds.layer("boxes")
    layer.write_info({"kind": "regions", "stage": "recaption"})
    bad = {"x0": 0.8, "y0": 0.1, "x1": 0.2, "y1": 0.5, "caption": "backwards", "label": "circle"}
    by_file = {}
    for shard in ds.committed_shards():
        with ds.shards.open(f"{shard}.parquet") as f:
            meta = pq.read_table(f, columns=["key", "url"]).to_pylist()
        rows = []
        for m in meta:
            i = file_index(m["url"])
            regs = region_annotations(make_scene(SEED, i, SIZE)) if i < N_SCENES else []
            if i == 0:
                regs = [*regs, bad]
            elif i == 1:
                regs = [bad, bad]
            elif i == 2:
                regs = [{**bad, "x0": 0.01 * k, "x1": 0.01 * k + 0.3, "label": str(k)} for k in range(30)]
            by_file[i] = regs
            rows.append(
                {
                    "key": m["key"],
                    "regions": regs,
                    "model": "t",
                    "prompt_id": "p",
                    "status": "ok",
                    "error": None,
                }
            )
        with layer.store.staging(f"b-{shard}") as staging:
            write_layer_shard(layer, shard, rows, REGION_SCHEMA, staging, time.time())
    return by_file


def test_region_layer_filtered_per_box_and_per_image(planted, ray_local, tmp_path) -> None:
    root = _copy(planted.root, tmp_path / "ds")
    regions = _write_region_layer(str(root))
    cfg = tmp_path / "regions.yaml"
    cfg.write_text("- type: regions\n  max_boxes: 20\n  min_area: 0.0001\n")
    assert (
        cli.main(
            ["filter", str(root), "--layer", "rf", "--on", "boxes", "--config", str(cfg), "--no-progress"]
        )
        == 0
    )
    k2f = key_to_file(str(root))
    layer = {k: r for k, r in read_filter_layer(str(root), "rf").items()}
    for key, row in layer.items():
        i = k2f[key]
        if i == 0:
            assert row["keep"] and row["region_keep"] == [True] * (len(regions[0]) - 1) + [False]
        elif i == 1:
            assert row["reasons"] == ["regions: 0 usable boxes < 1 (invalid)"]
        elif i == 2:
            assert row["reasons"] == ["regions: 30 boxes > 20"]
        elif i < 26:
            assert row["keep"] and all(row["region_keep"]) and row["n_regions"] == len(regions[i]), (i, row)
        else:  # no boxes at all
            assert not row["keep"] and row["n_regions"] == 0
