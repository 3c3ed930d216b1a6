"""Adam's moment estimates kept in blockwise 8-bit, as ``bitsandbytes.optim.Adam8bit`` keeps them.

Each step decodes both moments to float32, updates them with the new gradient, computes the step
from those float32 moments, then re-encodes them (see :mod:`qlora_jax.optim.quantized_moments`).
Leaves with fewer than ``min_8bit_size`` values keep float32 moments, as bitsandbytes does.

The output is Adam's direction ``m_hat / (sqrt(v_hat) + eps)`` (bitsandbytes' arithmetic:
``m / (sqrt(v) / sqrt(1 - b2^t) + eps) / (1 - b1^t)``), to be followed by weight decay and the
learning rate as in :func:`qlora_jax.optim.adamw_8bit`.

Blocks run over each leaf's flattened values. bitsandbytes sees one tensor per layer, so for
parameters stacked over a leading layer axis wrap this transform in
:func:`qlora_jax.optim.per_layer` (or :func:`qlora_jax.optim.offload_state`, which does the same)
to get the same blocks, the same ``min_8bit_size`` decision, and so the same numbers.

Not reproduced: bitsandbytes' CUDA kernel skips non-finite gradient values (and zeroes their
state); here a NaN or Inf gradient poisons its block, as in optax's Adam. Stop on non-finite
gradients before the update (``qlora_jax.train`` reports them) or wrap in ``optax.apply_if_finite``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qlora_jax.optim import quantized_moments as qm
from qlora_jax.quant.blockwise import BnbBackend

__all__ = ["ScaleByAdam8bitState", "scale_by_adam_8bit"]


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`; ``mu``/``nu`` and their absmax have the params' structure.

    Per leaf: ``mu``/``nu`` are uint8 codes of the leaf's shape with float32 absmax
    ``[num_blocks]``, or (leaves below ``min_8bit_size``) float32 moments and absmax ``None``.

    Attributes:
      count: int32 scalar, the steps taken.
      mu: first moments: per leaf uint8 codes (signed dynamic map) of the leaf's shape, or float32.
      mu_absmax: per leaf float32 ``[ceil(size / block_size)]`` absmax of ``mu``, or ``None``.
      nu: second moments: per leaf uint8 codes (unsigned dynamic map), or float32.
      nu_absmax: per leaf float32 ``[ceil(size / block_size)]`` absmax of ``nu``, or ``None``.

    References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021.
    """

    count: jax.Array  # int32 [], steps taken
    mu: Any
    mu_absmax: Any
    nu: Any
    nu_absmax: Any


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_size: int = qm.BLOCK_SIZE,
    min_8bit_size: int = qm.MIN_8BIT_SIZE,
    bnb_backend: BnbBackend = "cuda",
) -> optax.GradientTransformation:
    """Adam scaling with 8-bit blockwise moments (signed map for ``mu``, unsigned for ``nu``).

    ``block_size``: values per absmax block (bitsandbytes: 256). ``min_8bit_size``: leaves with
    fewer values keep float32 moments (bitsandbytes: 4096). ``bnb_backend``: whose re-encoding
    rounding to reproduce, ``"cuda"`` (GPU kernels, sign-preserving) or ``"cpu"``.

    Args:
      b1: exponential decay rate of the first moment.
      b2: exponential decay rate of the second moment.
      eps: added to the square root of the second moment (outside it, as PyTorch and optax).
      block_size: values per absmax block (bitsandbytes: 256).
      min_8bit_size: leaves with fewer values keep float32 moments (bitsandbytes: 4096).
      bnb_backend: ``"cuda"`` or ``"cpu"``.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByAdam8bitState` and float32
      updates.

    Raises:
      ValueError: betas outside ``[0, 1)``, a non-positive ``eps`` or ``block_size``, or an unknown
        ``bnb_backend``.

    References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021.
      Kingma and Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2014.
    """
    _check_settings(b1, b2, eps, block_size, bnb_backend)

    def quantized(leaf) -> bool:
        return leaf.size >= min_8bit_size

    def init_fn(params):
        def moment(p):
            if quantized(p):
                return jnp.zeros_like(p, dtype=jnp.uint8)
            return jnp.zeros_like(p, dtype=jnp.float32)

        def absmax(p):
            # None, not an empty array, for float32 leaves: Orbax refuses to save zero-size arrays.
            return jnp.zeros((qm.num_blocks(p.size, block_size),), jnp.float32) if quantized(p) else None

        mu = jax.tree.map(moment, params)
        return ScaleByAdam8bitState(
            count=jnp.zeros((), jnp.int32),
            mu=mu,
            mu_absmax=jax.tree.map(absmax, params),
            nu=jax.tree.map(moment, params),
            nu_absmax=jax.tree.map(absmax, params),
        )

    def update_fn(updates, state, params=None):
        del params
        count = optax.safe_increment(state.count)
        t = count.astype(jnp.float32)
        correction1 = 1.0 - jnp.float32(b1) ** t
        correction2 = jnp.sqrt(1.0 - jnp.float32(b2) ** t)

        leaf = functools.partial(_update_leaf, b1=b1, b2=b2, eps=eps, correction1=correction1,
                                 correction2=correction2, block_size=block_size, bnb_backend=bnb_backend)
        treedef = jax.tree.structure(updates)
        flat = [
            treedef.flatten_up_to(t) for t in (updates, state.mu, state.mu_absmax, state.nu, state.nu_absmax)
        ]
        out = [leaf(*xs) for xs in zip(*flat, strict=True)]
        pick = lambda i: treedef.unflatten([o[i] for o in out])  # noqa: E731
        new_state = ScaleByAdam8bitState(count, pick(1), pick(2), pick(3), pick(4))
        return pick(0), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _check_settings(b1: float, b2: float, eps: float, block_size: int, bnb_backend: str) -> None:
    if not 0.0 <= b1 < 1.0 or not 0.0 <= b2 < 1.0:
        raise ValueError(f"Adam betas must be in [0, 1), got b1={b1}, b2={b2}")
    if eps <= 0.0:
        raise ValueError(f"eps must be positive, got {eps}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if bnb_backend not in ("cuda", "cpu"):
        raise ValueError(f"bnb_backend must be 'cuda' or 'cpu', got {bnb_backend!r}")


def _update_leaf(g, mu, mu_absmax, nu, nu_absmax, *, b1: float, b2: float, eps: float, correction1: jax.Array,
                 correction2: jax.Array, block_size: int, bnb_backend: BnbBackend):
    """One leaf's Adam direction and new moments (8-bit codes and absmax, or float32 and None)."""
    g = g.astype(jnp.float32)
    is_8bit = mu.dtype == jnp.uint8
    if is_8bit:
        m = qm.decode_moment(mu, mu_absmax, signed=True, block_size=block_size)
        v = qm.decode_moment(nu, nu_absmax, signed=False, block_size=block_size)
    else:
        m, v = mu, nu
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * (g * g)
    # The step uses the float32 moments before re-encoding, as bitsandbytes does.
    direction = m / (jnp.sqrt(v) / correction2 + eps) / correction1
    if is_8bit:
        mu, mu_absmax = qm.encode_moment(m, signed=True, bnb_backend=bnb_backend, block_size=block_size)
        nu, nu_absmax = qm.encode_moment(v, signed=False, bnb_backend=bnb_backend, block_size=block_size)
    else:
        mu, nu = m, v
    return direction, mu, mu_absmax, nu, nu_absmax
