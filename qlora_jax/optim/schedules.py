"""The QLoRA learning-rate schedule: constant, after an optional linear warmup."""

from __future__ import annotations

import optax

__all__ = ["warmup_constant_schedule"]


def warmup_constant_schedule(learning_rate: float, warmup_steps: int = 0) -> optax.Schedule:
    """``learning_rate * min(1, step / warmup_steps)``: Hugging Face's constant schedule with warmup.

    Step 0 (the first update) gets 0 when ``warmup_steps > 0``, as in
    ``transformers.get_constant_schedule_with_warmup``; with ``warmup_steps=0`` it is constant.
    """
    if learning_rate < 0:
        raise ValueError(f"learning_rate must be non-negative, got {learning_rate}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be non-negative, got {warmup_steps}")
    if warmup_steps == 0:
        return optax.constant_schedule(learning_rate)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), optax.constant_schedule(learning_rate)],
        [warmup_steps],
    )
