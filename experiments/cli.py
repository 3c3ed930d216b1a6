"""What every launcher shares: ``run(main)``, absl's ``app.run`` with two fixes.

* ``--help``, ``--helpshort`` and ``--helpfull`` exit with status 0 (absl's own exit 1, which
  reads as a failure to shells and CI);
* ``--verbosity`` is honoured (absl's default shows INFO). Orbax reports every save and restore
  through absl at INFO; those records are kept out below ``--verbosity=1`` (debug), so the
  default output is the recipe's own progress. Orbax's writer threads' reports of a full disk
  (or a folder it may not write) are debug output too, and so are TensorStore's late callbacks
  after such a failed save: the launcher reports that failure in one line.
"""

from __future__ import annotations

import logging as std_logging
import sys
import traceback
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
    """Drops Orbax's records below WARNING unless --verbosity asks for debug output, and its
    writer threads' reports of a full disk or a folder it may not write (each thread logs the
    error with a traceback; the recipe reports it once, in one line: qlora_jax.recipe.io_errors)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname.replace("\\", "/"):
            return True
        if record.levelno >= std_logging.WARNING and not _output_failure(record):
            return True
        return absl_logging.get_verbosity() >= absl_logging.DEBUG


def _output_failure(record: std_logging.LogRecord) -> bool:
    """Whether ``record`` reports an error of qlora_jax.recipe.io_errors.OUTPUT_ERRNOS (no space, ...)."""
    from qlora_jax.recipe.io_errors import errno_in_text

    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += f"\n{record.exc_info[1]}"
    return errno_in_text(text) is not None


def _late_callbacks_to_debug(previous: Callable) -> Callable:
    """A ``sys.unraisablehook`` that sends TensorStore's late callbacks after a failed Orbax save
    to the debug log, and everything else to ``previous``.

    Why: when one write of an asynchronous save fails (a full disk), Orbax's thread closes its
    event loop while TensorStore still has writes in flight; each of those then fails to call back
    (``RuntimeError: Event loop is closed``), reported as "unraisable" with a traceback apiece.
    The failure itself is reported once, in one line (qlora_jax.recipe.io_errors).
    """

    def hook(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            absl_logging.debug("a TensorStore callback after its event loop closed (a failed save): %s",
                               "".join(traceback.format_exception(unraisable.exc_value)))
            return
        previous(unraisable)

    return hook


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
    sys.unraisablehook = _late_callbacks_to_debug(sys.unraisablehook)
    app.run(main)
