"""4-bit blockwise quantization on the GPU, byte-identical to bitsandbytes' CUDA kernel.

Loading a large bf16 checkpoint and quantizing it on the host is bound by host memory bandwidth
and a single core; this kernel does the heavy part on the device. ``W[..., K]`` (bf16/f16/f32,
viewed as ``[N, K]``) is cut into tiles of whole quantization blocks. Per block the program takes
the absmax, scales by the IEEE float32 reciprocal (``x * (1 / absmax)``, as bitsandbytes' CUDA
``kQuantizeBlockwise``), picks the code by counting the decision thresholds strictly below the
value (NF4: the 15 midpoints; FP4: bitsandbytes' 7 magnitude thresholds plus the sign), and
packs two codes per byte, element ``2j`` in the high nibble.

An all-zero block scales to NaN and gets code 0, and a block holding NaN or Inf gets a NaN
absmax, exactly as :func:`qlora_jax.quant.quantize` with ``bnb_backend="cuda"``.

Double quantization of the absmax (a global mean, then an 8-bit code per scale: 1/64 of the
data) runs in XLA on the device, through the very function the reference uses
(:func:`qlora_jax.quant.double_quantize`), so its bytes are the reference's by construction.
:func:`reference` beside it is that reference.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from qlora_jax.kernels import common, support
from qlora_jax.kernels.tiles import DequantTiles, quantize_tiles

from qlora_jax.quant import QuantizedTensor, codebooks, double_quantize, quantize
from qlora_jax.quant.blockwise import count_above
from qlora_jax.quant.tensor import NESTED_BLOCKSIZE

__all__ = ["quantize_blocks", "assemble", "reference", "check_supported", "INPUT_DTYPES"]

INPUT_DTYPES = support.QUANTIZE_INPUT_DTYPES


def reference(w: jax.Array, quant_type: str = "nf4", *, blocksize: int = 64, double_quant: bool = True,
              nested_blocksize: int = NESTED_BLOCKSIZE) -> QuantizedTensor:
    """XLA reference: ``quantize(w, ..., bnb_backend="cuda")``."""
    return quantize(w, quant_type, blocksize=blocksize, double_quant=double_quant,
                    nested_blocksize=nested_blocksize, bnb_backend="cuda", check_finite=False)


def _encode(unit: jax.Array, quant_type: str, magnitude_ref: Any) -> jax.Array:
    """int32 4-bit codes of values scaled to [-1, 1] (NaN -> 0), as bitsandbytes' CUDA kernel.

    :func:`qlora_jax.quant.blockwise.encode_4bit` with ``bnb_backend="cuda"``, except that FP4's
    magnitude codes come through ``magnitude_ref`` (a kernel cannot capture an array constant).
    """
    if quant_type == "nf4":
        return count_above(unit, codebooks.NF4_CUDA_THRESHOLDS)
    sign = jnp.where(unit < 0, 8, 0).astype(jnp.int32)
    magnitude = magnitude_ref[count_above(jnp.abs(unit), codebooks.FP4_CUDA_THRESHOLDS)]
    return magnitude + sign


def _kernel(w_ref, magnitude_ref, codes_ref, absmax_ref, *, n: int, tiles: DequantTiles, blocksize: int,
            quant_type: str, interpret: bool):
    br, bc = tiles.block_rows, tiles.block_cols
    blocks = bc // blocksize
    pid_r, pid_c = pl.program_id(0), pl.program_id(1)
    rows = pid_r * br + jnp.arange(br, dtype=jnp.int32)
    mask = rows < n
    c0 = pl.multiple_of(pid_c * bc, bc)
    x = plt.load(w_ref.at[pl.ds(pid_r * br, br), pl.ds(c0, bc)], mask=mask[:, None], other=0.0)
    x = x.astype(jnp.float32).reshape(br, blocks, blocksize)
    magnitude = jnp.abs(x)
    absmax = jnp.max(magnitude, axis=2)
    # NaN and Inf both fail `< inf`: such a block gets a NaN absmax (and so NaN values back).
    non_finite = jnp.max(jnp.where(magnitude < jnp.float32(jnp.inf), 0, 1), axis=2)
    absmax = jnp.where(non_finite == 0, absmax, jnp.float32(jnp.nan))
    unit = x * common.exact_reciprocal(absmax, interpret=interpret)[:, :, None]
    codes = _encode(unit, quant_type, magnitude_ref).reshape(br, bc // 2, 2)
    high, low = jax.lax.unstack(codes, axis=2)
    packed = ((high << 4) | low).astype(jnp.uint8)
    plt.store(
        codes_ref.at[pl.ds(pid_r * br, br), pl.ds(pl.multiple_of(c0 // 2, bc // 2), bc // 2)],
        packed,
        mask=mask[:, None],
    )
    plt.store(absmax_ref.at[pl.ds(pid_r * br, br), pl.ds(pid_c * blocks, blocks)], absmax, mask=mask[:, None])


def check_supported(w: Any, quant_type: str, blocksize: int) -> None:
    """Raises ValueError naming the problem when the kernel cannot quantize ``w`` (rules: :mod:`.support`)."""
    support.check(support.Problem("quantize", quant_type, w.shape, blocksize, w.dtype), "pallas_triton")


@functools.partial(jax.jit, static_argnames=("quant_type", "blocksize", "tiles", "interpret", "debug_poison_output"))
def quantize_blocks(
    w: jax.Array,
    quant_type: str = "nf4",
    *,
    blocksize: int = 64,
    tiles: DequantTiles | None = None,
    interpret: bool = False,
    debug_poison_output: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """First stage: ``(codes uint8[..., K // 2], absmax float32[..., K // blocksize])`` of ``w[..., K]``.

    ``debug_poison_output`` starts both outputs filled (codes 0xFF, absmax NaN) so that an
    unwritten tile is visible (tests).
    """
    check_supported(w, quant_type, blocksize)
    k = w.shape[-1]
    n = int(np.prod(w.shape[:-1], dtype=np.int64))
    tiles = tiles or quantize_tiles(n, k, blocksize)
    if k % tiles.block_cols or tiles.block_cols % blocksize:
        raise ValueError(f"{tiles}: block_cols must divide K={k} and be a multiple of blocksize={blocksize}")
    out_shape = (jax.ShapeDtypeStruct((n, k // 2), jnp.uint8), jax.ShapeDtypeStruct((n, k // blocksize), jnp.float32))

    def kernel(w_ref, magnitude_ref, *refs):
        codes_ref, absmax_ref = refs[-2:]
        _kernel(w_ref, magnitude_ref, codes_ref, absmax_ref, n=n, tiles=tiles, blocksize=blocksize,
                quant_type=quant_type, interpret=interpret)

    codes, absmax = common.triton_call(
        kernel, [w.reshape(n, k), jnp.asarray(codebooks.FP4_CUDA_MAGNITUDE_CODES, jnp.int32)], out_shape,
        grid=(pl.cdiv(n, tiles.block_rows), k // tiles.block_cols), num_warps=tiles.num_warps, num_stages=1,
        interpret=interpret, name="qlora_quantize_4bit", poison=(0xFF, jnp.nan) if debug_poison_output else None,
    )
    return codes.reshape(*w.shape[:-1], k // 2), absmax.reshape(*w.shape[:-1], k // blocksize)


def assemble(w: jax.Array, codes: jax.Array, absmax: jax.Array, quant_type: str, *, blocksize: int,
             double_quant: bool, nested_blocksize: int, offset: Any) -> QuantizedTensor:
    """The QuantizedTensor of ``w`` from a quantize kernel's first stage ``(codes, absmax)``.

    Double quantization (1/64 of the data) runs in XLA through the reference's own function
    (:func:`qlora_jax.quant.double_quantize`), so its bytes are the reference's by construction.
    """
    meta = dict(shape=tuple(int(d) for d in w.shape), dtype=jnp.dtype(w.dtype).name, quant_type=quant_type,
                blocksize=blocksize, nested_blocksize=nested_blocksize)
    if not double_quant:
        return QuantizedTensor(codes=codes, scales=absmax, nested_scales=None, offset=None, **meta)
    scale_codes, nested, off = _double_quantize(absmax.reshape(-1), nested_blocksize, offset)
    return QuantizedTensor(codes=codes, scales=scale_codes.reshape(absmax.shape), nested_scales=nested, offset=off,
                           **meta)


@functools.partial(jax.jit, static_argnames=("nested_blocksize",))
def _double_quantize(absmax: jax.Array, nested_blocksize: int, offset: Any) -> tuple[jax.Array, ...]:
    return double_quantize(absmax, nested_blocksize, "cuda", offset)
