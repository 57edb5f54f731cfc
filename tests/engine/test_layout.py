import pytest

from engine.layout import Dataset, LayoutError, check_layer_name, commit_parts, make_key, sample_digits


@pytest.mark.parametrize("sps", [1, 9, 10, 50, 100, 10_000, 12_345])
@pytest.mark.parametrize("shard, index", [(0, 0), (1, 5), (42, 7)])
def test_keys_match_img2dataset(sps, shard, index):
    from img2dataset.downloader import compute_key

    if index >= sps:
        index = sps - 1
    assert make_key(shard, index, sps) == compute_key(index, shard, sample_digits(sps), 5)


def test_architecture_example_key():
    assert make_key(1, 5, 10_000) == "000010005"
    assert "." not in make_key(123, 9999, 10_000)


def test_only_committed_shards_are_visible(tmp_path):
    ds = Dataset(str(tmp_path))
    ds.write_manifest({"samples_per_shard": 10, "shard_root": "shards", "sources": []})
    ds.shards.write_bytes("00000.tar", b"t")
    ds.shards.write_bytes("00001.tar", b"t")  # in progress: no stats
    src = tmp_path / "p"
    src.write_bytes(b"p")
    commit_parts(ds.shards, {"00000.parquet": str(src)}, "00000_stats.json", {"count": 1, "successes": 1})
    assert ds.committed_shards() == ["00000"]
    assert ds.summary()["count"] == 1


def test_manifest_errors(tmp_path):
    ds = Dataset(str(tmp_path / "none"))
    with pytest.raises(LayoutError, match="dataset.json not found"):
        ds.manifest  # noqa: B018
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "dataset.json").write_text('{"layout_version": 99}')
    with pytest.raises(LayoutError, match="layout_version 99"):
        Dataset(str(tmp_path / "v")).manifest  # noqa: B018


@pytest.mark.parametrize("bad", ["", "../x", "a/b", ".hidden", "sp ace"])
def test_layer_names_are_checked(bad):
    with pytest.raises(LayoutError):
        check_layer_name(bad)
    assert check_layer_name("recap-qwen2.5vl-72b-v2")
