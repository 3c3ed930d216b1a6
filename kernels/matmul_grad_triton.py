"""Input gradient of the 4-bit linear layer, ``dx = dy @ dequant(W)``, as a Pallas-Triton kernel.

The base weight is frozen in QLoRA, so the backward pass needs only this product (no weight
gradient). ``dy``: bf16/f16 ``[M, N]``; ``W``: a 4-bit QuantizedTensor ``[N, K]``; ``dx``:
``[M, K]``. Each program owns a ``block_m x block_out`` tile of ``dx`` (``block_out`` columns of
K) and walks (its share of) N in ``block_red`` steps, dequantizing the weight tile
``W[n0:n0 + block_red, k0:k0 + block_out]`` in registers exactly as the forward kernel does.
Unlike the forward, the reduction runs over the weight's rows, so a ragged N is masked inside
the loop: rows past N get a zero scale and a zero ``dy``.

:func:`reference` beside it is the XLA computation the kernel must match.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from qlora_jax.kernels import common, support
from qlora_jax.kernels.tiles import MatmulTiles, matmul_grad_tiles

from qlora_jax.quant import QuantizedTensor, codebooks, dequantize

__all__ = ["fused_matmul_grad", "reference", "check_supported"]


def reference(dy: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """XLA reference: dequantize W to ``dy.dtype``, then ``dy @ W`` with float32 accumulation."""
    w = dequantize(qt, dy.dtype)
    dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(dy.dtype)


def _kernel(*refs, m: int, n: int, k: int, tiles: MatmulTiles, blocksize: int, nested_blocksize: int,
            double_quant: bool, out_dtype: Any, interpret: bool, table_values: Any):
    # Inputs: dy, the weight's operands (common.weight_operands), maybe the poisoned output.
    dy_ref, out_ref = refs[0], refs[-1]
    codes_ref, scale_refs, table_ref = common.unpack_weight_refs(refs[1:], double_quant)
    bm, bk, bn = tiles.block_m, tiles.block_out, tiles.block_red
    pid_m, pid_k, pid_split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    steps = pl.cdiv(pl.cdiv(n, bn), tiles.split)

    rows_dy = pid_m * bm + jnp.arange(bm, dtype=jnp.int32)
    mask_dy = rows_dy < m
    k0 = pl.multiple_of(pid_k * bk, bk)
    if bk <= blocksize:
        block_col = k0 // blocksize
    else:
        block_col = k0 // blocksize + jnp.arange(bk // blocksize, dtype=jnp.int32)

    def body(step, acc):
        n0 = pl.multiple_of((pid_split * steps + step) * bn, bn)
        rows_w = n0 + jnp.arange(bn, dtype=jnp.int32)
        mask_w = rows_w < n
        dy = plt.load(
            dy_ref.at[pl.ds(pid_m * bm, bm), pl.ds(n0, bn)], mask=mask_dy[:, None] & mask_w[None, :], other=0.0
        )
        packed = plt.load(
            codes_ref.at[pl.ds(n0, bn), pl.ds(pl.multiple_of(k0 // 2, bk // 2), bk // 2)],
            mask=mask_w[:, None],
            other=0,
        )
        scale = common.decode_block_scales(
            scale_refs, jnp.minimum(rows_w, n - 1), mask_w, block_col, blocks_per_row=k // blocksize,
            nested_blocksize=nested_blocksize, interpret=interpret,
        )
        # Rows past N must add exactly nothing, even if the clamped row's scale is not finite.
        scale = jnp.where(mask_w[:, None] if scale.ndim == 2 else mask_w, scale, 0.0)
        w = common.dequantize_packed_tile(packed, scale, table_ref, dy.dtype, table_values=table_values,
                                                lookup=tiles.lookup)
        return acc + jax.lax.dot_general(dy, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bk), jnp.float32))
    mask = mask_dy[:, None]
    if tiles.split == 1:
        plt.store(out_ref.at[pl.ds(pid_m * bm, bm), pl.ds(k0, bk)], acc.astype(out_dtype), mask=mask)
    else:
        plt.store(out_ref.at[pid_split, pl.ds(pid_m * bm, bm), pl.ds(k0, bk)], acc, mask=mask)


def check_supported(dy: jax.Array, qt: QuantizedTensor) -> None:
    """Raises ValueError naming the problem when the kernel cannot take ``(dy, qt)`` (rules: :mod:`.support`)."""
    if dy.ndim != 2 or len(qt.shape) != 2 or dy.shape[1] != qt.shape[0]:
        raise ValueError(f"dy must be [M, N] for a weight [N, K] = {list(qt.shape)}, got {list(dy.shape)}")
    support.check(support.Problem.of_weight("matmul_grad", qt, dy.dtype, dy.shape[0]), "pallas_triton")


@functools.partial(jax.jit, static_argnames=("tiles", "interpret", "debug_poison_output"))
def fused_matmul_grad(
    dy: jax.Array,
    qt: QuantizedTensor,
    *,
    tiles: MatmulTiles | None = None,
    interpret: bool = False,
    debug_poison_output: bool = False,
) -> jax.Array:
    """``dy[M, N] @ dequant(W[N, K])`` -> ``[M, K]`` in ``dy.dtype`` (float32 accumulation).

    Options as :func:`qlora_jax.kernels.matmul_triton.fused_matmul`; ``tiles.block_out`` tiles
    K and ``tiles.block_red`` steps through N.
    """
    qt.validate()
    check_supported(dy, qt)
    m = dy.shape[0]
    n, k = qt.shape
    tiles = tiles or matmul_grad_tiles(m, n, k)
    if k % tiles.block_out:
        raise ValueError(f"{tiles}: block_out must divide K={k}")
    if tiles.block_out % qt.blocksize and qt.blocksize % tiles.block_out:
        raise ValueError(f"{tiles}: block_out and blocksize={qt.blocksize} must nest")
    if tiles.split == 1:
        out_shape = jax.ShapeDtypeStruct((m, k), dy.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((tiles.split, m, k), jnp.float32)
    inputs = [dy, *common.weight_operands(qt)]
    aliases = {}
    if debug_poison_output:
        inputs.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        aliases = {len(inputs) - 1: 0}
    kernel = functools.partial(
        _kernel, m=m, n=n, k=k, tiles=tiles, blocksize=qt.blocksize, nested_blocksize=qt.nested_blocksize,
        double_quant=qt.double_quant, out_dtype=dy.dtype, interpret=interpret,
        table_values=codebooks.codebook(qt.quant_type),
    )
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(m, tiles.block_m), k // tiles.block_out, tiles.split),
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="qlora_fused_dequant_matmul_grad",
    )(*inputs)
    if tiles.split > 1:
        out = out.sum(axis=0).astype(dy.dtype)
    return out
