r"""Zero- and k-shot prompts from :class:`Question`\ s, in MMLU's standard format.

**Letter style** (MMLU; lm-evaluation-harness's ``mmlu`` task template, which is Hendrycks et
al.'s with the question stripped): the model reads the choices labelled A, B, C, ... and is
scored on the letter. For ``subject="abstract_algebra"`` and two shots::

    The following are multiple choice questions (with answers) about abstract algebra.\n\n
    {shot 1 question}\nA. {choice}\nB. {choice}\nC. {choice}\nD. {choice}\nAnswer: {letter}\n\n
    {shot 2 ...}\nAnswer: {letter}\n\n
    {context}{question}\nA. {choice}\nB. {choice}\nC. {choice}\nD. {choice}\nAnswer:

and the continuations are ``" A"``, ``" B"``, ... The subject's underscores become spaces; a
question without a subject gets ``"The following are multiple choice questions (with
answers).\n\n"``. Questions are ``.strip()``-ed, choices are not. (Hendrycks' original code and
qlora.py's pre-rendered files write two spaces after "about"; lm-eval and this module write one.)

**Cloze style** (lm-eval's ARC/PIQA-style tasks, where ``acc_norm`` matters): no header and no
listed choices; ``"Question: {question}\nAnswer:"`` with each shot followed by
``" {correct choice}\n\n"``, and the continuations are ``" " + choice``.

**Shots** come from a dev split: for each question, the first ``k`` dev questions of the same
subject, in file order (MMLU's 5 dev questions per subject; lm-eval's ``first_n`` sampler).
Without a dev split they come from the evaluated questions themselves, the first ``k`` of the same
subject other than the question itself.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from qlora_jax.data.example import DatasetError
from qlora_jax.eval.items import MultipleChoiceItem, Question

__all__ = ["LETTERS", "STYLES", "mmlu_header", "letter_block", "cloze_block", "render_question", "select_shots",
           "build_items"]

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
STYLES = ("letter", "cloze")
_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
_HEADER_NO_SUBJECT = "The following are multiple choice questions (with answers).\n\n"


def mmlu_header(subject: str) -> str:
    """MMLU's task description for ``subject``, ending in a blank line.

    Args:
      subject: e.g. ``"abstract_algebra"`` (underscores read as spaces); "" for none.

    Returns:
      ``"The following are multiple choice questions (with answers) about abstract algebra.\\n\\n"``.

    References:
      Hendrycks et al., `Measuring Massive Multitask Language Understanding
      <https://arxiv.org/abs/2009.03300>`_, 2021 (MMLU).
    """
    words = subject.replace("_", " ").strip()
    return _HEADER.format(subject=words) if words else _HEADER_NO_SUBJECT


def letter_block(question: Question) -> str:
    """The question, its lettered choices, and ``"Answer:"`` (no answer).

    Args:
      question: at most 26 choices.

    Returns:
      ``"{question}\\nA. {choice}\\nB. {choice}...\\nAnswer:"``.

    Raises:
      DatasetError: more choices than letters.
    """
    if len(question.choices) > len(LETTERS):
        raise DatasetError(f"{question.origin}: {len(question.choices)} choices cannot be lettered A-Z")
    lines = [question.question.strip()] + [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question.choices)]
    return "\n".join(lines) + "\nAnswer:"


def cloze_block(question: Question) -> str:
    """The cloze-style prompt of a question.

    Args:
      question: the question.

    Returns:
      ``"Question: {question}\\nAnswer:"``.
    """
    return f"Question: {question.question.strip()}\nAnswer:"


def render_question(question: Question, shots: Sequence[Question], style: str = "letter") -> MultipleChoiceItem:
    """The item for ``question`` with ``shots`` as worked examples (see the module docstring).

    Args:
      question: the question asked.
      shots: worked examples placed before it, their answers given.
      style: ``"letter"`` (MMLU) or ``"cloze"``.

    Returns:
      The :class:`~qlora_jax.eval.items.MultipleChoiceItem`.

    Raises:
      ValueError: an unknown ``style``.
      DatasetError: shots for a question that has its own few-shot context.

    References:
      Hendrycks et al., `Measuring Massive Multitask Language Understanding
      <https://arxiv.org/abs/2009.03300>`_, 2021 (MMLU).
    """
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}; expected one of {', '.join(STYLES)}")
    if shots and question.context:
        raise DatasetError(f"{question.origin}: the row has its own few-shot context; ask for 0 shots "
                           "(the context already holds them) or remove the row's 'context'")
    if style == "letter":
        examples = "".join(f"{letter_block(s)} {LETTERS[s.answer]}\n\n" for s in shots)
        context = mmlu_header(question.subject) + examples + question.context + letter_block(question)
        choices = tuple(LETTERS[: len(question.choices)])
    else:
        examples = "".join(f"{cloze_block(s)} {s.choices[s.answer]}\n\n" for s in shots)
        context = examples + question.context + cloze_block(question)
        choices = question.choices
    return MultipleChoiceItem(context, choices, question.answer, question.subject, delimiter=" ",
                              origin=question.origin)


def select_shots(questions: Sequence[Question], shots: int, dev: Sequence[Question] | None = None) \
        -> list[list[Question]]:
    """For each question, its ``shots`` worked examples (see the module docstring).

    Args:
      questions: the evaluated questions.
      shots: worked examples per question (0 or more).
      dev: where they come from (None: the evaluated questions, each question excluded from its own).

    Returns:
      One list of ``shots`` questions per question, the first of its subject in file order.

    Raises:
      ValueError: a negative ``shots``.
      DatasetError: a subject with too few questions to draw from.
    """
    if shots < 0:
        raise ValueError(f"the number of shots must not be negative, got {shots}")
    if shots == 0:
        return [[] for _ in questions]
    pool = list(questions) if dev is None else list(dev)
    if dev is None:
        log.info("no dev split given: the %d-shot examples of each question are the first other questions of its "
                 "subject in the evaluated file", shots)
    by_subject: dict[str, list[int]] = {}
    for index, q in enumerate(pool):
        by_subject.setdefault(q.subject, []).append(index)
    selected = []
    for position, question in enumerate(questions):
        candidates = by_subject.get(question.subject, [])
        if dev is None:
            candidates = [i for i in candidates if i != position]
        if len(candidates) < shots:
            where = "the evaluated questions (no dev split given)" if dev is None else "the dev split"
            raise DatasetError(f"{question.origin}: {shots}-shot prompts need {shots} other questions of subject "
                               f"{question.subject!r} in {where}, found {len(candidates)}")
        selected.append([pool[i] for i in candidates[:shots]])
    return selected


def build_items(questions: Sequence[Question], *, shots: int = 0, style: str = "letter",
                dev: Sequence[Question] | None = None) -> list[MultipleChoiceItem]:
    """Items for ``questions``, ``shots``-shot.

    Args:
      questions: the evaluated questions.
      shots: worked examples per question.
      style: ``"letter"`` or ``"cloze"``.
      dev: where the shots come from (None: the questions themselves).

    Returns:
      One :class:`~qlora_jax.eval.items.MultipleChoiceItem` per question.

    Raises:
      ValueError: a negative ``shots`` or an unknown ``style``.
      DatasetError: too few questions of a subject to draw the shots from.
    """
    return [render_question(q, s, style) for q, s in zip(questions, select_shots(questions, shots, dev), strict=True)]
