"""Which examples form which batch in each epoch: a pure function of (lengths, seed, epoch).

The random stream of epoch ``e`` is ``numpy.random.default_rng([seed, e])``, independent of how
many batches were drawn before, so any epoch's order can be recomputed (and a run resumed) without
replaying the earlier ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["epoch_rng", "length_grouped_order", "epoch_batches"]


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The random generator of one epoch.

    Args:
      seed: the run's data seed.
      epoch: the epoch's index.

    Returns:
      A :class:`numpy.random.Generator` that depends on both.
    """
    return np.random.default_rng([seed, epoch])


def length_grouped_order(
    lengths: Sequence[int],
    batch_size: int,
    rng: np.random.Generator,
    *,
    mega_batch_mult: int | None = None,
) -> np.ndarray:
    """A permutation whose consecutive ``batch_size`` chunks hold similar lengths (HF ``group_by_length``).

    transformers' ``get_length_grouped_indices``: randomly permute, cut into mega-batches of
    ``mega_batch_mult * batch_size``, sort each mega-batch by length, longest first, then swap the
    longest example of all into position 0, so that the first batch is the longest and memory runs
    out at once if it will.

    Args:
      lengths: tokens per example.
      batch_size: rows per batch.
      rng: the epoch's generator (:func:`epoch_rng`).
      mega_batch_mult: batches per mega-batch (None: ``min(n // (4 * batch_size), 50)``, at least 1).

    Returns:
      int ``[n]`` example indices.
    """
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        return np.zeros(0, np.int64)
    if mega_batch_mult is None:
        mega_batch_mult = max(min(len(lengths) // (batch_size * 4), 50), 1)
    size = mega_batch_mult * batch_size
    permutation = rng.permutation(len(lengths))
    megabatches = [permutation[i:i + size] for i in range(0, len(lengths), size)]
    # A stable sort on the negated length: ties keep their random order, as Python's sorted does.
    megabatches = [m[np.argsort(-lengths[m], kind="stable")] for m in megabatches]
    longest = int(np.argmax([lengths[m[0]] for m in megabatches]))
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return np.concatenate(megabatches)


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    group_by_length: bool = False,
    drop_remainder: bool = True,
    mega_batch_mult: int | None = None,
) -> list[np.ndarray]:
    """The batches of one epoch as arrays of example indices, in the order they are trained on.

    Args:
      lengths: tokens per example.
      batch_size: rows per batch (positive).
      seed: the run's data seed.
      epoch: the epoch's index.
      group_by_length: :func:`length_grouped_order` instead of a plain permutation.
      drop_remainder: drop a last batch smaller than ``batch_size`` (fixed shapes for training).
      mega_batch_mult: :func:`length_grouped_order`'s.

    Returns:
      int arrays of example indices, ``[batch_size]`` each (the last may be shorter without
      ``drop_remainder``).

    Raises:
      ValueError: a non-positive ``batch_size``, or too few examples for one batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_remainder and len(lengths) < batch_size:
        raise ValueError(f"{len(lengths)} examples cannot fill one batch of {batch_size}")
    rng = epoch_rng(seed, epoch)
    if group_by_length:
        order = length_grouped_order(lengths, batch_size, rng, mega_batch_mult=mega_batch_mult)
    else:
        order = rng.permutation(len(lengths))
    end = len(order) - len(order) % batch_size if drop_remainder else len(order)
    return [order[i:i + batch_size] for i in range(0, end, batch_size)]
