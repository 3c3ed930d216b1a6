"""absl flags generated from a settings dataclass (:mod:`qlora_jax.recipe.settings`).

``define_flags(FinetuneConfig)`` defines one flag per field: its name, default and help from the
field, its kind from the annotation (``bool``, ``int``, ``float``, ``str``; ``int | float`` for a
count-or-fraction; ``X | None`` for settings that may be unset) and an enum flag where the field
declares ``choices``. ``from_flags(FinetuneConfig)`` builds the dataclass from the parsed flags,
so its ``__post_init__`` is the one validator of the values. ``--flagfile``, ``--help`` and
``--helpfull`` are absl's own.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from absl import flags

from qlora_jax.recipe.settings import field_type

__all__ = ["define_flags", "from_flags", "NumberParser"]


class NumberParser(flags.ArgumentParser):
    """An ``int | float`` flag: ``96`` is the count 96, ``0.1`` the fraction 0.1 (the type decides)."""

    syntactic_help = "an integer count or a fraction"

    def parse(self, argument: Any) -> int | float | None:
        if argument is None or isinstance(argument, (int, float)) and not isinstance(argument, bool):
            return argument
        text = str(argument).strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected an integer or a float, got {argument!r}") from None

    def flag_type(self) -> str:
        return "number"


def define_flags(cls: type, flag_values: flags.FlagValues = flags.FLAGS, *,
                 module_name: str | None = None) -> list[str]:
    """Defines an absl flag for every field of the dataclass ``cls``; returns the flag names.

    The flags belong to ``module_name`` (default: the calling module), so that ``--help`` lists
    them among the launcher's own.
    """
    if module_name is None:
        module_name = sys._getframe(1).f_globals.get("__name__", "__main__")
    if module_name == "__main__":
        module_name = sys.argv[0]  # absl's name for the main module
    names = []
    for field in dataclasses.fields(cls):
        kind, _ = field_type(cls, field)
        help_text = field.metadata.get("help")
        if not help_text:
            raise TypeError(f"{cls.__name__}.{field.name} has no help text: declare it with setting(...)")
        choices = field.metadata.get("choices")
        default = field.default
        common = dict(name=field.name, default=default, help=help_text, flag_values=flag_values,
                      module_name=module_name)
        if choices is not None:
            if kind is not str:
                raise TypeError(f"{cls.__name__}.{field.name}: choices are supported for str settings only")
            flags.DEFINE_enum(enum_values=list(choices), **common)
        elif kind is bool:
            flags.DEFINE_bool(**common)
        elif kind is int:
            flags.DEFINE_integer(**common)
        elif kind is float:
            flags.DEFINE_float(**common)
        elif kind is str:
            flags.DEFINE_string(**common)
        elif isinstance(kind, tuple) and set(kind) == {int, float}:
            flags.DEFINE(NumberParser(), serializer=flags.ArgumentSerializer(), **common)
        else:
            raise TypeError(f"{cls.__name__}.{field.name}: no flag kind for the type {kind!r}")
        names.append(field.name)
    return names


def from_flags[T](cls: type[T], flag_values: flags.FlagValues = flags.FLAGS, **overrides: Any) -> T:
    """The dataclass ``cls`` with every field taken from its (parsed) flag, then ``overrides``."""
    values = {field.name: flag_values[field.name].value for field in dataclasses.fields(cls)}
    return cls(**{**values, **overrides})
