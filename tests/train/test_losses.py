"""Losses: the formulas, padding invariance, and distributed == single process (2 gloo ranks)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from train.losses import sigmoid_loss, softmax_loss


def _feats(n: int, e: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1),
        F.normalize(torch.randn(n, e, generator=g, dtype=torch.float64), dim=-1),
    )


def test_sigmoid_matches_formula_and_ignores_padding() -> None:
    img, txt = _feats(5)
    scale, bias = torch.tensor(2.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    logits = img @ txt.T * scale.exp() + bias
    labels = 2 * torch.eye(5, dtype=torch.float64) - 1
    expected = -F.logsigmoid(labels * logits).sum() / 5
    _, value = sigmoid_loss(img, txt, torch.ones(5, dtype=torch.bool), scale, bias)
    torch.testing.assert_close(value, expected)
    pad_img = torch.cat([img, torch.randn(3, 8, dtype=torch.float64)])
    pad_txt = torch.cat([txt, torch.full((3, 8), float("nan"), dtype=torch.float64)])
    valid = torch.tensor([1] * 5 + [0] * 3, dtype=torch.bool)
    loss, value2 = sigmoid_loss(pad_img, pad_txt, valid, scale, bias)
    torch.testing.assert_close(value2, expected)
    assert torch.isfinite(loss)


def test_softmax_matches_clip() -> None:
    img, txt = _feats(6)
    scale = torch.tensor(1.5, dtype=torch.float64)
    logits = img @ txt.T * scale.exp()
    t = torch.arange(6)
    expected = (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2
    valid = torch.tensor([1] * 6 + [0] * 2, dtype=torch.bool)
    _, value = softmax_loss(
        torch.cat([img, torch.zeros(2, 8, dtype=torch.float64)]),
        torch.cat([txt, torch.zeros(2, 8, dtype=torch.float64)]),
        valid,
        scale,
    )
    torch.testing.assert_close(value, expected)


# ------------------------------------------------------------------ 2 ranks (gloo) vs 1 process

SLOTS, E = 5, 8
PER_RANK = [3, 5]  # images per rank differ: padding + masks


def _global_batch():
    img, txt = _feats(sum(PER_RANK), E, seed=1)
    return img.float(), txt.float()


def _run_loss(kind: str, img, txt, valid, scale, bias):
    if kind == "softmax":
        return softmax_loss(img, txt, valid, scale)
    return sigmoid_loss(img, txt, valid, scale, bias, mode=kind.split(":")[1])


def _rank_main(r: int, port: int, kind: str, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=r, world_size=2)
    img_all, txt_all = _global_batch()
    lo = sum(PER_RANK[:r])
    n = PER_RANK[r]
    img = torch.zeros(SLOTS, E)
    txt = torch.zeros(SLOTS, E)
    img[:n], txt[:n] = img_all[lo : lo + n], txt_all[lo : lo + n]
    img.requires_grad_()
    txt.requires_grad_()
    valid = torch.arange(SLOTS) < n
    scale = torch.tensor(1.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    loss, value = _run_loss(kind, img, txt, valid, scale, bias)
    loss.backward()
    # DDP would average parameter grads: do the same for the shared scalars
    sgrad = scale.grad.clone()
    dist.all_reduce(sgrad)
    # each rank backpropagates W x its share (DDP divides by W): feature grads are W x the global ones
    out[r] = {
        "value": float(value),
        "img_grad": img.grad[:n] / 2,
        "txt_grad": txt.grad[:n] / 2,
        "scale_grad": float(sgrad) / 2,
    }
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sigmoid:all_gather", "sigmoid:ring", "softmax"])
def test_distributed_equals_single_process(kind: str) -> None:
    img_all, txt_all = _global_batch()
    img, txt = img_all.clone().requires_grad_(), txt_all.clone().requires_grad_()
    scale = torch.tensor(1.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    loss, value = _run_loss(kind, img, txt, torch.ones(len(img), dtype=torch.bool), scale, bias)
    loss.backward()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.start_processes(_rank_main, args=(port, kind, out), nprocs=2, start_method="spawn")
    for r in range(2):
        assert out[r]["value"] == pytest.approx(float(value), rel=1e-5)
        assert out[r]["scale_grad"] == pytest.approx(float(scale.grad), rel=1e-4)
    torch.testing.assert_close(
        torch.cat([out[0]["img_grad"], out[1]["img_grad"]]), img.grad, atol=1e-6, rtol=1e-4
    )
    torch.testing.assert_close(
        torch.cat([out[0]["txt_grad"], out[1]["txt_grad"]]), txt.grad, atol=1e-6, rtol=1e-4
    )
