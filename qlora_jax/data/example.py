"""The normal form every data source produces: a conversation of role-tagged messages."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

__all__ = ["ROLES", "DatasetError", "Example", "make_example"]

ROLES = ("system", "user", "assistant")


class DatasetError(ValueError):
    """A dataset file, row or conversation is malformed; the message names where and what."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One conversation.

    Invariants (checked on construction): every role is one of :data:`ROLES`, every content is a
    string, and at least one message is an assistant turn (there is something to learn).

    Attributes:
      messages: ``({"role", "content"}, ...)``, in order.
      origin: where it was read (``file:line``), for error messages.

    Raises:
      DatasetError: a broken invariant, naming ``origin`` and the message.
    """

    messages: tuple[dict[str, str], ...]
    origin: str = "<unknown>"

    def __post_init__(self):
        if not isinstance(self.messages, tuple):
            object.__setattr__(self, "messages", tuple(self.messages))
        for i, message in enumerate(self.messages):
            if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
                raise DatasetError(f"{self.origin}: message {i} must have exactly the keys 'role' and 'content', "
                                   f"got {message!r}")
            if message["role"] not in ROLES:
                raise DatasetError(f"{self.origin}: message {i} has role {message['role']!r}; "
                                   f"expected one of {', '.join(ROLES)}")
            if not isinstance(message["content"], str):
                raise DatasetError(f"{self.origin}: message {i} content must be a string, "
                                   f"got {type(message['content']).__name__}")
        if not any(m["role"] == "assistant" for m in self.messages):
            raise DatasetError(f"{self.origin}: the conversation has no assistant message (nothing to train on)")


def make_example(turns: Sequence[tuple[str, str]], origin: str) -> Example:
    """An :class:`Example` from ``[(role, content), ...]``.

    Args:
      turns: ``(role, content)`` pairs, in order.
      origin: where it was read, for error messages.

    Returns:
      The :class:`Example`.

    Raises:
      DatasetError: as :class:`Example`.
    """
    return Example(tuple({"role": role, "content": content} for role, content in turns), origin)
