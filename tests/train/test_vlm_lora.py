"""LoRA on the stage-2 LM (peft), on a tiny VLM built from configs (no run): in the LM phases only the
adapters, the projector (and the vision tower in ``all``) train; the LM's own weights stay
bit-identical; merging the adapters gives the adapted model's logits with a plain LM."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.train.test_stage2_optim import IMAGE_ID, TINY_MODEL, tiny_vlm
from train.model.vlm import pack_padded
from train.stage2 import LoRAConfig, Stage2Optim, add_lora, merge_lora, param_groups, set_phase


def batch() -> dict:
    p = TINY_MODEL["vision"]["patch_size"]
    torch.manual_seed(1)
    vision, spans = pack_padded(torch.randn(1, 16, 3 * p * p), torch.tensor([[4, 4]]))
    ids = torch.tensor([[1] + [IMAGE_ID] * 4 + [5, 6, 7, 8, 2]])  # 4x4 patches -> 4 merged tokens
    return {"input_ids": ids, "vision": vision, "spans": spans}


def lora_vlm():
    model = tiny_vlm()
    add_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    return model


def base_lm_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.language_model.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize(("phase", "trains"), [("lm", {"projector"}), ("all", {"projector", "vision"})])
def test_lora_phases_train_adapters_and_leave_the_lm_bit_identical(phase: str, trains: set[str]) -> None:
    model = lora_vlm()
    set_phase(model, phase)
    base = base_lm_weights(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    o = Stage2Optim(lr=1e-2, weight_decay=0.1)
    optim = torch.optim.AdamW(param_groups(model, o), lr=o.lr)
    for _ in range(2):  # the second step moves lora_A too (B is zero at the first)
        b = batch()
        optim.zero_grad()
        model(**b, labels=b["input_ids"]).loss.backward()
        optim.step()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert grads == moved
    lm_moved = {n for n in moved if n.startswith("language_model.")}
    assert lm_moved and all("lora_A" in n or "lora_B" in n for n in lm_moved), lm_moved
    assert {n.split(".")[0] for n in moved - lm_moved} == trains
    for n, p in model.language_model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n]), f"{n}: the LM's own weight moved under LoRA"
    # frozen phases leave the adapters alone
    set_phase(model, "encoder")
    assert not any(p.requires_grad for p in model.language_model.parameters())


def test_merged_adapters_give_the_adapted_logits_with_a_plain_lm() -> None:
    model = lora_vlm()
    set_phase(model, "lm")
    optim = torch.optim.AdamW(param_groups(model, Stage2Optim(lr=5e-2)), lr=5e-2)
    for _ in range(3):
        b = batch()
        optim.zero_grad()
        model(**b, labels=b["input_ids"]).loss.backward()
        optim.step()
    model.eval()
    with torch.no_grad():
        adapted = model(**batch()).logits
        merged_model = merge_lora(copy.deepcopy(model))
        merged = merged_model(**batch()).logits
        model.language_model.disable_adapter_layers()
        base = model(**batch()).logits
    assert type(merged_model.language_model).__name__ == "LlamaForCausalLM"
    assert not any("lora_" in k for k in merged_model.state_dict())
    assert (adapted - base).abs().max() > 1e-3  # the adapters did something
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_unknown_target_module_is_a_clear_error() -> None:
    from engine.config import ConfigError

    with pytest.raises(ConfigError, match=r"lm.lora.target_modules \['c_attn'\]"):
        add_lora(tiny_vlm(), LoRAConfig(r=2, target_modules=["q_proj", "c_attn"]))
