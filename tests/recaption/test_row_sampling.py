"""Per-request sampling in one batch (recaption/backends/row_sampling.py) and the per-request
seeds recaption sends (Task.sampling): a seeded answer must not depend on its batch."""

from __future__ import annotations

import pytest
import torch

from recaption.backends.base import SamplingParams
from recaption.backends.row_sampling import RowSampler, top_p_mask
from recaption.prompts import load_prompt
from recaption.tasks import GlobalTask, Sample, TaskSettings


def _draw(sampler: RowSampler, scores: torch.Tensor) -> torch.Tensor:
    out = sampler(None, scores)
    # generate's greedy step keeps the one token the sampler left at 0
    assert torch.isfinite(out).sum(dim=-1).tolist() == [1] * scores.shape[0]
    return out.argmax(dim=-1)


def test_rows_sample_their_own_temperature_and_nucleus_and_greedy_rows_take_the_argmax():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])
    scores = logits.repeat(3, 1)
    n = 6000
    counts = torch.zeros(3, 5)
    for seed in range(n):
        s = RowSampler([0.0, 0.5, 1.0], [1.0, 1.0, 0.8], [seed, seed + n, seed + 2 * n])
        counts[torch.arange(3), _draw(s, scores)] += 1
    assert counts[0].tolist() == [n, 0, 0, 0, 0]  # greedy
    p = torch.softmax(logits / 0.5, dim=0)
    sigma = (p * (1 - p) / n).sqrt()
    assert ((counts[1] / n - p).abs() <= 4 * sigma + 1e-3).all(), (counts[1] / n, p)
    # top_p 0.8 at T=1: the two most likely tokens hold 0.665 + 0.245; the other three are never drawn
    q = torch.softmax(logits, dim=0)
    assert counts[2, 2:].sum() == 0
    kept = q[:2] / q[:2].sum()
    sigma = (kept * (1 - kept) / n).sqrt()
    assert ((counts[2, :2] / n - kept).abs() <= 4 * sigma).all(), (counts[2] / n, kept)


def test_top_p_mask_keeps_the_smallest_nucleus_and_always_the_top_token():
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.97, 0.01, 0.01, 0.01]])
    drop = top_p_mask(probs, torch.tensor([0.75, 0.5]))
    assert drop.tolist() == [[True, False, False, True], [False, True, True, True]]


def test_a_draw_that_rounds_up_to_the_total_mass_still_takes_a_nucleus_token():
    s = RowSampler([1.0, 1.0], [0.5, 1.0], [0, 1])
    s._uniforms = lambda: torch.ones(2)  # u * total == total: past the end of every CDF
    scores = torch.tensor([[0.0, 3.0, 2.0, -5.0], [0.0, 3.0, 2.0, -5.0]])
    assert _draw(s, scores).tolist() == [1, 3]  # the nucleus's only token; the last token with mass


def test_a_seeded_row_draws_the_same_tokens_alone_and_in_any_batch():
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randn(4, 50, generator=gen) for _ in range(70)]  # more steps than one CHUNK

    def tokens(sampler: RowSampler, rows: list[int]) -> list[list[int]]:
        return [_draw(sampler, s[rows]).tolist() for s in steps]

    alone = [t[0] for t in tokens(RowSampler([0.8], [0.95], [123]), [1])]
    batch = RowSampler([0.0, 1.3, 0.8, 0.5], [1.0, 1.0, 0.95, 0.9], [None, 5, 123, None])
    in_batch = [t[2] for t in tokens(batch, [0, 3, 1, 2])]
    assert in_batch == alone
    other = [t[0] for t in tokens(RowSampler([0.8], [0.95], [124]), [1])]
    assert other != alone  # the seed matters


def _sample(sha: str | None, key: str = "k") -> Sample:
    return Sample(key=key, image=None, sha256=sha)  # Task.sampling reads the key and the bytes' hash


@pytest.mark.parametrize(
    ("seed", "temperature", "seeded"), [(7, 0.7, True), (None, 0.7, False), (7, 0.0, False)]
)
def test_requests_carry_a_seed_of_their_own_only_when_seeded_and_sampled(seed, temperature, seeded):
    task = GlobalTask(load_prompt("dense-v1"), TaskSettings("m", SamplingParams(16, temperature), seed=seed))
    a, a_again = task.sampling(_sample("aa", "k1")), task.sampling(_sample("aa", "k2"))
    b = task.sampling(_sample("bb", "k1"))
    if not seeded:
        assert a.seed is b.seed is None
        return
    # one image, one seed (a duplicate gets the answer the response cache would give it); another
    # image, another seed; a second request of one sample (a proposal box), another seed
    assert a.seed == a_again.seed and a.seed != b.seed and 0 <= a.seed < 2**63
    assert task.sampling(_sample("aa"), 1).seed != a.seed
    other_run = GlobalTask(
        load_prompt("dense-v1"), TaskSettings("m", SamplingParams(16, temperature), seed=8)
    )
    assert other_run.sampling(_sample("aa")).seed != a.seed
