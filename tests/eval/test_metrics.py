"""Metric code against hand-computed cases: similarity matrices with known ranks, and RoIAlign."""

from __future__ import annotations

import pytest
import torch

from eval.metrics import (
    class_embeddings,
    classification_metrics,
    positive_ranks,
    recall_at,
    retrieval_metrics,
)
from eval.roi import normalized_to_grid, roi_align_1x1


def test_positive_ranks_known_matrix() -> None:
    # rows: queries; the positive is marked; ranks counted by hand
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.5, 0.3],  # positive col 0: best -> rank 0
            [0.9, 0.1, 0.5, 0.3],  # positive col 3: 0.9 and 0.5 above -> rank 2
            [0.2, 0.4, 0.6, 0.8],  # positive col 0: all three above -> rank 3
            [0.2, 0.4, 0.6, 0.8],  # positives cols 0 and 2: best positive 0.6, one above -> rank 1
        ]
    )
    pos = torch.zeros(4, 4, dtype=torch.bool)
    pos[0, 0] = pos[1, 3] = pos[2, 0] = pos[3, 0] = pos[3, 2] = True
    assert positive_ranks(scores, pos).tolist() == [0, 2, 3, 1]
    r = recall_at(positive_ranks(scores, pos), [1, 2, 3, 4])
    assert r == {1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0}


def test_retrieval_metrics_several_captions_per_image() -> None:
    # 3 images (one-hot embeddings), 5 captions: image 0 has captions 0,1; image 1 has 2,3; image 2 has 4
    img = torch.eye(3)
    txt = torch.tensor(
        [
            [1.0, 0.0, 0.0],  # caption 0 -> image 0 first (right)
            [0.0, 0.9, 0.1],  # caption 1 (of image 0) -> image 1, image 2, image 0: rank 2
            [0.0, 1.0, 0.0],  # caption 2 -> image 1 (right)
            [0.8, 0.0, 0.6],  # caption 3 (of image 1): image 1 scores 0 -> rank 2
            [0.1, 0.0, 0.9],  # caption 4 -> image 2 (right)
        ]
    )
    m = retrieval_metrics(img, txt, torch.tensor([0, 0, 1, 1, 2]), ks=(1, 2, 3))
    # t2i ranks: [0, 2, 0, 2, 0]
    assert m["t2i_R@1"] == pytest.approx(3 / 5) and m["t2i_R@2"] == pytest.approx(3 / 5)
    assert m["t2i_R@3"] == 1.0
    # i2t: image 0 -> captions scores [1, 0, 0, .8, .1]: caption 0 first -> rank 0
    # image 1 -> [0, .9, 1, 0, 0]: caption 2 first -> rank 0
    # image 2 -> [0, .1, 0, .6, .9]: caption 4 first -> rank 0
    assert m["i2t_R@1"] == 1.0
    # break image 1's hit: its best caption now ranks behind caption 1 and 0 -> rank 2
    txt2 = txt.clone()
    txt2[2] = torch.tensor([0.0, 0.5, 0.0])
    txt2[3] = torch.tensor([0.8, 0.0, 0.6])
    m2 = retrieval_metrics(img, txt2, torch.tensor([0, 0, 1, 1, 2]), ks=(1, 2, 3))
    assert m2["i2t_R@1"] == pytest.approx(2 / 3) and m2["i2t_R@3"] == 1.0


def test_classification_metrics_known_logits() -> None:
    logits = torch.tensor(
        [
            [5.0, 1, 2, 3, 4, 0],  # y=0: top1
            [5.0, 1, 2, 3, 4, 0],  # y=4: rank 1
            [0.0, 1, 2, 3, 4, 5],  # y=0: rank 5
            [0.0, 9, 2, 3, 4, 5],  # y=1: top1
        ]
    )
    y = torch.tensor([0, 4, 0, 1])
    m = classification_metrics(logits, y, ks=(1, 5))
    assert m["top1"] == pytest.approx(0.5) and m["top5"] == pytest.approx(0.75)
    # per class recall: class 0 -> 1/2, class 4 -> 0, class 1 -> 1 => mean 0.5
    assert m["mean_per_class_recall"] == pytest.approx(0.5)
    assert classification_metrics(logits[:, :3], torch.tensor([0, 0, 0, 1]), ks=(1, 5))["top5"] is None


def test_template_ensemble_normalize_average_renormalize() -> None:
    table = {
        "a cat": torch.tensor([3.0, 0.0]),
        "the cat": torch.tensor([0.0, 1.0]),
        "a dog": torch.tensor([1.0, 1.0]),
        "the dog": torch.tensor([2.0, 2.0]),
    }
    emb = class_embeddings(
        lambda texts: torch.stack([table[t] for t in texts]), ["cat", "dog"], ["a {c}", "the {c}"]
    )
    s = 2**-0.5
    # cat: normalize -> (1,0), (0,1); mean (0.5, 0.5); renormalize -> (s, s) (not (3,1)/|.|: each was normalized)
    assert torch.allclose(emb, torch.tensor([[s, s], [s, s]]), atol=1e-6)


def test_roi_align_hand_computed() -> None:
    lin = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[..., None]  # value = 2*row + col, patch centres at integers
    boxes = torch.tensor(
        [
            [0.0, 0.0, 2.0, 2.0],  # whole grid: 2x2 samples at the four centres -> mean 1.5
            [0.0, 0.0, 1.0, 1.0],  # the top-left patch: one sample at its centre -> 0
            [1.0, 1.0, 2.0, 2.0],  # the bottom-right patch -> 3
            [0.5, 0.5, 1.5, 1.5],  # centred between all four: one sample at (0.5, 0.5) -> 1.5
        ]
    )
    assert roi_align_1x1(lin, boxes)[:, 0].tolist() == pytest.approx([1.5, 0.0, 3.0, 1.5])
    spike = torch.tensor([[0.0, 0.0], [0.0, 4.0]])[..., None]
    # box (0.75, 0.5)-(1.25, 1.0): shifted by -0.5 -> (0.25, 0)-(0.75, 0.5), one sample at x=0.5, y=0.25;
    # bilinear weight of the spike at (1, 1) is 0.25 * 0.5 -> 0.5
    assert roi_align_1x1(spike, torch.tensor([[0.75, 0.5, 1.25, 1.0]]))[0, 0].item() == pytest.approx(0.5)
    # 2 channels, normalized boxes on a 2 (rows) x 4 (cols) grid
    feat = torch.arange(16.0).view(2, 4, 2)
    box = normalized_to_grid(torch.tensor([[0.0, 0.0, 0.25, 0.5]]), 2, 4)
    assert box.tolist() == [[0.0, 0.0, 1.0, 1.0]]
    assert roi_align_1x1(feat, box)[0].tolist() == [0.0, 1.0]
