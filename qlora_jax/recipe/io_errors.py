"""Disk and permission failures on ``output_dir`` as one line: the path, what failed, the free space, what to do.

A full disk (``ENOSPC``, or a quota: ``EDQUOT``), a folder the user may not write (``EACCES``) or
a read-only file system (``EROFS``) reach the recipe two ways:

* from our own writes (metrics, samples, the adapter, the lock): an ``OSError`` with ``errno``
  and ``filename``;
* from Orbax's writer threads (checkpoints, the quantized base): TensorStore's error, a
  ``ValueError`` such as ``RESOURCE_EXHAUSTED: Error writing ... "<path>" ... No space left on
  device [os_error_code='28']``, logged with a traceback by each thread that saw it and raised
  again in the main thread when the save is waited for.

:func:`output_dir_error` recognises both (the errno, or its text in the message, through the
exception's causes) and builds an :class:`OutputDirError` whose message is one line;
:func:`naming_output_errors` converts what a block raises, and the launcher prints that line
(``experiments/finetune.py``). A ``RESOURCE_EXHAUSTED`` without such an errno (a device out of
memory) is not one of these. Errors on paths outside ``output_dir`` are left as they are.

Orbax writes each checkpoint into a temporary folder and renames it when complete, so a failed
save is never listed as a checkpoint: ``--resume`` continues from the last complete one.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import logging
import os
import pathlib
import re
import shutil
import traceback
from collections.abc import Iterator

__all__ = ["OUTPUT_ERRNOS", "OutputDirError", "errno_in_text", "naming_output_errors", "output_dir_error"]

log = logging.getLogger(__name__)

# What each failure is called in the message.
OUTPUT_ERRNOS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EROFS: "read-only file system",
}
# How an errno appears in text: Python's "[Errno 28]", TensorStore's "[os_error_code='28']", Rust's
# "(os error 28)" (safetensors), and the C library's wording.
_ERRNO_PATTERNS = (re.compile(r"\[Errno (\d+)\]"), re.compile(r"os_error_code='?(\d+)'?"),
                   re.compile(r"os error (\d+)"))
_STRERROR = {os.strerror(code): code for code in OUTPUT_ERRNOS}
_QUOTED_PATH = re.compile(r"""["'](/[^"']+)["']""")


class OutputDirError(OSError):
    """Writing under ``output_dir`` failed for lack of space, permission or a writable file system.

    ``str()`` is the one-line message; ``errno``, ``filename`` (the path, or ``output_dir`` when the
    error did not say) and ``what`` (the operation) are set.
    """

    def __init__(self, code: int, path: pathlib.Path, what: str, message: str):
        super().__init__(code, OUTPUT_ERRNOS[code], str(path))
        self.what = what
        self.message = message

    def __str__(self) -> str:
        return self.message


def errno_in_text(text: str) -> int | None:
    """The errno of :data:`OUTPUT_ERRNOS` that ``text`` (an error message or a log line) reports, or None."""
    for pattern in _ERRNO_PATTERNS:
        for match in pattern.finditer(text):
            if int(match.group(1)) in OUTPUT_ERRNOS:
                return int(match.group(1))
    for words, code in _STRERROR.items():
        if words in text:
            return code
    return None


def _causes(err: BaseException) -> Iterator[BaseException]:
    """``err``, its causes and contexts, and the members of exception groups, each once."""
    seen, pending = set(), [err]
    while pending:
        current = pending.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        pending.extend([current.__cause__, current.__context__, *getattr(current, "exceptions", ())])


def _find(err: BaseException) -> tuple[int, pathlib.Path | None] | None:
    for cause in _causes(err):
        if isinstance(cause, OSError) and cause.errno in OUTPUT_ERRNOS:
            return cause.errno, pathlib.Path(cause.filename) if cause.filename else None
        code = errno_in_text(str(cause))
        if code is not None:
            paths = _QUOTED_PATH.findall(str(cause))
            return code, pathlib.Path(paths[-1]) if paths else None  # the last: the file itself
    return None


def _what(relative: pathlib.Path) -> str:
    """The operation that writes ``relative`` (a path inside output_dir)."""
    parts = relative.parts
    if not parts:
        return "creating the output directory"
    if parts[0] == "checkpoints":
        step = parts[1].split(".")[0] if len(parts) > 1 else ""
        return f"saving checkpoint {step}" if step.isdigit() else "writing the checkpoints"
    if parts[0] == "base":
        return "writing the quantized base (base/)"
    if parts[0] == "adapter":
        return "writing the adapter (adapter/)"
    if parts[0] == ".lock":
        return "creating the run lock (.lock)"
    return f"writing {relative}"


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def _free_space(path: pathlib.Path) -> str:
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return "free space unknown"
    try:
        usage = shutil.disk_usage(existing)
    except OSError as err:
        return f"free space unknown ({err.strerror})"
    return f"{_size(usage.free)} free of {_size(usage.total)} on that file system"


def output_dir_error(err: BaseException, output_dir: str | pathlib.Path) -> OutputDirError | None:
    """``err`` as an :class:`OutputDirError` if it (or one of its causes) is a disk, quota,
    permission or read-only failure on a path inside ``output_dir`` (or on no named path); else None."""
    if isinstance(err, OutputDirError):
        return err
    found = _find(err)
    if found is None:
        return None
    code, path = found
    out = pathlib.Path(output_dir).absolute()
    if path is None:  # e.g. safetensors' errors name no file
        path, what = out, f"writing to {out}"
    else:
        path = pathlib.Path(os.path.abspath(path))
        if not path.is_relative_to(out):
            return None
        what = _what(path.relative_to(out))
    if code in (errno.ENOSPC, errno.EDQUOT):
        advice = (f"Free space there, then run the same command with --resume (it continues from the last "
                  f"complete checkpoint in {out / 'checkpoints'}), or choose another --output_dir")
    elif code == errno.EACCES:
        # The folder to fix: the nearest one that exists (the parent, when output_dir cannot be created).
        folder = next((p for p in (path, *path.parents) if p.is_dir()), out)
        advice = f"Make {folder} writable by the user {getpass.getuser()}, or choose another --output_dir"
    else:
        advice = "Choose an --output_dir on a writable file system"
    message = (f"{what} failed: {OUTPUT_ERRNOS[code]} ({errno.errorcode[code]}) at {path}; {_free_space(path)}. "
               f"{advice}.")
    return OutputDirError(code, path, what, message)


@contextlib.contextmanager
def naming_output_errors(output_dir: str | pathlib.Path) -> Iterator[None]:
    """Raises what the block raises, but a disk or permission failure under ``output_dir`` as an
    :class:`OutputDirError` (one line); its traceback goes to the debug log."""
    try:
        yield
    except Exception as err:
        converted = output_dir_error(err, output_dir)
        if converted is None or converted is err:
            raise
        log.debug("%s; the original error:\n%s", converted,
                  "".join(traceback.format_exception(type(err), err, err.__traceback__)))
        raise converted from err
