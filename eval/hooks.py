"""Eval during stage-1 training: ``periodic_eval(encoder, cfg, step)`` -> scalars for TensorBoard.

The trainer calls it every ``eval.every`` steps with a view of its live model
(:func:`train.model.encoder.encoder_from_model`) and logs the returned dict; the towers are put
back in train mode afterwards. What runs is set by :class:`EvalHookConfig`: the fine-grained
synthetic suite (held-out seed, kept small: it is rendered each time) and, when a path is
given, zero-shot classification.
"""

from __future__ import annotations

from typing import Any

from train.config import EvalConfig

# one definition of these fields: the trainer's config section (train/ does not import eval/)
EvalHookConfig = EvalConfig


def periodic_eval(encoder: Any, cfg: Any, step: int) -> dict[str, float]:
    """Run the configured suites; returns flat ``{"eval/<task>/<metric>": value}`` (floats only).

    ``cfg``: an :class:`EvalHookConfig` (the trainer's ``eval`` section) or a dict of its fields."""
    from eval.run import evaluate

    if not isinstance(cfg, EvalHookConfig):
        cfg = EvalHookConfig.model_validate(cfg)
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
