"""Paged optimizer state: on the device when it fits, streamed through host memory when it does not.

bitsandbytes' paged optimizers keep their state in CUDA unified memory: pages move to the host
only under memory pressure, so with enough device memory nothing is copied. JAX has no unified
memory; :func:`offload_state` makes the same choice once, at ``init``, from the state's size (the
planner's accounting, :func:`qlora_jax.memory.plan_optimizer_state`) and the device's free
memory, and logs it:

=============  ==============================================================================
placement      what happens
=============  ==============================================================================
``"auto"``     (default) ``"device"`` if the state fits in the free device memory left after
               ``reserve_device_bytes``; otherwise ``"groups"``, or ``"layers"`` when no two
               layers fit. On a CPU (no separate device memory, ``memory_stats()`` is None)
               it is always ``"device"``: host and device are the same RAM, so offloading
               would only add copies.
``"device"``   the state stays on the device; no copies. An ``elementwise`` inner transform is
               called on the whole tree (the plain optax transform); otherwise it runs one
               layer at a time (:func:`~qlora_jax.optim.per_layer`).
``"layers"``   the state lives in ``pinned_host`` memory between steps and streams through the
               device one layer at a time, double-buffered (:mod:`qlora_jax.optim.streaming`).
``"groups"``   the same, ``k`` layers at a time, ``k`` the largest divisor of the layer count
               up to a ``1/MIN_CHUNKS`` of the layers whose three chunks fit the free memory.
``"whole"``    the whole state moves to the device and back once per step.
``Placement``  an explicit placement (e.g. ``Placement("host", layers_per_chunk=4)``).
=============  ==============================================================================

Whatever the placement, the state is the inner transform's own state tree (see
:class:`~qlora_jax.optim.streaming.StateLayout`), so a checkpoint written under one placement
restores under another, and ``optax.tree_utils.tree_get(state, "learning_rate")`` works. The
``update`` follows where the state is: host-resident state is streamed, device state is not, and
the new state goes where the old one was (so ``optax.MultiSteps``' branches agree).

Offloaded, every per-parameter state leaf with at least one axis is a ``pinned_host`` array between
steps, with the sharding of the parameter it belongs to (:mod:`qlora_jax.optim.shardings`); the
global leaves (step counts, injected hyperparameters) and 0-d leaves stay on the device (a few
bytes, and optax wrappers such as ``optax.MultiSteps`` compute on them). On CPU every
memory kind is the same RAM and the copies are no-ops: tests there check placement, the structure
of the update and numerics, not the savings (``experiments/bench_optimizer.py`` on a GPU).

**Donation.** jax 0.11 can abort the process when a ``jax.jit`` donates ``pinned_host`` buffers
without explicit memory kinds for every output (:mod:`qlora_jax.optim.jit`). State on the
device (``"auto"`` whenever it fits, and always on CPU) has no host buffers, so any ``jax.jit``
with any ``donate_argnums`` works. Host-resident state is safe with
:func:`qlora_jax.optim.jit_train_step`, or with a ``jax.jit`` that donates the parameters and the
state together (``donate_argnums=(0, 1)`` for ``step(params, state, ...) -> (params, state,
...)``); :func:`qlora_jax.optim.check_donation` tells any other ``jit`` apart before it runs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
import optax

from qlora_jax.memory import OptimizerStatePlan, plan_optimizer_state
from qlora_jax.optim import memory_kinds, shardings, streaming

__all__ = ["MIN_CHUNKS", "PLACEMENTS", "Placement", "choose_placement", "measure_free_device_bytes", "offload_state"]

logger = logging.getLogger(__name__)

PLACEMENTS = ("auto", "device", "layers", "groups", "whole")
# "groups" keeps at least this many chunks, so that the one chunk the loop re-reads stays a small
# part of the traffic (1/MIN_CHUNKS of the layers' host-to-device bytes at most).
MIN_CHUNKS = 8
# Without reserve_device_bytes, "auto" leaves this fraction of the free memory (after the
# gradients and the update) to the step's activations and workspace.
DEFAULT_ACTIVATION_FRACTION = 0.25

FreeBytes = int | None | Callable[[Iterable[jax.Device]], int | None]


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a paged optimizer keeps its state between steps, and how it moves it.

    ``where``: ``"device"`` or ``"host"`` (``pinned_host``). ``layers_per_chunk``: host only,
    how many layers of the layer-stacked state go to the device at a time (None: all at once).
    ``whole``: host only, also the other leaves in one piece. ``reason``: why it was chosen.

    Attributes:
      where: ``"device"`` or ``"host"``.
      layers_per_chunk: host only: layers per device-bound chunk (>= 1), or ``None`` for all.
      whole: host only: copy the whole state at once.
      reason: human-readable reason for the choice (logged).

    Raises:
      ValueError: an unknown ``where`` or ``layers_per_chunk < 1``.
    """

    where: str
    layers_per_chunk: int | None = 1
    whole: bool = False
    reason: str = ""

    def __post_init__(self):
        if self.where not in ("device", "host"):
            raise ValueError(f"Placement.where must be 'device' or 'host', got {self.where!r}")
        if self.layers_per_chunk is not None and self.layers_per_chunk < 1:
            raise ValueError(f"Placement.layers_per_chunk must be >= 1 or None, got {self.layers_per_chunk}")

    @property
    def on_host(self) -> bool:
        return self.where == "host"

    def describe(self) -> str:
        if not self.on_host:
            return "on the device"
        if self.whole or self.layers_per_chunk is None:
            return "in pinned host memory, copied whole"
        unit = "one layer" if self.layers_per_chunk == 1 else f"{self.layers_per_chunk} layers"
        return f"in pinned host memory, streamed {unit} at a time"


def measure_free_device_bytes(devices: Iterable[jax.Device]) -> int | None:
    """Free memory of the most loaded of ``devices`` (``bytes_limit - bytes_in_use``), None on CPU.

    None means the backend has no separate device memory or reports none (``memory_stats()`` is
    None or lacks the counters).

    Args:
      devices: the devices holding the parameters.

    Returns:
      Free bytes (``int``) of the device with the least free memory, or ``None``.
    """
    free = []
    for device in devices:
        if device.platform == "cpu":
            return None
        stats = device.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(free) if free else None


def _per_device_bytes(abstract: Any, shards: Any) -> list[int]:
    """Bytes each leaf of ``abstract`` occupies on one device under ``shards`` (same structure)."""
    out = []
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shards, is_leaf=lambda s: s is None), strict=True):
        shape = s.shard_shape(x.shape) if s is not None else x.shape
        out.append(int(np.prod(shape, dtype=np.int64)) * x.dtype.itemsize)
    return out


def _params_devices(params: Any) -> frozenset | None:
    try:
        return shardings.params_devices(params)
    except TypeError:  # ShapeDtypeStructs without shardings
        return None


def state_plan(layout: streaming.StateLayout, params: Any, placement: Placement) -> OptimizerStatePlan:
    """Per-device bytes of ``layout``'s state under ``placement`` (the planner's accounting)."""
    try:
        shards = jax.tree.leaves(shardings.state_shardings(layout.abstract_state(), params),
                                 is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    except TypeError:
        shards = [None] * len(layout.abstract)
    sizes = _per_device_bytes(list(layout.abstract), shards)
    layer = sum(sizes[i] for i in layout.layer_ids)
    plan = layout.plan
    groups_set = [set(p.sources) - set(layout.global_ids) for p in layout.group_pieces]
    group_sizes = [sum(sizes[i] for i in g) for g in groups_set]
    max_group = sum(group_sizes) if placement.whole else max(group_sizes, default=0)
    return plan_optimizer_state(
        sum(sizes), on_host=placement.on_host, layer_state_bytes=layer, num_layers=plan.num_layers,
        layers_per_chunk=None if placement.whole else placement.layers_per_chunk,
        max_group_bytes=max_group, global_bytes=sum(sizes[i] for i in layout.global_ids))


def choose_placement(
    layout: streaming.StateLayout,
    params: Any,
    policy: str | Placement = "auto",
    *,
    free_device_bytes: FreeBytes = measure_free_device_bytes,
    reserve_device_bytes: int | None = None,
) -> Placement:
    """The placement ``policy`` gives for this state (see the module docstring for the policies).

    ``free_device_bytes``: free memory per device in bytes (an int), None (no separate device
    memory: CPU), or a function of the devices that measures it (default:
    :func:`measure_free_device_bytes`). ``reserve_device_bytes``: what the rest of the step will
    allocate on each device beyond what is already there (e.g.
    ``qlora_jax.memory.plan_memory(...).step_transient_bytes``); default: the gradients and the
    update (twice the parameters' bytes) plus a quarter of the free memory for activations.

    Args:
      layout: the state's :class:`~qlora_jax.optim.StateLayout` (its plan and per-piece sizes).
      params: the parameters (arrays or ShapeDtypeStructs with shardings).
      policy: one of ``PLACEMENTS``, or a :class:`Placement` (returned as is).
      free_device_bytes: bytes, ``None``, or a function of the devices measuring them.
      reserve_device_bytes: bytes per device the rest of the step needs, or ``None`` (estimated).

    Returns:
      The :class:`Placement`, with its ``reason``.

    Raises:
      ValueError: an unknown ``policy``.
    """
    if isinstance(policy, Placement):
        return policy if policy.reason else dataclasses.replace(policy, reason="given")
    if policy not in PLACEMENTS:
        raise ValueError(f"unknown placement {policy!r}; choose one of {', '.join(PLACEMENTS)} or pass a Placement")
    num_layers = layout.plan.num_layers
    if policy == "device":
        return Placement("device", reason="asked for")
    if policy == "layers":
        return Placement("host", 1, reason="asked for")
    if policy == "whole":
        return Placement("host", None, whole=True, reason="asked for")

    free = free_device_bytes
    if callable(free):
        devices = _params_devices(params)
        free = free(devices) if devices else None
    if free is None:
        if policy == "auto":
            return Placement("device", reason="this backend has no separate device memory (CPU)")
        budget = None
    else:
        if reserve_device_bytes is None:
            params_bytes = sum(_per_device_bytes(params, _param_shardings(params)))
            reserve_device_bytes = 2 * params_bytes + int(DEFAULT_ACTIVATION_FRACTION * free)
        budget = free - reserve_device_bytes
    if policy == "auto" and budget is not None:
        needed = state_plan(layout, params, Placement("device")).device_bytes
        if needed <= budget:
            return Placement("device", reason=f"the state ({_mib(needed)}) fits in {_mib(budget)} of free device "
                                              f"memory (after reserving {_mib(reserve_device_bytes)})")
    if num_layers == 0:
        return Placement("host", 1, reason="the state does not fit on the device" if budget is not None else
                         "asked for")
    candidates = [k for k in range(max(1, num_layers // MIN_CHUNKS), 0, -1) if num_layers % k == 0]
    for k in candidates:
        transient = state_plan(layout, params, Placement("host", k)).device_transient_bytes
        if budget is None or transient <= budget:
            what = "no free-memory figure" if budget is None else f"{_mib(transient)} in flight fits {_mib(budget)}"
            return Placement("host", k, reason=f"{k} of {num_layers} layers at a time: {what}")
    smallest = state_plan(layout, params, Placement("host", 1)).device_transient_bytes
    logger.warning("paged optimizer: even one layer's state in flight (%s) exceeds the free device memory left "
                   "for it (%s); streaming one layer at a time anyway", _mib(smallest), _mib(budget))
    return Placement("host", 1, reason=f"one layer at a time ({_mib(smallest)} in flight) exceeds {_mib(budget)}")


def _param_shardings(params: Any) -> Any:
    return jax.tree.map(lambda x: getattr(x, "sharding", None), params)


def _mib(n: int | None) -> str:
    """Bytes for a log line, in the largest binary unit that keeps a leading digit."""
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n} B"


def _to_device(tree: Any) -> Any:
    def one(x):
        if jax.typeof(x).memory_space != jax.memory.Space.Host:
            # Offloaded state whose abstract value says device (built by jit out_shardings alone, or
            # restored by Orbax; see memory_kinds.refresh_host_avals): re-tag it, or the copy to the
            # device would be dropped. Best effort: refresh such state before the jit instead.
            x = jax.device_put(x, jax.memory.Space.Host)
        return jax.device_put(x, jax.memory.Space.Device)

    return jax.tree.map(one, tree)


def _to_host(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Host), tree)


def _on_host(layout: streaming.StateLayout, state: Any) -> bool:
    """Whether the state is offloaded: its per-parameter leaves in host memory (all or none of them)."""
    leaves = jax.tree.leaves(state)
    spaces = {jax.typeof(leaves[i]).memory_space for i in layout.offloadable_ids}
    if len(spaces) > 1:
        raise ValueError(f"the optimizer state is partly on the device and partly in host memory ({spaces}); "
                         "restore or build it with the placement of optimizer.init(params)")
    return spaces == {jax.memory.Space.Host}


def offload_state(
    inner: optax.GradientTransformation,
    *,
    placement: str | Placement = "auto",
    elementwise: bool = False,
    stacked: streaming.Stacked = streaming.layer_stacked,
    max_group_size: int = streaming.DEFAULT_MAX_GROUP_SIZE,
    free_device_bytes: FreeBytes = measure_free_device_bytes,
    reserve_device_bytes: int | None = None,
    unroll: int = 1,
    memory_kind: str = memory_kinds.HOST,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` as a paged optimizer: its state on the device or in host memory, per ``placement``.

    ``placement``: see the module docstring (default ``"auto"``, decided and logged at ``init``).
    ``elementwise``: ``inner`` acts on every value independently (Adam, AdamW, Lion, SGD): then
    the device placement calls it on the whole tree, and layers may be chunked freely. Otherwise
    (per-leaf transforms such as 8-bit Adam) it always sees one layer at a time. The inner
    transform must be elementwise or per-leaf either way (see :mod:`qlora_jax.optim.streaming`).
    ``stacked``, ``max_group_size``: how the parameters split into pieces. ``free_device_bytes``,
    ``reserve_device_bytes``: inputs of the ``"auto"``/``"groups"`` decision
    (:func:`choose_placement`). ``unroll``: ``lax.scan`` unroll of the streamed layer loop.
    ``memory_kind``: only ``"pinned_host"`` (see :mod:`qlora_jax.optim.memory_kinds`).

    Args:
      inner: the optimizer whose state is paged (e.g. :func:`~qlora_jax.optim.adamw`).
      placement: one of ``PLACEMENTS`` or a :class:`Placement`.
      elementwise: whether ``inner`` acts on every value independently.
      stacked: ``(path, leaf) -> bool``, which leaves carry a leading layer axis.
      max_group_size: most values (elements) per group of the non-layer leaves.
      free_device_bytes: free device bytes, ``None``, or a function of the devices measuring them.
      reserve_device_bytes: bytes per device the rest of the step needs, or ``None`` (estimated).
      unroll: ``lax.scan`` unroll of the streamed layer loop (>= 1).
      memory_kind: must be ``"pinned_host"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with ``inner``'s updates; its state is
      ``inner``'s, in optax's layout, placed on the device or in pinned host memory.

    Raises:
      ValueError: another ``memory_kind``, an unknown ``placement`` or ``unroll < 1``.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023 (paged optimizers).
    """
    _check_offload_settings(placement, unroll, memory_kind)
    inner = optax.with_extra_args_support(inner)
    layouts = streaming.LayoutCache(inner, stacked, max_group_size)
    decided: dict[Any, Placement] = {}

    def init_fn(params):
        layout = layouts(params)
        chosen = choose_placement(layout, params, placement, free_device_bytes=free_device_bytes,
                                  reserve_device_bytes=reserve_device_bytes)
        if chosen.on_host and chosen.layers_per_chunk and layout.plan.num_layers % chosen.layers_per_chunk:
            raise ValueError(f"layers_per_chunk={chosen.layers_per_chunk} does not divide the "
                             f"{layout.plan.num_layers} layers")
        if chosen.on_host and not streaming.is_traced(params):
            memory_kinds.require_memory_kind(memory_kind, shardings.params_devices(params))
        decided[_tree_key(params)] = chosen
        _log_placement(layout, params, chosen)
        if not chosen.on_host:
            return streaming.init_state(inner, layout, params)
        logger.info("paged optimizer with host-resident state: compile the step with "
                    "qlora_jax.optim.jit_train_step, or check your own jax.jit with qlora_jax.optim.check_donation "
                    "(jax 0.11 aborts the process when a jit pairs a donated host buffer with a device output)")
        return streaming.init_state(inner, layout, params, memory_kind=memory_kind, to_host=_to_host)

    def update_fn(updates, state, params=None, **extra_args):
        layout = layouts(updates)
        streaming.check_state(layout, state)
        chosen = decided.get(_tree_key(updates))
        if not _on_host(layout, state) and not (chosen is not None and chosen.on_host):
            if elementwise:
                return inner.update(updates, state, params, **extra_args)
            return streaming.update_pieces(inner, layout, updates, state, params, extra_args, layers_per_chunk=1)
        # Host-resident (the state says so, or this instance's init put it there: an abstract value can
        # say device for a host array). The chunk size is the one decided at init; one layer if this
        # instance never saw init (e.g. inside optax.inject_hyperparams, which rebuilds it every step).
        if chosen is None or not chosen.on_host:
            chosen = Placement("host", 1)
        if chosen.whole:
            layout = layouts(updates, max_group_size=None)
        return streaming.update_pieces(inner, layout, updates, state, params, extra_args,
                                       layers_per_chunk=chosen.layers_per_chunk,
                                       to_device=_to_device, to_host=_to_host, prefetch=True, unroll=unroll)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_offload_settings(placement: str | Placement, unroll: int, memory_kind: str) -> None:
    if memory_kind != memory_kinds.HOST:
        raise ValueError(
            f"offload_state keeps state in 'pinned_host' memory only, got memory_kind={memory_kind!r}: "
            "'unpinned_host' cannot be copied to a GPU, and 'device' is the placement 'device'"
        )
    if not isinstance(placement, Placement) and placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose one of {', '.join(PLACEMENTS)} or pass a Placement")
    if unroll < 1:
        raise ValueError(f"unroll must be >= 1, got {unroll}")


def _tree_key(tree: Any) -> tuple:
    """What identifies a parameter tree for the placement decided at ``init``: structure, shapes, dtypes."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def _log_placement(layout: streaming.StateLayout, params: Any, chosen: Placement) -> None:
    """Logs where the state goes and what it moves per step."""
    traffic = state_plan(layout, params, chosen)
    logger.info(
        "paged optimizer state %s (%s): %s per device; per step %s to the device and %s to the host, "
        "up to %s on the device while updating", chosen.describe(), chosen.reason,
        _mib(traffic.device_bytes + traffic.host_bytes), _mib(traffic.to_device_bytes_per_step),
        _mib(traffic.to_host_bytes_per_step), _mib(traffic.device_transient_bytes))
