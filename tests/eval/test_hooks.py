"""eval.hooks.periodic_eval on a live stage-1 model: flat scalars, train mode restored, weights shared."""

from __future__ import annotations

from pathlib import Path

import torch

from eval.hooks import periodic_eval
from tests.eval.conftest import TinyCkpt
from train.model.encoder import encoder_from_model, load_encoder


def test_periodic_eval_on_live_model(tiny_ckpt: TinyCkpt, tmp_path: Path) -> None:
    from PIL import Image

    from train.config import Stage1Config
    from train.data.loader import load_tokenizer
    from train.model.towers import Stage1Model

    cfg = Stage1Config.model_validate(tiny_ckpt.config)
    tok = load_tokenizer(str(tiny_ckpt.tokenizer))
    torch.manual_seed(0)
    model = Stage1Model(cfg.model, len(tok)).train()
    enc = encoder_from_model(model, cfg, tok)
    assert enc.vision is model.vision and enc.text is model.text
    im = [Image.new("RGB", (30, 20), (200, 0, 0))]
    assert torch.allclose(enc.encode_image(im), load_encoder(tiny_ckpt.run).encode_image(im), atol=1e-6)
    for c in ("red", "blue"):
        (tmp_path / "zs" / c).mkdir(parents=True)
        Image.new("RGB", (30, 20), (200, 0, 0) if c == "red" else (0, 0, 200)).save(
            tmp_path / "zs" / c / "a.png"
        )
    hook = {
        "finegrained": "synthetic://scenes?n=3&seed=1000&size=64",
        "negatives": 1,
        "zeroshot": str(tmp_path / "zs"),
    }
    out = periodic_eval(enc, hook, step=5)
    assert model.training and model.vision.training  # back to training
    assert {"eval/finegrained/t2i_mean", "eval/finegrained/colour_t2i", "eval/zeroshot/top1"} <= set(out)
    assert all(isinstance(v, float) for v in out.values())
