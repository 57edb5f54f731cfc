"""Every recipe in configs/ validates with its typed config; the stage-2 GPU recipes state their LM
(architecture and parameter count, checked on the meta device), start from a stage-1 recipe whose
encoder they match, and name LoRA targets the LM has."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.config import load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STAGE2_GPU = sorted(p for p in CONFIGS.glob("stage2_*.yaml") if "cpu" not in p.name)


def config_class(name: str):
    from engine.config import FineVitConfig
    from train.config import Stage1Config
    from train.stage2 import Stage2Config

    kinds = {
        ("stage1_", "demo_stage1"): Stage1Config,
        ("stage2_", "demo_stage2", "demo_captioner"): Stage2Config,
        ("ingest_", "default"): FineVitConfig,
    }
    return next((cls for prefixes, cls in kinds.items() if name.startswith(prefixes)), None)


@pytest.mark.parametrize("recipe", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_recipe_validates_with_its_config(recipe: str) -> None:
    cls = config_class(recipe)
    assert cls is not None, f"configs/{recipe}: which config does it follow? (add its prefix here)"
    load_config(CONFIGS / recipe, [], cls)  # raises ConfigError naming the bad field


def test_there_are_gpu_recipes_for_stage2() -> None:
    assert len(STAGE2_GPU) >= 2, STAGE2_GPU


@pytest.mark.parametrize("path", STAGE2_GPU, ids=lambda p: p.name)
def test_stage2_gpu_recipe_states_its_lm_and_matches_its_stage1_encoder(path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from train.config import Stage1Config
    from train.stage2 import Stage2Config, check_fits

    header = path.read_text()
    cfg = load_config(path, ["data.dataset=x", "init.checkpoint=y", "lm.path=z"], Stage2Config)
    check_fits(cfg)
    assert f"--config configs/{path.name}" in header
    assert cfg.loop.dtype == "auto" and cfg.data.pack and cfg.lm.lora.r > 0
    assert cfg.model.attention == "auto" and cfg.lm.attention == "auto"  # the flash rungs of the ladders
    # the encoder is a stage-1 recipe's, so its checkpoint loads (stage 2 checks shapes at start-up)
    stage1 = re.search(r"configs/(stage1_\w+)\.yaml", header)
    assert stage1, f"{path.name}: the header should name the stage-1 recipe it starts from"
    s1 = load_config(CONFIGS / f"{stage1[1]}.yaml", ["data.dataset=x", "data.tokenizer=y"], Stage1Config)
    assert s1.model.vision == cfg.model.vision, (stage1[1], s1.model.vision, cfg.model.vision)
    # the LM the header states: built on the meta device, its parameter count and LoRA targets
    m = re.search(
        r"# lm: (\S+) \((\w+): hidden (\d+), (\d+) layers, (\d+) heads, (\d+) kv heads, "
        r"intermediate (\d+), vocab (\d+), (tied|untied)\) = ([\d.]+)M params",
        header,
    )
    assert m, f"{path.name}: the header should state '# lm: NAME (arch: hidden ..., ...) = <n>M params'"
    hidden, layers, heads, kv, inter, vocab = (int(x) for x in m.group(3, 4, 5, 6, 7, 8))
    lm_cfg = AutoConfig.for_model(
        m[2],
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        tie_word_embeddings=m[9] == "tied",
    )
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(lm_cfg)
    assert round(sum(p.numel() for p in lm.parameters()) / 1e6, 2) == float(m[10])
    linear = {n.rsplit(".", 1)[-1] for n, mod in lm.named_modules() if isinstance(mod, torch.nn.Linear)}
    assert set(cfg.lm.lora.target_modules) <= linear, (cfg.lm.lora.target_modules, linear)
    assert cfg.data.max_len <= lm_cfg.max_position_embeddings
