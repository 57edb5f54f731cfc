"""What the stage-2 projector reads: ``projector.feature_layers`` (LLaVA's vision_feature_layer)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.train.test_stage2_optim import LM, tiny_vlm
from train.config import ModelConfig
from train.model.vlm import FineViTVLMConfig, FineViTVLMForConditionalGeneration, pack_padded, vision_tokens


def test_feature_layers_concatenate_the_chosen_blocks() -> None:
    model = tiny_vlm().eval()
    tower = model.vision
    C = tower.cfg.width
    p = tower.cfg.patch_size
    vision, _ = pack_padded(torch.randn(1, 16, 3 * p * p), torch.tensor([[4, 4]]))
    with torch.no_grad():
        last = vision_tokens(tower, vision)
        both = vision_tokens(tower, vision, [0, -1])
        embed = tower.norm_pre(tower.patch_embed(vision.patches_TP))
        one = vision_tokens(tower, vision, [1])
    assert both.shape == (last.shape[0], 2 * C)
    torch.testing.assert_close(both[:, C:], last)
    torch.testing.assert_close(both[:, :C], F.layer_norm(embed, (C,)))
    assert not torch.allclose(one, both[:, :C]) and not torch.allclose(one, last)
    with pytest.raises(ValueError, match="feature layers"):
        vision_tokens(tower, vision, [len(tower.blocks) + 1])


def test_the_projector_is_sized_for_the_layers_it_reads() -> None:
    vision = ModelConfig.model_validate(tiny_vlm().config.vision).model_dump(mode="json")
    cfg = FineViTVLMConfig(
        vision=vision, lm_config=dict(LM), image_token_id=39, vision_feature_layers=[0, 1, -1]
    )
    model = FineViTVLMForConditionalGeneration(cfg)
    C = model.vision.cfg.width
    assert model.projector.fc1.in_features == 3 * C * 4  # three layers, 2x2 merge
    p = model.vision.cfg.patch_size
    vb, spans = pack_padded(torch.randn(1, 16, 3 * p * p), torch.tensor([[4, 4]]))
    assert model.image_embeds(vb, spans).shape == (4, LM["hidden_size"])


def test_a_layer_the_encoder_does_not_have_stops_at_start_up() -> None:
    from engine.config import ConfigError
    from train.stage2 import Stage2Config, check_fits

    cfg = Stage2Config.model_validate(
        {
            "data": {"dataset": "d"},
            "init": {"checkpoint": "c"},
            "lm": {"path": "l"},
            "projector": {"feature_layers": [0, 99]},
        }
    )
    with pytest.raises(ConfigError, match=r"projector.feature_layers \[99\]"):
        check_fits(cfg)
    check_fits(
        cfg.model_copy(update={"projector": cfg.projector.model_copy(update={"feature_layers": [0, -1]})})
    )


@pytest.mark.parametrize("abs_pos", [False, True])
def test_abs_pos_tells_the_lm_where_each_token_sits(abs_pos: bool) -> None:
    """A flat image gives the same token everywhere unless the projector adds its place."""
    from train.model.projector import PatchMerger

    torch.manual_seed(0)
    merger = PatchMerger(8, 16, abs_pos=abs_pos)
    tokens = merger(torch.ones(6, 4, 8))  # a 3x2 merged grid of one repeated feature
    distinct = torch.cdist(tokens, tokens)[~torch.eye(6, dtype=torch.bool)].min()
    assert (distinct > 1e-3) == abs_pos
