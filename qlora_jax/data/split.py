"""Data hygiene, the held-out evaluation split and the train/eval sample caps, deterministic under a seed.

Before splitting, :func:`clean_examples` drops two kinds of conversations that would make
training or evaluation wrong without any error:

* **empty responses**: every assistant turn is empty or whitespace. Rendered, such a row's only
  targets are end-of-turn tokens, so training on it teaches the model to answer with nothing;
* **exact duplicates**: the same roles and contents as an earlier conversation (the first is
  kept). A duplicate on both sides of the split makes the held-out loss measure memorisation:
  chatterbot-corpus holds 2025 conversations of which only 898 are distinct.

:func:`train_eval_split` cleans, then splits, and returns what it dropped with the split.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np

from qlora_jax.data.example import Example

__all__ = ["DataCleaning", "DataSplit", "clean_examples", "eval_count", "split_indices", "train_eval_split"]

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class DataCleaning:
    """Counts of conversations :func:`clean_examples` saw, kept and dropped.

    Attributes:
      total: conversations seen.
      kept: conversations kept.
      duplicates: exact duplicates dropped (the first kept).
      empty_responses: conversations dropped because every response is empty.
      partly_empty: conversations kept with some but not all assistant turns empty, counted so that
        they can be looked at.
    """

    total: int
    kept: int
    duplicates: int
    empty_responses: int
    partly_empty: int

    def summary(self) -> str:
        """One line for a log."""
        return (f"data hygiene: kept {self.kept} of {self.total} conversations; dropped {self.duplicates} exact "
                f"duplicates and {self.empty_responses} with only empty responses ({self.partly_empty} kept have "
                "some empty assistant turns)")


def _dedup_key(example: object) -> Hashable:
    if isinstance(example, Example):
        return tuple((m["role"], m["content"]) for m in example.messages)
    return example  # any hashable item (tests split strings)


def _assistant_turns(example: object) -> list[str]:
    if not isinstance(example, Example):
        return []
    return [m["content"] for m in example.messages if m["role"] == "assistant"]


def clean_examples[T](examples: Sequence[T]) -> tuple[list[T], DataCleaning]:
    """``examples`` without exact duplicates (first kept) and without conversations whose responses are all empty.

    Order is kept, so the result is deterministic.

    Args:
      examples: :class:`~qlora_jax.data.example.Example` values; other (hashable) values are
        deduplicated only.

    Returns:
      ``(kept, cleaning)``: the kept examples and the counts.
    """
    seen: set[Hashable] = set()
    kept: list[T] = []
    duplicates = empty = partly = 0
    for example in examples:
        responses = _assistant_turns(example)
        blank = [not text.strip() for text in responses]
        if responses and all(blank):
            empty += 1
            continue
        key = _dedup_key(example)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        partly += any(blank)
        kept.append(example)
    report = DataCleaning(total=len(examples), kept=len(kept), duplicates=duplicates, empty_responses=empty,
                          partly_empty=partly)
    (log.warning if duplicates or empty else log.info)("%s", report.summary())
    return kept, report


class DataSplit[T](NamedTuple):
    """:func:`train_eval_split`'s result.

    Attributes:
      train: the training part, in dataset order.
      eval: the held-out part, in dataset order.
      cleaning: what cleaning dropped (:class:`DataCleaning`).
    """

    train: list[T]
    eval: list[T]
    cleaning: DataCleaning


def eval_count(num_examples: int, eval_dataset_size: int | float) -> int:
    """How many of ``num_examples`` are held out.

    As in ``datasets.Dataset.train_test_split``, the type decides: ``1`` is one example, ``0.5`` half.

    Args:
      num_examples: the dataset's size.
      eval_dataset_size: a count (int), or a fraction in (0, 1) (float, rounded up).

    Returns:
      The held-out count.

    Raises:
      TypeError: neither an int nor a float.
      ValueError: a negative count, a float outside (0, 1), or a count that leaves no training example.
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
    """(train, eval) indices into a dataset of ``num_examples``.

    One permutation under ``seed`` decides everything: its first :func:`eval_count` entries are
    the eval set, the rest the training set, and the caps keep the first ``max_*_samples`` of
    each part (a random subset, not the head of the file). So the eval set does not depend on
    ``max_train_samples``, and a smaller cap gives a subset of a larger one.

    Args:
      num_examples: the dataset's size.
      eval_dataset_size: :func:`eval_count`'s.
      seed: seeds the permutation.
      max_train_samples: cap on the training part (None: none).
      max_eval_samples: cap on the held-out part (None: none).

    Returns:
      ``(train, eval)``: int64 index arrays, each ascending.

    Raises:
      ValueError: a negative cap, or a bad ``eval_dataset_size`` (:func:`eval_count`).
    """
    for name, cap in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
        if cap is not None and cap < 0:
            raise ValueError(f"{name} must not be negative, got {cap}")
    order = np.random.default_rng(seed).permutation(num_examples)
    held_out = eval_count(num_examples, eval_dataset_size)
    eval_part, train_part = order[:held_out], order[held_out:]
    return np.sort(train_part[:max_train_samples]), np.sort(eval_part[:max_eval_samples])


def train_eval_split[T](
    examples: Sequence[T],
    eval_dataset_size: int | float,
    seed: int,
    *,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
) -> DataSplit[T]:
    """:func:`clean_examples`, then :func:`split_indices` over what is kept.

    ``eval_dataset_size`` and the caps count conversations after cleaning.

    Args:
      examples: the dataset.
      eval_dataset_size: :func:`eval_count`'s.
      seed: seeds the split.
      max_train_samples: cap on the training part (None: none).
      max_eval_samples: cap on the held-out part (None: none).

    Returns:
      ``DataSplit(train, eval, cleaning)``: the examples of each part in dataset order, and the
      counts of what was dropped (log ``cleaning.summary()``).

    Raises:
      ValueError: as :func:`split_indices`.
    """
    kept, cleaning = clean_examples(examples)
    train, held_out = split_indices(len(kept), eval_dataset_size, seed, max_train_samples=max_train_samples,
                                    max_eval_samples=max_eval_samples)
    return DataSplit([kept[i] for i in train], [kept[i] for i in held_out], cleaning)
