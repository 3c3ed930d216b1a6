"""An exclusive lock on a run directory, so that two runs never write into one ``output_dir``.

``with RunLock(output_dir): ...`` creates ``output_dir/.lock`` atomically (``O_CREAT | O_EXCL``,
atomic on local file systems and on NFSv3+) holding the owner's host, pid, the pid's process
start time and the machine's boot id, and removes it on exit, errors included. When the file
already exists:

* its owner is alive (this host, the pid runs, and it is the same process: its start time is the
  one recorded): :class:`RunLockedError`, naming the owner;
* its owner is dead (this host, and no such pid, or the pid now belongs to another program: its
  start time differs, or the machine rebooted since): the lock is stale, left by a crashed or
  killed run, and is taken over, with a warning naming the old owner. So a ``--resume`` after
  ``kill -9``, an OOM kill or a reboot needs no other flag;
* its owner is on another host (its liveness cannot be checked from here, e.g. a shared file
  system): :class:`RunLockedError`, unless ``force=True`` (``--force_unlock``).

"This host" is the same host name and, where both sides have one, the same ``/etc/machine-id``,
so that two machines sharing a folder under one host name do not take each other's locks.
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

__all__ = ["RunLock", "RunLockedError", "StaleRunLockError", "LOCK_FILE", "process_start_ticks"]

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another run holds (or may hold) the run directory."""


class StaleRunLockError(RunLockedError):
    """The run directory's lock belongs to a process of this host that no longer runs.

    :class:`RunLock` takes such locks over and no longer raises this; it stays for callers that
    catch it.
    """


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22);
    None where there is no such process or no ``/proc`` (not Linux).

    A pid and this number name one process: a pid reused by a later program has a later start.
    """
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may hold spaces and parentheses itself:
    # the fields after it start after the last ')', with field 3 first.
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[22 - 3])
    except (IndexError, ValueError):
        return None


def _read_id(path: str) -> str | None:
    try:
        return pathlib.Path(path).read_text().strip() or None
    except OSError:
        return None


class RunLock:
    """The lock file ``directory/.lock`` (see the module docstring); a context manager."""

    def __init__(self, directory: str | pathlib.Path, *, force: bool = False):
        self.directory = pathlib.Path(directory)
        self.path = self.directory / LOCK_FILE
        self.force = force
        pid = os.getpid()
        self._owner = {"host": socket.gethostname(), "pid": pid,
                       "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       "pid_start_ticks": process_start_ticks(pid),
                       "boot_id": _read_id("/proc/sys/kernel/random/boot_id"),
                       "machine_id": _read_id("/etc/machine-id")}
        self._held = False

    def owner(self) -> dict | None:
        """The lock file's content (host, pid, started, ...), None if there is none, {} if unreadable."""
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Takes the lock (over a stale one if need be) or raises :class:`RunLockedError`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a stale lock, or one that force allows to take over
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

    def _same_host(self, owner: dict) -> bool:
        ours, theirs = self._owner.get("machine_id"), owner.get("machine_id")
        return owner.get("host") == self._owner["host"] and (ours is None or theirs is None or ours == theirs)

    def _why_dead(self, owner: dict) -> str | None:
        """Why the owner (of this host) is certainly gone, or None if it may be alive."""
        pid = owner["pid"]
        boot = owner.get("boot_id")
        if boot is not None and self._owner["boot_id"] is not None and boot != self._owner["boot_id"]:
            return "the machine has rebooted since"
        if not _pid_alive(pid):
            return f"pid {pid} is no longer running"
        recorded, now = owner.get("pid_start_ticks"), process_start_ticks(pid)
        if recorded is not None and now is not None and recorded != now:
            # Why a start time: pids are reused, and a live pid may be an unrelated program.
            return f"pid {pid} now belongs to another program (started at tick {now}, the owner at {recorded})"
        return None

    def _refuse_or_break(self, owner: dict | None) -> None:
        if owner is None:  # released between our attempt and the read
            return
        host, pid = owner.get("host"), owner.get("pid")
        who = f"pid {pid} on host {host} (started {owner.get('started', '?')})" if owner else "an unreadable owner"
        if self._same_host(owner) and isinstance(pid, int):
            dead = self._why_dead(owner)
            if dead is None:
                raise RunLockedError(
                    f"{self.directory} is in use by another run: {who} holds {self.path}. Wait for it to finish, "
                    "stop it, or choose another output_dir")
            log.warning("taking over the stale lock %s of %s: %s (a crashed or killed run)", self.path, who, dead)
        elif not self.force:
            raise RunLockedError(
                f"{self.directory} is locked by {who}, which cannot be checked from this host "
                f"({self._owner['host']}). If that run is no longer alive, pass --force_unlock "
                f"(force_unlock=True) or delete {self.path}")
        else:
            log.warning("taking over %s from %s (force_unlock)", self.path, who)
        # Only the lock judged stale: another run may have broken it and taken the directory since.
        if self.owner() == owner:
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
