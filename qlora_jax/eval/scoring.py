"""Log-likelihoods of continuations: items -> token groups -> padded batches -> one compiled function.

**Tokens.** Each choice of an item is ``context tokens + continuation tokens``, the continuation
being the *targets* whose log-probabilities are summed (see
:class:`~qlora_jax.eval.items.MultipleChoiceItem` for how text and chat items are tokenized).
A context longer than ``max_length`` minus its longest continuation loses its first tokens (a BOS
is kept), as lm-eval truncates; a continuation that does not fit is an error.

**Groups.** The choices of an item share their context (always, unless a joint encoding merged
the context's last token into a continuation: then that choice gets its own group). A group runs
its context once and scores all its continuations from the context's KV cache:

1. the contexts of ``B`` groups, left-padded to a bucketed length ``Tc``, fill a cache of
   ``Tc + K - 1`` slots (``K``: the bucketed longest continuation); the last context position
   gives the log-probabilities of every continuation's first token;
2. when ``K > 1``, the cache is repeated for the ``C`` continuation slots of each group and the
   continuations' first ``K - 1`` tokens run after it (positions continue each context's own
   length), giving the log-probabilities of the remaining tokens.

When every choice is one token (MMLU's letters) step 2 does not exist: one forward pass per
question, the logits at the answer position read at the choices' ids, which is qlora.py's
letter-argmax. Log-softmax is over the whole vocabulary in float32; the output head only sees the
positions that predict targets, ``K`` positions at a time, so ``[B, T, V]`` logits never exist.

Shapes are bucketed (powers of two via :func:`qlora_jax.data.bucket_lengths`; a fixed number of
groups per batch, filler groups masked out), so the function compiles once per
(context bucket, continuation bucket). With a mesh, batches split their groups over the
data-parallel axes (:func:`qlora_jax.distributed.shard_batch`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax import data as data_lib
from qlora_jax.data.example import make_example
from qlora_jax.eval.items import MultipleChoiceItem
from qlora_jax.models import llama
from qlora_jax.models.spec import ModelSpec
from qlora_jax.tokenizer import Tokenizer

__all__ = ["TokenizedItem", "tokenize_item", "group_logprobs", "GroupBatch", "plan_batches"]

log = logging.getLogger(__name__)

# Positions whose logits [rows, V] the output head makes at once, per batch.
_HEAD_ROWS = 512


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: compare with np.array_equal
class TokenizedItem:
    """The tokens of one item, per choice ``c``.

    Attributes:
      contexts: int32 ``[Tc]`` token ids of each choice's context.
      continuations: int32 ``[Tk]`` token ids of each choice's continuation (the targets).
    """

    contexts: tuple[np.ndarray, ...]
    continuations: tuple[np.ndarray, ...]

    @property
    def target_counts(self) -> tuple[int, ...]:
        return tuple(len(c) for c in self.continuations)

    def groups(self) -> list[tuple[np.ndarray, list[int]]]:
        """``(context, choice indices)`` per distinct context, in choice order."""
        out: list[tuple[np.ndarray, list[int]]] = []
        for c, context in enumerate(self.contexts):
            for shared, members in out:
                if np.array_equal(shared, context):
                    members.append(c)
                    break
            else:
                out.append((context, [c]))
        return out


def _text_pair(item: MultipleChoiceItem, choice: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    context, continuation = item.context, item.delimiter + choice
    # lm-eval moves the context's trailing spaces into the continuation ("Answer: " + "A" -> "Answer:" + " A"),
    # where BPE vocabularies keep a word's leading space.
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = tokenizer.encode(context)
    if item.separate_encoding:
        return context_ids, tokenizer.encode(continuation, add_bos=False)
    whole = tokenizer.encode(context + continuation)
    # The split point is where the two encodings stop agreeing (they agree on all of the
    # context unless its last token merges with the continuation's first).
    shared = next((i for i, (a, b) in enumerate(zip(whole, context_ids, strict=False)) if a != b),
                  min(len(whole), len(context_ids)))
    return whole[:shared], whole[shared:]


def _chat_pair(item: MultipleChoiceItem, choice: str, tokenizer: Tokenizer, template: str | None) \
        -> tuple[list[int], list[int]]:
    example = make_example([("user", item.context), ("assistant", choice)], item.origin)
    big = 1 << 30  # no truncation here: the caller truncates the context to max_length
    tokens = data_lib.tokenize_example(example, tokenizer, template=template, source_max_len=big,
                                       target_max_len=big)
    targets = np.flatnonzero(tokens.loss_mask)
    first, last = int(targets[0]), int(targets[-1])
    ids = tokens.input_ids.tolist()
    return ids[:first], ids[first:last + 1]


def tokenize_item(item: MultipleChoiceItem, tokenizer: Tokenizer, *, max_length: int = 2048,
                  template: str | None = None) -> tuple[TokenizedItem, bool]:
    """The item's tokens (see the module docstring) and whether its context was truncated.

    Args:
      item: the item.
      tokenizer: the model's tokenizer.
      max_length: longest row in tokens; a longer context loses its start.
      template: the chat template of chat items (None: the tokenizer's own).

    Returns:
      ``(tokens, truncated)``: a :class:`TokenizedItem` and whether a context lost its start.

    Raises:
      ValueError: naming the item, a choice or context that encodes to no tokens, or a choice
        that leaves no room for the context in ``max_length``.
    """
    pairs = []
    for c, choice in enumerate(item.choices):
        context, continuation = (_chat_pair(item, choice, tokenizer, template) if item.chat
                                 else _text_pair(item, choice, tokenizer))
        if not continuation:
            raise ValueError(f"{item.origin}: choice {c} ({choice!r}) encodes to no tokens after the context")
        if not context:
            raise ValueError(f"{item.origin}: the context encodes to no tokens; nothing would predict the choice")
        pairs.append((context, continuation))
    longest = max(len(continuation) for _, continuation in pairs)
    keep_bos = tokenizer.add_bos_token and tokenizer.bos_id is not None
    contexts, truncated = [], False
    for context, _ in pairs:
        if len(context) + longest > max_length:
            bos = [context[0]] if keep_bos and context[0] == tokenizer.bos_id else []
            room = max_length - longest - len(bos)
            if room < 1:
                raise ValueError(f"{item.origin}: a choice of {longest} tokens leaves no room for the context in "
                                 f"max_length={max_length} tokens")
            context, truncated = bos + context[len(context) - room:], True
        contexts.append(np.asarray(context, np.int32))
    return TokenizedItem(tuple(contexts), tuple(np.asarray(cont, np.int32) for _, cont in pairs)), truncated


def _log_softmax_at(spec: ModelSpec, base: Any, hidden: jax.Array, ids: jax.Array) -> jax.Array:
    """``log_softmax(head(hidden))`` read at ``ids``: hidden ``[N, D]``, ids ``[N, C]`` -> ``[N, C]`` float32."""
    logits = llama.logits_from_hidden(spec, base, hidden)
    return jnp.take_along_axis(logits, ids, axis=-1) - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def _positions_logprobs(spec: ModelSpec, base: Any, hidden: jax.Array, ids: jax.Array) -> jax.Array:
    """Per position: hidden ``[N, P, D]``, next-token ids ``[N, P]`` -> ``[N, P]``, ``P`` positions chunked."""
    n, p, d = hidden.shape
    chunk = max(1, min(p, _HEAD_ROWS // max(n, 1)))
    while p % chunk:
        chunk -= 1
    # Chunks along P, so that N (the sharded axis) stays whole within each step.
    h = jnp.moveaxis(hidden.reshape(n, p // chunk, chunk, d), 1, 0)
    t = jnp.moveaxis(ids.reshape(n, p // chunk, chunk), 1, 0)
    out = jax.lax.map(lambda x: _log_softmax_at(spec, base, x[0].reshape(-1, d), x[1].reshape(-1, 1)), (h, t))
    return jnp.moveaxis(out.reshape(p // chunk, n, chunk), 0, 1).reshape(n, p)


@functools.partial(jax.jit, static_argnames=("spec",))
def group_logprobs(spec: ModelSpec, base: Any, lora: Any, context_ids: jax.Array, context_mask: jax.Array,
                   continuation_ids: jax.Array, continuation_counts: jax.Array) -> jax.Array:
    """Summed ``log p(continuation | context)`` of every continuation of every group (nats, float32 ``[B, C]``).

    ``context_ids``/``context_mask``: int32 ``[1, B, Tc]``, left-padded (mask 1 on real tokens);
    ``continuation_ids``: int32 ``[1, B, C, K]``, right-padded; ``continuation_counts``: int32
    ``[1, B, C]``, tokens of each (0: an empty slot, scored 0). The leading axis is
    :func:`~qlora_jax.distributed.shard_batch`'s.
    """
    ctx, mask = context_ids[0], context_mask[0]
    conts, counts = continuation_ids[0], continuation_counts[0]
    b, tc = ctx.shape
    _, c, k = conts.shape
    dtype = jnp.dtype(spec.compute_dtype)
    lengths = jnp.sum(mask, axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    cache = llama.init_kv_cache(spec.config, b, tc + k - 1, dtype) if k > 1 else None
    slots_mask = jnp.pad(mask, ((0, 0), (0, k - 1))) if k > 1 else mask
    hidden, cache = llama.hidden_states(spec, base, lora, ctx, attention_mask=slots_mask, positions=positions,
                                        cache=cache)
    first = _log_softmax_at(spec, base, hidden[:, -1], conts[:, :, 0])  # [B, C]
    total = jnp.where(counts > 0, first, 0.0)
    if k == 1:
        return total
    # Each group's cache serves its C continuations: rows b * C + j.
    repeated = llama.KVCache(jnp.repeat(cache.k, c, axis=1), jnp.repeat(cache.v, c, axis=1), cache.index)
    inputs = conts[:, :, : k - 1].reshape(b * c, k - 1)
    cont_positions = jnp.broadcast_to(lengths[:, None, None] + jnp.arange(k - 1)[None, None, :], (b, c, k - 1))
    cont_positions = cont_positions.reshape(b * c, k - 1)
    cont_mask = jnp.concatenate([jnp.repeat(mask, c, axis=0), jnp.ones((b * c, k - 1), mask.dtype)], axis=1)
    hidden, _ = llama.hidden_states(spec, base, lora, inputs, attention_mask=cont_mask,
                                    positions=cont_positions.astype(jnp.int32), cache=repeated)
    rest = _positions_logprobs(spec, base, hidden, conts[:, :, 1:].reshape(b * c, k - 1)).reshape(b, c, k - 1)
    valid = jnp.arange(1, k)[None, None, :] < counts[..., None]
    return total + jnp.sum(jnp.where(valid, rest, 0.0), axis=-1)


@dataclasses.dataclass(frozen=True, eq=False)
class GroupBatch:
    """One padded batch of groups and where its results go (see :func:`group_logprobs` for the arrays).

    Attributes:
      context_ids: int32 ``[1, B, Tc]``, left-padded.
      context_mask: int32 ``[1, B, Tc]``, 1 on real tokens.
      continuation_ids: int32 ``[1, B, C, K]``, right-padded.
      continuation_counts: int32 ``[1, B, C]``, tokens of each continuation (0: an empty slot).
      owners: per real group, ``(item index, choice indices)`` in continuation-slot order.
    """

    context_ids: np.ndarray
    context_mask: np.ndarray
    continuation_ids: np.ndarray
    continuation_counts: np.ndarray
    owners: tuple[tuple[int, tuple[int, ...]], ...]


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def plan_batches(items: Sequence[TokenizedItem], *, batch_size: int, pad_id: int, max_length: int) \
        -> list[GroupBatch]:
    """Every group of ``items`` in padded batches of ``batch_size`` groups, similar shapes together.

    Args:
      items: the tokenized items.
      batch_size: groups per batch (positive).
      pad_id: the padding token.
      max_length: longest row in tokens (the lengths are bucketed up to it).

    Returns:
      The :class:`GroupBatch` list.

    Raises:
      ValueError: a non-positive ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    buckets = data_lib.bucket_lengths(max_length)
    groups = [(i, context, tuple(members), [item.continuations[m] for m in members])
              for i, item in enumerate(items) for context, members in item.groups()]
    slots = max(len(members) for _, _, members, _ in groups)
    # Similar continuation lengths first (they set K), then similar contexts.
    groups.sort(key=lambda g: (_pow2_at_least(max(len(x) for x in g[3])), len(g[1])))
    batches = []
    for first in range(0, len(groups), batch_size):
        chunk = groups[first:first + batch_size]
        tc = data_lib.padded_length(max(len(g[1]) for g in chunk), buckets)
        k = _pow2_at_least(max(len(x) for g in chunk for x in g[3]))
        context_ids = np.full((batch_size, tc), pad_id, np.int32)
        context_mask = np.zeros((batch_size, tc), np.int32)
        continuation_ids = np.full((batch_size, slots, k), pad_id, np.int32)
        continuation_counts = np.zeros((batch_size, slots), np.int32)
        for r, (_, context, _, continuations) in enumerate(chunk):
            context_ids[r, tc - len(context):] = context
            context_mask[r, tc - len(context):] = 1
            for j, continuation in enumerate(continuations):
                continuation_ids[r, j, : len(continuation)] = continuation
                continuation_counts[r, j] = len(continuation)
        batches.append(GroupBatch(context_ids, context_mask, continuation_ids, continuation_counts,
                                  tuple((i, members) for i, _, members, _ in chunk)))
    return batches
