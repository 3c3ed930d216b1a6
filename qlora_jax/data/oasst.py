"""OpenAssistant conversation trees -> root-to-leaf threads.

Two layouts are read:

* **flat** (oasst1/oasst2's message export): one row per message with ``message_id``,
  ``parent_id`` (null for the root prompt), ``role`` (``"prompter"`` or ``"assistant"``) and
  ``text``; optional ``rank`` (0 = best among siblings), ``deleted``, ``review_result``. The trees
  are rebuilt from the parent links; rows may come in any order.
* **nested** (the ``*.trees.jsonl`` export, or hand-written trees): one tree per row, either the
  root message itself ``{"role", "text", "replies": [...]}`` or ``{"prompt": <root message>, ...}``.

Messages that are ``deleted`` or failed review (``review_result: false``) are dropped together
with their replies. A thread keeps going until a message without (kept) replies, then loses any
trailing prompter messages (nothing to learn from them); a thread left without an assistant
message is dropped. Threads are chosen by ``policy``:

* ``"top_ranked"`` (default): one thread per tree, following at each message the best-ranked
  reply (lowest ``rank``; unranked replies after ranked ones; ties in file order). This is how
  openassistant-guanaco, the dataset of qlora.py's Guanaco runs, was built from oasst1.
* ``"all_leaves"``: every root-to-leaf thread (trees with many branches yield many overlapping
  conversations; identical threads after trimming are kept once).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from qlora_jax.data.example import DatasetError, Example, make_example
from qlora_jax.data.files import Row
from qlora_jax.data.formats import require_field

__all__ = ["OASST_POLICIES", "oasst_examples", "is_nested_tree_row"]

OASST_POLICIES = ("top_ranked", "all_leaves")
_ROLES = {"prompter": "user", "user": "user", "assistant": "assistant"}


@dataclasses.dataclass
class _Message:
    location: str
    role: str  # "user" or "assistant"
    text: str
    rank: float | None
    order: int  # position in the file, for deterministic tie-breaking
    kept: bool
    replies: list[_Message] = dataclasses.field(default_factory=list)


def _parse_message(row: Any, location: str, order: int) -> _Message:
    if not isinstance(row, Mapping):
        raise DatasetError(f"{location}: expected a JSON object, got {type(row).__name__}")
    role = require_field(row, "role", location)
    if role not in _ROLES:
        raise DatasetError(f"{location}: role {role!r} is not 'prompter' or 'assistant'")
    text = require_field(row, "text", location)
    rank = row.get("rank")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, (int, float))):
        raise DatasetError(f"{location}: field 'rank' must be a number or null, got {rank!r}")
    if isinstance(rank, float) and math.isnan(rank):  # pandas-made exports write unranked as NaN
        rank = None
    kept = not row.get("deleted", False) and row.get("review_result", True) is not False
    return _Message(location, _ROLES[role], text, rank, order, kept)


def is_nested_tree_row(row: Any) -> bool:
    """Whether an oasst row is a whole nested tree (rather than one message of the flat export).

    Args:
      row: one row.

    Returns:
      True for a row with ``replies`` or ``prompt``.
    """
    return isinstance(row, Mapping) and ("replies" in row or isinstance(row.get("prompt"), Mapping))


def _nested_tree(row: Any, row_location: str, counter: list[int]) -> _Message:
    if not is_nested_tree_row(row):
        raise DatasetError(f"{row_location}: expected a nested OASST tree ('replies' or 'prompt'), like the "
                           "file's first row; a file must not mix nested trees and flat message rows")
    if "role" not in row and isinstance(row.get("prompt"), Mapping):
        row, row_location = row["prompt"], f"{row_location}: prompt"
    root = None
    stack: list[tuple[Any, str, _Message | None]] = [(row, "", None)]
    while stack:
        node, path, parent = stack.pop()
        location = f"{row_location}: {path}" if path else row_location
        message = _parse_message(node, location, counter[0])
        counter[0] += 1
        if parent is None:
            root = message
        else:
            parent.replies.append(message)
        replies = node.get("replies", [])
        if not isinstance(replies, list):
            raise DatasetError(f"{location}: field 'replies' must be a list, got {type(replies).__name__}")
        # Pushed in reverse so that replies are parsed in file order (which breaks rank ties).
        for i in reversed(range(len(replies))):
            stack.append((replies[i], f"{path}.replies[{i}]" if path else f"replies[{i}]", message))
    return root


def _flat_trees(rows: Sequence[Row]) -> list[_Message]:
    messages: dict[str, _Message] = {}
    parents: list[tuple[_Message, str | None]] = []
    for order, (location, row) in enumerate(rows):
        if is_nested_tree_row(row):
            raise DatasetError(f"{location}: a nested OASST tree ('replies' or 'prompt') in a file whose first "
                               "row is a flat message row; a file must not mix the two layouts")
        message = _parse_message(row, location, order)
        message_id = require_field(row, "message_id", location)
        if "parent_id" not in row:
            raise DatasetError(f"{location}: missing field 'parent_id' (null for a conversation's first prompt)")
        parent_id = require_field(row, "parent_id", location, optional=True)
        if message_id in messages:
            raise DatasetError(f"{location}: message_id {message_id!r} repeats {messages[message_id].location}")
        messages[message_id] = message
        parents.append((message, parent_id))
    roots = []
    for message, parent_id in parents:
        if parent_id is None:
            roots.append(message)
        elif parent_id not in messages:
            raise DatasetError(f"{message.location}: parent_id {parent_id!r} is not a message_id in the file")
        else:
            messages[parent_id].replies.append(message)
    return roots


def _best_reply(replies: list[_Message]) -> _Message:
    return min(replies, key=lambda m: (m.rank is None, m.rank or 0, m.order))


def _threads(root: _Message, policy: str) -> list[list[_Message]]:
    if not root.kept:
        return []
    if policy == "top_ranked":
        thread, message = [root], root
        while kept := [m for m in message.replies if m.kept]:
            message = _best_reply(kept)
            thread.append(message)
        return [thread]
    threads, stack = [], [[root]]
    while stack:
        thread = stack.pop()
        kept = [m for m in thread[-1].replies if m.kept]
        if not kept:
            threads.append(thread)
        stack.extend(thread + [m] for m in reversed(kept))
    return threads


def oasst_examples(rows: Sequence[Row], policy: str = "top_ranked") -> list[Example]:
    """Conversations of an OpenAssistant file's rows (flat or nested, judged from the first row).

    Args:
      rows: the file's rows (:func:`~qlora_jax.data.files.read_rows`).
      policy: which threads of each tree, one of :data:`OASST_POLICIES`: ``"top_ranked"`` (the
        best-ranked reply at each turn) or ``"all_leaves"`` (every thread).

    Returns:
      The conversations as :class:`~qlora_jax.data.example.Example`.

    Raises:
      ValueError: an unknown ``policy``.
      DatasetError: a malformed row or tree (a bad role or rank, a repeated ``message_id``, a
        ``parent_id`` not in the file), naming it.
    """
    if policy not in OASST_POLICIES:
        raise ValueError(f"unknown OASST thread policy {policy!r}; expected one of {', '.join(OASST_POLICIES)}")
    if not rows:
        return []
    if is_nested_tree_row(rows[0].value):
        counter = [0]
        roots = [_nested_tree(row, location, counter) for location, row in rows]
    else:
        roots = _flat_trees(rows)
    examples, seen = [], set()
    for root in roots:
        for thread in _threads(root, policy):
            while thread and thread[-1].role != "assistant":
                thread = thread[:-1]
            key = tuple(id(m) for m in thread)
            if not thread or key in seen:
                continue
            seen.add(key)
            examples.append(make_example([(m.role, m.text) for m in thread], thread[-1].location))
    return examples
