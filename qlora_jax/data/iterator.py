"""Training batches, epoch after epoch, from a position that a checkpoint can store and restore.

The position is a small dict of ints (:attr:`BatchIterator.state`): ``seed``, ``epoch`` and
``index`` (the next batch within the epoch), plus what the position is only valid for
(``num_examples``, ``batch_size``, ``group_by_length``, and ``fingerprint``, a CRC-32 of the
example lengths) so that resuming on other data or settings fails loudly instead of silently
training on a different stream. A restored iterator yields exactly the batches the uninterrupted
one would have.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from qlora_jax.data.batching import Batch, collate, padded_length, stack_batches
from qlora_jax.data.ordering import epoch_batches
from qlora_jax.data.tokenization import TokenizedExample

__all__ = ["BatchIterator", "eval_batches"]


def _fingerprint(lengths: np.ndarray) -> int:
    return zlib.crc32(lengths.astype("<i8").tobytes())


class BatchIterator:
    """Endless training batches ``{"input_ids", "attention_mask", "loss_mask"}: int32[B, T]``.

    Each epoch visits every example at most once in a fresh order under ``seed`` (see
    :mod:`.ordering`), drops the last partial batch so that every batch has ``batch_size`` rows,
    and pads to ``buckets`` (:mod:`.batching`). The order, the position and :attr:`state` are
    those of the global batches, whatever the ``rows`` (a checkpoint resumes on any process count).

    Args:
      examples: the tokenized training examples (at least ``batch_size``).
      batch_size: rows per batch (global).
      pad_id: the padding token.
      buckets: the allowed lengths (:func:`~qlora_jax.data.batching.bucket_lengths`).
      seed: seeds every epoch's order.
      group_by_length: HF's length grouping (:func:`~qlora_jax.data.ordering.length_grouped_order`).
      mega_batch_mult: its mega-batch size in batches (None: HF's default).
      state: :attr:`state` of an earlier run, to resume where it stopped.
      rows: yield only these rows of every batch (ascending positions in ``0..batch_size-1``): a
        process of a multi-process run reads the rows its devices hold
        (:func:`qlora_jax.distributed.process_rows`) and pads them to the bucket of the whole batch.

    Raises:
      ValueError: a non-positive ``batch_size``, too few examples, bad ``rows``, or a ``state``
        saved for other data or settings.
    """

    def __init__(
        self,
        examples: Sequence[TokenizedExample],
        *,
        batch_size: int,
        pad_id: int,
        buckets: Sequence[int],
        seed: int = 0,
        group_by_length: bool = False,
        mega_batch_mult: int | None = None,
        state: Mapping[str, Any] | None = None,
        rows: Sequence[int] | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training examples cannot fill one batch of {batch_size}")
        self._examples = examples
        self._lengths = np.array([len(e) for e in examples], np.int64)
        self._pad_id, self._buckets = pad_id, tuple(buckets)
        self._rows = None if rows is None else np.asarray(rows, np.int64)
        if self._rows is not None and (self._rows.ndim != 1 or not len(self._rows) or np.any(np.diff(self._rows) <= 0)
                                       or self._rows[0] < 0 or self._rows[-1] >= batch_size):
            raise ValueError(f"rows must be ascending positions in 0..{batch_size - 1}, got {self._rows.tolist()}")
        self._mega_batch_mult = mega_batch_mult
        self._config = {"seed": int(seed), "num_examples": len(examples), "batch_size": int(batch_size),
                        "group_by_length": int(bool(group_by_length)), "fingerprint": _fingerprint(self._lengths)}
        self._epoch, self._index = 0, 0
        self._batches: list[np.ndarray] | None = None
        self._batches_epoch = -1
        if state is not None:
            self._restore(state)

    # ------------------------------------------------------------------ position
    @property
    def state(self) -> dict[str, int]:
        """The position as plain ints: save it with a checkpoint, pass it back as ``state=``."""
        return {**self._config, "epoch": self._epoch, "index": self._index}

    def _restore(self, state: Mapping[str, Any]) -> None:
        missing = {"epoch", "index", *self._config} - set(state)
        if missing:
            raise ValueError(f"data iterator state lacks {', '.join(sorted(missing))}")
        state = {key: int(value) for key, value in state.items()}  # restored arrays/numpy scalars -> int
        changed = [f"{key} {state[key]} -> {value}" for key, value in self._config.items() if state[key] != value]
        if changed:
            raise ValueError("the data iterator state was saved for other data or settings (" + "; ".join(changed)
                             + "); resuming would not continue the same stream of batches")
        if not (state["epoch"] >= 0 and 0 <= state["index"] < self.steps_per_epoch):
            raise ValueError(f"data iterator position epoch {state['epoch']}, index {state['index']} is out of "
                             f"range ({self.steps_per_epoch} batches per epoch)")
        self._epoch, self._index = state["epoch"], state["index"]

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch: ``num_examples // batch_size``."""
        return self._config["num_examples"] // self._config["batch_size"]

    @property
    def epoch(self) -> int:
        """The epoch of the next batch (0-based)."""
        return self._epoch

    # ------------------------------------------------------------------ batches
    def _epoch_order(self, epoch: int) -> list[np.ndarray]:
        if self._batches_epoch != epoch:
            self._batches = epoch_batches(
                self._lengths, self._config["batch_size"], self._config["seed"], epoch,
                group_by_length=bool(self._config["group_by_length"]), drop_remainder=True,
                mega_batch_mult=self._mega_batch_mult)
            self._batches_epoch = epoch
        return self._batches

    def next_indices(self) -> np.ndarray:
        """The example indices of the next batch; advances the position."""
        indices = self._epoch_order(self._epoch)[self._index]
        self._index += 1
        if self._index == self.steps_per_epoch:
            self._epoch, self._index = self._epoch + 1, 0
        return indices

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        return self._collate([self.next_indices()])[0]

    def _collate(self, step: list[np.ndarray]) -> list[Batch]:
        """The batches of ``step`` (example indices per batch), this reader's rows of each, all
        padded to the bucket of the longest example of the whole step."""
        length = padded_length(int(max(self._lengths[indices].max() for indices in step)), self._buckets)
        picked = step if self._rows is None else [indices[self._rows] for indices in step]
        return [collate([self._examples[i] for i in indices], self._pad_id, self._buckets, length=length)
                for indices in picked]

    def next_batches(self, count: int) -> Batch:
        """The next ``count`` batches stacked ``[count, B, T]``: one step's micro-batches for
        gradient accumulation, padded to their longest bucket (``B``: the reader's rows)."""
        if count < 1:
            raise ValueError(f"count must be positive, got {count}")
        return stack_batches(self._collate([self.next_indices() for _ in range(count)]), self._pad_id)


def eval_batches(
    examples: Sequence[TokenizedExample],
    *,
    batch_size: int,
    pad_id: int,
    buckets: Sequence[int],
    rows: Sequence[int] | None = None,
) -> list[Batch]:
    """Every example once, longest first (least padding), the last batch filled with all-masked rows.

    The order does not matter for a token-weighted mean loss.

    Args:
      examples: the tokenized held-out examples.
      batch_size: rows per batch.
      pad_id: the padding token.
      buckets: the allowed lengths.
      rows: keep only these rows of each batch (ascending positions, as
        :meth:`BatchIterator.next_batches` takes them), padded to the bucket of the whole batch.

    Returns:
      The batches, ``{"input_ids", "attention_mask", "loss_mask"}``: int32 ``[B, T]`` each.

    Raises:
      ValueError: a non-positive ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        length = padded_length(max(len(examples[i]) for i in members), buckets)
        if rows is None:
            picked, size = members, batch_size
        else:
            picked, size = [members[r] for r in rows if r < len(members)], len(rows)
        batches.append(collate([examples[i] for i in picked], pad_id, buckets, batch_size=size, length=length))
    return batches
