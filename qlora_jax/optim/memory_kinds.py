"""Memory kinds: where an array's buffers live, and which kinds each backend offers.

A device has several addressable memories (``device.addressable_memories()``); an array's
``x.sharding.memory_kind`` says which one holds it. What jax 0.11 offers:

================  ===============================================  =================================
backend           memory kinds                                     notes
================  ===============================================  =================================
GPU (CUDA/ROCm)   ``device`` (HBM), ``pinned_host``                ``unpinned_host`` is listed by
                                                                   some versions but does not work
                                                                   (jax's own memories tests skip
                                                                   it on GPU); use ``pinned_host``
TPU               ``device``, ``pinned_host``, ``unpinned_host``
CPU               ``device``, ``pinned_host``, ``unpinned_host``   all three are the same RAM:
                                                                   copies between them are no-ops,
                                                                   so CPU runs check placement and
                                                                   numerics, not memory savings
================  ===============================================  =================================

Offloaded optimizer state uses ``pinned_host`` only: it is the kind every accelerator backend can
DMA from, and the one ``jax.memory.Space.Host`` (used inside ``jit``) means.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax

__all__ = [
    "HOST",
    "memory_kinds",
    "supports_memory_kind",
    "require_memory_kind",
    "tree_memory_kinds",
    "bytes_by_memory_kind",
    "refresh_host_avals",
]

HOST = "pinned_host"


def memory_kinds(device: jax.Device | None = None) -> tuple[str, ...]:
    """The memory kinds ``device`` (default: the first device) can address, e.g. ``('device', 'pinned_host')``.

    Args:
      device: a ``jax.Device``; ``None`` is ``jax.devices()[0]``.

    Returns:
      A tuple of memory-kind names.
    """
    device = jax.devices()[0] if device is None else device
    return tuple(m.kind for m in device.addressable_memories())


def supports_memory_kind(kind: str, device: jax.Device | None = None) -> bool:
    """Whether ``kind`` is usable on ``device``: addressable, and not ``unpinned_host`` on a GPU.

    Args:
      kind: a memory kind, e.g. ``"pinned_host"``.
      device: a ``jax.Device``; ``None`` is ``jax.devices()[0]``.

    Returns:
      ``bool``.
    """
    device = jax.devices()[0] if device is None else device
    if kind == "unpinned_host" and device.platform in ("gpu", "cuda", "rocm"):
        return False
    return kind in memory_kinds(device)


def require_memory_kind(kind: str, devices: Iterable[jax.Device]) -> None:
    """Raises ValueError naming the device and its kinds if any of ``devices`` cannot hold ``kind``.

    Args:
      kind: a memory kind, e.g. ``"pinned_host"``.
      devices: the devices to check.

    Raises:
      ValueError: a device that cannot hold ``kind``.
    """
    for device in devices:
        if not supports_memory_kind(kind, device):
            raise ValueError(
                f"memory kind {kind!r} is not usable on {device} ({device.platform}); it offers "
                f"{memory_kinds(device)}. Optimizer-state offload needs 'pinned_host'."
            )


def tree_memory_kinds(tree: Any) -> Any:
    """The memory kind of every array leaf of ``tree`` (same structure), e.g. to check placement.

    Args:
      tree: a pytree of ``jax.Array``.

    Returns:
      A pytree of memory-kind names (``str``) with ``tree``'s structure.
    """
    return jax.tree.map(lambda x: x.sharding.memory_kind, tree)


def bytes_by_memory_kind(tree: Any) -> dict[str, int]:
    """Total bytes of the array leaves of ``tree`` per memory kind (global sizes, not per device).

    Args:
      tree: a pytree of ``jax.Array``.

    Returns:
      ``{memory_kind: bytes}`` (a leaf without a memory kind counts as ``"device"``).
    """
    totals: dict[str, int] = {}
    for x in jax.tree.leaves(tree):
        kind = x.sharding.memory_kind or "device"
        totals[kind] = totals.get(kind, 0) + x.size * x.dtype.itemsize
    return totals


def refresh_host_avals(tree: Any) -> Any:
    """``tree`` with every host-memory array's abstract value saying host memory too.

    In jax 0.11 an array put in ``pinned_host`` by a ``jit``'s ``out_shardings`` alone, or restored
    by Orbax into a ``pinned_host`` target, reports ``memory_kind == "pinned_host"`` but its abstract
    value (``jax.typeof(x).memory_space``) still says device memory. A step traced on it then
    treats the state as already on the device and drops the copy to it. This re-places such leaves
    (``jax.device_put(x, jax.memory.Space.Host)``, once after a restore); others are returned as is.

    Args:
      tree: a pytree (arrays and other leaves).

    Returns:
      ``tree`` with the same structure, host-memory arrays re-placed.
    """

    def one(x):
        if (isinstance(x, jax.Array) and x.sharding.memory_kind == HOST
                and jax.typeof(x).memory_space != jax.memory.Space.Host):
            return jax.device_put(x, jax.memory.Space.Host)
        return x

    return jax.tree.map(one, tree)
