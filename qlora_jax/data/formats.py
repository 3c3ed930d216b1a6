"""Row formats of local files: which one a row is in, and one-row converters to :class:`Example`.

* ``alpaca``: ``{"instruction", "input"?, "output"}`` -> user = instruction (+ ``"\\n\\n"`` + input
  when input is non-empty), assistant = output. The chat template replaces Alpaca's own
  "Below is an instruction..." prompt.
* ``input-output``: ``{"input", "output"}`` (qlora.py's format for local files) -> user, assistant.
* ``messages``: ``{"messages": [{"role", "content"}, ...]}`` with roles system/user/assistant.
* ``oasst``: OpenAssistant rows, whole threads rather than one row each (see :mod:`.oasst`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from qlora_jax.data.example import ROLES, DatasetError, Example, make_example

__all__ = ["FORMATS", "ROW_FORMATS", "detect_format", "alpaca_example", "input_output_example", "messages_example",
           "require_field"]

FORMATS = ("alpaca", "input-output", "messages", "oasst")


def _require_object(row: Any, location: str) -> Mapping[str, Any]:
    if not isinstance(row, Mapping):
        raise DatasetError(f"{location}: expected a JSON object, got {type(row).__name__}")
    return row


def require_field(row: Mapping[str, Any], field: str, location: str, *, optional: bool = False) -> str | None:
    """``row[field]`` as a string.

    Args:
      row: one row.
      field: the field's name.
      location: where it was read, for error messages.
      optional: a missing field gives None instead of an error.

    Returns:
      The field's string, or None (a missing ``optional`` field).

    Raises:
      DatasetError: a missing field (unless ``optional``) or a non-string.
    """
    if field not in row or row[field] is None:
        if optional:
            return None
        present = ", ".join(repr(k) for k in row) or "none"
        raise DatasetError(f"{location}: missing field {field!r} (fields present: {present})")
    value = row[field]
    if not isinstance(value, str):
        raise DatasetError(f"{location}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def alpaca_example(row: Any, location: str) -> Example:
    """An Alpaca row as a single user -> assistant exchange (the input, if any, after the instruction).

    Args:
      row: ``{"instruction", "input"?, "output"}``, strings.
      location: where it was read, for error messages.

    Returns:
      A two-message :class:`~qlora_jax.data.example.Example`.

    Raises:
      DatasetError: a row that is not an object, no ``instruction`` or ``output``, or a non-string
        field, naming ``location``.
    """
    row = _require_object(row, location)
    instruction = require_field(row, "instruction", location)
    extra = require_field(row, "input", location, optional=True)
    output = require_field(row, "output", location)
    prompt = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return make_example([("user", prompt), ("assistant", output)], location)


def input_output_example(row: Any, location: str) -> Example:
    """A qlora.py ``input-output`` row as a single user -> assistant exchange.

    Args:
      row: ``{"input", "output"}``, strings.
      location: names the row in error messages.

    Returns:
      The user's ``input`` and the assistant's ``output``, as an :class:`~qlora_jax.data.example.Example`.

    Raises:
      DatasetError: a row without both string fields.
    """
    row = _require_object(row, location)
    return make_example([("user", require_field(row, "input", location)),
                         ("assistant", require_field(row, "output", location))], location)


def messages_example(row: Any, location: str) -> Example:
    """A ``{"messages": [...]}`` row (roles system/user/assistant) as it stands.

    Args:
      row: ``{"messages": [{"role", "content"}, ...]}``.
      location: names the row (and each message's index) in error messages.

    Returns:
      Its messages, in order, as an :class:`~qlora_jax.data.example.Example`.

    Raises:
      DatasetError: no ``messages`` list, an unknown role, or a message without string content.
    """
    row = _require_object(row, location)
    messages = row.get("messages")
    if messages is None:
        raise DatasetError(f"{location}: missing field 'messages'")
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{location}: field 'messages' must be a non-empty list, got {messages!r:.80}")
    turns = []
    for i, message in enumerate(messages):
        where = f"{location}: messages[{i}]"
        message = _require_object(message, where)
        role = require_field(message, "role", where)
        if role not in ROLES:
            raise DatasetError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        turns.append((role, require_field(message, "content", where)))
    return make_example(turns, location)


ROW_FORMATS: dict[str, Callable[[Any, str], Example]] = {
    "alpaca": alpaca_example,
    "input-output": input_output_example,
    "messages": messages_example,
}


def _matching_formats(row: Mapping[str, Any]) -> list[str]:
    is_oasst_tree = "replies" in row or isinstance(row.get("prompt"), Mapping)
    is_oasst_flat = "message_id" in row and "parent_id" in row
    candidates = {
        "alpaca": "instruction" in row,
        "input-output": "input" in row and "output" in row and "instruction" not in row,
        "messages": "messages" in row,
        "oasst": is_oasst_tree or is_oasst_flat,
    }
    return [name for name, matches in candidates.items() if matches]


def detect_format(row: Any, location: str) -> str:
    """The format of a file, judged from its first row.

    Exactly one format must match the row's keys.

    Args:
      row: the first row.
      location: where it was read, for error messages.

    Returns:
      One of :data:`FORMATS`.

    Raises:
      DatasetError: no format or several match.
    """
    row = _require_object(row, location)
    matches = _matching_formats(row)
    if len(matches) == 1:
        return matches[0]
    keys = ", ".join(repr(k) for k in row) or "none"
    if not matches:
        raise DatasetError(
            f"{location}: cannot tell the dataset format from the first row (keys: {keys}). Expected "
            "'instruction'/'output' (alpaca), 'input'/'output' (input-output), 'messages' (messages), or "
            "'message_id'/'parent_id' or 'replies' (oasst); or pass the format explicitly")
    raise DatasetError(f"{location}: the first row matches several dataset formats ({', '.join(matches)}; "
                       f"keys: {keys}); pass the format explicitly")
