"""An exclusive lock on a run directory, so that two runs never write into one ``output_dir``.

``with RunLock(output_dir): ...`` creates ``output_dir/.lock`` atomically (``O_CREAT | O_EXCL``,
atomic on local file systems and on NFSv3+) holding the owner's host, pid and start time, and
removes it on exit, errors included. When the file already exists:

* its owner is alive (same host, the pid runs): :class:`RunLockedError`, naming the owner;
* its owner is dead (same host, no such pid: a crashed or killed run): :class:`StaleRunLockError`,
  saying what to do. The lock is *not* taken over silently, because a pid that no longer runs is
  strong but not certain evidence (another machine may share the folder under the same name);
  ``force=True`` (``--force_unlock``) takes it over, with a warning naming the old owner;
* its owner is on another host (liveness unknowable from here): :class:`RunLockedError`, unless
  ``force=True``.

``force`` never takes a lock whose owner runs on this host. Only one process of a multi-host run
should hold the lock (the recipe takes it on process 0).
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import pathlib
import socket
from types import TracebackType

__all__ = ["RunLock", "RunLockedError", "StaleRunLockError", "LOCK_FILE"]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another run holds (or may hold) the run directory."""


class StaleRunLockError(RunLockedError):
    """The run directory's lock belongs to a process of this host that no longer runs."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class RunLock:
    """The lock file ``directory/.lock`` (see the module docstring); a context manager."""

    def __init__(self, directory: str | pathlib.Path, *, force: bool = False):
        self.directory = pathlib.Path(directory)
        self.path = self.directory / LOCK_FILE
        self.force = force
        self._owner = {"host": socket.gethostname(), "pid": os.getpid(),
                       "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        self._held = False

    def owner(self) -> dict | None:
        """The lock file's content (host, pid, started), None if there is none, {} if unreadable."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Takes the lock or raises :class:`RunLockedError` / :class:`StaleRunLockError`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a lock that force allows to take over
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._refuse_or_break(self.owner())
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._owner, f)
            self._held = True
            return
        raise RunLockedError(f"{self.path} was taken by another process while breaking its stale lock")

    def _refuse_or_break(self, owner: dict | None) -> None:
        if owner is None:  # released between our attempt and the read
            return
        host, pid = owner.get("host"), owner.get("pid")
        who = f"pid {pid} on host {host} (started {owner.get('started', '?')})" if owner else "an unreadable owner"
        here = host == self._owner["host"]
        if here and isinstance(pid, int) and _pid_alive(pid):
            raise RunLockedError(
                f"{self.directory} is in use by another run: {who} holds {self.path}. Wait for it to finish, "
                "stop it, or choose another output_dir")
        if not self.force:
            if here and isinstance(pid, int):
                raise StaleRunLockError(
                    f"{self.path} is a stale lock: its owner, {who}, is no longer running (a crashed or killed "
                    "run). If no other run uses this directory, pass --force_unlock (force_unlock=True) to take "
                    f"it over, or delete {self.path}")
            raise RunLockedError(
                f"{self.directory} is locked by {who}, which cannot be checked from this host "
                f"({self._owner['host']}). If that run is no longer alive, pass --force_unlock "
                f"(force_unlock=True) or delete {self.path}")
        log.warning("taking over %s from %s (force_unlock)", self.path, who)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Removes the lock file if this lock still owns it."""
        if not self._held:
            return
        self._held = False
        if self.owner() == self._owner:
            try:
                self.path.unlink()
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()
