"""4-bit dequantization (NF4/FP4, double-quantized scales decoded in-kernel), Pallas-Triton.

``W[..., K]`` stored as a :class:`~qlora_jax.quant.QuantizedTensor` is viewed as ``[N, K]``
(leading dimensions flattened, which is free for the row-major codes and scales). Each program
decodes a ``block_rows x block_cols`` tile: one uint8 load of the packed codes, the block scales
(``dyn[q] * nested + offset`` for double quantization), two 16-entry table lookups per byte and
one store of the interleaved values. The result has exactly the values of
:func:`qlora_jax.quant.dequantize` (:func:`reference`): ``round(round32(code * scale), dtype)``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from qlora_jax.kernels import common, support
from qlora_jax.kernels.tiles import DequantTiles, dequantize_tiles

from qlora_jax.quant import QuantizedTensor, codebooks, dequantize

__all__ = ["dequantize_kernel", "reference", "check_supported", "OUTPUT_DTYPES"]

OUTPUT_DTYPES = support.DEQUANTIZE_OUTPUT_DTYPES


def reference(qt: QuantizedTensor, dtype: Any = jnp.bfloat16) -> jax.Array:
    """XLA reference: :func:`qlora_jax.quant.dequantize`."""
    return dequantize(qt, dtype)


def _kernel(*refs, n: int, k: int, tiles: DequantTiles, blocksize: int, nested_blocksize: int,
            double_quant: bool, out_dtype: Any, interpret: bool, table_values: Any):
    out_ref = refs[-1]
    codes_ref, scale_refs, table_ref = common.unpack_weight_refs(refs, double_quant)
    br, bc = tiles.block_rows, tiles.block_cols
    pid_r, pid_c = pl.program_id(0), pl.program_id(1)
    rows = pid_r * br + jnp.arange(br, dtype=jnp.int32)
    mask = rows < n
    c0 = pl.multiple_of(pid_c * bc, bc)
    packed = common.load_codes(codes_ref, pid_r * br, br, c0, bc, mask)
    scale = common.decode_block_scales(
        scale_refs, jnp.minimum(rows, n - 1), mask, common.block_columns(c0, bc, blocksize),
        blocks_per_row=k // blocksize,
        nested_blocksize=nested_blocksize, interpret=interpret,
    )
    values = common.dequantize_packed_tile(packed, scale, table_ref, out_dtype, table_values=table_values,
                                            lookup=tiles.lookup)
    plt.store(out_ref.at[pl.ds(pid_r * br, br), pl.ds(c0, bc)], values, mask=mask[:, None])


def check_supported(qt: QuantizedTensor, dtype: Any) -> None:
    """Raises ValueError naming the problem when the kernel cannot dequantize ``qt`` to ``dtype``
    (rules: :mod:`.support`)."""
    support.check(support.Problem.of_weight("dequantize", qt, dtype), "pallas_triton")


@functools.partial(jax.jit, static_argnames=("dtype", "tiles", "interpret", "debug_poison_output"))
def dequantize_kernel(
    qt: QuantizedTensor,
    dtype: Any = jnp.bfloat16,
    *,
    tiles: DequantTiles | None = None,
    interpret: bool = False,
    debug_poison_output: bool = False,
) -> jax.Array:
    """The tensor ``qt`` in ``dtype`` (bf16, f16 or f32), shape ``qt.shape``.

    ``interpret`` runs the Pallas interpreter (CPU); ``debug_poison_output`` starts the output as
    NaN so that an unwritten tile is visible (tests).
    """
    qt.validate()
    check_supported(qt, dtype)
    k = qt.shape[-1]
    n = qt.numel // k
    out_dtype = jnp.dtype(dtype)
    tiles = tiles or dequantize_tiles(n, k)
    if k % tiles.block_cols or (tiles.block_cols % qt.blocksize and qt.blocksize % tiles.block_cols):
        raise ValueError(f"{tiles}: block_cols must divide K={k} and nest with blocksize={qt.blocksize}")
    flat = QuantizedTensor(
        codes=qt.codes.reshape(n, k // 2), scales=qt.scales.reshape(n, k // qt.blocksize),
        nested_scales=qt.nested_scales, offset=qt.offset, shape=(n, k), dtype=qt.dtype,
        quant_type=qt.quant_type, blocksize=qt.blocksize, nested_blocksize=qt.nested_blocksize,
    )
    kernel = functools.partial(
        _kernel, n=n, k=k, tiles=tiles, blocksize=qt.blocksize, nested_blocksize=qt.nested_blocksize,
        double_quant=qt.double_quant, out_dtype=out_dtype, interpret=interpret,
        table_values=codebooks.codebook(qt.quant_type),
    )
    out = common.triton_call(
        kernel, common.weight_operands(flat), jax.ShapeDtypeStruct((n, k), out_dtype),
        grid=(pl.cdiv(n, tiles.block_rows), k // tiles.block_cols), num_warps=tiles.num_warps, num_stages=1,
        interpret=interpret, name="qlora_dequantize_4bit", poison=(jnp.nan,) if debug_poison_output else None,
    )
    return out.reshape(qt.shape)
