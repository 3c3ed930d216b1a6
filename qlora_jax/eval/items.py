"""The two normal forms of the harness: a :class:`Question` as files hold it, and a
:class:`MultipleChoiceItem` as the model is asked it (a context and one continuation per choice).

Every reader produces one of them; :mod:`.prompts` turns questions into items; scoring only ever
sees items. Both check their invariants on construction and name ``origin`` (``file:line``) in
the error, so a bad row fails where it was read, not later inside a compiled function.
"""

from __future__ import annotations

import dataclasses

from qlora_jax.data.example import DatasetError

__all__ = ["Question", "MultipleChoiceItem", "MultipleChoiceTask"]


def _check_text(value: object, field: str, origin: str, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise DatasetError(f"{origin}: field {field!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DatasetError(f"{origin}: field {field!r} is empty")


def _check_choices(choices: tuple, answer: object, origin: str) -> None:
    if len(choices) < 2:
        raise DatasetError(f"{origin}: field 'choices' needs at least 2 choices, got {len(choices)}")
    for i, choice in enumerate(choices):
        _check_text(choice, f"choices[{i}]", origin)
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise DatasetError(f"{origin}: field 'answer' must be an integer index into 'choices', "
                           f"got {type(answer).__name__} {answer!r}")
    if not 0 <= answer < len(choices):
        raise DatasetError(f"{origin}: field 'answer' is {answer}, out of range for {len(choices)} choices "
                           f"(expected 0 to {len(choices) - 1})")


@dataclasses.dataclass(frozen=True)
class Question:
    """A multiple-choice question: ``choices[answer]`` is correct.

    Attributes:
      question: the question's text.
      choices: at least 2 choices.
      answer: the index of the correct choice.
      subject: the group it is scored in (MMLU's subject, e.g. ``"abstract_algebra"``; "" for none).
      context: text placed right before this question's own prompt, e.g. few-shot examples the file
        already rendered for it ("" for none).
      origin: where it was read (``file:line``).

    Raises:
      DatasetError: an empty question or choice, fewer than 2 choices, or an ``answer`` out of range.
    """

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""
    context: str = ""
    origin: str = "<unknown>"

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))
        _check_text(self.question, "question", self.origin)
        _check_choices(self.choices, self.answer, self.origin)
        _check_text(self.subject, "subject", self.origin, allow_empty=True)
        _check_text(self.context, "context", self.origin, allow_empty=True)


@dataclasses.dataclass(frozen=True)
class MultipleChoiceItem:
    """One question as the model is asked it.

    Choice ``c`` is scored by the log-likelihood of ``delimiter + choices[c]`` after ``context``
    (lm-evaluation-harness's ``target_delimiter``; ``acc_norm`` divides by ``len(choices[c])``,
    characters without the delimiter, as lm-eval does).

    Attributes:
      context: the prompt.
      choices: the continuations scored (at least 2).
      answer: the index of the correct choice.
      subject: the group it is scored in ("" for none).
      delimiter: text between the context and each choice.
      chat: ``context`` is a user message and each choice an assistant reply; the pair is rendered
        with the tokenizer's chat template and the reply's target tokens (its text and the
        end-of-turn token, exactly what training learns) are scored. ``delimiter`` must then be "".
      separate_encoding: the context and each continuation are tokenized on their own and
        concatenated (qlora.py's way for its ``input``/``output`` rows); otherwise the pair is
        tokenized as one text and split where the context's tokens end (lm-eval's way).
      origin: where it was read.

    Raises:
      DatasetError: bad fields (as :class:`Question`), or a chat item with a delimiter.
    """

    context: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""
    delimiter: str = " "
    chat: bool = False
    separate_encoding: bool = False
    origin: str = "<unknown>"

    def __post_init__(self):
        object.__setattr__(self, "choices", tuple(self.choices))
        _check_text(self.context, "context", self.origin)
        _check_choices(self.choices, self.answer, self.origin)
        _check_text(self.subject, "subject", self.origin, allow_empty=True)
        _check_text(self.delimiter, "delimiter", self.origin, allow_empty=True)
        if self.chat and (self.delimiter or self.separate_encoding):
            raise DatasetError(f"{self.origin}: a chat item has no delimiter and no separate encoding (the chat "
                               "template decides how the reply follows the user turn)")


@dataclasses.dataclass(frozen=True)
class MultipleChoiceTask:
    """A named list of items (what an evaluator scores).

    Attributes:
      name: the task's name.
      items: its items (at least one).
      description: what it measures.

    Raises:
      DatasetError: no items.
    """

    name: str
    items: tuple[MultipleChoiceItem, ...]
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "items", tuple(self.items))
        if not self.items:
            raise DatasetError(f"task {self.name!r} has no questions")

    def __len__(self) -> int:
        return len(self.items)
