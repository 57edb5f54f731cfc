import pytest

from engine.config import ConfigError, FineVitConfig, load_config


def test_defaults_suit_native_resolution():
    cfg = FineVitConfig()
    assert cfg.ingest.samples_per_shard == 10_000
    assert cfg.ingest.image.resize_mode == "keep_ratio_largest"
    assert cfg.ingest.image.image_size == 1024
    assert cfg.ingest.image.resize_only_if_bigger is True
    assert cfg.ingest.allow_private_network is False


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("ingest:\n  samples_per_shard: 50\n  image:\n    image_size: 512\n")
    cfg = load_config(p, ["ingest.image.encode_format=png", "ray.num_cpus=2"])
    assert cfg.ingest.samples_per_shard == 50
    assert cfg.ingest.image.image_size == 512
    assert cfg.ingest.image.encode_format == "png"
    assert cfg.ray.num_cpus == 2


@pytest.mark.parametrize(
    "override, field",
    [
        ("ingest.samples_per_shard=0", "ingest.samples_per_shard"),
        ("ingest.image.resize_mode=stretch", "ingest.image.resize_mode"),
        ("ingest.sampels_per_shard=5", "ingest.sampels_per_shard"),
        ("ingest.timeout=abc", "ingest.timeout"),
    ],
)
def test_bad_field_is_named(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["justakey"])


def test_recipes_in_configs_validate():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert recipes, "configs/ holds at least one recipe"
    for r in recipes:
        if r.name.startswith(("ingest", "default")):
            load_config(r)
