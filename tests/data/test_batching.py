"""Padding, shuffling, length grouping and the resumable batch iterator (no tokenizer needed)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from qlora_jax.data import (
    BatchIterator,
    TokenizedExample,
    bucket_lengths,
    collate,
    epoch_batches,
    eval_batches,
    length_grouped_order,
    padded_length,
    stack_batches,
)
from qlora_jax.data.ordering import epoch_rng

PAD = 2


def random_examples(rng, count, max_length=300):
    examples = []
    for _ in range(count):
        n = int(rng.integers(2, max_length + 1))
        mask = rng.integers(0, 2, n).astype(np.int32)
        mask[0] = 0
        examples.append(TokenizedExample(rng.integers(3, 1000, n).astype(np.int32), mask))
    return examples


def test_bucket_lengths():
    assert bucket_lengths(1280) == (64, 128, 256, 512, 1024, 1280)
    assert bucket_lengths(1024) == (64, 128, 256, 512, 1024)
    assert bucket_lengths(100, minimum=128) == (100,)
    assert bucket_lengths(300, multiple=64) == (64, 128, 192, 256, 300)
    assert [padded_length(n, bucket_lengths(1280)) for n in (1, 64, 65, 1025, 1280)] == [64, 64, 128, 1280, 1280]
    with pytest.raises(ValueError, match="longer than the largest bucket"):
        padded_length(1281, bucket_lengths(1280))


def test_collate_right_pads_to_the_bucket(rng):
    examples = random_examples(rng, 3, max_length=100)
    batch = collate(examples, PAD, (64, 128), batch_size=5)
    length = 64 if max(len(e) for e in examples) <= 64 else 128
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((5, length), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    for row, example in enumerate(examples):
        n = len(example)
        assert batch["input_ids"][row].tolist() == example.input_ids.tolist() + [PAD] * (length - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (length - n)
        assert batch["loss_mask"][row].tolist() == example.loss_mask.tolist() + [0] * (length - n)
    # Filler rows: padding only, nothing attended or predicted.
    assert np.all(batch["input_ids"][3:] == PAD) and not batch["attention_mask"][3:].any()
    assert not batch["loss_mask"][3:].any()


def test_stack_batches_pads_to_the_longest(rng):
    short = collate(random_examples(rng, 2, max_length=60), PAD, (64, 256))
    long = collate([TokenizedExample(np.arange(3, 203, dtype=np.int32), np.ones(200, np.int32))], PAD, (64, 256),
                   batch_size=2)
    stacked = stack_batches([short, long], PAD)
    assert stacked["input_ids"].shape == (2, 2, 256)
    assert np.array_equal(stacked["input_ids"][0, :, :64], short["input_ids"])
    assert np.all(stacked["input_ids"][0, :, 64:] == PAD) and not stacked["attention_mask"][0, :, 64:].any()
    assert np.array_equal(stacked["loss_mask"][1], long["loss_mask"])


def test_shuffle_is_deterministic_per_seed_and_epoch(rng):
    lengths = rng.integers(1, 500, 103)
    seed = int(rng.integers(1 << 31))
    first = epoch_batches(lengths, 8, seed, epoch=0)
    assert len(first) == 103 // 8 and all(len(b) == 8 for b in first)
    visited = np.concatenate(first)
    assert len(set(visited.tolist())) == len(visited) == 96  # no repeats, 7 dropped
    assert all(np.array_equal(a, b) for a, b in zip(first, epoch_batches(lengths, 8, seed, epoch=0), strict=True))
    assert not np.array_equal(visited, np.concatenate(epoch_batches(lengths, 8, seed, epoch=1)))
    assert not np.array_equal(visited, np.concatenate(epoch_batches(lengths, 8, seed + 1, epoch=0)))
    kept_all = epoch_batches(lengths, 8, seed, epoch=0, drop_remainder=False)
    assert sorted(np.concatenate(kept_all).tolist()) == list(range(103)) and len(kept_all[-1]) == 7


def hf_length_grouped_indices(lengths, batch_size, permutation):
    """transformers' get_length_grouped_indices, transcribed, with the permutation given."""
    mega_batch_mult = min(len(lengths) // (batch_size * 4), 50) or 1
    megabatch_size = mega_batch_mult * batch_size
    indices = permutation.tolist()
    megabatches = [indices[i:i + megabatch_size] for i in range(0, len(lengths), megabatch_size)]
    megabatches = [sorted(m, key=lambda i: lengths[i], reverse=True) for m in megabatches]
    megabatch_maxlen = [lengths[m[0]] for m in megabatches]
    max_idx = int(np.argmax(megabatch_maxlen))
    megabatches[0][0], megabatches[max_idx][0] = megabatches[max_idx][0], megabatches[0][0]
    return [i for m in megabatches for i in m]


@pytest.mark.parametrize("count, batch_size", [(1000, 4), (3000, 8), (37, 8)])
def test_group_by_length_follows_transformers(rng, count, batch_size):
    lengths = rng.integers(1, 60, count)  # many ties: their order must match too
    seed = int(rng.integers(1 << 31))
    permutation = epoch_rng(seed, 3).permutation(count)
    order = length_grouped_order(lengths, batch_size, epoch_rng(seed, 3))
    assert order.tolist() == hf_length_grouped_indices(lengths.tolist(), batch_size, permutation)


def test_group_by_length_batches_hold_similar_lengths(rng):
    lengths = rng.integers(1, 1281, 4000)
    seed, batch_size = int(rng.integers(1 << 31)), 8
    grouped = epoch_batches(lengths, batch_size, seed, 0, group_by_length=True)
    plain = epoch_batches(lengths, batch_size, seed, 0)
    # The longest example comes first, so memory runs out at step 1 if it will.
    assert lengths[grouped[0]].max() == lengths.max()
    # Within a mega-batch (50 batches here), batches are sorted: each batch is no longer than the
    # one before (apart from the swapped-in longest example in the first batch).
    for start in range(0, len(grouped), 50):
        mega = [lengths[b] for b in grouped[start:start + 50]]
        for before, after in itertools.pairwise(mega[1:]):
            assert after.max() <= before.min()

    def padding_fraction(batches):  # of the tokens of batches padded to their longest example
        return 1 - sum(lengths[b].sum() for b in batches) / sum(lengths[b].max() * len(b) for b in batches)

    # A sorted mega-batch of 400 uniform lengths: a batch spans ~1/50 of the range (~1% padding);
    # random batches of 8 pad ~44% (1 - E[mean] / E[max of 8]).
    assert padding_fraction(grouped) < 0.04 and padding_fraction(plain) > 0.35
    again = epoch_batches(lengths, batch_size, seed, 0, group_by_length=True)
    assert all(np.array_equal(a, b) for a, b in zip(grouped, again, strict=True))
    other = epoch_batches(lengths, batch_size, seed + 1, 0, group_by_length=True)
    assert not np.array_equal(np.concatenate(grouped), np.concatenate(other))
    assert sorted(np.concatenate(grouped).tolist()) == list(range(4000))


@pytest.mark.parametrize("group_by_length", [False, True])
def test_iterator_resumes_exactly(rng, group_by_length):
    examples = random_examples(rng, 45)
    seed, batch_size = int(rng.integers(1 << 31)), 4  # 11 batches per epoch
    options = dict(batch_size=batch_size, pad_id=PAD, buckets=bucket_lengths(300), seed=seed,
                   group_by_length=group_by_length)
    uninterrupted = BatchIterator(examples, **options)
    reference = [next(uninterrupted) for _ in range(30)]  # nearly three epochs
    for stop in (0, 5, 11, 12, 29):
        first = BatchIterator(examples, **options)
        for _ in range(stop):
            next(first)
        state = json.loads(json.dumps(first.state))  # as a checkpoint stores it
        resumed = BatchIterator(examples, **options, state=state)
        for expected in reference[stop:]:
            got = next(resumed)
            assert all(np.array_equal(got[k], expected[k]) for k in expected)
    assert uninterrupted.state["epoch"] == 30 // 11 and uninterrupted.state["index"] == 30 % 11


def test_iterator_batches_and_epochs(rng):
    examples = random_examples(rng, 45)
    iterator = BatchIterator(examples, batch_size=4, pad_id=PAD, buckets=bucket_lengths(300), seed=1)
    assert iterator.steps_per_epoch == 11
    seen = []
    for _ in range(11):
        batch = next(iterator)
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] in bucket_lengths(300)
        for row in range(4):
            n = int(batch["attention_mask"][row].sum())
            seen.append(next(i for i, e in enumerate(examples) if len(e) == n and
                             np.array_equal(e.input_ids, batch["input_ids"][row, :n])))
    assert len(set(seen)) == 44 and iterator.epoch == 1
    step = iterator.next_batches(3)
    assert step["input_ids"].shape[:2] == (3, 4) and step["loss_mask"].shape == step["input_ids"].shape
    assert iterator.state["index"] == 3


def test_iterator_refuses_a_state_from_other_data_or_settings(rng):
    examples = random_examples(rng, 45)
    options = dict(pad_id=PAD, buckets=bucket_lengths(300), seed=7)
    state = BatchIterator(examples, batch_size=4, **options).state
    with pytest.raises(ValueError, match="batch_size 4 -> 5"):
        BatchIterator(examples, batch_size=5, **options, state=state)
    with pytest.raises(ValueError, match="num_examples 45 -> 44"):
        BatchIterator(examples[:44], batch_size=4, **options, state=state)
    shorter = examples[:-1] + [TokenizedExample(examples[-1].input_ids[:1], examples[-1].loss_mask[:1])]
    with pytest.raises(ValueError, match="fingerprint"):
        BatchIterator(shorter, batch_size=4, **options, state=state)
    with pytest.raises(ValueError, match="group_by_length 0 -> 1"):
        BatchIterator(examples, batch_size=4, **options, group_by_length=True, state=state)
    with pytest.raises(ValueError, match="out of range"):
        BatchIterator(examples, batch_size=4, **options, state={**state, "index": 11})
    with pytest.raises(ValueError, match="cannot fill one batch"):
        BatchIterator(examples[:3], batch_size=4, **options)


def test_eval_batches_cover_every_example_once(rng):
    examples = random_examples(rng, 23)
    batches = eval_batches(examples, batch_size=5, pad_id=PAD, buckets=bucket_lengths(300))
    assert len(batches) == 5 and all(b["input_ids"].shape[0] == 5 for b in batches)
    rows = []
    for b in batches:
        for r in range(5):
            n = int(b["attention_mask"][r].sum())
            if n:
                rows.append((b["input_ids"][r, :n].tolist(), b["loss_mask"][r, :n].tolist()))
    assert sorted(rows) == sorted((e.input_ids.tolist(), e.loss_mask.tolist()) for e in examples)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == sum(int(e.loss_mask.sum()) for e in examples)
