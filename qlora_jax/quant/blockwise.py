"""Blockwise absmax quantization: the arithmetic, on flat float32 arrays.

Everything here is pure, jit-able JAX and works on a flat view of a tensor, split into blocks of
``blocksize`` consecutive values (row-major order, as bitsandbytes does). A tail that does not fill
a block is its own, shorter block, again as bitsandbytes does. The arithmetic copies bitsandbytes
operation by operation (float32 reciprocal of the absmax, then a product, then comparisons against
float32 thresholds), so that the codes come out byte-identical.

Two bitsandbytes backends disagree on a few bytes, and ``bnb_backend`` picks which to reproduce:

* ``"cuda"``: the CUDA kernels (``kQuantizeBlockwise``), which wrote nearly every published
  bitsandbytes checkpoint. An all-zero block gets code 0 there (its scaled values are NaN).
* ``"cpu"``: the CPU/default backend (``torch.bucketize`` against midpoints, and a 65536-entry
  lookup table for the 8-bit dynamic map).

Both decode to the same values except where the two backends round a value differently.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.quant import codebooks

BnbBackend = Literal["cuda", "cpu"]

__all__ = [
    "BnbBackend",
    "pad_to_blocks",
    "block_absmax",
    "scale_to_unit",
    "count_above",
    "encode_4bit",
    "encode_int8",
    "encode_dynamic8",
    "decode_int8",
    "pack_4bit",
    "unpack_4bit",
    "accurate_mean",
]

INT8_MAX = 127.0
# bitsandbytes multiplies by this float32 literal instead of dividing by 127.
INV_INT8_MAX = np.float32(7.874015718698502e-3)


def pad_to_blocks(flat: jax.Array, blocksize: int) -> jax.Array:
    """Zero-pads a flat array to whole blocks and returns it as ``[num_blocks, blocksize]``.

    Zero padding leaves each block's absmax unchanged (|0| never exceeds it).

    Args:
      flat: a 1-D array of ``n`` values (any dtype).
      blocksize: values per block.

    Returns:
      ``[ceil(n / blocksize), blocksize]`` in ``flat``'s dtype.
    """
    n = flat.shape[0]
    num_blocks = -(-n // blocksize)
    pad = num_blocks * blocksize - n
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(num_blocks, blocksize)


def block_absmax(blocks: jax.Array) -> jax.Array:
    """Absolute maximum of each row of ``[num_blocks, blocksize]``, float32 ``[num_blocks]``.

    Args:
      blocks: float32 ``[num_blocks, blocksize]``.

    Returns:
      ``[num_blocks]`` in ``blocks``' dtype (NaN for a block holding NaN).
    """
    return jnp.max(jnp.abs(blocks), axis=-1)


def scale_to_unit(blocks: jax.Array, absmax: jax.Array, bnb_backend: BnbBackend, numel: int) -> jax.Array:
    """Maps each block onto [-1, 1] as bitsandbytes does: ``x * float32(1 / absmax)``.

    ``numel`` is the unpadded element count. The CPU backend clamps the absmax at 1e-38 (an
    all-zero block scales to zeros), divides (rather than multiplying by the reciprocal) in a
    partial last block, and clamps to [-1, 1]; the CUDA kernels do none of this, so an all-zero
    block scales to NaN there.

    Args:
      blocks: float32 ``[num_blocks, blocksize]`` (zero-padded).
      absmax: float32 ``[num_blocks]``.
      bnb_backend: ``"cuda"`` or ``"cpu"``.
      numel: the unpadded element count.

    Returns:
      float32 ``[num_blocks, blocksize]``.
    """
    if bnb_backend == "cpu":
        safe = jnp.maximum(absmax, jnp.float32(1e-38))
        unit = blocks * (jnp.float32(1.0) / safe)[:, None]
        if numel % blocks.shape[1]:
            # XLA turns a division by a broadcast scalar into a product with its reciprocal (not the
            # IEEE quotient); a divisor behind a barrier stays a true elementwise division.
            divisor = jax.lax.optimization_barrier(jnp.broadcast_to(safe[-1], blocks[-1].shape))
            unit = unit.at[-1].set(blocks[-1] / divisor)
        return jnp.clip(unit, -1.0, 1.0)
    inv = jnp.float32(1.0) / absmax
    return blocks * inv[:, None]


def count_above(x: jax.Array, thresholds: np.ndarray) -> jax.Array:
    """Number of thresholds strictly below each x (0 for NaN): a branch-free sorted search.

    Unrolled into one comparison per threshold, so it also runs inside a Pallas kernel body (the
    quantize kernels of :mod:`qlora_jax.kernels` encode with it).

    Args:
      x: float32 values, any shape.
      thresholds: the sorted float32 decision thresholds (a host array, unrolled at trace time).

    Returns:
      int32 counts of ``x``'s shape, in ``[0, len(thresholds)]``.
    """
    count = jnp.zeros(x.shape, jnp.int32)
    for t in thresholds:
        count = count + (x > jnp.float32(t)).astype(jnp.int32)
    return count


def encode_4bit(unit: jax.Array, quant_type: str, bnb_backend: BnbBackend) -> jax.Array:
    """Nearest 4-bit code (int32 in [0, 15]) of values already scaled to [-1, 1].

    A value exactly on a midpoint takes the lower code, as both bitsandbytes backends do.

    Args:
      unit: float32 values in ``[-1, 1]``, any shape.
      quant_type: ``"nf4"`` or ``"fp4"``.
      bnb_backend: ``"cuda"`` or ``"cpu"`` (they differ for FP4).

    Returns:
      int32 codes of ``unit``'s shape.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
    """
    code = codebooks.codebook(quant_type)
    if quant_type == "nf4":
        # NF4 codes are sorted, and the CUDA decision tree's thresholds are these midpoints.
        midpoints = ((code[:-1] + code[1:]) / np.float32(2)).astype(np.float32)
        return count_above(unit, midpoints)
    if bnb_backend == "cpu":
        order = codebooks.FP4_CPU_SORT_ORDER
        ordered = code[order]
        midpoints = ((ordered[:-1] + ordered[1:]) / np.float32(2)).astype(np.float32)
        return jnp.asarray(order)[count_above(unit, midpoints)]
    sign = jnp.where(unit < 0, 8, 0).astype(jnp.int32)
    magnitude = jnp.asarray(codebooks.FP4_CUDA_MAGNITUDE_CODES)[
        count_above(jnp.abs(unit), codebooks.FP4_CUDA_THRESHOLDS)
    ]
    return magnitude + sign


def encode_int8(blocks: jax.Array, absmax: jax.Array) -> jax.Array:
    """Symmetric absmax int8 codes, ``round(x * float32(127 / absmax))`` (ties to even), as int8.

    The same rounding as bitsandbytes' LLM.int8() row-wise quantization; a zero block gives zeros.

    Args:
      blocks: float32 ``[num_blocks, blocksize]``.
      absmax: float32 ``[num_blocks]``.

    Returns:
      int8 ``[num_blocks, blocksize]``.
    """
    factor = jnp.where(absmax > 0, jnp.float32(INT8_MAX) / jnp.where(absmax > 0, absmax, 1.0), 0.0)
    q = jnp.round(blocks * factor[:, None])
    return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8)


def decode_int8(codes: jax.Array, absmax: jax.Array) -> jax.Array:
    """float32 values of int8 codes ``[num_blocks, blocksize]`` with float32 absmax ``[num_blocks]``.

    Args:
      codes: int8 ``[num_blocks, blocksize]``.
      absmax: float32 ``[num_blocks]``.

    Returns:
      float32 ``[num_blocks, blocksize]``: ``code * absmax * float32(1 / 127)``.
    """
    return codes.astype(jnp.float32) * absmax[:, None] * INV_INT8_MAX


def _dynamic_cuda_search(x: jax.Array, code: jax.Array) -> jax.Array:
    """bitsandbytes' CUDA ``dQuantize<0>``: a 7-step binary search, then the nearer neighbour.

    Copied step by step (including its pivots and its NaN behaviour: NaN takes code 0), so that
    the result is the same byte as the CUDA kernel's, not merely a nearest code.
    """
    pivot = jnp.full(x.shape, 127, jnp.int32)
    upper_pivot = jnp.full(x.shape, 255, jnp.int32)
    lower_pivot = jnp.zeros(x.shape, jnp.int32)
    lower = jnp.full(x.shape, -1.0, jnp.float32)
    upper = jnp.full(x.shape, 1.0, jnp.float32)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        above = x > val
        lower_pivot = jnp.where(above, pivot, lower_pivot)
        lower = jnp.where(above, val, lower)
        upper_pivot = jnp.where(above, upper_pivot, pivot)
        upper = jnp.where(above, upper, val)
        pivot = jnp.where(above, pivot + step, pivot - step)
        val = code[pivot]
    upper = jnp.where(upper_pivot == 255, code[255], upper)
    lower = jnp.where(lower_pivot == 0, code[0], lower)
    above = x > val
    mid_upper = (upper + val) * jnp.float32(0.5)
    mid_lower = (lower + val) * jnp.float32(0.5)
    return jnp.where(
        above,
        jnp.where(x > mid_upper, upper_pivot, pivot),
        jnp.where(x < mid_lower, lower_pivot, pivot),
    )


_LUT_SIZE = 65536
_CPU_LUT_CACHE: dict[bytes, np.ndarray] = {}


def _cpu_lookup_table(code: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU quantization table: [-1, 1] cut into 65536 bins, each mapped to a code.

    Built exactly as ``build_quantize_lut`` in bitsandbytes' csrc/cpu_ops.cpp, in float32.
    """
    key = code.tobytes()
    if key not in _CPU_LUT_CACHE:
        midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
        i = np.arange(_LUT_SIZE, dtype=np.float32)
        bins = (np.float32(-1.0) + (np.float32(2.0) * i) / np.float32(_LUT_SIZE - 1)).astype(np.float32)
        _CPU_LUT_CACHE[key] = np.searchsorted(midpoints, bins, side="left").astype(np.uint8)
    return _CPU_LUT_CACHE[key]


def encode_dynamic8(
    blocks: jax.Array, absmax: jax.Array, code: np.ndarray, bnb_backend: BnbBackend
) -> jax.Array:
    """8-bit codes (uint8) of ``[num_blocks, blocksize]`` float32 against a sorted 256-entry map.

    This is bitsandbytes' ``quantize_blockwise`` given the blocks' absmax: the values are scaled
    by ``float32(1 / absmax)`` and mapped to a code the way the chosen backend does it.

    Args:
      blocks: float32 ``[num_blocks, blocksize]``.
      absmax: float32 ``[num_blocks]``.
      code: numpy float32 ``[256]``, the sorted map (e.g. ``DYNAMIC_MAP_SIGNED``).
      bnb_backend: ``"cuda"`` (binary search) or ``"cpu"`` (lookup table).

    Returns:
      uint8 ``[num_blocks, blocksize]``.

    References:
      Dettmers et al., `8-bit Optimizers via Block-wise Quantization
      <https://arxiv.org/abs/2110.02861>`_, 2021.
    """
    if bnb_backend == "cuda":
        unit = blocks * (jnp.float32(1.0) / absmax)[:, None]
        return _dynamic_cuda_search(unit, jnp.asarray(code)).astype(jnp.uint8)
    lut = jnp.asarray(_cpu_lookup_table(code))
    safe = jnp.where(absmax == 0, jnp.float32(1.0), absmax)
    unit = jnp.clip(blocks * (jnp.float32(1.0) / safe)[:, None], -1.0, 1.0)
    # Halves first, then the products: the float32 steps of ``norm_to_lut_index``.
    index = ((unit + jnp.float32(1.0)) * jnp.float32(0.5) * jnp.float32(_LUT_SIZE - 1) + jnp.float32(0.5)).astype(
        jnp.int32
    )
    out = lut[index]
    # bitsandbytes' CPU kernel writes code 0 for a block whose absmax is 0.
    return jnp.where((absmax == 0)[:, None], jnp.uint8(0), out)


def pack_4bit(codes: jax.Array) -> jax.Array:
    """Packs 4-bit codes ``[..., 2n]`` into uint8 ``[..., n]``; element 2j is the high nibble.

    This is bitsandbytes' byte layout. Elements 2j and 2j+1 share a byte, which is the pair a
    single GPU thread holds in an mma fragment, so a kernel turns one byte into one bf16x2.

    Args:
      codes: integer codes in ``[0, 15]``, ``[..., 2n]``.

    Returns:
      uint8 ``[..., n]``.
    """
    codes = codes.astype(jnp.uint8)
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return (pairs[..., 0] << 4) | pairs[..., 1]


def unpack_4bit(packed: jax.Array) -> jax.Array:
    """Inverse of :func:`pack_4bit`: uint8 ``[..., n]`` to codes uint8 ``[..., 2n]``.

    Args:
      packed: uint8 ``[..., n]``.

    Returns:
      uint8 ``[..., 2n]``.
    """
    high = packed >> 4
    low = packed & 0xF
    return jnp.stack([high, low], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def accurate_mean(x: jax.Array) -> jax.Array:
    """Mean of a flat float32 array: an error-free (TwoSum) pairwise sum, divided by n in float32.

    bitsandbytes takes ``torch.mean``, whose float32 summation order depends on the device and on
    the CPU's vector width, so no order reproduces it everywhere. A compensated sum is within
    float32 rounding of the exact sum on every device, which keeps the offset within an ulp or two
    of bitsandbytes' and identical between our CPU and GPU runs.

    Args:
      x: a 1-D array (cast to float32).

    Returns:
      A float32 scalar.
    """
    n = x.shape[0]
    size = 1 << max(0, (n - 1).bit_length())
    hi = jnp.pad(x.astype(jnp.float32), (0, size - n))
    lo = jnp.zeros_like(hi)
    while hi.shape[0] > 1:
        a, b = hi[0::2], hi[1::2]
        s = a + b
        b_virtual = s - a
        err = (a - (s - b_virtual)) + (b - b_virtual)
        lo = lo[0::2] + lo[1::2] + err
        hi = s
    # XLA rewrites a division by a constant into a product with its rounded reciprocal, which is
    # not the IEEE quotient; a divisor hidden behind a barrier stays a true division.
    count = jax.lax.optimization_barrier(jnp.full((), n, jnp.float32))
    return (hi[0] + lo[0]) / count
