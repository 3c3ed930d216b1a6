"""Dataset specs (what ``--dataset`` / ``--dataset_format`` name) -> lists of :class:`Example`."""

from __future__ import annotations

import pathlib

from qlora_jax.data.corpora import load_chatterbot, load_chitchat
from qlora_jax.data.example import DatasetError, Example
from qlora_jax.data.files import read_rows
from qlora_jax.data.formats import FORMATS, ROW_FORMATS, detect_format
from qlora_jax.data.oasst import OASST_POLICIES, oasst_examples

__all__ = ["BUILTIN_DATASETS", "load_examples", "load_file"]

BUILTIN_DATASETS = ("chatterbot", "chitchat")


def load_file(path: str | pathlib.Path, format: str = "auto", *, oasst_policy: str = "top_ranked") -> list[Example]:
    """Conversations of a local ``.json``/``.jsonl`` file in one of :data:`~.formats.FORMATS`.

    Args:
      path: the file.
      format: "auto" decides from the first row; every row must then be in that format.
      oasst_policy: which OpenAssistant threads, one of :data:`~.oasst.OASST_POLICIES`.

    Returns:
      The conversations as :class:`~qlora_jax.data.example.Example`.

    Raises:
      ValueError: an unknown ``format`` or ``oasst_policy``.
      DatasetError: an empty file or a row not in the format, naming the file, the row and the problem.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown dataset format {format!r}; expected auto or one of {', '.join(FORMATS)}")
    if oasst_policy not in OASST_POLICIES:
        raise ValueError(f"unknown OASST thread policy {oasst_policy!r}; expected one of {', '.join(OASST_POLICIES)}")
    rows = read_rows(path)
    if not rows:
        raise DatasetError(f"{path}: the file holds no rows")
    if format == "auto":
        format = detect_format(rows[0].value, rows[0].location)
    if format == "oasst":
        examples = oasst_examples(rows, oasst_policy)
        if not examples:
            raise DatasetError(f"{path}: no OASST thread has an assistant message")
        return examples
    convert = ROW_FORMATS[format]
    return [convert(row, location) for location, row in rows]


def load_examples(spec: str, format: str = "auto", *, oasst_policy: str = "top_ranked") -> list[Example]:
    """The conversations a dataset spec names.

    The built-in names win over files of the same name: write ``./chitchat`` for such a file.

    Args:
      spec: ``"chatterbot"`` (English; ``"chatterbot:<language>"`` for another language of the
        corpus), ``"chitchat"``, or the path of a local ``.json``/``.jsonl`` file read with
        :func:`load_file`.
      format: the file's format (files only): "auto" or one of :data:`~.formats.FORMATS`.
      oasst_policy: which OpenAssistant threads (files only), one of :data:`~.oasst.OASST_POLICIES`.

    Returns:
      The conversations as :class:`~qlora_jax.data.example.Example`.

    Raises:
      DatasetError: an unknown dataset, or a bad file (as :func:`load_file`).
      ValueError: a ``format`` given for a built-in dataset.
    """
    name, _, language = spec.partition(":")
    if name == "chatterbot" or spec == "chitchat":
        if format != "auto":
            raise ValueError(f"dataset format {format!r} applies to local files only, not to {name!r}")
        return load_chatterbot(language or "english") if name == "chatterbot" else load_chitchat()
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise DatasetError(f"unknown dataset {spec!r}: expected {' or '.join(BUILTIN_DATASETS)} (the embedded "
                           "corpora) or the path of a local .json/.jsonl file; nothing is downloaded")
    return load_file(path, format, oasst_policy=oasst_policy)
