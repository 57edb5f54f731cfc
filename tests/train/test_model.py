"""NaFlex grids, RoPE, packing, and the packed model: an image's embedding does not depend on its neighbours."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from train.config import ModelConfig, TextConfig, VisionConfig
from train.data.naflex import grid_for, patchify
from train.data.packing import assemble, plan_rows
from train.model.rope import apply_rope, rope_1d, rope_2d
from train.model.towers import Stage1Model

MEAN = STD = (0.5, 0.5, 0.5)


@pytest.mark.parametrize(
    "w,h,budget", [(1024, 512, 256), (4000, 3000, 256), (64, 1000, 64), (128, 128, 1024), (7, 5, 16)]
)
def test_grid_fits_budget_keeps_aspect_never_upscales(w: int, h: int, budget: int) -> None:
    gh, gw = grid_for(w, h, 16, budget)
    assert 1 <= gh * gw <= budget
    assert gh * 16 <= max(h, 16) and gw * 16 <= max(w, 16)
    if gh > 2 and gw > 2:
        assert abs((gw / gh) / (w / h) - 1) < 0.25
    # the largest grid: one more row or column at the same scale would not fit
    if w * h > budget * 256:
        assert gh * gw > 0.8 * budget


@pytest.mark.parametrize("w,h", [(128, 128), (128, 64), (72, 128), (20, 10)])
def test_upscale_fills_the_budget_with_a_small_image(w: int, h: int) -> None:
    """``upscale`` (stage 2's progressive resolution): a small image is scaled up until its grid
    nearly fills the budget, aspect kept; without it the grid stops at the source's size."""
    gh, gw = grid_for(w, h, 16, 256, upscale=True)
    assert 0.85 * 256 <= gh * gw <= 256, (gh, gw)
    assert abs((gw / gh) / (w / h) - 1) < 0.1
    native = grid_for(w, h, 16, 256)
    assert native[0] <= max(h // 16, 1) and native[1] <= max(w // 16, 1)
    assert grid_for(4000, 3000, 16, 256, upscale=True) == grid_for(4000, 3000, 16, 256)  # large: as before


def test_patchify_shapes_and_positions() -> None:
    im = Image.new("RGB", (96, 64), (255, 0, 0))
    patches_NP, pos_N2 = patchify(im, (2, 3), 16, MEAN, STD)
    assert patches_NP.shape == (6, 768) and pos_N2.tolist() == [
        [0, 0],
        [0, 1],
        [0, 2],
        [1, 0],
        [1, 1],
        [1, 2],
    ]
    assert torch.allclose(patches_NP.view(6, 16, 16, 3)[..., 0], torch.ones(6, 16, 16))


def test_rope_scores_depend_only_on_relative_position() -> None:
    q, k = torch.randn(1, 1, 8), torch.randn(1, 1, 8)

    def score(pq: list[int], pk: list[int]) -> float:
        cq, sq = rope_2d(torch.tensor([pq]), 8)
        ck, sk = rope_2d(torch.tensor([pk]), 8)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    assert score([3, 5], [1, 2]) == pytest.approx(score([13, 25], [11, 22]), abs=1e-4)
    assert score([3, 5], [1, 2]) != pytest.approx(score([3, 5], [2, 2]), abs=1e-4)
    c, s = rope_1d(torch.arange(4), 8)
    assert torch.allclose(c[0], torch.ones(4)) and torch.allclose(s[0], torch.zeros(4))


def test_plan_rows_best_fit() -> None:
    stream = iter([100, 60, 40, 90, 10, 30, 200, 56] * 4)
    pool: list[int] = []

    def refill() -> None:
        while len(pool) < 6:
            pool.append(next(stream))

    rows = plan_rows(pool, lambda n: n, refill, rows=2, seq_len=256, max_images=32)
    assert all(sum(r) <= 256 for r in rows)
    assert sum(map(sum, rows)) / 512 > 0.97


def _model(pool: str = "mean") -> Stage1Model:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vision=VisionConfig(width=32, depth=2, heads=2, patch_size=8),
        text=TextConfig(width=32, depth=1, heads=2, context=16, pool=pool),
        embed_dim=16,
    )
    return Stage1Model(cfg, 50).eval()


def _img(w: int, h: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    return patchify(Image.fromarray(arr), grid_for(w, h, 8, 64), 8, MEAN, STD)


def test_packed_embedding_equals_alone() -> None:
    model = _model()
    a, b, c = _img(64, 32, 1), _img(24, 48, 2), _img(40, 40, 3)
    tokens = torch.randint(4, 50, (4, 16))
    mask = torch.ones(4, 16, dtype=torch.bool)
    packed, _ = assemble([[a, b], [c]], 64, 4, 192)
    alone, _ = assemble([[b]], 64, 4, 192)
    with torch.no_grad():
        img_packed, txt, _, _ = model(packed, tokens, mask)
        img_alone, *_ = model(alone, tokens, mask)
    torch.testing.assert_close(img_packed[1], img_alone[0], atol=1e-5, rtol=1e-4)
    assert torch.isfinite(img_packed).all() and torch.isfinite(txt).all()
    assert img_packed[3].abs().sum() == 0  # an empty slot pools to zero


@pytest.mark.parametrize("pool", ["mean", "map"])
def test_text_padding_does_not_change_embedding(pool: str) -> None:
    model = _model(pool)
    tokens = torch.randint(4, 50, (2, 16))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :7] = True
    tokens2 = tokens.clone()
    tokens2[:, 7:] = 0
    alone, _ = assemble([[_img(16, 16, 0)]], 64, 2, 192)
    with torch.no_grad():
        _, t1, _, _ = model(alone, tokens, mask)
        _, t2, _, _ = model(alone, tokens2, mask)
        _, t3, _, _ = model(alone, tokens[:, :7], mask[:, :7])  # trimmed to the caption
    torch.testing.assert_close(t1, t2)
    torch.testing.assert_close(t1, t3, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(t1[0], t1[1])


def test_activation_checkpointing_same_gradients() -> None:
    model = _model().train()
    batch, _ = assemble([[_img(64, 32, 1), _img(24, 48, 2)]], 64, 2, 192)
    tokens, mask = torch.randint(4, 50, (2, 16)), torch.ones(2, 16, dtype=torch.bool)

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        img, txt, _, _ = model(batch, tokens, mask)
        (img @ txt.T).sum().backward()
        return [p.grad.clone() for p in model.vision.blocks.parameters()]

    g0 = grads()
    model.set_checkpointing(True)
    g1 = grads()
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b)
