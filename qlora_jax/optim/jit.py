"""Compiling a train step whose optimizer state lives in host memory, without the donation abort.

jax 0.11.2 (and, reportedly, 0.12.0.1) can abort the whole process, with no Python exception, when a ``jax.jit``
function donates ``pinned_host`` arguments::

    RAW: Attempting to fetch value instead of handling error INVALID_ARGUMENT: PjRtBuffer's memory
    kind does not match sharding's memory kind. Got PjRtBuffer's memory kind: pinned_host vs
    shardings's memory kind: device

Why: jax reuses each donated input buffer for an output of the same shape and dtype, taking
inputs in argument order, and compares memory kinds only when *every* input and output sharding
is explicit (``jax/_src/interpreters/mlir.py``, ``_set_up_aliases``). A donated host buffer handed
to a device output aborts at run time. Whether it happens depends on shapes and argument order:
``jax.jit(step, donate_argnums=(1,))`` with Adam state whose moments have the parameters' shapes
does it (the new parameters take the old moments' host buffers); ``donate_argnums=(0, 1)`` happens
to pair them right; ``in_shardings`` alone does not make it safe.

(jax derives the output memory kinds from the program, ``propagated_out_mem_kinds`` in
``pxla.py``, but ``_set_up_aliases`` does not use them; that is where an upstream fix belongs.)

What this package does about it:

* The paged optimizers keep their state on the device whenever it fits (``placement="auto"``,
  and always on a CPU), and the global leaves (step counts, hyperparameters) on the device in
  every placement. Such a state has no host buffers: **any** ``jax.jit`` with any
  ``donate_argnums`` works, the user's own included.
* State that does live in host memory cannot be protected from inside the optimizer (the pairing
  is decided by the user's ``jit``, which the optimizer never sees, and a layout that dodged it
  would no longer be optax's). :func:`jit_train_step` builds the ``jit`` with explicit shardings
  and memory kinds for every input and output, so donation pairs only same-memory buffers; a
  plain ``jax.jit`` that donates the parameters and the state together, outputs in argument
  order, also pairs them right. :func:`check_donation` replays jax's pairing for any ``jit`` and
  raises :class:`DonationError` instead of aborting (``tests/optim/test_offload.py`` runs each
  configuration in a subprocess: only the one it flags aborts).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from qlora_jax.optim.memory_kinds import refresh_host_avals
from qlora_jax.optim.shardings import tree_shardings

__all__ = ["DonationError", "check_donation", "jit_train_step", "TrainStep"]


class DonationError(RuntimeError):
    """A jitted call would donate host-memory buffers in a way that aborts jax 0.11."""


def _is_host(aval: Any) -> bool:
    space = getattr(aval, "memory_space", None)
    return space is not None and space == jax.memory.Space.Host


def _describe(path: tuple) -> str:
    """``(args, kwargs)`` key path as "argument 1 [0].mu['w']" / "keyword argument x ..."."""
    if len(path) >= 2 and getattr(path[0], "idx", None) == 0:
        return f"argument {path[1].idx} {jax.tree_util.keystr(path[2:])}".rstrip()
    if len(path) >= 2:
        return f"keyword argument {getattr(path[1], 'key', path[1])} {jax.tree_util.keystr(path[2:])}".rstrip()
    return jax.tree_util.keystr(path)


def _all_memory_kinds_known(params: dict) -> bool:
    shardings = [*params.get("in_shardings", ()), *params.get("out_shardings", ())]
    return bool(shardings) and all(isinstance(s, Sharding) and s.memory_kind is not None for s in shardings)


def check_donation(jitted: Callable, *args: Any, **kwargs: Any) -> None:
    """Raises :class:`DonationError` if ``jitted(*args, **kwargs)`` would hit jax's donation abort.

    ``jitted`` is a ``jax.jit`` function (or a :class:`TrainStep`); the call is traced, not compiled
    or run. Call it once, before the first step, on any ``jit`` you build yourself around
    offloaded state.

    The abort: jax pairs each output with a donated input of the same shape and dtype (in argument
    order), and looks at memory kinds only when every input and output sharding is explicit. A
    donated ``pinned_host`` buffer paired with a device output aborts the process. This replays
    that pairing (conservatively: without the memory kinds that explicit-mesh shardings may supply).

    Args:
      jitted: a ``jax.jit``-wrapped function or a :class:`TrainStep`.
      *args: the positional arguments of the call to check.
      **kwargs: its keyword arguments.

    Returns:
      ``None`` when the call is safe.

    Raises:
      DonationError: a donated host-memory buffer would be reused for a device-memory output (or
        the traced arguments could not be matched to their avals).
    """
    if isinstance(jitted, TrainStep):
        jitted = jitted.jitted(*args)
    traced = jitted.trace(*args, **kwargs)
    infos = jax.tree_util.tree_flatten_with_path(traced.args_info)[0]
    in_avals = jax.tree.leaves(traced.in_avals)
    if len(in_avals) != len(infos):
        raise DonationError("could not match the traced arguments to their avals; use jit_train_step")
    values = jax.tree.leaves((args, kwargs))
    if len(values) != len(infos):
        values = [None] * len(infos)
    donated = []
    for (path, info), aval, value in zip(infos, in_avals, values, strict=True):
        if info.donated:
            kind = getattr(getattr(value, "sharding", None), "memory_kind", None)
            donated.append((_describe(path), aval, _is_host(aval) or kind in ("pinned_host", "unpinned_host")))
    if not any(host for _, _, host in donated):
        return
    params = getattr(traced, "_params", None)
    if isinstance(params, dict) and _all_memory_kinds_known(params):
        return
    pool: dict[tuple, collections.deque] = collections.defaultdict(collections.deque)
    for path, aval, host in donated:
        pool[(tuple(aval.shape), aval.dtype)].append((path, aval, host))
    for index, out in enumerate(jax.tree.leaves(traced.out_avals)):
        queue = pool.get((tuple(out.shape), out.dtype))
        if not queue:
            continue
        path, aval, host = queue.popleft()
        if host != _is_host(out):
            raise DonationError(
                f"this jit donates the host-memory (pinned_host) {path} ({aval}) and jax would reuse "
                f"its buffer for output {index} ({out}) in device memory, because not every input and output "
                "has an explicit sharding: jax 0.11 aborts the process on that call. Build the step with "
                "qlora_jax.optim.jit_train_step(step, opt_state, donate_argnums=...), or do not donate the "
                "optimizer state."
            )


def _replicated_on(sharding: Sharding) -> Sharding:
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    if len(sharding.device_set) == 1:
        return SingleDeviceSharding(next(iter(sharding.device_set)))
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    return NamedSharding(jax.sharding.Mesh(devices, ("replica",)), PartitionSpec())


class TrainStep:
    """A train step compiled with explicit shardings; see :func:`jit_train_step`.

    Calling it runs the step (compiled once per argument placement); :meth:`lower` lowers it.

    Args:
      step: the unjitted step, ``step(*args) -> tuple``.
      state_shardings: pytree of ``jax.sharding.Sharding`` of the optimizer state (memory kinds
        included).
      state_argnum: position of the optimizer state among the step's arguments.
      state_output: index of the new optimizer state in the step's output tuple.
      donate_argnums: positional arguments whose buffers are donated.

    Raises:
      ValueError: ``state_shardings`` has no array leaves; when called, a state leaf placed
        elsewhere than ``state_shardings`` or arguments committed to other devices.
    """

    def __init__(self, step: Callable, state_shardings: Any, state_argnum: int, state_output: int,
                 donate_argnums: tuple[int, ...]):
        self.step = step
        self.state_shardings = state_shardings
        self.state_argnum = state_argnum
        self.state_output = state_output
        self.donate_argnums = donate_argnums
        first = jax.tree.leaves(state_shardings, is_leaf=lambda s: isinstance(s, Sharding))
        if not first:
            raise ValueError("the optimizer state has no array leaves to take shardings from")
        self._default = _replicated_on(first[0]).with_memory_kind("device")
        self._devices = frozenset(first[0].device_set)
        self._compiled: dict[Any, Callable] = {}

    def _check_state(self, state: Any) -> None:
        expected, expected_def = jax.tree_util.tree_flatten_with_path(
            self.state_shardings, is_leaf=lambda s: isinstance(s, Sharding))
        leaves, treedef = jax.tree.flatten(state)
        if len(leaves) != len(expected):
            raise ValueError(
                f"argument {self.state_argnum} (optimizer state) has {len(leaves)} leaves, the step was built for "
                f"{len(expected)} (structure {expected_def} vs {treedef})"
            )
        for (path, want), x in zip(expected, leaves, strict=True):
            have = getattr(x, "sharding", None)
            if have is None or have.memory_kind != want.memory_kind or not have.is_equivalent_to(want, x.ndim):
                raise ValueError(
                    f"optimizer state leaf {jax.tree_util.keystr(path)} is placed as {have}, the step expects {want}. "
                    "Restore or build the state with the shardings of optimizer.init(params) "
                    "(e.g. qlora_jax.training_state.abstract_like(optimizer.init(params)) as the restore target)."
                )

    def _arg_shardings(self, arg: Any) -> Any:
        def one(x):
            sharding = getattr(x, "sharding", None)
            if isinstance(x, jax.Array) and x.committed and isinstance(sharding, Sharding):
                return sharding
            # Uncommitted arrays, NumPy arrays and Python scalars go where jit would put them.
            return self._default

        return jax.tree.map(one, arg)

    def _out_shardings(self, args: tuple, in_shardings: tuple) -> tuple:
        """Explicit shardings, memory kinds included, for every output.

        jax pairs donated inputs with outputs by shape and dtype alone unless *every* input and
        output has a known memory kind; a donated host buffer paired with a device output aborts
        the process. So: the state output gets the state's shardings; an output with the tree
        structure and shapes of an argument (the new parameters) gets that argument's shardings;
        anything else (metrics) is replicated in device memory over the state's devices.
        """
        out = jax.eval_shape(self.step, *args)
        if not isinstance(out, (tuple, list)) or self.state_output >= len(out):
            raise TypeError(f"the step must return a tuple with the new optimizer state at index {self.state_output}, "
                            f"got {type(out).__name__}")

        def signature(tree):
            leaves, treedef = jax.tree.flatten(tree)
            return treedef, tuple((tuple(x.shape), x.dtype) for x in leaves)

        arg_signatures = [signature(a) for a in args]
        result = []
        for i, tree in enumerate(out):
            if i == self.state_output:
                result.append(self.state_shardings)
                continue
            sig = signature(tree)
            candidates = ([i] if i < len(args) else []) + list(range(len(args)))
            match = next((j for j in candidates if j != self.state_argnum and arg_signatures[j] == sig), None)
            if match is not None:
                result.append(in_shardings[match])
            else:
                result.append(jax.tree.map(lambda _: self._default, tree))
        return tuple(result)

    def jitted(self, *args: Any) -> Callable:
        """The ``jax.jit`` function used for arguments like ``args`` (compiled on first call)."""
        if self.state_argnum >= len(args):
            raise TypeError(f"the step takes the optimizer state as argument {self.state_argnum}, "
                            f"got {len(args)} arguments")
        self._check_state(args[self.state_argnum])
        in_shardings = tuple(self.state_shardings if i == self.state_argnum else self._arg_shardings(a)
                             for i, a in enumerate(args))
        flat, treedef = jax.tree.flatten(in_shardings, is_leaf=lambda s: isinstance(s, Sharding))
        key = (treedef, tuple(flat))
        fn = self._compiled.get(key)
        if fn is None:
            other = {s for s in flat if frozenset(s.device_set) != self._devices}
            if other:
                raise ValueError(
                    f"some arguments are committed to devices other than the optimizer state's "
                    f"({sorted(d.id for d in self._devices)}): {sorted(map(str, other))[:2]}"
                )
            out_shardings = self._out_shardings(args, in_shardings)
            step, state_output, state_shardings = self.step, self.state_output, self.state_shardings

            def placed_step(*a):
                out = list(step(*a))
                # Pin the new state to the state's shardings (memory kind included) inside the
                # computation too, so that XLA places it on the host itself.
                out[state_output] = jax.device_put(out[state_output], state_shardings)
                return tuple(out)

            fn = jax.jit(placed_step, in_shardings=in_shardings, out_shardings=out_shardings,
                         donate_argnums=self.donate_argnums)
            self._compiled[key] = fn
        return fn

    def _refresh(self, args: tuple) -> tuple:
        if self.state_argnum >= len(args):
            return args
        args = list(args)
        args[self.state_argnum] = refresh_host_avals(args[self.state_argnum])
        return tuple(args)

    def __call__(self, *args: Any) -> Any:
        args = self._refresh(args)
        return self.jitted(*args)(*args)

    def lower(self, *args: Any) -> Any:
        """``jax.jit(...).lower(*args)`` of the step for these arguments (for memory analysis, HLO)."""
        args = self._refresh(args)
        return self.jitted(*args).lower(*args)


def jit_train_step(
    step: Callable,
    opt_state: Any,
    *,
    state_argnum: int = 1,
    state_output: int = 1,
    donate_argnums: Sequence[int] = (0, 1),
) -> TrainStep:
    """``jax.jit(step)`` with explicit shardings for every argument, so offloaded state can be donated.

    ``step(*args) -> tuple`` takes the optimizer state as positional argument ``state_argnum`` and
    returns the new state at index ``state_output`` (the defaults fit
    ``qlora_jax.train.make_train_step``: ``(trainable, opt_state, ...) -> (trainable, opt_state, metrics)``).
    ``opt_state``: the initialised (or restored) state, or a pytree of its shardings; its shardings,
    memory kinds included, are the state's input shardings and are imposed on the new state.
    Every other argument keeps the sharding it is committed to; uncommitted arrays, NumPy arrays
    and Python scalars are replicated over the state's devices. Positional arguments only.

    Each call checks that the state is where the step expects it and raises ValueError naming the
    leaf if not (e.g. a checkpoint restored to device memory), and re-tags host arrays whose
    abstract value says device memory (:func:`~qlora_jax.optim.memory_kinds.refresh_host_avals`; Orbax
    restores give such arrays).

    Args:
      step: the unjitted step, ``step(*args) -> tuple``.
      opt_state: the optimizer state (arrays) or a pytree of its shardings.
      state_argnum: position of the optimizer state among the step's arguments.
      state_output: index of the new optimizer state in the step's output tuple.
      donate_argnums: positional arguments to donate (non-negative).

    Returns:
      A :class:`TrainStep`, called like ``step``.

    Raises:
      ValueError: a negative entry in ``donate_argnums``, or a state without array leaves.
    """
    if any(i < 0 for i in donate_argnums):
        raise ValueError(f"donate_argnums must be non-negative, got {tuple(donate_argnums)}")
    shardings = jax.tree.map(lambda x: x if isinstance(x, Sharding) else tree_shardings(x), opt_state,
                             is_leaf=lambda x: isinstance(x, Sharding))
    return TrainStep(step, shardings, state_argnum, state_output, tuple(donate_argnums))
