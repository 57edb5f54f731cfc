"""Ranking metrics on similarity matrices, and the zero-shot classifier from a template ensemble.

Legend: Q queries, G gallery items, C classes, E embedding size.

Ranks are 0-based and *optimistic on ties*: a query's rank is the number of gallery items
scoring strictly higher than its best positive. (CLIP_benchmark takes ``torch.topk``, which
breaks ties by index; with float embeddings ties do not happen and the two agree.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def positive_ranks(scores_QG: torch.Tensor, positive_QG: torch.Tensor) -> torch.Tensor:
    """For each query, the rank of its best-scoring positive (0 = first). Queries with no positive: -1."""
    if scores_QG.shape != positive_QG.shape:
        raise ValueError(f"scores {tuple(scores_QG.shape)} and positives {tuple(positive_QG.shape)} differ")
    scores_QG = scores_QG.float()
    best_Q = scores_QG.masked_fill(~positive_QG, float("-inf")).max(1).values
    ranks_Q = (scores_QG > best_Q[:, None]).sum(1)
    return torch.where(positive_QG.any(1), ranks_Q, torch.full_like(ranks_Q, -1))


def recall_at(ranks_Q: torch.Tensor, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries whose best positive ranks in the top ``k`` (queries with rank -1 excluded)."""
    valid = ranks_Q[ranks_Q >= 0]
    n = max(int(valid.numel()), 1)
    return {k: float((valid < k).sum()) / n for k in ks}


def retrieval_metrics(
    image_NE: torch.Tensor, text_ME: torch.Tensor, text_image_M: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image->text and text->image R@k; text ``m`` describes image ``text_image_M[m]``.

    Image->text: a hit when any of the image's captions is in the top k (the CLIP papers' protocol)."""
    scores_MN = text_ME.float() @ image_NE.float().T
    positive_MN = torch.zeros_like(scores_MN, dtype=torch.bool)
    positive_MN[torch.arange(len(text_image_M)), text_image_M] = True
    t2i = recall_at(positive_ranks(scores_MN, positive_MN), ks)
    i2t = recall_at(positive_ranks(scores_MN.T, positive_MN.T), ks)
    out = {f"i2t_R@{k}": v for k, v in i2t.items()}
    out.update({f"t2i_R@{k}": v for k, v in t2i.items()})
    return out


def classification_metrics(
    logits_NC: torch.Tensor, target_N: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float | None]:
    """Top-k accuracy (None when k > classes) and mean per-class recall (over the classes present)."""
    C = logits_NC.shape[1]
    positive_NC = F.one_hot(target_N, C).bool()
    ranks_N = positive_ranks(logits_NC, positive_NC)
    out: dict[str, float | None] = {
        f"top{k}": (int((ranks_N < k).sum()) / len(ranks_N) if k <= C else None) for k in ks
    }
    pred_N = logits_NC.argmax(1)
    recalls = [
        int((pred_N[target_N == c] == c).sum()) / int((target_N == c).sum())
        for c in target_N.unique().tolist()
    ]
    out["mean_per_class_recall"] = sum(recalls) / len(recalls) if recalls else 0.0
    return out


def class_embeddings(
    encode_text: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str],
) -> torch.Tensor:
    """``(C, E)``: per class, each template's embedding normalized, averaged, renormalized.

    Templates hold ``{c}`` for the class name (CLIP_benchmark's convention)."""
    texts = [t.format(c=c) for c in classnames for t in templates]
    emb = F.normalize(encode_text(texts).float(), dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(emb.mean(1), dim=-1)
