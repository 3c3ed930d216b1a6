"""Scores -> metrics: accuracy both ways, their standard errors, per-subject results, answer loss.

Definitions (``ll[i, c]``: summed log-likelihood, nats, of choice ``c`` of question ``i``):

* ``acc``: ``argmax_c ll[i, c] == answer`` (lm-eval's ``acc``). When the choices are the letters
  of an MMLU prompt this *is* qlora.py's letter-argmax: the argmax over the A/B/C/D token logits
  at the answer position (the shared log-normaliser does not change the argmax).
* ``acc_norm``: ``argmax_c ll[i, c] / len(choice_c)``, the choice's length in characters without
  the delimiter (lm-eval's ``acc_norm``; equal to ``acc`` when all choices have one length, as
  letters do).
* ``answer_loss``: the mean over questions of ``-ll[i, answer] / tokens(answer)``, nats per
  token of the correct continuation over the whole vocabulary. For letters it is the
  cross-entropy of the answer letter: qlora.py's ``mmlu_loss`` without its end-of-sequence token
  and without its per-batch averaging.
* Ties go to the first choice (``numpy.argmax``, as lm-eval).
* ``*_stderr``: the standard error of the mean of the 0/1 scores, ``sqrt(p (1 - p) / (n - 1))``
  (the binomial proportion's, with lm-eval's sample variance; None for ``n < 2``).
* ``acc`` is the mean over all questions (lm-eval's MMLU aggregate, weighted by size);
  ``subject_mean_acc`` the unweighted mean of the subjects' accuracies (qlora.py's
  ``mmlu_{split}_accuracy``), with standard error ``sqrt(sum_s stderr_s^2) / S``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["MultipleChoiceScores", "stderr_of_mean"]


def stderr_of_mean(scores: np.ndarray) -> float | None:
    """Standard error of the mean of 0/1 ``scores`` (sample variance).

    Args:
      scores: ``[N]`` per-question scores, 0 or 1.

    Returns:
      ``sqrt(var(scores, ddof=1) / N)``; None for fewer than 2 scores.
    """
    n = len(scores)
    if n < 2:
        return None
    p = float(np.mean(scores))
    return math.sqrt(p * (1.0 - p) / (n - 1))


@dataclasses.dataclass(frozen=True, eq=False)
class MultipleChoiceScores:
    """Per-question results of one evaluation (``N`` questions, at most ``C`` choices each).

    Attributes:
      loglik: float64 ``[N, C]`` summed log-likelihoods in nats (-inf where a question has fewer
        choices).
      num_tokens: int ``[N, C]`` target tokens per choice.
      choice_chars: int ``[N, C]`` characters per choice (acc_norm's divisor).
      answers: int ``[N]``, the correct choice's index.
      subjects: one per question.
    """

    loglik: np.ndarray
    num_tokens: np.ndarray
    choice_chars: np.ndarray
    answers: np.ndarray
    subjects: tuple[str, ...]

    def predictions(self, normalized: bool = False) -> np.ndarray:
        """The chosen index per question: by summed log-likelihood, or per character (``normalized``)."""
        scores = self.loglik / np.maximum(self.choice_chars, 1) if normalized else self.loglik
        return np.argmax(scores, axis=1)

    def correct(self, normalized: bool = False) -> np.ndarray:
        """float64 ``[N]``: 1 where the prediction is the answer."""
        return (self.predictions(normalized) == self.answers).astype(np.float64)

    def answer_losses(self) -> np.ndarray:
        """float64 ``[N]``: nats per token of the correct continuation."""
        rows = np.arange(len(self.answers))
        return -self.loglik[rows, self.answers] / self.num_tokens[rows, self.answers]

    def subject_names(self) -> list[str]:
        return sorted(set(self.subjects))

    def metrics(self, prefix: str = "mc_") -> dict[str, float | int | None]:
        """Flat metrics for ``metrics.jsonl`` (see the module docstring), every key starting with ``prefix``.

        Per subject: ``{prefix}acc/{subject}`` and ``{prefix}count/{subject}``.
        """
        correct, correct_norm = self.correct(), self.correct(normalized=True)
        subjects = np.asarray(self.subjects, dtype=object)
        out: dict[str, float | int | None] = {
            f"{prefix}acc": float(np.mean(correct)),
            f"{prefix}acc_stderr": stderr_of_mean(correct),
            f"{prefix}acc_norm": float(np.mean(correct_norm)),
            f"{prefix}acc_norm_stderr": stderr_of_mean(correct_norm),
            f"{prefix}answer_loss": float(np.mean(self.answer_losses())),
            f"{prefix}count": len(correct),
        }
        subject_accs, subject_errors = [], []
        per_subject: dict[str, float | int | None] = {}
        for subject in self.subject_names():
            scores = correct[subjects == subject]
            subject_accs.append(float(np.mean(scores)))
            subject_errors.append(stderr_of_mean(scores))
            per_subject[f"{prefix}acc/{subject}"] = subject_accs[-1]
            per_subject[f"{prefix}count/{subject}"] = len(scores)
        out[f"{prefix}subject_mean_acc"] = float(np.mean(subject_accs))
        out[f"{prefix}subject_mean_acc_stderr"] = (
            None if any(e is None for e in subject_errors)
            else math.sqrt(sum(e * e for e in subject_errors)) / len(subject_errors))
        out[f"{prefix}num_subjects"] = len(subject_accs)
        out.update(per_subject)
        return out

    @classmethod
    def from_rows(cls, loglik: Sequence[Sequence[float]], num_tokens: Sequence[Sequence[int]],
                  choices: Sequence[Sequence[str]], answers: Sequence[int], subjects: Sequence[str]) \
            -> MultipleChoiceScores:
        """From ragged per-question lists (questions may have different numbers of choices)."""
        n, width = len(answers), max(len(c) for c in choices)
        ll = np.full((n, width), -np.inf)
        tokens = np.ones((n, width), np.int64)
        chars = np.ones((n, width), np.int64)
        for i, (row_ll, row_tokens, row_choices) in enumerate(zip(loglik, num_tokens, choices, strict=True)):
            k = len(row_choices)
            ll[i, :k], tokens[i, :k] = row_ll, row_tokens
            chars[i, :k] = [len(c) for c in row_choices]
        return cls(ll, tokens, chars, np.asarray(answers, np.int64), tuple(subjects))
