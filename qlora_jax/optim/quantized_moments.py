"""Blockwise 8-bit storage of one optimizer moment, as bitsandbytes' 8-bit optimizers keep it.

A moment tensor is cut, over its flattened row-major values, into blocks of ``block_size`` (256 in
bitsandbytes since 0.44); a tail that does not fill a block is its own, shorter block. Each block
stores its absolute maximum (float32) and one uint8 code per value: the index of the nearest
entry of a 256-entry dynamic map after scaling by the absmax. The first moment uses the signed
map, the second (never negative) the unsigned one. That is 1 + 4/256 bytes per value instead of 4.

``bnb_backend`` picks whose rounding to reproduce when a new moment is re-encoded:

* ``"cuda"``: ``kOptimizerStatic8bit2StateBlockwise`` (csrc/kernels.cu). A binary search over the
  map on ``x / absmax`` (``quantize_2D``, which returns the same code as ``dQuantize<0>`` for these
  maps), then, for the signed first moment only, a nudge to the neighbouring code when the chosen
  code has the opposite sign to the value, so that momentum never flips sign by rounding.
* ``"cpu"``: the CPU backend (backends/cpu/ops.py), which re-encodes with ``quantize_blockwise``:
  a 65536-bin lookup table over [-1, 1], and no sign nudge.

The two differ only for values close to the midpoint between two codes (and the sign nudge).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import blockwise
from qlora_jax.quant.blockwise import BnbBackend
from qlora_jax.quant.codebooks import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED

__all__ = ["BLOCK_SIZE", "MIN_8BIT_SIZE", "num_blocks", "encode_moment", "decode_moment", "moment_code"]

# bitsandbytes.optim.optimizer: 8-bit state blocks of 256 values, and tensors with fewer than
# ``min_8bit_size`` values keep float32 state (the saving would not pay for the absmax overhead).
BLOCK_SIZE = 256
MIN_8BIT_SIZE = 4096


def moment_code(signed: bool) -> np.ndarray:
    """The 256-entry float32 dynamic map of a moment: signed for the first, unsigned for the second.

    Args:
      signed: ``True`` for the first moment, ``False`` for the second.

    Returns:
      numpy float32 ``[256]``.

    References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021.
    """
    return DYNAMIC_MAP_SIGNED if signed else DYNAMIC_MAP_UNSIGNED


def num_blocks(size: int, block_size: int = BLOCK_SIZE) -> int:
    """Number of blocks (the last one possibly partial) of a tensor of ``size`` values.

    Args:
      size: number of values.
      block_size: values per block.

    Returns:
      ``ceil(size / block_size)`` (``int``).
    """
    return -(-size // block_size)


def encode_moment(
    x: jax.Array, *, signed: bool, bnb_backend: BnbBackend = "cuda", block_size: int = BLOCK_SIZE
) -> tuple[jax.Array, jax.Array]:
    """8-bit codes (uint8, ``x.shape``) and per-block absmax (float32 ``[num_blocks]``) of a moment.

    ``x`` is float32 of any shape; blocks run over its flattened values. See the module docstring
    for ``bnb_backend``.

    Args:
      x: the moment, any shape (cast to float32).
      signed: signed map (first moment) or unsigned (second moment).
      bnb_backend: ``"cuda"`` (with the CUDA kernel's sign guard) or ``"cpu"``.
      block_size: values per absmax block.

    Returns:
      ``(codes, absmax)``: uint8 of ``x.shape`` and float32 ``[ceil(x.size / block_size)]``.

    Raises:
      ValueError: an unknown ``bnb_backend``.

    References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021.
    """
    if bnb_backend not in ("cuda", "cpu"):
        raise ValueError(f"bnb_backend must be 'cuda' or 'cpu', got {bnb_backend!r}")
    x = x.astype(jnp.float32)
    flat = x.reshape(-1)
    blocks = blockwise.pad_to_blocks(flat, block_size)
    absmax = blockwise.block_absmax(blocks)
    code = moment_code(signed)
    codes = blockwise.encode_dynamic8(blocks, absmax, code, bnb_backend).reshape(-1)[: flat.shape[0]]
    if bnb_backend == "cuda" and signed:
        # The kernel's sign guard: a code whose value has the other sign moves one step towards the
        # value's side. In uint8 arithmetic, so code 0 - 1 wraps to 255 as in the kernel (that only
        # happens in an all-zero block, whose absmax 0 decodes every code to 0).
        c = codes.astype(jnp.int32)
        flipped = jnp.signbit(jnp.asarray(code)[c]) != jnp.signbit(flat)
        c = jnp.where(flipped, jnp.where(flat > 0, c + 1, c - 1), c)
        codes = (c & 0xFF).astype(jnp.uint8)
    return codes.reshape(x.shape), absmax


def decode_moment(codes: jax.Array, absmax: jax.Array, *, signed: bool, block_size: int = BLOCK_SIZE) -> jax.Array:
    """float32 values (``codes.shape``) of a moment stored by :func:`encode_moment`.

    Args:
      codes: uint8 codes, any shape.
      absmax: float32 ``[ceil(codes.size / block_size)]``.
      signed: the map the codes use.
      block_size: values per absmax block.

    Returns:
      float32 of ``codes.shape``.

    Raises:
      TypeError: codes that are not uint8.
      ValueError: ``absmax`` of the wrong shape.
    """
    if codes.dtype != jnp.uint8:
        raise TypeError(f"8-bit moment codes must be uint8, got {codes.dtype}")
    n = codes.size
    expected = num_blocks(n, block_size)
    if absmax.shape != (expected,):
        raise ValueError(
            f"absmax of an 8-bit moment with {n} values in blocks of {block_size} must have shape "
            f"({expected},), got {absmax.shape}"
        )
    values = jnp.asarray(moment_code(signed))[codes.reshape(-1).astype(jnp.int32)]
    blocks = blockwise.pad_to_blocks(values, block_size) * absmax[:, None]
    return blocks.reshape(-1)[:n].reshape(codes.shape)
