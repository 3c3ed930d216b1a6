"""AdamW, 32-bit and 8-bit, as optax chains without clipping (clip before them, outside any offload).

Both are ``scale_by_adam[_8bit] -> add_decayed_weights(mask) -> scale_by_learning_rate``, i.e. the
decoupled update ``p <- p - lr * (adam_direction + weight_decay * p)`` of ``torch.optim.AdamW``,
``optax.adamw`` and bitsandbytes' AdamW8bit. Every piece is elementwise or per-leaf, so both can be
wrapped whole in :func:`qlora_jax.optim.offload_state`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from qlora_jax.optim import quantized_moments as qm
from qlora_jax.optim.adam8bit import scale_by_adam_8bit
from qlora_jax.optim.masks import MaskLike, as_mask_fn, decay_mask
from qlora_jax.quant.blockwise import BnbBackend

__all__ = ["adamw", "adamw_8bit", "scale_by_adam_float32", "updates_in_params_dtype"]


def _check(learning_rate, weight_decay: float) -> None:
    if not callable(learning_rate) and learning_rate < 0:
        raise ValueError(f"learning_rate must be non-negative, got {learning_rate}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")


def scale_by_adam_float32(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` whose moments and output are float32 whatever the parameters' dtype.

    ``optax.scale_by_adam`` keeps its second moment in the parameters' dtype, so bfloat16 adapters
    would get bfloat16 moments; bitsandbytes' 32-bit optimizers (and this) keep float32 state for
    16-bit parameters. For float32 parameters it is ``optax.scale_by_adam`` exactly.

    Args:
      b1: exponential decay rate of the first moment.
      b2: exponential decay rate of the second moment.
      eps: added to the square root of the second moment (outside it, as PyTorch and optax).

    Returns:
      An ``optax.GradientTransformation`` whose state is ``optax.ScaleByAdamState`` (int32
      ``count``, float32 ``mu``/``nu`` shaped like the parameters) and whose updates are float32.

    References:
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014.
    """
    inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=jnp.float32)

    def init_fn(params):
        return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                      mu=optax.tree.zeros_like(params, dtype=jnp.float32),
                                      nu=optax.tree.zeros_like(params, dtype=jnp.float32))

    def update_fn(updates, state, params=None):
        del params
        return inner.update(jax.tree.map(lambda g: g.astype(jnp.float32), updates), state)

    return optax.GradientTransformation(init_fn, update_fn)


def updates_in_params_dtype() -> optax.GradientTransformation:
    """Casts each update to its parameter's dtype (a no-op for float32 parameters; without params).

    The last step of the AdamW chains: float32 directions for bfloat16 adapters would otherwise
    hold a float32 buffer the size of the adapters. Adding a bfloat16 update to a bfloat16
    parameter rounds twice instead of once, a difference far below the parameter's own rounding.

    Returns:
      A stateless ``optax.GradientTransformation`` (state ``optax.EmptyState``); ``update`` without
      ``params`` returns the updates unchanged.
    """

    def update_fn(updates, state, params=None):
        if params is None:
            return updates, state
        return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskLike = decay_mask,
) -> optax.GradientTransformation:
    """AdamW with float32 moments (``optax.adamw`` with QLoRA's defaults: ``b2=0.999``, no decay).

    The moments stay float32 for bfloat16 parameters too (:func:`scale_by_adam_float32`); the
    updates come back in the parameters' dtype.

    ``weight_decay_mask``: which leaves decay (default :func:`~qlora_jax.optim.decay_mask`: not biases
    or norms). Learning rate and weight decay follow PyTorch's AdamW convention.

    Args:
      learning_rate: a non-negative float or an optax schedule (step -> rate).
      b1: exponential decay rate of the first moment.
      b2: exponential decay rate of the second moment.
      eps: added to the square root of the second moment (outside it, as PyTorch and optax).
      weight_decay: decoupled weight decay, multiplied by the learning rate (non-negative).
      weight_decay_mask: a pytree of bools, or a function of the parameters returning one, or a
        function ``(path, leaf) -> bool`` (see :func:`~qlora_jax.optim.as_mask_fn`).

    Returns:
      An ``optax.GradientTransformation``: float32 moments, updates in the parameters' dtypes.

    Raises:
      ValueError: a negative constant ``learning_rate`` or ``weight_decay``.

    References:
      Loshchilov and Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014.
    """
    _check(learning_rate, weight_decay)
    return optax.chain(
        scale_by_adam_float32(b1=b1, b2=b2, eps=eps),
        optax.add_decayed_weights(weight_decay, as_mask_fn(weight_decay_mask)),
        optax.scale_by_learning_rate(learning_rate),
        updates_in_params_dtype(),
    )


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskLike = decay_mask,
    block_size: int = qm.BLOCK_SIZE,
    min_8bit_size: int = qm.MIN_8BIT_SIZE,
    bnb_backend: BnbBackend = "cuda",
) -> optax.GradientTransformation:
    """AdamW with blockwise 8-bit moments: ``bitsandbytes.optim.AdamW8bit``'s update.

    See :func:`~qlora_jax.optim.scale_by_adam_8bit` for ``block_size``, ``min_8bit_size`` and
    ``bnb_backend``. For layer-stacked parameters wrap it in :func:`~qlora_jax.optim.per_layer` (or
    offload it) to get bitsandbytes' per-layer blocks.

    Args:
      learning_rate: a non-negative float or an optax schedule (step -> rate).
      b1: exponential decay rate of the first moment.
      b2: exponential decay rate of the second moment.
      eps: added to the square root of the second moment (outside it, as PyTorch and optax).
      weight_decay: decoupled weight decay, multiplied by the learning rate (non-negative).
      weight_decay_mask: which leaves decay (as :func:`adamw`).
      block_size: values per absmax block of the 8-bit moments (bitsandbytes: 256).
      min_8bit_size: leaves with fewer values keep float32 moments (bitsandbytes: 4096).
      bnb_backend: ``"cuda"`` or ``"cpu"``, whose re-encoding rounding to reproduce.

    Returns:
      An ``optax.GradientTransformation`` whose first state is :class:`ScaleByAdam8bitState`;
      updates in the parameters' dtypes.

    Raises:
      ValueError: a negative constant ``learning_rate`` or ``weight_decay``, or a bad setting of
        :func:`~qlora_jax.optim.scale_by_adam_8bit`.

    References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021.
      Loshchilov and Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019.
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
    """
    _check(learning_rate, weight_decay)
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, block_size=block_size, min_8bit_size=min_8bit_size,
                           bnb_backend=bnb_backend),
        optax.add_decayed_weights(weight_decay, as_mask_fn(weight_decay_mask)),
        optax.scale_by_learning_rate(learning_rate),
        updates_in_params_dtype(),
    )
