"""Shardings of optimizer state: follow the parameters, change only the memory kind.

``optax`` builds its state with ``zeros_like(params)``, which keeps a parameter's sharding when run
eagerly but not under ``jit`` or ``vmap`` (the zeros do not depend on the data), and it puts
scalars such as ``count`` on one device. A state laid out that way cannot be passed to a step
compiled for the parameters' mesh. :func:`state_shardings` states the rule instead:

* a subtree of the state with the parameters' tree structure (Adam's ``mu``, ``nu``, 8-bit codes,
  ...) gets, leaf by leaf, the sharding of the parameter in the same position when the shapes
  match, and is replicated otherwise (e.g. the per-block absmax of an 8-bit moment);
* every other leaf (``count``, schedule state) is replicated over the parameters' devices.

The memory kind of every sharding is then set to the one requested (``pinned_host`` to offload).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

__all__ = ["params_devices", "replicated_sharding", "state_shardings", "tree_shardings"]


def _sharding(x: Any) -> Sharding:
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, Sharding):
        raise TypeError(f"expected a jax.Array (or ShapeDtypeStruct with a sharding), got {type(x).__name__}")
    return sharding


def params_devices(params: Any) -> frozenset:
    """The set of devices all parameter leaves live on; ValueError if they differ between leaves.

    Args:
      params: a pytree of arrays (or ShapeDtypeStructs with shardings).

    Returns:
      A ``frozenset`` of ``jax.Device``.

    Raises:
      ValueError: no array leaves, or leaves on different sets of devices.
    """
    found: dict[frozenset, str] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        found.setdefault(frozenset(_sharding(x).device_set), jax.tree_util.keystr(path))
    if not found:
        raise ValueError("the parameter tree has no array leaves")
    if len(found) > 1:
        detail = "; ".join(f"{path} on {sorted(d.id for d in devs)}" for devs, path in found.items())
        raise ValueError(f"parameters live on different sets of devices ({detail}); put them on one mesh")
    return next(iter(found))


def replicated_sharding(params: Any, memory_kind: str | None = None) -> Sharding:
    """A sharding that replicates a value over the devices of ``params`` (on their mesh if they have one).

    Args:
      params: a pytree of arrays (or ShapeDtypeStructs with shardings).
      memory_kind: memory kind of the result, or ``None`` (the default kind).

    Returns:
      A ``NamedSharding`` with an empty ``PartitionSpec`` or a ``SingleDeviceSharding``.

    Raises:
      ValueError: as :func:`params_devices`.
    """
    params_devices(params)
    first = _sharding(jax.tree.leaves(params)[0])
    if isinstance(first, NamedSharding):
        out: Sharding = NamedSharding(first.mesh, PartitionSpec())
    elif isinstance(first, SingleDeviceSharding) or len(first.device_set) == 1:
        out = SingleDeviceSharding(next(iter(first.device_set)))
    else:
        devices = sorted(first.device_set, key=lambda d: d.id)
        out = NamedSharding(jax.sharding.Mesh(devices, ("replica",)), PartitionSpec())
    return out.with_memory_kind(memory_kind) if memory_kind else out


def state_shardings(abstract_state: Any, params: Any, memory_kind: str | None = None) -> Any:
    """Sharding of every leaf of ``abstract_state`` (e.g. ``jax.eval_shape(tx.init, params)``).

    ``params``: arrays (or ShapeDtypeStructs with shardings). ``memory_kind``: the kind the result
    uses (None: each parameter's own, i.e. usually ``device``). See the module docstring.

    A subtree of the state with the parameters' structure (moments) follows the parameters'
    shardings leaf by leaf where the shapes match; everything else (counts, absmax, ...) is
    replicated.

    Args:
      abstract_state: the optimizer state, arrays or ``jax.ShapeDtypeStruct``.
      params: the parameters, arrays or ShapeDtypeStructs with shardings.
      memory_kind: memory kind of every resulting sharding, or ``None``.

    Returns:
      A pytree of ``jax.sharding.Sharding`` with ``abstract_state``'s structure.
    """
    p_leaves, p_def = jax.tree.flatten(params)
    replicated = replicated_sharding(params, memory_kind)

    def kind(sharding: Sharding) -> Sharding:
        return sharding.with_memory_kind(memory_kind) if memory_kind else sharding

    def mirrors_params(node) -> bool:
        try:
            return jax.tree.structure(node) == p_def
        except Exception:  # noqa: BLE001 - an unflattenable node simply is not a params subtree
            return False

    def assign(node):
        if not mirrors_params(node):
            return replicated
        leaves = p_def.flatten_up_to(node)
        out = [
            kind(_sharding(p)) if getattr(s, "shape", None) == p.shape else replicated
            for s, p in zip(leaves, p_leaves, strict=True)
        ]
        return p_def.unflatten(out)

    return jax.tree.map(assign, abstract_state, is_leaf=mirrors_params)


def tree_shardings(tree: Any) -> Any:
    """``x.sharding`` of every leaf (a pytree of shardings, usable as jit in/out shardings).

    Args:
      tree: a pytree of arrays (or ShapeDtypeStructs with shardings).

    Returns:
      A pytree of ``jax.sharding.Sharding`` with ``tree``'s structure.
    """
    return jax.tree.map(_sharding, tree)
