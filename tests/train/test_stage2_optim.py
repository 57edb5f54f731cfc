"""Stage 2's schedule phases and per-part learning rates, on a tiny VLM built from configs (no run).

The vision tower trains at ``optim.vision_lr_mult`` of the LM's rate: at the full rate the demo's
captioner encoder collapsed (every patch token the same vector, so the LM could not tell images
apart). ``lm`` trains projector + LM with the vision tower frozen."""

from __future__ import annotations

import pytest
import torch

from tests.eval.conftest import TINY_MODEL
from train.config import ModelConfig
from train.model.vlm import FineViTVLMConfig, FineViTVLMForConditionalGeneration, pack_padded
from train.stage2 import Stage2Optim, param_groups, set_phase

LM = {
    "model_type": "llama",
    "vocab_size": 40,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
IMAGE_ID = 39


def tiny_vlm() -> FineViTVLMForConditionalGeneration:
    torch.manual_seed(0)
    vision = ModelConfig.model_validate(TINY_MODEL).model_dump(mode="json")
    cfg = FineViTVLMConfig(vision=vision, lm_config=dict(LM), image_token_id=IMAGE_ID)
    return FineViTVLMForConditionalGeneration(cfg)


def one_step(model: FineViTVLMForConditionalGeneration, phase: str, o: Stage2Optim) -> dict[str, float]:
    """One AdamW step on a random image + prompt; how far each part's weights moved (max abs)."""
    set_phase(model, phase)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optim = torch.optim.AdamW(param_groups(model, o), lr=o.lr)
    p = TINY_MODEL["vision"]["patch_size"]
    vision, spans = pack_padded(torch.randn(1, 16, 3 * p * p), torch.tensor([[4, 4]]))
    ids = torch.tensor([[1] + [IMAGE_ID] * 4 + [5, 6, 7, 8, 2]])  # 4x4 patches -> 4 merged tokens
    model(input_ids=ids, labels=ids, vision=vision, spans=spans).loss.backward()
    optim.step()
    moved: dict[str, float] = {}
    for n, q in model.named_parameters():
        part = n.split(".")[0] + (".head" if n.startswith(("vision.head.", "vision.proj.")) else "")
        moved[part] = max(moved.get(part, 0.0), float((q.detach() - before[n]).abs().max()))
    return moved


def test_each_part_trains_at_its_own_rate() -> None:
    model = tiny_vlm()
    o = Stage2Optim(lr=1e-2, weight_decay=0.0, vision_lr_mult=0.1, projector_lr_mult=1.0, lm_lr_mult=0.5)
    groups = param_groups(model, o)
    rate = {id(p): g["lr"] for g in groups for p in g["params"]}
    for n, p in model.named_parameters():
        if n.startswith(("vision.head.", "vision.proj.")):
            assert id(p) not in rate, f"{n}: stage 1's pooling head is not trained in stage 2"
            continue
        want = {"vision": 1e-3, "projector": 1e-2, "language_model": 5e-3}[n.split(".")[0]]
        assert rate[id(p)] == pytest.approx(want), n
    # AdamW's first step moves each weight by about its group's rate
    moved = one_step(model, "all", o)
    assert moved["vision"] == pytest.approx(1e-3, rel=0.05)
    assert moved["projector"] == pytest.approx(1e-2, rel=0.05)
    assert moved["language_model"] == pytest.approx(5e-3, rel=0.05)
    assert moved["vision.head"] == 0.0


@pytest.mark.parametrize(
    ("phase", "trains"),
    [
        ("projector", {"projector"}),
        ("encoder", {"projector", "vision"}),
        ("lm", {"projector", "language_model"}),
        ("all", {"projector", "vision", "language_model"}),
    ],
)
def test_phases_train_only_their_parts(phase: str, trains: set[str]) -> None:
    moved = one_step(tiny_vlm(), phase, Stage2Optim(lr=1e-2, weight_decay=0.0))
    assert {part for part, d in moved.items() if d > 0} == trains


def test_loss_reductions() -> None:
    """'token' is the LM's own loss; 'sample' and 'square' stop long targets drowning short ones."""
    from train.stage2 import lm_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 9, 11)
    labels = torch.full((2, 9), -100)
    labels[0, 1:9] = torch.randint(0, 11, (8,))  # a long target: 8 tokens
    labels[1, 7:9] = torch.randint(0, 11, (2,))  # a short one: 2 tokens
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="none"
    )
    ce = ce.view(2, 8)
    long, short = ce[0].sum(), ce[1, 6:].sum()
    hf = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(lm_loss(logits, labels, "token"), hf)
    torch.testing.assert_close(lm_loss(logits, labels, "token"), (long + short) / 10)
    torch.testing.assert_close(lm_loss(logits, labels, "sample"), (long / 8 + short / 2) / 2)
    w8, w2 = 8**-0.5, 2**-0.5
    torch.testing.assert_close(
        lm_loss(logits, labels, "square"), (long * w8 + short * w2) / (8 * w8 + 2 * w2)
    )
    # a sample without target tokens counts for nothing
    labels[1] = -100
    torch.testing.assert_close(lm_loss(logits, labels, "sample"), long / 8)
