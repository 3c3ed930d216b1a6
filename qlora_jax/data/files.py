"""Rows of a local JSON or JSON Lines file, each tagged with where it came from."""

from __future__ import annotations

import json
import pathlib
from typing import Any, NamedTuple

from qlora_jax.data.example import DatasetError

__all__ = ["Row", "read_rows"]

JSONL_SUFFIXES = (".jsonl", ".ndjson")


class Row(NamedTuple):
    """One parsed row and its location.

    Attributes:
      location: ``file.jsonl:LINE`` (1-based) or ``file.json[INDEX]``.
      value: the parsed JSON value.
    """

    location: str
    value: Any


def _jsonl_rows(path: pathlib.Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno})") from None
        rows.append(Row(f"{path}:{number}", value))
    return rows


def read_rows(path: str | pathlib.Path) -> list[Row]:
    """The rows of ``path``: one JSON value per line (``.jsonl``/``.ndjson``), or a ``.json`` array.

    A ``.json`` file that holds one value per line instead of a single array is read as JSON
    Lines, as Hugging Face ``datasets`` does: many exported "json" datasets are really JSONL.

    Args:
      path: the file.

    Returns:
      One :class:`Row` per value.

    Raises:
      DatasetError: no such file, another suffix, text that is not UTF-8, or invalid JSON
        (naming the line and column).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.suffix not in (".json", *JSONL_SUFFIXES):
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; expected .json, .jsonl or .ndjson")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix in JSONL_SUFFIXES:
        return _jsonl_rows(path, text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data" and error.lineno > 1:
            return _jsonl_rows(path, text)
        raise DatasetError(f"{path}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") \
            from None
    if not isinstance(value, list):
        raise DatasetError(f"{path}: expected a JSON array of rows (or one JSON object per line), "
                           f"got a top-level {type(value).__name__}")
    return [Row(f"{path}[{index}]", row) for index, row in enumerate(value)]
