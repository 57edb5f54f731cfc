"""Per-request sampling inside one batched ``generate``, as vLLM does it.

Transformers' ``generate`` samples every row of a batch with one temperature, one ``top_p`` and
the process-wide random generator, so a sampled answer depended on which other requests shared
its batch, and a request's ``seed`` could only be honoured by giving it a batch of its own.
:class:`RowSampler` is a logits processor that draws each row's token itself, with the row's
own temperature and ``top_p`` and the row's own ``torch.Generator`` (seeded by the request's
``seed``, else at random), and hands ``generate`` a one-hot score that its greedy argmax
keeps. A seeded request then gets the same answer alone or in any batch, and greedy and
sampled requests share one batch.

The draw is inverse-CDF sampling, as ``torch.multinomial`` does for one sample: one uniform
number per row and step, drawn :data:`CHUNK` steps at a time (one generator call per row and
chunk: per step, at 256 rows, those calls took longer than the sampling).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

CHUNK = 32  # steps of draws per generator call


def top_p_mask(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``True`` where a token lies outside its row's nucleus: the smallest set of most likely
    tokens whose mass reaches ``top_p`` (the most likely token always stays)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each one
    drop_sorted = before >= top_p[:, None]
    drop_sorted[:, 0] = False
    return torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)


class RowSampler:
    """A transformers logits processor (``generate(..., do_sample=False,
    logits_processor=LogitsProcessorList([RowSampler(...)]))``): row ``i`` is greedy when
    ``temperatures[i] == 0``, else sampled at that temperature within ``top_ps[i]`` with a
    generator seeded by ``seeds[i]`` (a fresh random seed when ``None``)."""

    def __init__(
        self, temperatures: Sequence[float], top_ps: Sequence[float], seeds: Sequence[int | None]
    ) -> None:
        if not len(temperatures) == len(top_ps) == len(seeds):
            raise ValueError("one temperature, top_p and seed per row")
        self.temperatures = torch.tensor(temperatures, dtype=torch.float32)
        self.top_ps = torch.tensor(top_ps, dtype=torch.float32)
        self.sampled = [i for i, t in enumerate(temperatures) if t > 0]
        self.rows = torch.tensor(self.sampled, dtype=torch.long)
        self.nucleus = bool((self.top_ps[self.rows] < 1).any())
        self.generators = []
        for i in self.sampled:
            g = torch.Generator()
            g.manual_seed(seeds[i] if seeds[i] is not None else random.getrandbits(63))
            self.generators.append(g)
        self.step = 0
        self.draws = torch.empty(0)

    def _uniforms(self) -> torch.Tensor:
        """This step's ``U[0, 1)`` draw of each sampled row, from the row's own generator on the
        CPU: the same numbers whatever the device and the batch."""
        k = self.step % CHUNK
        if k == 0:
            self.draws = torch.stack([torch.rand(CHUNK, generator=g) for g in self.generators], dim=1)
        self.step += 1
        return self.draws[k]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = scores.argmax(dim=-1)
        if self.sampled:
            dev = scores.device
            rows = self.rows.to(dev)
            probs = torch.softmax(scores[rows].float() / self.temperatures.to(dev)[rows, None], dim=-1)
            if self.nucleus:
                probs = probs.masked_fill(top_p_mask(probs, self.top_ps.to(dev)[rows]), 0.0)
            cdf = probs.cumsum(dim=-1)
            u = (self._uniforms().to(dev)[:, None] * cdf[:, -1:]).contiguous()
            picked = torch.searchsorted(cdf, u, right=True)
            # where u * total rounds up to the total, the last token with mass (never a masked one)
            last = torch.searchsorted(cdf, cdf[:, -1:].contiguous(), right=False)
            chosen[rows] = torch.minimum(picked, last).squeeze(1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter(-1, chosen[:, None], 0.0)
