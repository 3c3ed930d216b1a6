"""The held-out evaluation split and the train/eval sample caps, deterministic under a seed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeVar

import numpy as np

__all__ = ["eval_count", "split_indices", "train_eval_split"]

T = TypeVar("T")


def eval_count(num_examples: int, eval_dataset_size: int | float) -> int:
    """How many of ``num_examples`` are held out: a count (int), or a fraction in (0, 1) (float, rounded up).

    As in ``datasets.Dataset.train_test_split``, the type decides: ``1`` is one example, ``0.5`` half.
    """
    if isinstance(eval_dataset_size, bool) or not isinstance(eval_dataset_size, (int, float)):
        raise TypeError(f"eval_dataset_size must be a count or a fraction, got {eval_dataset_size!r}")
    if isinstance(eval_dataset_size, float):
        if not 0.0 < eval_dataset_size < 1.0:
            raise ValueError(f"eval_dataset_size {eval_dataset_size} is neither a count nor a fraction in (0, 1)")
        count = math.ceil(eval_dataset_size * num_examples)  # as datasets' train_test_split rounds
    else:
        count = int(eval_dataset_size)
    if count < 0:
        raise ValueError(f"eval_dataset_size must not be negative, got {eval_dataset_size}")
    if count >= num_examples:
        raise ValueError(f"eval_dataset_size {eval_dataset_size} holds out {count} of {num_examples} examples, "
                         "leaving none to train on")
    return count


def split_indices(
    num_examples: int,
    eval_dataset_size: int | float,
    seed: int,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) indices into a dataset of ``num_examples``: int64 arrays, each ascending.

    One permutation under ``seed`` decides everything: its first :func:`eval_count` entries are
    the eval set, the rest the training set, and the caps keep the first ``max_*_samples`` of
    each part (a random subset, not the head of the file). So the eval set does not depend on
    ``max_train_samples``, and a smaller cap gives a subset of a larger one.
    """
    for name, cap in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if cap is not None and cap < 0:
            raise ValueError(f"{name} must not be negative, got {cap}")
    order = np.random.default_rng(seed).permutation(num_examples)
    held_out = eval_count(num_examples, eval_dataset_size)
    eval_part, train_part = order[:held_out], order[held_out:]
    return np.sort(train_part[:max_train_samples]), np.sort(eval_part[:max_eval_samples])


def train_eval_split(
    examples: Sequence[T],
    eval_dataset_size: int | float,
    seed: int,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> tuple[list[T], list[T]]:
    """:func:`split_indices` applied to a sequence: (train examples, eval examples), in dataset order."""
    train, held_out = split_indices(len(examples), eval_dataset_size, seed, max_train_samples=max_train_samples,
                                    max_eval_samples=max_eval_samples)
    return [examples[i] for i in train], [examples[i] for i in held_out]
