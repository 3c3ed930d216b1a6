"""What every launcher shares: ``run(main)``, absl's ``app.run`` with two fixes.

* ``--help``, ``--helpshort`` and ``--helpfull`` exit with status 0 (absl's own exit 1, which
  reads as a failure to shells and CI);
* ``--verbosity`` is honoured (absl's default shows INFO). Orbax reports every save and restore
  through absl at INFO; those records are kept out below ``--verbosity=1`` (debug), so the
  default output is the recipe's own progress.
"""

from __future__ import annotations

import logging as std_logging
import sys
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging

__all__ = ["run"]

FLAGS = flags.FLAGS


def _help_exiting_0(base: type[flags.BooleanFlag], shorthelp: bool) -> flags.BooleanFlag:
    class Help(base):
        def parse(self, argument):
            if self._parse(argument):
                app.usage(shorthelp=shorthelp, writeto_stdout=True)
                if shorthelp:
                    print("\nTry --helpfull to get a list of all flags.")
                sys.exit(0)

    return Help()


def _define_help_flags() -> None:
    app.define_help_flags()  # idempotent: app.run will not define them again
    for name, base, shorthelp in (("help", app.HelpFlag, True), ("helpshort", app.HelpshortFlag, True),
                                  ("helpfull", app.HelpfullFlag, False)):
        if not getattr(FLAGS[name], "_exits_0", False):
            short = FLAGS[name].short_name
            delattr(FLAGS, name)
            if short is not None:
                delattr(FLAGS, short)
            flag = _help_exiting_0(base, shorthelp)
            flag._exits_0 = True
            flags.DEFINE_flag(flag)


class _QuietOrbax(std_logging.Filter):
    """Drops Orbax's records below WARNING unless --verbosity asks for debug output."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname.replace("\\", "/"):
            return True
        return absl_logging.get_verbosity() >= absl_logging.DEBUG


def _adopt_as_main(module_name: str) -> None:
    """For a console script, whose ``__main__`` is a generated wrapper: ``--help`` shows the
    launcher's docstring and flags, as with ``python -m``."""
    main_module = sys.modules["__main__"]
    if not main_module.__doc__:
        main_module.__doc__ = sys.modules[module_name].__doc__
    for flag in FLAGS.get_key_flags_for_module(module_name):
        FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main: Callable[[list[str]], None], module_name: str = "__main__") -> None:
    """``absl.app.run(main)`` with the fixes in the module docstring; ``module_name``: the launcher's."""
    if module_name != "__main__":
        _adopt_as_main(module_name)
    _define_help_flags()
    absl_logging.get_absl_handler().addFilter(_QuietOrbax())
    app.run(main)
