"""Padding tokenized examples into fixed-shape numpy batches.

A jitted step compiles once per input shape, so batches are padded to one of a few lengths (the
*buckets*) rather than to their longest example: by default powers of two from 64 up to the
longest possible example, ``source_max_len + target_max_len`` (which is always the last bucket).
With qlora.py's 1024 + 256 that is 64, 128, 256, 512, 1024, 1280: six compilations at most,
and under half of each padded row wasted in the worst case.

Batches are right-padded: ``input_ids`` with the pad id, ``attention_mask`` 1 on real tokens and
0 on padding, ``loss_mask`` 0 on padding. Rows that only fill a batch up to its size (the last,
partial batch of an evaluation pass) have all three masks at 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qlora_jax.data.tokenization import TokenizedExample

__all__ = ["Batch", "bucket_lengths", "padded_length", "collate", "stack_batches"]

Batch = dict[str, np.ndarray]  # {"input_ids", "attention_mask", "loss_mask"}: int32[B, T]


def bucket_lengths(max_length: int, *, minimum: int = 64, multiple: int | None = None) -> tuple[int, ...]:
    """The padded lengths allowed, ascending, ending at ``max_length``.

    Args:
      max_length: the longest sequence in tokens (positive).
      minimum: the smallest bucket, in tokens (positive).
      multiple: every multiple of it instead of powers of two from ``minimum`` (less padding, more
        compilations); None: powers of two.

    Returns:
      The bucket lengths in tokens.

    Raises:
      ValueError: a non-positive ``max_length``, ``minimum`` or ``multiple``.
    """
    if max_length < 1 or minimum < 1:
        raise ValueError(f"max_length and minimum must be positive, got {max_length} and {minimum}")
    if multiple is not None:
        if multiple < 1:
            raise ValueError(f"multiple must be positive, got {multiple}")
        lengths = list(range(multiple, max_length, multiple))
    else:
        lengths, length = [], minimum
        while length < max_length:
            lengths.append(length)
            length *= 2
    return tuple(lengths) + (max_length,)


def padded_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``length`` tokens.

    Args:
      length: a sequence's length in tokens.
      buckets: the allowed lengths (:func:`bucket_lengths`).

    Returns:
      The bucket's length in tokens.

    Raises:
      ValueError: ``length`` longer than the largest bucket.
    """
    for bucket in sorted(buckets):
        if bucket >= length:
            return bucket
    raise ValueError(f"a sequence of {length} tokens is longer than the largest bucket ({max(buckets)})")


def collate(
    examples: Sequence[TokenizedExample],
    pad_id: int,
    buckets: Sequence[int],
    *,
    batch_size: int | None = None,
    length: int | None = None,
) -> Batch:
    """A right-padded batch ``[B, T]`` with T the bucket of the longest example (or ``length``).

    Args:
      examples: the tokenized examples.
      pad_id: the padding token.
      buckets: the allowed lengths (:func:`bucket_lengths`).
      batch_size: rows of the batch (default: the number of examples); all-masked filler rows reach it.
      length: pad to this many tokens instead (a bucket at least as long as the longest example; the
        processes of a multi-process run each collate their rows of one batch to the same length).

    Returns:
      ``{"input_ids", "attention_mask", "loss_mask"}``: int32 ``[B, T]``.

    Raises:
      ValueError: more examples than ``batch_size``, or a ``length`` shorter than the longest example.
    """
    batch_size = len(examples) if batch_size is None else batch_size
    if len(examples) > batch_size or (not examples and (length is None or batch_size == 0)):
        raise ValueError(f"cannot make a batch of {batch_size} rows from {len(examples)} examples")
    longest = max((len(e) for e in examples), default=0)
    if length is None:
        length = padded_length(longest, buckets)
    elif length < longest:
        raise ValueError(f"length {length} is shorter than the longest example ({longest} tokens)")
    input_ids = np.full((batch_size, length), pad_id, np.int32)
    attention_mask = np.zeros((batch_size, length), np.int32)
    loss_mask = np.zeros((batch_size, length), np.int32)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = example.input_ids
        attention_mask[row, :n] = 1
        loss_mask[row, :n] = example.loss_mask
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def stack_batches(batches: Sequence[Batch], pad_id: int) -> Batch:
    """Batches ``[B, T_i]`` stacked into ``[len(batches), B, max T_i]`` (micro-batches of one step).

    Shorter batches are right-padded like :func:`collate` pads, so the result needs no extra
    compilation beyond the buckets.

    Args:
      batches: :func:`collate`'s batches, each with ``B`` rows.
      pad_id: the padding token.

    Returns:
      ``{"input_ids", "attention_mask", "loss_mask"}``: int32 ``[len(batches), B, T]``.

    Raises:
      ValueError: no batches.
    """
    if not batches:
        raise ValueError("no batches to stack")
    length = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_id, "attention_mask": 0, "loss_mask": 0}
    return {key: np.stack([np.pad(b[key], ((0, 0), (0, length - b[key].shape[1])), constant_values=value)
                           for b in batches]) for key, value in fill.items()}
