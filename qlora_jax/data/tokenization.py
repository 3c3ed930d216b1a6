"""Conversations -> token ids with a loss mask over the assistant's tokens.

**Rendering.** A conversation is rendered with a chat template (the tokenizer's own, or a built-in
such as ``"chatml"``). The text of assistant turn ``k`` is found from prefixes: it starts where
``render(messages[:k], add_generation_prompt=True)`` ends and ends where ``render(messages[:k + 1])``
ends. Both must be prefixes of the full rendering, in order; a template for which this fails (one
that rewrites earlier turns depending on what follows) raises :class:`ChatTemplateError` rather
than silently mislabelling tokens.

**Tokens and mask.** The rendered text is cut at those boundaries and each piece is encoded on its
own, with no BOS/EOS added (the template writes its special tokens; as in transformers'
``apply_chat_template(tokenize=True)``). Encoding the pieces separately makes the prompt tokens
exactly those of ``encode(render(messages[:k], add_generation_prompt=True))``, i.e. what the model
sees when asked to generate turn ``k``. Within an assistant piece, the tokens up to and including
its last special token (the end of turn, e.g. ``<|im_end|>``) are targets, so the model learns to
stop; anything the template writes after it (ChatML's ``"\\n"``) is scaffolding. System and user
turns and the template's scaffolding are source: not targets unless ``train_on_source``.

**Convention.** ``loss_mask[t] == 1`` iff token ``t`` is a target, predicted from tokens ``< t``.
A training step uses ``logits = model(input_ids)[:-1]``, ``targets = input_ids[1:]``,
``weights = loss_mask[1:]``. ``loss_mask[0]`` is always 0 (nothing predicts the first token), so
``loss_mask.sum()`` is the number of predicted target tokens.

**Truncation** (qlora.py's ``source_max_len``/``target_max_len``, generalised to many turns). The
*response* is everything from the start of the last assistant turn; the *source* is everything
before it (earlier assistant turns inside it stay targets). The response keeps its first
``target_max_len`` tokens (a cut response also loses its end-of-turn token, as in qlora.py).
The source keeps its *last* ``source_max_len`` tokens, the context closest to the response;
qlora.py keeps the first ones instead, which can leave a long prompt without its question. When
the tokenizer adds BOS to every sequence (``add_bos_token``, e.g. Llama) and the rendering starts
with it, a cut source keeps that BOS in front.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import multiprocessing
from collections.abc import Callable, Sequence

import jinja2
import numpy as np

from qlora_jax.data.example import Example
from qlora_jax.tokenizer import ChatTemplateError, Tokenizer, check_chat_template, compile_chat_template

__all__ = ["ChatTemplateError", "ChatRenderer", "TokenizedExample", "chat_segments", "tokenize_example",
           "tokenize_examples"]

log = logging.getLogger(__name__)

Render = Callable[..., str]


@dataclasses.dataclass(frozen=True, eq=False)  # arrays: compare with np.array_equal, not ==
class TokenizedExample:
    """One conversation's tokens.

    Attributes:
      input_ids: int32 ``[T]``.
      loss_mask: int32 ``[T]`` in {0, 1}, 1 where token t is a target.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class ChatRenderer:
    """A tokenizer's ``apply_chat_template``, with the Jinja template compiled once.

    Compiling a template takes milliseconds and tokenizing a multi-turn dataset renders each
    conversation once per assistant turn, so compiling per call would dominate. Picklable (it
    keeps the template's source), so that worker processes can rebuild it.

    Args:
      template_source: the Jinja template.
      bos_token: the template's ``bos_token``.
      eos_token: the template's ``eos_token``.
      origin: names the template in error messages.
    """

    def __init__(self, template_source: str, *, bos_token: str = "", eos_token: str = "",
                 origin: str = "chat template"):
        check_chat_template(template_source, origin, bos_token, eos_token)
        self.template_source, self.bos_token, self.eos_token = template_source, bos_token, eos_token
        self._template = compile_chat_template(template_source)

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer, template: str | None = None) -> ChatRenderer:
        """``template``: a built-in name, a Jinja string, or None for the tokenizer's own."""
        return cls(tokenizer.resolve_template(template), bos_token=tokenizer.bos_token or "",
                   eos_token=tokenizer.eos_token or "")

    def __call__(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self._template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token, eos_token=self.eos_token)

    def __reduce__(self):
        return (_rebuild_renderer, (self.template_source, self.bos_token, self.eos_token))


def _rebuild_renderer(template_source: str, bos_token: str, eos_token: str) -> ChatRenderer:
    return ChatRenderer(template_source, bos_token=bos_token, eos_token=eos_token)


def _divergence(expected_prefix: str, text: str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(expected_prefix, text, strict=False)) if a != b),
              min(len(expected_prefix), len(text)))
    return f"at character {at}: {expected_prefix[at:at + 40]!r} versus {text[at:at + 40]!r}"


def chat_segments(messages: Sequence[dict[str, str]], render: Render, origin: str = "<conversation>") \
        -> list[tuple[str, bool]]:
    """The full rendering cut into ``(text, is_assistant_turn)`` pieces, in order, joining back to it.

    Args:
      messages: the conversation, ``({"role", "content"}, ...)``.
      render: renders a message list (``add_generation_prompt`` as a keyword), e.g. a :class:`ChatRenderer`.
      origin: names the conversation in error messages.

    Returns:
      ``[(text, is_assistant_turn), ...]``.

    Raises:
      ChatTemplateError: a template that refuses the conversation, is not prefix-stable, or closes an
        assistant turn without its text.
    """
    try:
        return _chat_segments(messages, render, origin)
    except jinja2.TemplateError as error:
        # The template renders a plain exchange (ChatRenderer checked it), so this conversation's shape is at fault.
        raise ChatTemplateError(f"{origin}: the chat template refuses this conversation: {error}") from error


def _chat_segments(messages, render, origin):
    full = render(messages)
    pieces: list[tuple[str, bool]] = []
    position = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:k], add_generation_prompt=True)
        through = render(messages[: k + 1])
        problem = None
        if not full.startswith(prompt):
            problem = (f"rendering messages[:{k}] with the generation prompt is not a prefix of the whole "
                       f"conversation ({_divergence(prompt, full)})")
        elif not full.startswith(through):
            problem = (f"rendering messages[:{k + 1}] is not a prefix of the whole conversation "
                       f"({_divergence(through, full)})")
        elif len(prompt) < position:
            problem = f"the generation prompt for message {k} ends inside the previous assistant turn"
        elif len(through) <= len(prompt):
            problem = f"assistant message {k} renders to no text after its generation prompt"
        if problem:
            raise ChatTemplateError(f"{origin}: the chat template is not prefix-stable: {problem}. Source and "
                                    "target tokens cannot be told apart; use a template that renders earlier "
                                    "turns the same whatever follows (e.g. 'chatml')")
        pieces += [(full[position:len(prompt)], False), (full[len(prompt):len(through)], True)]
        position = len(through)
    pieces.append((full[position:], False))
    return [(text, is_target) for text, is_target in pieces if text]


def _segment_chunk(render: ChatRenderer, examples: Sequence[Example]) -> list[list[tuple[str, bool]]]:
    return [chat_segments(example.messages, render, example.origin) for example in examples]


def _segment_all(examples: Sequence[Example], render: ChatRenderer, num_workers: int) \
        -> list[list[tuple[str, bool]]]:
    """:func:`chat_segments` of every example, over ``num_workers`` processes when worth it.

    Segmenting renders each conversation once per assistant turn, so its cost grows with the
    square of the number of turns (chitchat: ~20 s on one core). Workers are spawned, not forked:
    forking a process that runs JAX's threads can deadlock.
    """
    costs = [len(example.messages) ** 2 for example in examples]
    if num_workers <= 1 or sum(costs) < 200_000:
        return _segment_chunk(render, examples)
    # Contiguous chunks of similar cost, several per worker to even out the load.
    target = sum(costs) / (4 * num_workers)
    chunks, start, cost = [], 0, 0
    for i, c in enumerate(costs):
        cost += c
        if cost >= target:
            chunks.append(examples[start:i + 1])
            start, cost = i + 1, 0
    if start < len(examples):
        chunks.append(examples[start:])
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(num_workers, len(chunks)), mp_context=context) as pool:
        return [pieces for chunk in pool.map(_segment_chunk, [render] * len(chunks), chunks) for pieces in chunk]


def _special_ids(tokenizer: Tokenizer) -> frozenset[int]:
    special = {i for i, token in tokenizer.hf.get_added_tokens_decoder().items() if token.special}
    if tokenizer.eos_id is not None:
        special.add(tokenizer.eos_id)
    return frozenset(special)


def _keep_last(ids: list[int], count: int) -> list[int]:
    return ids[len(ids) - count:] if len(ids) > count else ids


def _assemble(
    pieces: list[tuple[list[int], bool]],
    special_ids: frozenset[int],
    *,
    bos_id: int | None,
    source_max_len: int,
    target_max_len: int,
    train_on_source: bool,
    origin: str,
) -> tuple[TokenizedExample, bool, bool]:
    ids: list[int] = []
    mask: list[int] = []
    response_start = 0
    for piece, is_target in pieces:
        if is_target:
            end_of_turn = max((i for i, token in enumerate(piece) if token in special_ids), default=None)
            if end_of_turn is None:
                raise ChatTemplateError(f"{origin}: the chat template closes an assistant turn without a special "
                                        "end-of-turn token, so the model could not learn to stop; use a template "
                                        "that ends assistant turns with one (e.g. 'chatml')")
            response_start = len(ids)
            mask += [1] * (end_of_turn + 1) + [0] * (len(piece) - end_of_turn - 1)
        else:
            mask += [0] * len(piece)
        ids += piece

    source, response = slice(0, response_start), slice(response_start, len(ids))
    source_ids, source_mask = ids[source], mask[source]
    cut_source = len(source_ids) > source_max_len
    if cut_source:
        keep_bos = bos_id is not None and source_ids[0] == bos_id
        kept = source_max_len - 1 if keep_bos else source_max_len
        source_ids = ([bos_id] if keep_bos else []) + _keep_last(source_ids, kept)
        source_mask = ([0] if keep_bos else []) + _keep_last(source_mask, kept)
    cut_response = len(ids) - response_start > target_max_len
    input_ids = np.asarray(source_ids + ids[response][:target_max_len], np.int32)
    loss_mask = np.asarray(source_mask + mask[response][:target_max_len], np.int32)
    if train_on_source:
        loss_mask[:] = 1
    loss_mask[:1] = 0
    return TokenizedExample(input_ids, loss_mask), cut_source, cut_response


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    *,
    template: str | None = None,
    source_max_len: int = 1024,
    target_max_len: int = 256,
    train_on_source: bool = False,
    num_workers: int = 1,
) -> list[TokenizedExample]:
    """Token ids and loss masks of conversations (see the module docstring for the rules).

    Args:
      examples: the conversations.
      tokenizer: the model's tokenizer.
      template: a built-in name (``"chatml"``, ``"llama2"``, ``"llama3"``), a Jinja string, or None
        for the tokenizer's own.
      source_max_len: most tokens kept of the prompt part (at least 1).
      target_max_len: most tokens kept of the response part (at least 1); each result has at most
        ``source_max_len + target_max_len`` tokens.
      train_on_source: the prompt tokens are targets too.
      num_workers: > 1 renders long multi-turn datasets in that many worker processes (same results).

    Returns:
      One :class:`TokenizedExample` per conversation.

    Raises:
      ValueError: ``source_max_len`` or ``target_max_len`` below 1.
      ChatTemplateError: a template that cannot render a conversation (as :func:`chat_segments`).
    """
    if source_max_len < 1 or target_max_len < 1:
        raise ValueError(f"source_max_len and target_max_len must be at least 1, "
                         f"got {source_max_len} and {target_max_len}")
    render = ChatRenderer.for_tokenizer(tokenizer, template)
    special_ids = _special_ids(tokenizer)
    bos_id = tokenizer.bos_id if tokenizer.add_bos_token else None
    segmented = _segment_all(examples, render, num_workers)
    texts = [text for pieces in segmented for text, _ in pieces]
    # One batched call: the Rust tokenizer encodes in parallel (same ids as Tokenizer.encode).
    encoded = iter(e.ids for e in tokenizer.hf.encode_batch(texts, add_special_tokens=False))
    results, cut_sources, cut_responses = [], 0, 0
    for example, pieces in zip(examples, segmented, strict=True):
        tokenized, cut_source, cut_response = _assemble(
            [(next(encoded), is_target) for _, is_target in pieces], special_ids, bos_id=bos_id,
            source_max_len=source_max_len, target_max_len=target_max_len, train_on_source=train_on_source,
            origin=example.origin)
        results.append(tokenized)
        cut_sources += cut_source
        cut_responses += cut_response
    if cut_sources or cut_responses:
        log.info("truncated the source of %d and the response of %d of %d examples (source_max_len=%d, "
                 "target_max_len=%d)", cut_sources, cut_responses, len(results), source_max_len, target_max_len)
    return results


def tokenize_example(example: Example, tokenizer: Tokenizer, **options) -> TokenizedExample:
    """:func:`tokenize_examples` of one conversation.

    Args:
      example: the conversation.
      tokenizer: the model's tokenizer.
      **options: :func:`tokenize_examples`' keyword options.

    Returns:
      Its :class:`TokenizedExample`.
    """
    return tokenize_examples([example], tokenizer, **options)[0]
