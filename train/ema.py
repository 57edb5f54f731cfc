"""EMA of the weights: ``ema = decay * ema + (1 - decay) * w`` after every optimizer step.

The shadow copy lives beside the parameters it follows (an fp32 copy of each; a DTensor shard of
the same layout under FSDP2, so it is sharded too). :meth:`EMA.state_dict` is the model's own
state dict with the parameters replaced by their averages (buffers as they are): saved as a
checkpoint of its own (``step_<N>/ema/``, see :mod:`train.checkpoint`), it loads wherever a
stage-1 checkpoint does (eval, export, stage 2's ``init.checkpoint``).
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.reset(model)

    def reset(self, model: torch.nn.Module) -> None:
        """Start the average at the current weights."""
        model = getattr(model, "module", model)  # DDP
        self.shadow = {name: p.detach().to(torch.float32, copy=True) for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One EMA step towards the current weights (call after ``optimizer.step()``)."""
        model = getattr(model, "module", model)
        d = self.decay
        for name, p in model.named_parameters():
            self.shadow[name].mul_(d).add_(p.detach().to(torch.float32), alpha=1.0 - d)

    def state_dict(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with every parameter replaced by its average."""
        model = getattr(model, "module", model)
        out = dict(model.state_dict())
        out.update(self.shadow)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, t in self.shadow.items():
                t.copy_(state[name])
