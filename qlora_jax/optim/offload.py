"""Optimizer state in host memory between steps: JAX's counterpart of bitsandbytes' paged optimizers.

bitsandbytes pages its state through CUDA unified memory and lets page faults bring it back. JAX
has no unified memory; instead :func:`offload_state` keeps an optax transform's state in
``pinned_host`` memory and, inside the compiled step, copies it to the device piece by piece just
before it is needed and back right after (:mod:`qlora_jax.optim.streaming`):

* layer-stacked leaves are updated in a ``lax.scan`` over layers whose body copies one layer's
  slice of the state in, updates it and copies it out, so the device holds one layer's state at a
  time (``init`` is built the same way);
* the other leaves go in groups of at most ``max_group_size`` values, one after the other
  (``sequential=True`` forces the order; otherwise XLA may prefetch them all at once).

XLA can overlap the first piece's host-to-device copy with the backward pass, which does not
depend on it; within the layer loop the copies and the compute of one iteration are serial unless
``unroll=2`` (then two layers' state may be resident). On CPU every memory kind is the same RAM and
the copies are no-ops: tests there check placement, the structure of the compiled update (which
copies move what) and numerics, not the savings. Not verified without a GPU: that XLA's GPU
host-offload passes keep the stacked state in host memory through the scan (it does so for
activation offloading in scans) and how much of the copy time the scheduler hides; run
``experiments/bench_optimizer.py`` on a GPU.

Between steps every state leaf is a ``pinned_host`` array with the sharding of the parameter it
belongs to (replicated for scalars; see :mod:`qlora_jax.optim.shardings`): offload changes the
memory kind, never the sharding.

**Compile the step with explicit shardings.** jax 0.11 can abort the process when a ``jax.jit``
donates ``pinned_host`` buffers without explicit shardings (and memory kinds) for every input and
output: it may reuse a donated host buffer for a device output of the same shape. Use
:func:`qlora_jax.optim.jit_train_step`, or check your own ``jit`` with
:func:`qlora_jax.optim.check_donation` (details in :mod:`qlora_jax.optim.jit`).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from qlora_jax.optim import memory, shardings, streaming

__all__ = ["offload_state"]


def _to_device(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Device), tree)


def _to_host(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.device_put(x, jax.memory.Space.Host), tree)


def offload_state(
    inner: optax.GradientTransformation,
    *,
    stream: bool = True,
    stacked: streaming.Stacked = streaming.layer_stacked,
    max_group_size: int = streaming.DEFAULT_MAX_GROUP_SIZE,
    sequential: bool = True,
    unroll: int = 1,
    memory_kind: str = memory.HOST,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` with its state kept in host memory between steps.

    ``stream=True``: the state moves piece by piece (one layer of the ``stacked`` leaves, or one group
    of at most ``max_group_size`` values of the others); the inner transform must then be elementwise
    or per-leaf (put ``optax.clip_by_global_norm`` before this wrapper, not inside). The state is a
    :class:`~qlora_jax.optim.streaming.StreamedState`. ``stream=False``: the whole state moves at once
    and any inner transform works; the state has the inner transform's own structure.

    ``sequential``, ``unroll``: see :func:`qlora_jax.optim.streaming.streamed`. ``memory_kind``: only
    ``"pinned_host"`` (see :mod:`qlora_jax.optim.memory`).
    """
    if memory_kind != memory.HOST:
        raise ValueError(
            f"offload_state keeps state in 'pinned_host' memory only, got memory_kind={memory_kind!r}: "
            "'unpinned_host' cannot be copied to a GPU, and 'device' is no offload"
        )

    def check_devices(params):
        if not streaming.is_traced(params):
            memory.require_memory_kind(memory_kind, shardings.params_devices(params))

    if stream:
        streamed = streaming.streamed(
            inner, stacked=stacked, max_group_size=max_group_size, memory_kind=memory_kind,
            to_device=_to_device, to_host=_to_host, sequential=sequential, unroll=unroll,
        )

        def init_fn(params):
            check_devices(params)
            return streamed.init(params)

        return optax.GradientTransformationExtraArgs(init_fn, streamed.update)

    inner = optax.with_extra_args_support(inner)

    def whole_init(params):
        check_devices(params)
        return streaming.init_placed(inner.init, params, memory_kind)

    def whole_update(updates, state, params=None, **extra_args):
        new_updates, new_state = inner.update(updates, _to_device(state), params, **extra_args)
        return new_updates, _to_host(new_state)

    return optax.GradientTransformationExtraArgs(whole_init, whole_update)
