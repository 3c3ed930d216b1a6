"""Several processes, one run: ``jax.distributed`` set up with bounded waits, and what processes agree on.

A multi-process (multi-host) run is one program started once per process with the same flags
but ``--process_id`` (JAX's multi-controller model): every process runs every step, and each
holds only its devices' shards. Three kinds of failure must end it, each within a bounded time:

* **a process never arrives** (a wrong ``--num_processes``, a process not started, a wrong
  address): :func:`initialize_distributed` gives up after ``init_timeout_seconds`` with an error
  that says so (JAX itself would abort with a message about a task that "died");
* **a process dies** (killed, out of memory, host lost): JAX's coordination service misses its
  heartbeats for ``heartbeat_timeout_seconds`` and terminates every other process, naming the
  dead one ("The following tasks are unhealthy (stopped sending heartbeats)");
* **a process stops with an error** the others do not share: it exits, and JAX's shutdown
  barrier fails the others after ``shutdown_timeout_seconds``. Steps that only process 0 runs
  (the run lock, files) report their outcome to all (:func:`on_primary`), so their errors reach
  every process at once instead.

Decisions taken from files (is there a cached base? a finished run?) are process 0's, shared by
:func:`from_primary` (:func:`primary_value` for a value at hand), so that no process takes another
branch because it looked a moment later.
With one process every function here is a plain local call.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

__all__ = [
    "DistributedSetupError",
    "PrimaryProcessError",
    "agreed_free_device_bytes",
    "from_primary",
    "gather_to_host",
    "initialize_distributed",
    "is_primary",
    "all_processes_agree",
    "on_primary",
    "primary_context",
    "primary_value",
    "sync_processes",
]

log = logging.getLogger(__name__)


# A process waits this long for the others at a barrier. Generous: process 0 may be writing
# outputs; a dead process ends the wait sooner through JAX's heartbeats.
BARRIER_TIMEOUT_SECONDS = 3600
# JAX's own initialization timeout is set this much past ours, so that ours reports first.
_INIT_GRACE_SECONDS = 30
_keys = itertools.count()


class DistributedSetupError(RuntimeError):
    """The processes of a multi-process run cannot be set up (flags, address, port, peers)."""


class PrimaryProcessError(RuntimeError):
    """A step that only process 0 runs failed there; raised on the other processes."""


def _parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedSetupError(f"--coordinator_address={address!r}: expected host:port (a port in 1-65535), "
                                    "e.g. 10.0.0.1:1234")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int, address: str) -> None:
    """Process 0 serves the coordinator on ``port``: refuse a port that something already holds
    (gRPC would fail to bind it and the process crash with a segmentation fault)."""
    bind_host = host if _is_loopback(host) else ""
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((bind_host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise DistributedSetupError(
                    f"--coordinator_address={address}: port {port} is already in use on this host (another run's "
                    "coordinator, or another program); process 0 serves the coordinator there. Choose a free port "
                    "and pass it to every process") from None
            raise DistributedSetupError(f"--coordinator_address={address}: process 0 cannot listen on port {port} "
                                        f"of this host: {err}") from None


def _give_up_waiting(address: str, num_processes: int, process_id: int, seconds: float) -> None:
    message = (f"jax.distributed: not all {num_processes} processes (--num_processes) reached the coordinator at "
               f"{address} within {seconds:g} s (this is process {process_id}). Start exactly {num_processes} "
               f"processes, with --process_id 0 to {num_processes - 1} and the same --coordinator_address, "
               "--num_processes and flags; check that process 0's host is reachable on that port.")
    log.error("%s", message)
    sys.stderr.write(f"\n{message}\n")
    sys.stderr.flush()
    # The main thread is inside JAX's connect() and cannot be interrupted; JAX would abort the
    # process a little later anyway, with a message about a task that "died".
    os._exit(1)


def initialize_distributed(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    init_timeout_seconds: int = 300,
    heartbeat_timeout_seconds: int = 100,
    shutdown_timeout_seconds: int = 300,
) -> None:
    """``jax.distributed.initialize`` for a run over ``num_processes`` processes (no-op for one).

    All three values are needed for an explicit setup; on managed clusters (SLURM, TPU pods) pass
    none and JAX discovers them. Process 0 serves the coordinator on ``coordinator_address``'s port
    (on the loopback interface only when the address is a loopback one). The waits are bounded
    (see the module docstring); a process that waits longer than ``init_timeout_seconds`` exits
    with status 1 and a message saying what to check.

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator.
      num_processes: processes in the run.
      process_id: this process's index, in ``0..num_processes - 1``.
      init_timeout_seconds: wait for every process to arrive (at least 1).
      heartbeat_timeout_seconds: silence after which a process is declared dead (at least 1).
      shutdown_timeout_seconds: wait for all to reach the end (at least 1).

    Raises:
      DistributedSetupError: bad or partial values, or a coordinator port in use.
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if not any(given):
        return
    if num_processes == 1 and coordinator_address is None:
        return
    if not all(given):
        raise DistributedSetupError("multi-host needs --coordinator_address, --num_processes and --process_id together")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise DistributedSetupError(f"--process_id={process_id}: must be in 0..{num_processes - 1} "
                                    f"(--num_processes={num_processes})")
    for name, value in (("init_timeout_seconds", init_timeout_seconds),
                        ("heartbeat_timeout_seconds", heartbeat_timeout_seconds),
                        ("shutdown_timeout_seconds", shutdown_timeout_seconds)):
        if not value >= 1:
            raise DistributedSetupError(f"--{name}={value}: must be at least 1 second")
    host, port = _parse_address(coordinator_address)
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if process_id == 0:
        _check_port_free(host, port, coordinator_address)
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
    log.info("process %d of %d: connecting to the coordinator at %s (waiting up to %d s for all processes)",
             process_id, num_processes, coordinator_address, init_timeout_seconds)
    watchdog = threading.Timer(init_timeout_seconds, _give_up_waiting,
                               (coordinator_address, num_processes, process_id, init_timeout_seconds))
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
            initialization_timeout=init_timeout_seconds + _INIT_GRACE_SECONDS,
            heartbeat_timeout_seconds=heartbeat_timeout_seconds, shutdown_timeout_seconds=shutdown_timeout_seconds,
            coordinator_bind_address=bind if _is_loopback(host) else None)
    finally:
        watchdog.cancel()
    if jax.process_count() != num_processes or jax.process_index() != process_id:
        raise DistributedSetupError(f"jax.distributed reports process {jax.process_index()} of {jax.process_count()}, "
                                    f"not {process_id} of {num_processes}")
    log.info("process %d of %d: %d local devices, %d in all; a process silent for %d s stops the run",
             process_id, num_processes, jax.local_device_count(), jax.device_count(), heartbeat_timeout_seconds)


# ----------------------------------------------------------------------------- agreement
def is_primary() -> bool:
    """Whether this process writes the run's files.

    Returns:
      True on process 0 (the only process of a local run), False on the others.
    """
    return jax.process_index() == 0


def _client():
    from jax._src import distributed  # the coordination service's client, as Orbax's multihost module uses it

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized, but jax reports several processes")
    return client


def _key(name: str) -> str:
    # Every process calls these functions in the same order, so the counter names the same call.
    return f"qlora_jax/{next(_keys)}/{name}"


def sync_processes(name: str, timeout_seconds: float = BARRIER_TIMEOUT_SECONDS) -> None:
    """Waits until every process has reached this point.

    Args:
      name: names the barrier in error messages.
      timeout_seconds: how long to wait.
    """
    if jax.process_count() == 1:
        return
    _client().wait_at_barrier(_key(name), int(timeout_seconds * 1000))


def primary_value[T](value: T, name: str, timeout_seconds: float = BARRIER_TIMEOUT_SECONDS) -> T:
    """Process 0's ``value`` on every process; the others' own are ignored.

    For decisions taken from files, which must be the same everywhere.

    Args:
      value: JSON-serialisable.
      name: names the value in the key-value store and in error messages.
      timeout_seconds: how long the other processes wait for process 0.

    Returns:
      Process 0's ``value``.
    """
    if jax.process_count() == 1:
        return value
    key = _key(name)
    if is_primary():
        _client().key_value_set(key, json.dumps(value))
        return value
    return json.loads(_client().blocking_key_value_get(key, int(timeout_seconds * 1000)))


def on_primary[T](function: Callable[[], T], name: str, timeout_seconds: float = BARRIER_TIMEOUT_SECONDS) -> T | None:
    """Runs ``function`` on process 0 only and tells every process how it went.

    If it raises there, it raises on process 0 and :class:`PrimaryProcessError` (with its message)
    on the others, so that all stop together.

    Args:
      function: takes no argument.
      name: names the step in the key-value store and in error messages.
      timeout_seconds: how long the other processes wait for process 0.

    Returns:
      Its result on process 0; None on the others.

    Raises:
      PrimaryProcessError: on the other processes, when ``function`` raised on process 0.
    """
    outcome, error, result = None, None, None
    if is_primary():
        try:
            result = function()
        except Exception as err:
            error = err
            outcome = f"{type(err).__name__}: {err}"
    shared = primary_value(outcome, name, timeout_seconds)
    if error is not None:
        raise error
    if shared is not None:
        raise PrimaryProcessError(f"process 0 failed ({name}): {shared}")
    return result


def from_primary[T](function: Callable[[], T], name: str, timeout_seconds: float = BARRIER_TIMEOUT_SECONDS) -> T:
    """``function()`` run on process 0 only, its result returned on every process.

    For reading (or writing) the run's files once; errors reach every process as in :func:`on_primary`.

    Args:
      function: takes no argument; its result must be JSON-serialisable.
      name: names the step in the key-value store and in error messages.
      timeout_seconds: how long the other processes wait for process 0.

    Returns:
      ``function()``'s result, on every process.

    Raises:
      PrimaryProcessError: on the other processes, when ``function`` raised on process 0 (which
        raises its own error).
    """
    return primary_value(on_primary(function, name, timeout_seconds), name, timeout_seconds)


@contextlib.contextmanager
def primary_context(manager: Callable[[], contextlib.AbstractContextManager], name: str):
    """``with manager():`` on process 0 only, entered before every process goes on (see :func:`on_primary`).

    Args:
      manager: makes the context manager (called on process 0 only).
      name: names the step in error messages.
    """
    with contextlib.ExitStack() as stack:
        on_primary(lambda: stack.enter_context(manager()), name)
        yield


def gather_to_host(tree: Any) -> Any:
    """Every leaf of ``tree`` as a numpy array holding its whole (global) value, on every process.

    A collective when arrays span several processes: every process must call it.

    Args:
      tree: a pytree of (possibly sharded) arrays.

    Returns:
      The same pytree of numpy arrays.
    """
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def all_processes_agree(flag: bool) -> bool:
    """Whether ``flag`` is true on every process (a collective).

    Args:
      flag: this process's view.

    Returns:
      The AND of ``flag`` over all processes.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(flag)))))


def agreed_free_device_bytes(devices: Iterable[jax.Device]) -> int | None:
    """Free memory per device for the paged optimizer's placement, the same number on every process.

    A collective across processes: each measures only its own devices, so their decisions would
    otherwise differ.

    Args:
      devices: the devices the optimizer state may occupy.

    Returns:
      Bytes: the least of every process's own devices among ``devices`` (``free_device_bytes=`` of
      :func:`qlora_jax.optim.make_optimizer`); None on a CPU.
    """
    from qlora_jax.optim.offload import measure_free_device_bytes

    devices = list(devices)
    local = measure_free_device_bytes([d for d in devices if d.process_index == jax.process_index()])
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    every = np.asarray(multihost_utils.process_allgather(np.asarray(-1 if local is None else local, np.int64)))
    return None if (every < 0).any() else int(every.min())
