"""Eval during stage-1 training: ``periodic_eval(encoder, cfg, step)`` -> scalars for TensorBoard.

The trainer calls it every ``eval.every`` steps with a view of its live model
(:func:`train.model.encoder.encoder_from_model`) and logs the returned dict; the towers are put
back in train mode afterwards. What runs is set by :class:`EvalHookConfig`: the fine-grained
synthetic suite (held-out seed, kept small: it is rendered each time) and, when a path is
given, zero-shot classification.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from engine.config import StrictModel


class EvalHookConfig(StrictModel):
    every: int = Field(default=0, ge=0, description="steps between evals during training; 0: off")
    finegrained: str = Field(
        default="synthetic://scenes?n=32&seed=1000&size=128",
        description="held-out synthetic scenes ('' to skip); train on another seed",
    )
    negatives: int = Field(default=3, ge=1)
    zeroshot: str = Field(default="", description="zero-shot set (ImageFolder, CSV or JSON); '' to skip")
    zeroshot_format: str = "auto"
    templates: str = "ensemble"
    batch_size: int = Field(default=64, ge=1)


def periodic_eval(encoder: Any, cfg: Any, step: int) -> dict[str, float]:
    """Run the configured suites; returns flat ``{"eval/<task>/<metric>": value}`` (floats only).

    ``cfg``: an :class:`EvalHookConfig`, a dict, or any pydantic model with the same fields (the
    trainer keeps its own copy in its config tree: train/ does not import eval/)."""
    from eval.run import evaluate

    if not isinstance(cfg, EvalHookConfig):  # a dict, or the trainer's own copy of these fields
        cfg = EvalHookConfig.model_validate(cfg if isinstance(cfg, dict) else cfg.model_dump())
    was_training = encoder.training
    encoder.eval()
    out: dict[str, float] = {}
    try:
        runs = []
        if cfg.finegrained:
            runs.append(("finegrained", cfg.finegrained, "auto"))
        if cfg.zeroshot:
            runs.append(("zeroshot", cfg.zeroshot, cfg.zeroshot_format))
        for task, data, fmt in runs:
            r = evaluate(
                encoder,
                task,
                data,
                fmt,
                templates=cfg.templates,
                negatives=cfg.negatives,
                batch_size=cfg.batch_size,
                checkpoint_hash=f"step {step}",
            )
            for k, v in r.metrics.items():
                if isinstance(v, dict):
                    out.update({f"eval/{task}/{k}_{m}": float(x) for m, x in v.items() if m != "n"})
                elif isinstance(v, int | float) and not isinstance(v, bool):
                    out[f"eval/{task}/{k}"] = float(v)
    finally:
        encoder.train(was_training)
    return out
