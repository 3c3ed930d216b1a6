"""Settings declared once: a dataclass field carries its default, help text, choices and check.

A recipe's configuration is a frozen dataclass whose fields are made with :func:`setting`. The
field's type annotation, default, ``help``, ``choices`` and ``check`` are everything there is to
know about a setting: :func:`validate` (called from the dataclass's ``__post_init__``) checks
every value against them, and :mod:`qlora_jax.recipe.flags` turns the same fields into absl
flags. So no setting is declared twice, and a value that cannot mean anything fails before any
work with a :class:`ConfigError` that starts with the setting's name::

    @dataclasses.dataclass(frozen=True)
    class Config:
        steps: int = setting(100, "Optimizer steps.", check=positive)
        lr: float = setting(1e-4, "Peak learning rate.", check=positive)

        def __post_init__(self):
            validate(self)

    Config(steps=0)   # ConfigError: steps=0: must be positive

**Defaults degrade, explicit requests fail.** A setting whose default ``"auto"`` turns a feature
on where it applies declares the value that turns it off (``setting("auto", ..., off="none")``).
When the feature cannot run on this data, the code that builds it calls :func:`unavailable`: at
``"auto"`` nobody asked for it, so the run goes on without it after one warning naming the reason
and the flag; an explicit value is an error naming the same and what would let it run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "AUTO",
    "ConfigError",
    "setting",
    "unavailable",
    "validate",
    "field_type",
    "positive",
    "non_negative",
    "in_range",
    "unit_interval",
    "below_one",
]

# A check returns None for a good value, else what the value must be ("must be positive").
Check = Callable[[Any], str | None]

log = logging.getLogger(__name__)

# The default of a setting that turns a feature on where it applies (see the module docstring).
AUTO = "auto"


class ConfigError(ValueError):
    """A setting has a value it cannot have. The message starts with ``name=value:``."""


def setting(
    default: Any,
    help: str,
    *,
    choices: Sequence[Any] | None = None,
    check: Check | None = None,
    resume_may_change: bool = False,
    off: Any = None,
) -> Any:
    """A dataclass field that declares one setting.

    ``help``: the flag's help text. ``choices``: the only values allowed (an enum flag).
    ``check``: a function of the value returning None or what is wrong (see :func:`positive`),
    applied to values other than None. ``resume_may_change``: the setting may differ when a run
    is resumed (output cadence, not what is computed); see
    :func:`qlora_jax.recipe.steps.check_resume_settings`. ``off``: for a setting that turns a
    feature on, the value that turns it off (its default must then be :data:`AUTO`; see
    :func:`unavailable`).
    """
    if off is not None and default != AUTO:
        raise TypeError(f"a setting with off={off!r} degrades at its default, which must be {AUTO!r}, not {default!r}")
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "check": check,
                "resume_may_change": resume_may_change, "off": off}
    return dataclasses.field(default=default, metadata=metadata)


def unavailable(config: Any, name: str, reason: str, needed: str) -> None:
    """The feature that setting ``name`` of ``config`` turns on cannot run here: defaults degrade,
    explicit requests fail.

    ``reason``: why not; ``needed``: what would let it run. At :data:`AUTO` (the default: nobody
    asked for the feature) this logs one warning naming both and the flag that turns the feature
    off, and returns: the caller goes on without the feature. Any other value raises
    :class:`ConfigError` (``name=value: reason; needed, or pass --name=off``).
    """
    field = next((f for f in dataclasses.fields(config) if f.name == name), None)
    if field is None or field.metadata.get("off") is None:
        raise TypeError(f"{type(config).__name__}.{name} is not a setting declared with off=... (a feature that "
                        "may be unavailable)")
    value, off = getattr(config, name), field.metadata["off"]
    if value == AUTO:
        log.warning("%s=%s: going on without it: %s. %s; --%s=%s turns it off (and this warning)", name, AUTO,
                    reason, needed[:1].upper() + needed[1:], name, off)
        return
    raise ConfigError(f"{name}={value!r}: {reason}; {needed}, or pass --{name}={off} to run without it")


def field_type(cls: type, field: dataclasses.Field) -> tuple[type | tuple[type, ...], bool]:
    """(the field's value type, whether None is allowed), from its annotation.

    ``int | float`` gives ``(int, float)``; ``str | None`` gives ``(str, True)``.
    """
    hint = typing.get_type_hints(cls)[field.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        return (args[0] if len(args) == 1 else tuple(args)), optional
    return hint, False


def _coerce(name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    """``value`` as the declared type (an int for a float setting is fine), or a ConfigError."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ConfigError(f"{name}={value!r}: expected {' or '.join(k.__name__ for k in kinds)}, got a bool")
    for k in kinds:
        if type(value) is k:
            return value
    if float in kinds and isinstance(value, int):
        return float(value)
    if int in kinds and isinstance(value, float) and float not in kinds and value.is_integer():
        return int(value)
    raise ConfigError(f"{name}={value!r}: expected {' or '.join(k.__name__ for k in kinds)}, "
                      f"got {type(value).__name__}")


def validate(config: Any) -> None:
    """Checks (and normalises the types of) every field of a frozen dataclass made with :func:`setting`.

    Raises :class:`ConfigError` naming the first bad setting. Call it first in ``__post_init__``;
    checks that relate several settings follow it there.
    """
    cls = type(config)
    for field in dataclasses.fields(cls):
        name, value = field.name, getattr(config, field.name)
        kind, optional = field_type(cls, field)
        if value is None:
            if not optional:
                raise ConfigError(f"{name}=None: a value is required")
            continue
        value = _coerce(name, value, kind)
        object.__setattr__(config, name, value)
        choices = field.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{name}={value!r}: expected one of {', '.join(map(repr, choices))}")
        check = field.metadata.get("check")
        problem = check(value) if check is not None else None
        if problem:
            raise ConfigError(f"{name}={value!r}: {problem}")


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def positive(value: Any) -> str | None:
    """A finite number > 0."""
    return None if _finite(value) and value > 0 else "must be a finite number > 0"


def non_negative(value: Any) -> str | None:
    """A finite number >= 0."""
    return None if _finite(value) and value >= 0 else "must be a finite number >= 0"


def in_range(low: float, high: float, *, include_high: bool = True) -> Check:
    """A finite number in ``[low, high]`` (or ``[low, high)``)."""
    closing = "]" if include_high else ")"

    def check(value: Any) -> str | None:
        ok = _finite(value) and low <= value and (value <= high if include_high else value < high)
        return None if ok else f"must be in [{low}, {high}{closing}"

    return check


unit_interval = in_range(0.0, 1.0)
below_one = in_range(0.0, 1.0, include_high=False)
