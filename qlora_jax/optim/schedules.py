"""Learning-rate schedules as qlora.py trains with them (Hugging Face ``transformers``' schedulers).

:func:`lr_schedule` is ``get_scheduler(lr_scheduler_type, ...)``: a linear warmup from 0 over
``warmup_steps`` (or ``ceil(warmup_ratio * max_steps)``, as ``TrainingArguments.get_warmup_steps``
computes it), then constant, linear decay to 0, or cosine decay to 0 at ``max_steps``. The
schedules take optax's step count (0 for the first update), which is the step index Hugging
Face's ``LambdaLR`` passes.
"""

from __future__ import annotations

import math

import optax

__all__ = ["SCHEDULE_TYPES", "lr_schedule", "warmup_constant_schedule", "warmup_steps_for"]

SCHEDULE_TYPES = ("constant", "linear", "cosine")


def warmup_steps_for(max_steps: int, warmup_ratio: float = 0.0, warmup_steps: int = 0) -> int:
    """Warmup length in steps: ``warmup_steps`` if positive, else ``ceil(warmup_ratio * max_steps)``.

    Args:
      max_steps: total optimizer steps.
      warmup_ratio: warmup as a fraction of ``max_steps``, in ``[0, 1]``.
      warmup_steps: warmup in steps (non-negative); overrides ``warmup_ratio`` when positive.

    Returns:
      The number of warmup steps (``int``).

    Raises:
      ValueError: a negative ``warmup_steps`` or ``warmup_ratio`` outside ``[0, 1]``.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be non-negative, got {warmup_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return warmup_steps if warmup_steps > 0 else int(math.ceil(warmup_ratio * max_steps))


def warmup_constant_schedule(learning_rate: float, warmup_steps: int = 0) -> optax.Schedule:
    """``learning_rate * min(1, step / warmup_steps)``: Hugging Face's constant schedule with warmup.

    Step 0 (the first update) gets 0 when ``warmup_steps > 0``, as in
    ``transformers.get_constant_schedule_with_warmup``; with ``warmup_steps=0`` it is constant.

    Args:
      learning_rate: the peak learning rate (non-negative).
      warmup_steps: steps of linear warmup from 0 (non-negative).

    Returns:
      An ``optax.Schedule``: step (int) -> learning rate (float32 scalar).

    Raises:
      ValueError: a negative ``learning_rate`` or ``warmup_steps``.
    """
    return lr_schedule("constant", learning_rate, max_steps=max(warmup_steps, 1), warmup_steps=warmup_steps)


def lr_schedule(
    schedule_type: str,
    learning_rate: float,
    *,
    max_steps: int,
    warmup_ratio: float = 0.0,
    warmup_steps: int = 0,
) -> optax.Schedule:
    """The learning rate per step, as ``transformers.get_scheduler(schedule_type, ...)`` gives it.

    ``schedule_type``: ``"constant"`` (``get_constant_schedule_with_warmup``), ``"linear"``
    (``get_linear_schedule_with_warmup``: down to 0 at ``max_steps``) or ``"cosine"``
    (``get_cosine_schedule_with_warmup``, half a period: down to 0 at ``max_steps``).
    ``warmup_steps`` (if positive) or ``warmup_ratio`` of ``max_steps``: linear warmup from 0.

    Args:
      schedule_type: one of ``SCHEDULE_TYPES``.
      learning_rate: the peak learning rate (non-negative).
      max_steps: total optimizer steps (at least 1).
      warmup_ratio: warmup as a fraction of ``max_steps``, in ``[0, 1]`` (rounded up to steps).
      warmup_steps: warmup in steps; overrides ``warmup_ratio`` when positive.

    Returns:
      An ``optax.Schedule``: step (int) -> learning rate (float32 scalar).

    Raises:
      ValueError: an unknown ``schedule_type``, a negative ``learning_rate`` or ``warmup_steps``,
        ``max_steps < 1`` or ``warmup_ratio`` outside ``[0, 1]``.
    """
    if schedule_type not in SCHEDULE_TYPES:
        raise ValueError(f"unknown lr_scheduler_type {schedule_type!r}: choose one of {', '.join(SCHEDULE_TYPES)}")
    if learning_rate < 0:
        raise ValueError(f"learning_rate must be non-negative, got {learning_rate}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    warmup = warmup_steps_for(max_steps, warmup_ratio, warmup_steps)
    decay_steps = max(1, max_steps - warmup)
    if schedule_type == "constant":
        main = optax.constant_schedule(learning_rate)
    elif schedule_type == "linear":
        main = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    else:
        main = optax.cosine_decay_schedule(learning_rate, decay_steps)
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup), main], [warmup])
