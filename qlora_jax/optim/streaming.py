"""Run an optax transform over the parameters piece by piece: one layer, or one group of leaves, at a time.

The parameter leaves are split into *pieces*:

* **layers**: leaves stacked over a leading layer axis (``stacked(path, leaf)``; by default every
  leaf under a ``"layers"`` key, :mod:`qlora_jax.models.llama`'s layout). The inner transform's
  state for them is ``jax.vmap(inner.init)`` of the stacked leaves, so every state leaf has the
  leading layer axis, and the update is a ``lax.scan`` over layers: iteration ``i`` gives the
  inner transform layer ``i``'s gradients, parameters and state. One piece = one layer of all
  stacked leaves.
* **groups**: the other leaves, in tree order, packed greedily into groups of at most
  ``max_group_size`` values (a bigger leaf is a group by itself); one ``inner.init`` per group.

Inside a piece the inner transform sees a tree of the parameters' structure holding only that
piece's leaves (``None`` elsewhere; a layer's leaves without their layer axis), so path-based
masks such as :func:`qlora_jax.optim.decay_mask` still apply.

**Conditions on the inner transform.** It must act on each piece independently of the others:
elementwise or per-leaf transforms (Adam, AdamW, 8-bit Adam, Lion, SGD with momentum, weight
decay, learning-rate scaling). Anything that reduces over all parameters, such as
``optax.clip_by_global_norm``, must go *outside* (before) the streamed transform, otherwise it
would clip each layer by that layer's norm. Its state must not depend on the step it is taken at
other than through its own counters (each piece keeps its own ``count``; they stay equal).
Extra arguments (``optax.GradientTransformationExtraArgs``) reach every piece unchanged.

For an elementwise inner transform the result equals the inner transform applied to the whole tree
(:mod:`tests.test_optim_offload` checks this against ``optax.adamw``). For a per-leaf one such as
:func:`qlora_jax.optim.scale_by_adam_8bit` it applies it to each layer's tensor separately, which is
what bitsandbytes does with per-layer PyTorch parameters.

``to_device``/``to_host`` hooks let :func:`qlora_jax.optim.offload_state` move each piece's state
to the device just before its update and back just after; :func:`per_layer` uses no hooks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from qlora_jax.optim.masks import key_name
from qlora_jax.optim.shardings import state_shardings

__all__ = ["StreamedState", "Plan", "layer_stacked", "no_layers", "plan_pieces", "streamed", "per_layer"]

Stacked = Callable[[tuple, Any], bool]
Hook = Callable[[Any], Any]

# Default bound on one group of non-stacked leaves: 16M values, i.e. 128 MiB of float32 Adam
# moments on the device at a time.
DEFAULT_MAX_GROUP_SIZE = 1 << 24


class StreamedState(NamedTuple):
    """State of a streamed transform.

    ``layers``: the inner state of the layer-stacked leaves, every leaf with a leading layer axis
    (None if no leaf is stacked). ``groups``: the inner state of each group of the other leaves.
    """

    layers: Any
    groups: tuple


def layer_stacked(path: tuple, leaf: Any) -> bool:
    """Default ``stacked`` predicate: leaves under a ``"layers"`` key with at least one axis."""
    return getattr(leaf, "ndim", 0) >= 1 and any(key_name(k) == "layers" for k in path)


def no_layers(path: tuple, leaf: Any) -> bool:
    """A ``stacked`` predicate that streams every leaf as a group (nothing is stacked)."""
    del path, leaf
    return False


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a parameter tree splits into pieces (leaf indices in ``jax.tree.flatten`` order)."""

    treedef: Any
    layer_ids: tuple[int, ...]
    num_layers: int
    groups: tuple[tuple[int, ...], ...]

    def select(self, leaves: list, ids: tuple[int, ...]) -> Any:
        """The tree with only the leaves ``ids`` (``None`` elsewhere)."""
        keep = set(ids)
        return self.treedef.unflatten([x if i in keep else None for i, x in enumerate(leaves)])

    def leaves_of(self, piece: Any, ids: tuple[int, ...]) -> list:
        """The leaves ``ids`` of a tree built by :meth:`select` (in ``ids`` order)."""
        flat = self.treedef.flatten_up_to(piece)
        return [flat[i] for i in ids]


def plan_pieces(tree: Any, stacked: Stacked, max_group_size: int) -> Plan:
    """Splits ``tree``'s leaves (arrays, tracers or ShapeDtypeStructs) into layer and group pieces.

    Depends only on paths and shapes, so the parameters at ``init`` and the gradients at
    ``update`` give the same plan.
    """
    if max_group_size <= 0:
        raise ValueError(f"max_group_size must be positive, got {max_group_size}")
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    layer_ids, leading = [], {}
    for i, (path, x) in enumerate(with_path):
        if stacked(path, x):
            layer_ids.append(i)
            leading.setdefault(int(x.shape[0]), jax.tree_util.keystr(path))
    if len(leading) > 1:
        detail = ", ".join(f"{path}: {n}" for n, path in leading.items())
        raise ValueError(
            f"layer-stacked leaves must share their leading (layer) axis, got {detail}; pass a `stacked` "
            "predicate that selects only leaves stacked over the same layers"
        )
    groups, current, size = [], [], 0
    for i, (_, x) in enumerate(with_path):
        if i in layer_ids:
            continue
        n = int(np.prod(x.shape, dtype=np.int64))
        if current and size + n > max_group_size:
            groups.append(tuple(current))
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        groups.append(tuple(current))
    return Plan(treedef, tuple(layer_ids), next(iter(leading), 0), tuple(groups))


def _identity(tree: Any) -> Any:
    return tree


def is_traced(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a tracer (we are inside ``jit``/``vmap``/``grad``)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def init_placed(init: Callable[[Any], Any], params: Any, memory_kind: str | None) -> Any:
    """``init(params)`` laid out by :func:`~qlora_jax.optim.shardings.state_shardings` in ``memory_kind``.

    Compiled with those output shardings, in one computation per piece. Under a trace (``init``
    called inside ``jit``) the caller's shardings apply instead.
    """
    if is_traced(params):
        state = init(params)
        return jax.device_put(state, jax.memory.Space.Host) if memory_kind == "pinned_host" else state
    shardings = state_shardings(jax.eval_shape(init, params), params, memory_kind)
    # The device_put inside as well as out_shardings: with out_shardings alone jax 0.11 returns
    # host arrays whose abstract value still says device memory, and a later jit would then skip
    # the copy to the device.
    return jax.jit(lambda p: jax.device_put(init(p), shardings), out_shardings=shardings)(params)


def streamed(
    inner: optax.GradientTransformation,
    *,
    stacked: Stacked = layer_stacked,
    max_group_size: int = DEFAULT_MAX_GROUP_SIZE,
    memory_kind: str | None = None,
    to_device: Hook = _identity,
    to_host: Hook = _identity,
    sequential: bool = False,
    unroll: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` applied piece by piece (see the module docstring), with placement hooks.

    ``memory_kind``: where ``init`` puts the state (None: the parameters' memory). ``to_device`` /
    ``to_host``: applied to a piece's state before / after its update. ``sequential``: make each
    group's state wait, before ``to_device``, for the previous piece's new state (bounds device
    residency to one group; forgoes prefetching the next one). ``unroll``: ``lax.scan`` unroll of the
    layer loop (2 lets XLA overlap one layer's copies with the next one's compute, holding two).
    """
    inner = optax.with_extra_args_support(inner)
    if unroll < 1:
        raise ValueError(f"unroll must be >= 1, got {unroll}")

    def init_fn(params):
        plan = plan_pieces(params, stacked, max_group_size)
        leaves = plan.treedef.flatten_up_to(params)
        layers = None
        if plan.layer_ids:
            # One layer at a time, like the update, so that init never holds more than one layer's
            # state on the device either; the result is vmap(inner.init) of the stacked leaves.
            def layer_init(stacked_params):
                return jax.lax.map(lambda p: to_host(inner.init(p)), stacked_params)

            layers = init_placed(layer_init, plan.select(leaves, plan.layer_ids), memory_kind)
        groups = tuple(init_placed(inner.init, plan.select(leaves, ids), memory_kind) for ids in plan.groups)
        return StreamedState(layers, groups)

    def update_fn(updates, state, params=None, **extra_args):
        if not isinstance(state, StreamedState):
            raise TypeError(
                f"expected the StreamedState this transform's init returns, got {type(state).__name__}"
            )
        plan = plan_pieces(updates, stacked, max_group_size)
        if (state.layers is None) != (not plan.layer_ids) or len(state.groups) != len(plan.groups):
            raise ValueError(
                f"optimizer state does not fit these gradients: it holds "
                f"{'no' if state.layers is None else 'a'} layer piece and {len(state.groups)} groups, the "
                f"gradients split into {'a' if plan.layer_ids else 'no'} layer piece and {len(plan.groups)} "
                "groups (was the state initialised for another parameter tree or `stacked` predicate?)"
            )
        g_leaves = plan.treedef.flatten_up_to(updates)
        p_leaves = None if params is None else plan.treedef.flatten_up_to(params)
        out: list[Any] = [None] * len(g_leaves)

        def piece_params(ids):
            return None if p_leaves is None else plan.select(p_leaves, ids)

        new_layers = None
        previous = None
        if plan.layer_ids:
            def body(carry, xs):
                g_i, state_i, p_i = xs
                u_i, new_i = inner.update(g_i, to_device(state_i), p_i, **extra_args)
                return carry, (u_i, to_host(new_i))

            xs = (plan.select(g_leaves, plan.layer_ids), state.layers, piece_params(plan.layer_ids))
            _, (u, new_layers) = jax.lax.scan(body, None, xs, unroll=unroll)
            for i, x in zip(plan.layer_ids, plan.leaves_of(u, plan.layer_ids)):
                out[i] = x
            previous = new_layers

        new_groups = []
        for ids, group_state in zip(plan.groups, state.groups):
            if sequential and previous is not None:
                # Tie this group's (host) state to the previous piece's result, so that its copy to
                # the device cannot be scheduled before the previous piece is done.
                group_state, _ = jax.lax.optimization_barrier((group_state, previous))
            u, new_state = inner.update(plan.select(g_leaves, ids), to_device(group_state), piece_params(ids),
                                        **extra_args)
            new_state = to_host(new_state)
            for i, x in zip(ids, plan.leaves_of(u, ids)):
                out[i] = x
            new_groups.append(new_state)
            previous = new_state
        return plan.treedef.unflatten(out), StreamedState(new_layers, tuple(new_groups))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def per_layer(
    inner: optax.GradientTransformation,
    *,
    stacked: Stacked = layer_stacked,
    max_group_size: int = DEFAULT_MAX_GROUP_SIZE,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` applied to each layer of layer-stacked parameters separately, state on the device.

    For elementwise transforms this changes nothing numerically. For per-tensor ones (8-bit Adam's
    blocks and its ``min_8bit_size`` rule) it treats every layer as its own tensor, as bitsandbytes
    does with per-layer PyTorch parameters, and matches :func:`qlora_jax.optim.offload_state`
    exactly. See the module docstring for the conditions on ``inner``.
    """
    return streamed(inner, stacked=stacked, max_group_size=max_group_size)
