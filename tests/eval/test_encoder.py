"""train/model/encoder.py: loads what the trainer saved, embeds as the training model does, round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tests.eval.conftest import TinyCkpt, save_stage1_checkpoint
from train.model.encoder import EncoderError, FineViTEncoder, load_encoder


def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    sizes = [(64, 48), (100, 30), (20, 90)]
    return [
        Image.fromarray(torch.randint(0, 255, (h, w, 3), generator=g, dtype=torch.uint8).numpy())
        for w, h in sizes
    ]


def test_loads_trainer_checkpoint_and_matches_training_forward(tiny_ckpt: TinyCkpt) -> None:
    from train.config import Stage1Config
    from train.data.loader import load_tokenizer, tokenize
    from train.data.naflex import grid_for, patchify
    from train.data.packing import assemble
    from train.model.towers import Stage1Model

    enc = load_encoder(tiny_ckpt.run)
    for other in (tiny_ckpt.run / "checkpoints", tiny_ckpt.run / "checkpoints" / "step_00000001"):
        assert torch.equal(load_encoder(other).vision.proj.weight, enc.vision.proj.weight)
    cfg = Stage1Config.model_validate(tiny_ckpt.config)
    torch.manual_seed(0)  # the fixture's init
    model = Stage1Model(cfg.model, len(load_tokenizer(str(tiny_ckpt.tokenizer)))).eval()
    assert torch.equal(model.vision.proj.weight, enc.vision.proj.weight)
    # the training forward on a packed step (several images per row) gives the same embeddings
    ims = _images()
    items = [patchify(im, grid_for(im.width, im.height, 8, 48), 8, (0.5,) * 3, (0.5,) * 3) for im in ims]
    batch, _ = assemble([items[:2], items[2:]], 96, 4, 3 * 64)
    texts = ["a red circle in the top left.", "two blue squares.", "the word STOP."]
    tokens, mask, _ = tokenize(load_tokenizer(str(tiny_ckpt.tokenizer)), texts, 64, 4)
    with torch.no_grad():
        img_ref, txt_ref, _, _ = model(batch, tokens, mask)
    assert torch.allclose(enc.encode_image(ims), img_ref[:3], atol=1e-5)
    assert torch.allclose(enc.encode_text(texts), txt_ref[:3], atol=1e-5)
    grids = enc.patch_features(ims)
    assert [tuple(g.shape[:2]) for g in grids] == [grid_for(im.width, im.height, 8, 48) for im in ims]


def test_exported_folder_round_trip_and_patch_budget(tiny_ckpt: TinyCkpt, tmp_path: Path) -> None:
    enc = load_encoder(tiny_ckpt.run)
    enc.save(tmp_path / "export")
    back = load_encoder(tmp_path / "export")
    ims = _images()
    assert torch.equal(back.encode_image(ims), enc.encode_image(ims))
    assert torch.equal(back.encode_text(["a cat"]), enc.encode_text(["a cat"]))
    small = load_encoder(tmp_path / "export", max_patches=4)
    assert all(g.shape[0] * g.shape[1] <= 4 for g in small.patch_features(ims))
    assert small.settings()["max_patches"] == 4


def test_run_config_missing_or_given(tokenizer_dir: Path, tmp_path: Path) -> None:
    ck = save_stage1_checkpoint(tmp_path / "run", tokenizer_dir, write_config=False)
    with pytest.raises(EncoderError, match="--config"):
        load_encoder(ck.run)
    (tmp_path / "recipe.yaml").write_text("model: {embed_dim: 32}\n")
    sets = [f"model.{t}.{k}={v}" for t in ("vision", "text") for k, v in ck.config["model"][t].items()]
    enc = load_encoder(ck.run, tmp_path / "recipe.yaml", [*sets, f"data.tokenizer={tokenizer_dir}"])
    assert enc.has_text and enc.preprocess.max_patches == 256  # the recipe's default budget
    with pytest.raises(EncoderError, match="not a FineViT encoder"):
        load_encoder(tmp_path)


def test_vision_only_encoder_fails_clearly_for_text(tiny_ckpt: TinyCkpt, tmp_path: Path) -> None:
    enc = load_encoder(tiny_ckpt.run)
    vision_sd = {k: v for k, v in enc.state_dict().items() if k.startswith("vision.")}
    vonly = FineViTEncoder(enc.model_cfg, vision_sd, enc.preprocess, tokenizer=None)
    vonly.save(tmp_path / "vonly")
    back = load_encoder(tmp_path / "vonly")
    assert not back.has_text
    assert torch.equal(back.encode_image(_images()), enc.encode_image(_images()))
    with pytest.raises(EncoderError, match="needs a text tower"):
        back.encode_text(["a cat"])


def test_a_recipe_with_dataset_normalization_keeps_the_runs_statistics(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    """`finevit eval RUN --config RECIPE`: the recipe's placeholder mean/std must not replace the
    statistics the run measured (that silently fed the encoder differently normalized pixels)."""
    ck = save_stage1_checkpoint(tmp_path / "run", tokenizer_dir)
    measured = {"normalize": "dataset", "mean": [0.9, 0.8, 0.7], "std": [0.1, 0.2, 0.3]}
    (ck.run / "config.yaml").write_text(
        yaml.safe_dump({**ck.config, "data": {**ck.config["data"], **measured}})
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**ck.config, "data": {**ck.config["data"], "normalize": "dataset"}}))
    enc = load_encoder(ck.run, recipe)
    assert enc.preprocess.mean == (0.9, 0.8, 0.7) and enc.preprocess.std == (0.1, 0.2, 0.3)
    explicit = load_encoder(ck.run, recipe, ["data.mean=[0.5,0.5,0.5]"])
    assert explicit.preprocess.mean == (0.5, 0.5, 0.5)
    (ck.run / "config.yaml").unlink()
    with pytest.raises(EncoderError, match="data.normalize=dataset"):
        load_encoder(ck.run, recipe)
