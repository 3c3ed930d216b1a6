"""An offline multiple-choice task on real data: pick the true reply from held-out chatterbot talk.

**What it is.** A retrieval-style sanity task, *not* MMLU: it asks whether the model, given a
user turn, finds the corpus's own reply more likely than replies from other topics. It needs no
download and moves with finetuning on chatterbot (the replies' register is what training
teaches), so it shows the harness working and a finetune helping; it says nothing about
knowledge or reasoning.

**How it is built** (deterministic given the arguments):

1. The conversations are split exactly as the finetuning recipe splits them:
   :func:`qlora_jax.data.load_examples` then :func:`qlora_jax.data.train_eval_split` with the
   recipe's ``eval_dataset_size``, ``seed`` and ``max_eval_samples``. Only held-out
   conversations are used.
2. Never seen in training, by text, not only by index: the corpus repeats many conversations,
   so a held-out question or reply whose text (case and spacing ignored) is any turn of any
   training conversation is not used (neither as a question, nor as a true reply, nor as a
   distractor).
3. Each question is the first user turn of a held-out conversation; its true reply is the turn
   that follows. The topic is the corpus file it came from (``ai``, ``trivia``, ...), which is
   also its ``subject``.
4. Distractors: ``num_choices - 1`` replies of held-out conversations of *other* topics, distinct
   from the true reply and from each other (as text), drawn with
   ``numpy.random.default_rng([seed, i])`` for question ``i``, which also shuffles the choices.

Items are chat items: the user turn and each candidate reply are rendered with the model's chat
template, and the reply's target tokens (text plus end-of-turn) are scored, as training does.
"""

from __future__ import annotations

import logging
import pathlib

import numpy as np

from qlora_jax import data as data_lib
from qlora_jax.data.example import DatasetError, Example
from qlora_jax.eval.items import MultipleChoiceItem, MultipleChoiceTask

__all__ = ["HeldOutTooSmallError", "chatterbot_task", "conversation_topic"]

log = logging.getLogger(__name__)


def _normal(text: str) -> str:
    return " ".join(text.casefold().split())


def conversation_topic(example: Example) -> str:
    """The chatterbot topic of a conversation: its corpus file's name.

    Args:
      example: a chatterbot conversation (origin ``.../ai.yml: ...``).

    Returns:
      The topic, e.g. ``"ai"``.
    """
    return pathlib.Path(example.origin.split(": conversations[")[0]).stem


def _first_exchange(example: Example) -> tuple[str, str]:
    messages = example.messages
    for i in range(len(messages) - 1):
        if messages[i]["role"] == "user" and messages[i + 1]["role"] == "assistant":
            return messages[i]["content"], messages[i + 1]["content"]
    raise DatasetError(f"{example.origin}: no user turn followed by an assistant turn")


class HeldOutTooSmallError(DatasetError):
    """The held-out split is too small for the reply-retrieval task: too few questions not seen in
    training, or too few replies of other topics to draw the distractors from.

    ``needed``: the smallest held-out count (``eval_dataset_size``, same seed) that is enough, or
    None if no split of this dataset is.
    """

    def __init__(self, message: str, needed: int | None):
        super().__init__(message)
        self.needed = needed


def _items(train: list[Example], held_out: list[Example], seed: int,
           num_choices: int) -> tuple[list[MultipleChoiceItem], int, str | None]:
    """``(items, skipped, problem)``: the task's items over this split, how many held-out
    conversations were dropped as seen in training, and what makes the split too small (None: nothing)."""
    seen = {_normal(m["content"]) for ex in train for m in ex.messages}
    exchanges = [(conversation_topic(ex), *_first_exchange(ex), ex.origin) for ex in held_out]
    replies_by_topic: dict[str, list[str]] = {}
    for topic, _, reply, _ in exchanges:
        if _normal(reply) not in seen:
            replies_by_topic.setdefault(topic, [])
            if _normal(reply) not in {_normal(r) for r in replies_by_topic[topic]}:
                replies_by_topic[topic].append(reply)

    items, skipped = [], 0
    for index, (topic, question, reply, origin) in enumerate(exchanges):
        if _normal(question) in seen or _normal(reply) in seen:
            skipped += 1
            continue
        pool, pool_texts = [], {_normal(reply)}
        for other_topic in sorted(replies_by_topic):
            if other_topic == topic:
                continue
            for candidate in replies_by_topic[other_topic]:
                if _normal(candidate) not in pool_texts:
                    pool.append(candidate)
                    pool_texts.add(_normal(candidate))
        if len(pool) < num_choices - 1:
            return items, skipped, (f"{origin}: only {len(pool)} held-out replies of other topics to draw "
                                    f"{num_choices - 1} distractors from")
        rng = np.random.default_rng([seed, index])
        distractors = [pool[i] for i in rng.choice(len(pool), size=num_choices - 1, replace=False)]
        order = rng.permutation(num_choices)
        choices = [([reply] + distractors)[i] for i in order]
        items.append(MultipleChoiceItem(question, tuple(choices), int(np.argmax(order == 0)), topic, delimiter="",
                                        chat=True, origin=origin))
    if not items:
        return items, skipped, (f"none of the {len(held_out)} held-out conversations has a question and reply that "
                                "are not also turns of the training split")
    return items, skipped, None


def _held_out_needed(kept: list[Example], start: int, seed: int, num_choices: int) -> int | None:
    """The smallest held-out count above ``start`` for which the task can be built (None: none can).

    The split's permutation does not depend on the count (:func:`qlora_jax.data.split_indices`), so
    a larger count holds out a superset and trains on a subset: more questions qualify and the
    distractor pools only grow. Doubling, then bisecting, finds the count in a few tries.
    """

    def enough(count: int) -> bool:
        train, held_out = data_lib.split_indices(len(kept), count, seed)
        return _items([kept[i] for i in train], [kept[i] for i in held_out], seed, num_choices)[2] is None

    top = len(kept) - 1  # at least one conversation trains
    low, high = start, min(max(start + 1, 2 * start), top)  # low: too few
    if high <= low:
        return None
    while not enough(high):
        if high == top:
            return None
        low, high = high, min(2 * high, top)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return high


def chatterbot_task(
    *,
    dataset: str = "chatterbot",
    eval_dataset_size: int | float = 96,
    seed: int = 0,
    max_eval_samples: int | None = None,
    num_choices: int = 4,
) -> MultipleChoiceTask:
    """The held-out chatterbot reply-retrieval task (see the module docstring).

    Args:
      dataset: ``"chatterbot"`` or ``"chatterbot:<language>"``.
      eval_dataset_size: the finetune's own setting (a count, or a fraction of the conversations),
        so that the questions are its held-out split.
      seed: the finetune's split seed.
      max_eval_samples: the finetune's cap on held-out conversations (None: none).
      num_choices: the true reply plus ``num_choices - 1`` distractors (at least 2).

    Returns:
      A :class:`~qlora_jax.eval.items.MultipleChoiceTask` of chat items.

    Raises:
      ValueError: a dataset other than chatterbot, or fewer than 2 choices.
      HeldOutTooSmallError: a split too small for the task, saying how many held-out conversations
        would do.
    """
    if dataset.partition(":")[0] != "chatterbot":
        raise ValueError(f"the reply-retrieval task is built from chatterbot-corpus, not {dataset!r}")
    if num_choices < 2:
        raise ValueError(f"num_choices must be at least 2, got {num_choices}")
    examples = data_lib.load_examples(dataset)
    train, held_out, _ = data_lib.train_eval_split(examples, eval_dataset_size, seed,
                                                   max_eval_samples=max_eval_samples)
    items, skipped, problem = _items(train, held_out, seed, num_choices)
    if problem is not None:
        kept, _ = data_lib.clean_examples(examples)
        needed = _held_out_needed(kept, len(held_out), seed, num_choices)
        enough = (f"no split of {dataset} is large enough" if needed is None else
                  f"at least {needed} needed with seed {seed}")
        raise HeldOutTooSmallError(f"the chatterbot reply-retrieval task: {problem} ({len(held_out)} conversations "
                                   f"held out; {enough})", needed)
    log.info("chatterbot reply retrieval: %d questions from %d held-out conversations (%d dropped: their question "
             "or reply is also a turn of the training split)", len(items), len(held_out), skipped)
    return MultipleChoiceTask(
        "chatterbot", tuple(items),
        description=f"held-out chatterbot reply retrieval, {num_choices} choices (a sanity task, not MMLU)")
