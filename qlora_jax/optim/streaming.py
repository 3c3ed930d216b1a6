"""Run an optax transform over the parameters piece by piece, keeping its state in optax's own layout.

The parameter leaves are split into *pieces*:

* **layers**: leaves stacked over a leading layer axis (``stacked(path, leaf)``; by default every
  leaf under a ``"layers"`` key, :mod:`qlora_jax.models.llama`'s layout). The update loops over
  *chunks* of ``layers_per_chunk`` consecutive layers (a ``lax.scan``); inside a chunk the inner
  transform sees one layer at a time (``vmap`` over the chunk), without its layer axis.
* **groups**: the other leaves, in tree order, packed greedily into groups of at most
  ``max_group_size`` values (a bigger leaf is a group by itself), one after the other.

Inside a piece the inner transform sees a tree of the parameters' structure holding only that
piece's leaves (``None`` elsewhere), so path-based masks such as :func:`qlora_jax.optim.decay_mask`
still apply.

**The state is the inner transform's own state tree** (:class:`StateLayout`): e.g. for AdamW a
``ScaleByAdamState`` whose ``mu``/``nu`` have the parameters' structure and shapes, and one
``count``. Each state leaf is either *per parameter* (it sits where ``inner.init`` puts a
parameter's state: a layer-stacked parameter's state has the layer axis in front) or *global*
(``count``, injected hyperparameters: what ``inner.init`` returns for a tree with no parameters).
Every piece's update gets the global leaves as they were at the start of the step; the new ones
are taken from the last piece (they are the same in every piece for the transforms allowed here).
For an elementwise inner transform the tree equals ``inner.init(params)`` exactly, so optax
utilities (``optax.tree_utils.tree_get``, ``tree_set``), Orbax and other JAX programs see a plain
optax state.

**Conditions on the inner transform.** It must act on each piece independently of the others:
elementwise or per-leaf (Adam, AdamW, 8-bit Adam, Lion, SGD with momentum, weight decay,
learning-rate scaling, ``optax.inject_hyperparams`` of those). Anything that reduces over all
parameters, such as ``optax.clip_by_global_norm``, must go *outside* (before) the streamed
transform. Its global state must not depend on the parameters' values. Extra arguments
(``optax.GradientTransformationExtraArgs``) reach every piece unchanged. For a per-leaf
transform such as :func:`qlora_jax.optim.scale_by_adam_8bit` the result is the transform applied to
each layer's tensor separately, which is what bitsandbytes does with per-layer PyTorch parameters.

**Moving the state** (:func:`qlora_jax.optim.offload_state`): with ``to_device``/``to_host``
hooks, the layer loop is double-buffered. Before the loop the first chunk's state is copied to
the device (it depends on nothing computed in the step, so it can overlap the backward pass);
iteration ``c`` starts the copy of chunk ``c + 1`` (the carry of the loop), updates chunk ``c``
with the copy the previous iteration made, and copies chunk ``c``'s new state back (a scan
output). The next chunk's copy and the current chunk's update are independent, so the
scheduler can run them at the same time, and the write-back of chunk ``c`` overlaps the copy of
chunk ``c + 1`` (PCIe moves both directions at once). The last iteration re-reads the last chunk
(an index must stay in range): one chunk of extra host-to-device traffic per step. The groups go
one after the other (each group's state waits for the previous piece's result), so the device
holds one group's state at a time.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qlora_jax.optim.masks import key_name
from qlora_jax.optim.shardings import state_shardings

__all__ = [
    "DEFAULT_MAX_GROUP_SIZE",
    "Plan",
    "StateLayout",
    "layer_stacked",
    "no_layers",
    "plan_pieces",
    "state_layout",
    "streamed",
    "per_layer",
]

Stacked = Callable[[tuple, Any], bool]
Hook = Callable[[Any], Any]

# Default bound on one group of non-stacked leaves: 16M values, i.e. 128 MiB of float32 Adam
# moments on the device at a time.
DEFAULT_MAX_GROUP_SIZE = 1 << 24


def layer_stacked(path: tuple, leaf: Any) -> bool:
    """Default ``stacked`` predicate: leaves stacked over a leading layer axis under a ``"layers"`` key.

    Leaves with at least one axis under a ``"layers"`` key that holds arrays stacked over a leading
    layer axis (the built-in LLaMA's layout). A ``layers`` key followed by a list index
    (``layers/0/...``: a Python list or ``nnx.List`` of separate layers) is not stacked:
    each of those layers is its own group.

    Args:
      path: the leaf's key path.
      leaf: the leaf (array or ShapeDtypeStruct).

    Returns:
      Whether the leaf's first axis is the layer axis (``bool``).
    """
    if getattr(leaf, "ndim", 0) < 1:
        return False
    for i, k in enumerate(path):
        if key_name(k) == "layers":
            following = path[i + 1] if i + 1 < len(path) else None
            return following is None or not key_name(following).isdigit()
    return False


def no_layers(path: tuple, leaf: Any) -> bool:
    """A ``stacked`` predicate that streams every leaf as a group (nothing is stacked).

    Args:
      path: the leaf's key path (unused).
      leaf: the leaf (unused).

    Returns:
      ``False``.
    """
    del path, leaf
    return False


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a parameter tree splits into pieces (leaf indices in ``jax.tree.flatten`` order).

    Attributes:
      treedef: the parameter tree's structure.
      layer_ids: indices of the layer-stacked leaves (one piece per layer).
      num_layers: size of their shared leading axis (0 without stacked leaves).
      groups: indices of the other leaves, one tuple per group piece.
    """

    treedef: Any
    layer_ids: tuple[int, ...]
    num_layers: int
    groups: tuple[tuple[int, ...], ...]

    def select(self, leaves: Sequence, ids: tuple[int, ...]) -> Any:
        """The tree with only the leaves ``ids`` (``None`` elsewhere)."""
        keep = set(ids)
        return self.treedef.unflatten([x if i in keep else None for i, x in enumerate(leaves)])

    def leaves_of(self, piece: Any, ids: tuple[int, ...]) -> list:
        """The leaves ``ids`` of a tree built by :meth:`select` (in ``ids`` order)."""
        flat = self.treedef.flatten_up_to(piece)
        return [flat[i] for i in ids]


def plan_pieces(tree: Any, stacked: Stacked, max_group_size: int | None) -> Plan:
    """Splits ``tree``'s leaves (arrays, tracers or ShapeDtypeStructs) into layer and group pieces.

    Depends only on paths and shapes, so the parameters at ``init`` and the gradients at
    ``update`` give the same plan. ``max_group_size=None``: all other leaves in one group.

    Args:
      tree: the parameters (or gradients).
      stacked: ``(path, leaf) -> bool``, which leaves carry a leading layer axis.
      max_group_size: most values (elements) per group, or ``None`` (one group).

    Returns:
      The :class:`Plan`.

    Raises:
      ValueError: a non-positive ``max_group_size``, or stacked leaves with different leading axes.
    """
    if max_group_size is not None and max_group_size <= 0:
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
        if current and max_group_size is not None and size + n > max_group_size:
            groups.append(tuple(current))
            current, size = [], 0
        current.append(i)
        size += n
    if current:
        groups.append(tuple(current))
    return Plan(treedef, tuple(layer_ids), next(iter(leading), 0), tuple(groups))


@dataclasses.dataclass(frozen=True)
class PieceState:
    """One piece's state tree: its structure and, per leaf, the index of the full-state leaf it is."""

    treedef: Any
    sources: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """How the inner transform's state tree maps onto the pieces of a parameter tree.

    ``treedef``/``abstract``: the full state (leaf shapes are global shapes; a layer-stacked
    parameter's state leaves have the layer axis in front). ``global_ids``: indices of the global
    leaves. ``layer_ids``: per-parameter leaves of the layer piece. ``layer_piece`` (one layer's
    state tree, no layer axis) and ``group_pieces``: each piece's state tree, leaf by leaf.

    Attributes:
      plan: how the parameters split into pieces (leaf indices in ``jax.tree.flatten`` order).
      treedef: the full state's tree structure.
      abstract: ``jax.ShapeDtypeStruct`` of every state leaf (global shapes).
      global_ids: indices of the leaves not tied to a parameter (e.g. ``count``).
      layer_ids: indices of the per-parameter leaves of the layer piece.
      layer_piece: one layer's state tree (no layer axis), or ``None`` without stacked leaves.
      group_pieces: each group piece's state tree.
    """

    plan: Plan
    treedef: Any
    abstract: tuple[jax.ShapeDtypeStruct, ...]
    global_ids: tuple[int, ...]
    layer_ids: tuple[int, ...]
    layer_piece: PieceState | None
    group_pieces: tuple[PieceState, ...]

    def abstract_state(self) -> Any:
        """The full state as a tree of ShapeDtypeStructs."""
        return self.treedef.unflatten(self.abstract)

    @property
    def offloadable_ids(self) -> tuple[int, ...]:
        """Leaves an offloaded state keeps in host memory: per-parameter leaves with at least one axis.

        Global leaves (step counts, injected hyperparameters) and 0-d leaves stay on the device: they
        are a few bytes, and optax wrappers compute on them (``optax.MultiSteps``' ``jnp.where`` on a
        0-d host array gives a device array, and its ``cond`` branches would then disagree).
        """
        globals_set = set(self.global_ids)
        return tuple(i for i, x in enumerate(self.abstract) if i not in globals_set and len(x.shape) >= 1)

    def leaf_bytes(self, ids: Sequence[int]) -> int:
        """Global bytes of the full-state leaves ``ids``."""
        return sum(int(np.prod(self.abstract[i].shape, dtype=np.int64)) * self.abstract[i].dtype.itemsize
                   for i in ids)


def _one_level(node: Any) -> tuple[list, Any]:
    return jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)


def _is_abstract_leaf(x: Any) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct)


def _overlay(trees: list, path: str = "") -> Any:
    """Merges piece-state trees that hold ``None`` where another piece has a leaf (see StateLayout)."""
    present = [t for t in trees if t is not None]
    if not present:
        return None
    first = present[0]
    if _is_abstract_leaf(first):
        for other in present[1:]:
            if not _is_abstract_leaf(other) or (other.shape, other.dtype) != (first.shape, first.dtype):
                raise ValueError(
                    f"the inner transform's state leaf {path or '(root)'} differs between pieces of the "
                    f"parameters ({first} vs {other}): it is neither one per parameter nor a global value. "
                    "Streaming needs per-parameter (elementwise or per-leaf) state; put transforms that reduce "
                    "over all parameters outside offload_state / per_layer."
                )
        return first
    children, treedefs = zip(*(_one_level(t) for t in present), strict=True)
    if any(d != treedefs[0] for d in treedefs[1:]):
        raise ValueError(f"the inner transform's state has a different structure at {path or '(root)'} for "
                         f"different pieces of the parameters: {set(map(str, treedefs))}")
    keys = [jax.tree_util.keystr(p) for p, _ in
            jax.tree_util.tree_flatten_with_path(first, is_leaf=lambda x: x is not first)[0]]
    if len(keys) != len(children[0]):
        keys = [f"[{i}]" for i in range(len(children[0]))]
    merged = [_overlay([c[i] for c in children], path + keys[i]) for i in range(len(children[0]))]
    return treedefs[0].unflatten(merged)


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)


def state_layout(inner: optax.GradientTransformation, params: Any, stacked: Stacked,
                 max_group_size: int | None) -> StateLayout:
    """The :class:`StateLayout` of ``inner``'s state for ``params`` (arrays, tracers or ShapeDtypeStructs).

    Args:
      inner: the transform whose state is laid out; its ``init`` must accept a tree of ``None``.
      params: the parameters (arrays, tracers or ShapeDtypeStructs).
      stacked: ``(path, leaf) -> bool``, which leaves carry a leading layer axis.
      max_group_size: most values (elements) per group of the non-layer leaves, or ``None`` (no limit).

    Returns:
      The :class:`StateLayout`.

    Raises:
      TypeError: ``inner.init`` fails on a tree of ``None`` leaves.
    """
    plan = plan_pieces(params, stacked, max_group_size)
    leaves = [_abstract(x) for x in plan.treedef.flatten_up_to(params)]
    try:
        empty = jax.eval_shape(inner.init, plan.select(leaves, ()))
    except Exception as e:  # noqa: BLE001 - re-raised with what streaming needs from init
        raise TypeError(
            "streaming needs the inner transform's init to accept a parameter tree whose leaves are all None "
            f"(to find its global state such as `count`); it raised {type(e).__name__}: {e}"
        ) from e
    global_paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(empty)[0]}

    pieces, layer_abstract = [], None
    if plan.layer_ids:
        one_layer = plan.select([jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in leaves], plan.layer_ids)
        layer_abstract = jax.eval_shape(inner.init, one_layer)
        num = plan.num_layers
        pieces.append(jax.tree_util.tree_map_with_path(
            lambda p, x: x if jax.tree_util.keystr(p) in global_paths else
            jax.ShapeDtypeStruct((num, *x.shape), x.dtype), layer_abstract))
    group_abstracts = [jax.eval_shape(inner.init, plan.select(leaves, ids)) for ids in plan.groups]
    pieces += group_abstracts
    if not pieces:
        raise ValueError("the parameter tree has no array leaves")
    full = _overlay(pieces)
    with_path, treedef = jax.tree_util.tree_flatten_with_path(full)
    index = {jax.tree_util.keystr(p): i for i, (p, _) in enumerate(with_path)}

    def piece_state(tree) -> PieceState:
        piece_with_path, piece_def = jax.tree_util.tree_flatten_with_path(tree)
        return PieceState(piece_def, tuple(index[jax.tree_util.keystr(p)] for p, _ in piece_with_path))

    global_ids = tuple(sorted(index[p] for p in global_paths if p in index))
    if len(global_ids) != len(global_paths):
        missing = sorted(global_paths - set(index))
        raise ValueError(f"the inner transform's global state {missing} is missing once parameters are given")
    layer_piece = piece_state(layer_abstract) if plan.layer_ids else None
    group_pieces = tuple(piece_state(t) for t in group_abstracts)
    globals_set = set(global_ids)
    owners: dict[int, int] = {}
    for piece in ([layer_piece] if layer_piece else []) + list(group_pieces):
        if not globals_set <= set(piece.sources):
            raise ValueError("every piece's state must hold the inner transform's global state")
        for i in piece.sources:
            if i not in globals_set:
                owners[i] = owners.get(i, 0) + 1
    if len(owners) + len(global_ids) != len(with_path) or any(v != 1 for v in owners.values()):
        raise ValueError("the inner transform's per-parameter state does not split into the pieces of the parameters")
    layer_ids = tuple(i for i in layer_piece.sources if i not in globals_set) if layer_piece else ()
    return StateLayout(plan, treedef, tuple(x for _, x in with_path), global_ids, layer_ids, layer_piece,
                       group_pieces)


def is_traced(tree: Any) -> bool:
    """Whether any leaf of ``tree`` is a tracer (we are inside ``jit``/``vmap``/``grad``)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _identity(tree: Any) -> Any:
    return tree


def _pick(leaves: Sequence, ids: Sequence[int]) -> list:
    return [leaves[i] for i in ids]


def init_state(inner: optax.GradientTransformation, layout: StateLayout, params: Any, *,
               memory_kind: str | None = None, to_host: Hook = _identity) -> Any:
    """``inner``'s state for ``params`` in ``layout``, placed like the parameters in ``memory_kind``.

    Layers are initialised one at a time (``lax.map``, each layer's state passed through
    ``to_host``), so the device never holds more than one layer's state. Compiled with
    :func:`~qlora_jax.optim.shardings.state_shardings` as output shardings; under a trace (``init``
    called inside ``jit``) the caller's shardings apply instead.
    """
    plan = layout.plan
    inner = optax.with_extra_args_support(inner)

    def build(params):
        leaves = plan.treedef.flatten_up_to(params)
        full: list[Any] = [None] * len(layout.abstract)
        empty = jax.tree.leaves(inner.init(plan.select(leaves, ())))
        for i, x in zip(layout.global_ids, empty, strict=True):
            full[i] = x
        globals_set = set(layout.global_ids)
        if plan.layer_ids:
            piece = layout.layer_piece
            local_pos = [q for q, i in enumerate(piece.sources) if i not in globals_set]

            def one_layer(layer_params):
                state = piece.treedef.flatten_up_to(inner.init(layer_params))
                return to_host(_pick(state, local_pos))

            for i, x in zip(layout.layer_ids, jax.lax.map(one_layer, plan.select(leaves, plan.layer_ids)), strict=True):
                full[i] = x
        offloadable = set(layout.offloadable_ids)
        for ids, piece in zip(plan.groups, layout.group_pieces, strict=True):
            state = piece.treedef.flatten_up_to(inner.init(plan.select(leaves, ids)))
            for q, i in enumerate(piece.sources):
                if i not in globals_set:
                    full[i] = to_host(state[q]) if i in offloadable else state[q]
        return layout.treedef.unflatten(full)

    if is_traced(params):
        state = build(params)
        if memory_kind != "pinned_host":
            return state
        offloadable = set(layout.offloadable_ids)
        leaves = [jax.device_put(x, jax.memory.Space.Host) if i in offloadable else x
                  for i, x in enumerate(layout.treedef.flatten_up_to(state))]
        return layout.treedef.unflatten(leaves)
    shardings = state_shardings(layout.abstract_state(), params)
    if memory_kind is not None:
        offloadable = set(layout.offloadable_ids)
        flat = [x.with_memory_kind(memory_kind) if i in offloadable else x
                for i, x in enumerate(layout.treedef.flatten_up_to(shardings))]
        shardings = layout.treedef.unflatten(flat)
    # The device_put inside as well as out_shardings: with out_shardings alone jax 0.11 returns
    # host arrays whose abstract value still says device memory, and a later jit would then skip
    # the copy to the device.
    return jax.jit(lambda p: jax.device_put(build(p), shardings), out_shardings=shardings)(params)


def update_pieces(
    inner: optax.GradientTransformationExtraArgs,
    layout: StateLayout,
    updates: Any,
    state: Any,
    params: Any,
    extra_args: dict,
    *,
    layers_per_chunk: int | None = 1,
    to_device: Hook = _identity,
    to_host: Hook = _identity,
    prefetch: bool = False,
    unroll: int = 1,
) -> tuple[Any, Any]:
    """One update of ``inner`` piece by piece (see the module docstring); returns ``(updates, state)``.

    ``layers_per_chunk``: layers per loop iteration (None: all at once; must divide the number of
    layers). ``to_device``/``to_host``: applied to each piece's state before / after its update.
    ``prefetch``: double-buffer the layer loop (copy chunk ``c + 1`` while chunk ``c`` updates).
    """
    plan = layout.plan
    full = layout.treedef.flatten_up_to(state)
    g_leaves = plan.treedef.flatten_up_to(updates)
    p_leaves = None if params is None else plan.treedef.flatten_up_to(params)
    globals_set = set(layout.global_ids)
    offloadable = set(layout.offloadable_ids)
    glob = dict(zip(layout.global_ids, _pick(full, layout.global_ids), strict=True))  # on the device already
    new_full = list(full)
    out: list[Any] = [None] * len(g_leaves)
    run_piece = functools.partial(_run_piece, inner, extra_args, glob, globals_set)
    new_glob = _pick(full, layout.global_ids)
    previous = None
    if plan.layer_ids:
        u_layers, new_layers, new_glob = _layer_loop(
            layout, run_piece, _pick(g_leaves, plan.layer_ids), None if p_leaves is None else
            _pick(p_leaves, plan.layer_ids), _pick(full, layout.layer_ids), layers_per_chunk,
            to_device, to_host, prefetch, unroll)
        for i, x in zip(plan.layer_ids, u_layers, strict=True):
            out[i] = x
        for i, x in zip(layout.layer_ids, new_layers, strict=True):
            new_full[i] = x
        previous = new_layers

    for ids, piece in zip(plan.groups, layout.group_pieces, strict=True):
        local = [full[i] for i in piece.sources if i not in globals_set]
        if previous is not None and to_device is not _identity:
            # Tie this group's (host) state to the previous piece's result, so that its copy to
            # the device cannot be scheduled before the previous piece is done.
            local, _ = jax.lax.optimization_barrier((local, previous))
        g_tree = plan.select(g_leaves, ids)
        p_tree = None if p_leaves is None else plan.select(p_leaves, ids)
        local_ids = [i for i in piece.sources if i not in globals_set]
        u, new_local, new_glob = run_piece(piece, to_device(local), g_tree, p_tree)
        new_local = [to_host(x) if i in offloadable else x for i, x in zip(local_ids, new_local, strict=True)]
        for i, x in zip(ids, plan.leaves_of(u, ids), strict=True):
            out[i] = x
        for i, x in zip(local_ids, new_local, strict=True):
            new_full[i] = x
        previous = new_local
    for i, x in zip(layout.global_ids, new_glob, strict=True):
        new_full[i] = x
    return plan.treedef.unflatten(out), layout.treedef.unflatten(new_full)


def _run_piece(inner: optax.GradientTransformationExtraArgs, extra_args: dict, glob: dict, globals_set: set,
               piece: PieceState, local: list, g_tree: Any, p_tree: Any) -> tuple[Any, list, list]:
    """inner.update on one piece; ``local``: its per-parameter leaves (in ``piece.sources`` order),
    ``glob``: the global leaves (on the device). Returns ``(updates, new local leaves, new globals)``."""
    it = iter(local)
    leaves = [glob[i] if i in globals_set else next(it) for i in piece.sources]
    u, new_state = inner.update(g_tree, piece.treedef.unflatten(leaves), p_tree, **extra_args)
    new_leaves = piece.treedef.flatten_up_to(new_state)
    new_local = [x for x, i in zip(new_leaves, piece.sources, strict=True) if i not in globals_set]
    new_glob = [x for x, i in zip(new_leaves, piece.sources, strict=True) if i in globals_set]
    return u, new_local, new_glob


def _layer_loop(layout, run_piece, grads, params, state, layers_per_chunk, to_device, to_host, prefetch, unroll):
    """The update of the layer piece: lists of stacked updates, stacked new state, new globals."""
    plan, piece = layout.plan, layout.layer_piece
    num = plan.num_layers
    k = num if layers_per_chunk is None else layers_per_chunk
    if k < 1 or num % k:
        raise ValueError(f"layers_per_chunk={layers_per_chunk} must divide the number of layers ({num})")
    n = num // k

    def tree_of(leaves):
        full = [None] * plan.treedef.num_leaves
        for i, x in zip(plan.layer_ids, leaves, strict=True):
            full[i] = x
        return plan.treedef.unflatten(full)

    def one_layer(g, local, p):
        u, new_local, new_glob = run_piece(piece, local, tree_of(g), None if p is None else tree_of(p))
        return plan.leaves_of(u, plan.layer_ids), new_local, new_glob

    def chunk(g, local, p):
        """Updates of a chunk of ``k`` layers (leading axis k on every argument)."""
        if k == 1:
            squeeze = lambda xs: None if xs is None else [x[0] for x in xs]  # noqa: E731
            u, new_local, new_glob = one_layer(squeeze(g), squeeze(local), squeeze(p))
            return [x[None] for x in u], [x[None] for x in new_local], new_glob
        u, new_local, new_glob = jax.vmap(one_layer)(g, local, p)
        return u, new_local, [x[0] for x in new_glob]

    def chunked(xs):  # [L, ...] -> [n, k, ...]
        return None if xs is None else [x.reshape(n, k, *x.shape[1:]) for x in xs]

    def unchunked(xs):  # [n, k, ...] -> [L, ...]
        return [x.reshape(num, *x.shape[2:]) for x in xs]

    if n == 1:
        u, new_local, new_glob = chunk(grads, to_device(state), params)
        return u, to_host(new_local), new_glob

    if prefetch:
        def read(c):
            return to_device([jax.lax.dynamic_slice_in_dim(x, c * k, k) for x in state])

        def body(current, xs):
            c, g, p = xs
            following = read(jnp.minimum(c + 1, n - 1))  # the next chunk's copy, for the next iteration
            u, new_local, new_glob = chunk(g, current, p)
            return following, (u, to_host(new_local), new_glob)

        xs = (jnp.arange(n), chunked(grads), chunked(params))
        _, (u, new_local, globs) = jax.lax.scan(body, read(0), xs, unroll=unroll)
    else:
        def body(carry, xs):
            g, local, p = xs
            u, new_local, new_glob = chunk(g, to_device(local), p)
            return carry, (u, to_host(new_local), new_glob)

        _, (u, new_local, globs) = jax.lax.scan(body, None, (chunked(grads), chunked(state), chunked(params)),
                                                unroll=unroll)
    return unchunked(u), unchunked(new_local), [x[-1] for x in globs]


def streamed(
    inner: optax.GradientTransformation,
    *,
    stacked: Stacked = layer_stacked,
    max_group_size: int | None = DEFAULT_MAX_GROUP_SIZE,
    layers_per_chunk: int | None = 1,
    unroll: int = 1,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` applied piece by piece with its state on the device, no copies (see the module docstring).

    Args:
      inner: an elementwise or per-leaf transform.
      stacked: ``(path, leaf) -> bool``, which leaves carry a leading layer axis.
      max_group_size: most values (elements) per group of the non-layer leaves, or ``None`` (no limit).
      layers_per_chunk: layers per step of the layer loop (must divide the number of layers);
        ``None`` takes them all at once.
      unroll: ``lax.scan`` unroll of the layer loop.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is ``inner``'s in optax's layout.
    """
    inner = optax.with_extra_args_support(inner)
    layouts = LayoutCache(inner, stacked, max_group_size)

    def init_fn(params):
        return init_state(inner, layouts(params), params)

    def update_fn(updates, state, params=None, **extra_args):
        layout = layouts(updates)
        check_state(layout, state)
        return update_pieces(inner, layout, updates, state, params, extra_args,
                             layers_per_chunk=layers_per_chunk, unroll=unroll)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class LayoutCache:
    """:func:`state_layout` memoised by the parameters' structure, shapes and dtypes."""

    def __init__(self, inner: optax.GradientTransformation, stacked: Stacked, max_group_size: int | None):
        self.inner, self.stacked, self.max_group_size = inner, stacked, max_group_size
        self._cache: dict[Any, StateLayout] = {}

    def __call__(self, params: Any, max_group_size: Any = "default") -> StateLayout:
        size = self.max_group_size if max_group_size == "default" else max_group_size
        leaves, treedef = jax.tree.flatten(params)
        key = (treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves), size)
        if key not in self._cache:
            self._cache[key] = state_layout(self.inner, params, self.stacked, size)
        return self._cache[key]


def check_state(layout: StateLayout, state: Any) -> None:
    """Raises ValueError if ``state`` is not a state of ``layout`` (another parameter tree or transform)."""
    treedef = jax.tree.structure(state)
    if treedef != layout.treedef:
        raise ValueError(
            "optimizer state does not fit these gradients: its structure is\n"
            f"  {treedef}\nthe inner transform's state for these gradients is\n  {layout.treedef}\n"
            "(was the state initialised for another parameter tree or another transform?)"
        )
    for i, (x, want) in enumerate(zip(jax.tree.leaves(state), layout.abstract, strict=True)):
        if tuple(x.shape) != tuple(want.shape):
            raise ValueError(f"optimizer state does not fit these gradients: leaf {i} has shape {tuple(x.shape)}, "
                             f"expected {tuple(want.shape)}")


def per_layer(
    inner: optax.GradientTransformation,
    *,
    stacked: Stacked = layer_stacked,
    max_group_size: int | None = DEFAULT_MAX_GROUP_SIZE,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` applied to each layer of layer-stacked parameters separately, state on the device.

    For elementwise transforms this changes nothing numerically. For per-tensor ones (8-bit Adam's
    blocks and its ``min_8bit_size`` rule) it treats every layer as its own tensor, as bitsandbytes
    does with per-layer PyTorch parameters, and matches :func:`qlora_jax.optim.offload_state`
    exactly. See the module docstring for the conditions on ``inner``.

    Args:
      inner: an elementwise or per-leaf transform (e.g. :func:`~qlora_jax.optim.adamw_8bit`).
      stacked: ``(path, leaf) -> bool``, which leaves carry a leading layer axis.
      max_group_size: most values (elements) per group of the non-layer leaves, or ``None`` (no limit).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is ``inner``'s in optax's layout.
    """
    return streamed(inner, stacked=stacked, max_group_size=max_group_size)
