"""Multiple-choice files in the formats users have, read into questions or items.

Files: ``.json`` (an array, or one object per line), ``.jsonl``/``.ndjson``, and ``.parquet``
(needs ``pyarrow``; Hugging Face ``datasets`` exports and the Hub's MMLU files are parquet). Row
formats, decided from the first row (every row must then be in it):

* ``qlora``: qlora.py's ``five_shot_mmlu_{val,test}.json`` / ``zero_shot_mmlu_*.json`` rows,
  ``{"input", "output", "subject"?}``: ``input`` is the whole rendered prompt (few-shot examples
  included, ending in ``"Answer:"``) and ``output`` the letter, one of A-D. They become items
  whose choices are the letters with no delimiter, tokenized apart from the prompt, as qlora.py
  does (its ``abcd_idx`` are the tokens of "A".."D" encoded alone).
* ``questions``: the Hugging Face ``cais/mmlu`` columns ``{"question", "choices", "answer",
  "subject"?}`` (``answer`` an index into ``choices``), which is also this harness's
  lm-evaluation-harness-style JSONL, with an optional ``"context"``: text placed right before the
  question's prompt, e.g. few-shot examples already rendered for it. Prompts are built by
  :mod:`.prompts`, zero- or k-shot.

A bad row fails with :class:`~qlora_jax.data.DatasetError` naming the file, the row and the field.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from qlora_jax.data.example import DatasetError
from qlora_jax.data.files import JSONL_SUFFIXES, Row, read_rows
from qlora_jax.eval.items import MultipleChoiceItem, Question
from qlora_jax.eval.prompts import LETTERS

__all__ = ["FORMATS", "QLORA_LETTERS", "read_table", "detect_format", "question_from_row", "qlora_item_from_row",
           "load_questions", "load_qlora_items"]

FORMATS = ("qlora", "questions")
QLORA_LETTERS = LETTERS[:4]
_SUFFIXES = (".json", *JSONL_SUFFIXES, ".parquet")


def _parquet_rows(path: pathlib.Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(f"{path}: reading .parquet files needs pyarrow, which is not installed "
                           "(pip install pyarrow), or convert the file to .jsonl") from None
    try:
        table = pq.read_table(path)
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise DatasetError(f"{path}: not a readable parquet file ({error})") from None
    return [Row(f"{path}[{index}]", row) for index, row in enumerate(table.to_pylist())]


def read_table(path: str | pathlib.Path) -> list[Row]:
    """The rows of a ``.json``/``.jsonl``/``.ndjson``/``.parquet`` file, each with its location.

    Args:
      path: the file.

    Returns:
      One :class:`~qlora_jax.data.files.Row` per record.

    Raises:
      DatasetError: no such file, an unsupported suffix, no rows, or an unreadable file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.suffix not in _SUFFIXES:
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(_SUFFIXES)}")
    rows = _parquet_rows(path) if path.suffix == ".parquet" else read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: the file holds no rows")
    return rows


def _object(row: Any, location: str) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise DatasetError(f"{location}: expected an object with fields, got {type(row).__name__}")
    return row


def _field(row: Mapping[str, Any], name: str, location: str, default: Any = ...) -> Any:
    if name not in row or row[name] is None:
        if default is not ...:
            return default
        present = ", ".join(repr(k) for k in row) or "none"
        raise DatasetError(f"{location}: missing field {name!r} (fields present: {present})")
    return row[name]


def detect_format(row: Any, location: str) -> str:
    """The format of an evaluation file, from the fields of one row.

    Args:
      row: one record.
      location: where it was read (``file:line``), for the error message.

    Returns:
      ``"qlora"`` (qlora.py's ``input``/``output``) or ``"questions"``.

    Raises:
      DatasetError: neither format's fields.
    """
    row = _object(row, location)
    if "input" in row and "output" in row:
        return "qlora"
    if "question" in row:
        return "questions"
    present = ", ".join(repr(k) for k in row) or "none"
    raise DatasetError(f"{location}: cannot tell the format: expected qlora.py's MMLU fields 'input' and 'output', "
                       f"or 'question', 'choices' and 'answer' (fields present: {present})")


def question_from_row(row: Any, location: str) -> Question:
    """A ``questions``-format row as a :class:`Question`.

    Args:
      row: one record (``question``, ``choices``, ``answer``, optional ``subject``).
      location: where it was read, for error messages.

    Returns:
      The :class:`~qlora_jax.eval.items.Question`.

    Raises:
      DatasetError: a missing field, or ``choices`` that is not a list of strings.
    """
    row = _object(row, location)
    choices = _field(row, "choices", location)
    if isinstance(choices, (str, bytes)) or not isinstance(choices, (list, tuple)):
        raise DatasetError(f"{location}: field 'choices' must be a list of strings, got {type(choices).__name__}")
    return Question(question=_field(row, "question", location), choices=tuple(choices),
                    answer=_field(row, "answer", location), subject=_field(row, "subject", location, ""),
                    context=_field(row, "context", location, ""), origin=location)


def qlora_item_from_row(row: Any, location: str) -> MultipleChoiceItem:
    """A qlora.py MMLU row as an item: the rendered prompt, scored on the letters A-D.

    Args:
      row: one record (``input``, ``output`` a letter, optional ``subject``).
      location: where it was read, for error messages.

    Returns:
      The :class:`~qlora_jax.eval.items.MultipleChoiceItem`.

    Raises:
      DatasetError: a missing field, or an ``output`` that is not one of A-D.
    """
    row = _object(row, location)
    prompt = _field(row, "input", location)
    output = _field(row, "output", location)
    if not isinstance(output, str) or output not in QLORA_LETTERS:
        raise DatasetError(f"{location}: field 'output' must be one of the letters {', '.join(QLORA_LETTERS)}, "
                           f"got {output!r}")
    return MultipleChoiceItem(prompt, tuple(QLORA_LETTERS), QLORA_LETTERS.index(output),
                              _field(row, "subject", location, ""), delimiter="", separate_encoding=True,
                              origin=location)


def _rows_in_format(path: str | pathlib.Path, expected: str) -> list[Row]:
    rows = read_table(path)
    found = detect_format(rows[0].value, rows[0].location)
    if found != expected:
        raise DatasetError(f"{path}: holds {found!r}-format rows, expected {expected!r}")
    for location, value in rows[1:]:
        if detect_format(value, location) != expected:
            raise DatasetError(f"{location}: not a {expected!r}-format row like the file's first row")
    return rows


def load_questions(path: str | pathlib.Path) -> list[Question]:
    """The questions of a ``questions``-format file (HF MMLU columns / lm-eval-style JSONL).

    Args:
      path: the file (:func:`read_table`'s suffixes).

    Returns:
      Its :class:`~qlora_jax.eval.items.Question` list.

    Raises:
      DatasetError: a file in another format, or a bad row (naming it).
    """
    return [question_from_row(value, location) for location, value in _rows_in_format(path, "questions")]


def load_qlora_items(path: str | pathlib.Path) -> list[MultipleChoiceItem]:
    """The items of a qlora.py MMLU file (``five_shot_mmlu_val.json`` etc.).

    Args:
      path: the file.

    Returns:
      Its :class:`~qlora_jax.eval.items.MultipleChoiceItem` list.

    Raises:
      DatasetError: a file in another format, or a bad row (naming it).
    """
    return [qlora_item_from_row(value, location) for location, value in _rows_in_format(path, "qlora")]
