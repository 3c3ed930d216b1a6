"""Fused 4-bit dequant-matmul, ``y = x @ dequant(W).T``, as a Pallas-Triton kernel.

``x``: bf16/f16 ``[M, K]``; ``W``: a 4-bit :class:`~qlora_jax.quant.QuantizedTensor` of shape
``[N, K]`` (out, in), bitsandbytes' bytes. Each program owns a ``block_m x block_out`` tile of
``y`` and walks (its share of) K in ``block_red`` steps: it loads the x tile, loads the packed
weight tile ``uint8[block_out, block_red / 2]``, decodes the block scales (double quantization
included, with pointer lookups into the 256-entry dynamic map and the nested scales), turns the
codes into values (a gather from the 16-entry table, or a select tree: ``tiles.lookup``),
interleaves the two nibbles into the weight tile and feeds a tensor-core ``dot`` with float32
accumulation. The weight is never written out in 16-bit form.

Ragged edges (M and N not multiples of the tile) are masked; K must be a multiple of the
quantization block (the dispatcher in :mod:`qlora_jax.kernels.ops` sends other shapes to XLA).
With ``split > 1`` the programs write float32 partial sums ``[split, M, N]`` that XLA adds.

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
from qlora_jax.kernels.tiles import MatmulTiles, matmul_tiles

from qlora_jax.quant import QuantizedTensor, codebooks, dequantize

__all__ = ["fused_matmul", "reference", "check_supported"]


def reference(x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """XLA reference: dequantize W to ``x.dtype``, then ``x @ W.T`` with float32 accumulation."""
    w = dequantize(qt, x.dtype)
    y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def _kernel(*refs, m: int, n: int, k: int, tiles: MatmulTiles, blocksize: int, nested_blocksize: int,
            double_quant: bool, out_dtype: Any, interpret: bool, table_values: Any):
    # Inputs: x, then the weight's operands (see kernel_operands), then possibly the poisoned
    # output buffer it aliases; the output comes last.
    x_ref, out_ref = refs[0], refs[-1]
    codes_ref, scale_refs, table_ref = common.unpack_weight_refs(refs[1:], double_quant)
    bm, bn, bk = tiles.block_m, tiles.block_out, tiles.block_red
    pid_m, pid_n, pid_split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    steps = (k // bk) // tiles.split

    rows_x = pid_m * bm + jnp.arange(bm, dtype=jnp.int32)
    mask_x = rows_x < m
    rows_w = pid_n * bn + jnp.arange(bn, dtype=jnp.int32)
    mask_w = rows_w < n
    rows_w_safe = jnp.minimum(rows_w, n - 1)

    def body(step, acc):
        k0 = pl.multiple_of((pid_split * steps + step) * bk, bk)
        x = plt.load(x_ref.at[pl.ds(pid_m * bm, bm), pl.ds(k0, bk)], mask=mask_x[:, None], other=0.0)
        packed = plt.load(
            codes_ref.at[pl.ds(pid_n * bn, bn), pl.ds(pl.multiple_of(k0 // 2, bk // 2), bk // 2)],
            mask=mask_w[:, None],
            other=0,
        )
        if bk <= blocksize:
            block_col = k0 // blocksize
        else:
            block_col = k0 // blocksize + jnp.arange(bk // blocksize, dtype=jnp.int32)
        scale = common.decode_block_scales(
            scale_refs, rows_w_safe, mask_w, block_col, blocks_per_row=k // blocksize,
            nested_blocksize=nested_blocksize, interpret=interpret,
        )
        w = common.dequantize_packed_tile(packed, scale, table_ref, x.dtype, table_values=table_values,
                                                lookup=tiles.lookup)
        return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    mask = mask_x[:, None] & mask_w[None, :]
    if tiles.split == 1:
        plt.store(out_ref.at[pl.ds(pid_m * bm, bm), pl.ds(pid_n * bn, bn)], acc.astype(out_dtype), mask=mask)
    else:
        plt.store(out_ref.at[pid_split, pl.ds(pid_m * bm, bm), pl.ds(pid_n * bn, bn)], acc, mask=mask)


def check_supported(x: jax.Array, qt: QuantizedTensor) -> None:
    """Raises ValueError naming the problem when the kernel cannot take ``(x, qt)`` (rules: :mod:`.support`)."""
    if x.ndim != 2 or len(qt.shape) != 2 or x.shape[1] != qt.shape[1]:
        raise ValueError(f"x must be [M, K] for a weight [N, K] = {list(qt.shape)}, got {list(x.shape)}")
    support.check(support.Problem.of_weight("matmul", qt, x.dtype, x.shape[0]), "pallas_triton")


@functools.partial(jax.jit, static_argnames=("tiles", "interpret", "debug_poison_output"))
def fused_matmul(
    x: jax.Array,
    qt: QuantizedTensor,
    *,
    tiles: MatmulTiles | None = None,
    interpret: bool = False,
    debug_poison_output: bool = False,
) -> jax.Array:
    """``x[M, K] @ dequant(W[N, K]).T`` -> ``[M, N]`` in ``x.dtype`` (float32 accumulation).

    ``tiles`` overrides the size-class choice of :func:`~qlora_jax.kernels.tiles.matmul_tiles`.
    ``interpret`` runs the kernel through the Pallas interpreter (CPU tests).
    ``debug_poison_output`` starts the output buffer as NaN, so a tile the kernel fails to write
    shows up as NaN instead of stale memory (tests).
    """
    qt.validate()
    check_supported(x, qt)
    m, k = x.shape
    n = qt.shape[0]
    tiles = tiles or matmul_tiles(m, n, k)
    if k % tiles.block_red or (k // tiles.block_red) % tiles.split:
        raise ValueError(f"{tiles} does not divide K={k} into whole steps per split")
    if tiles.block_red % qt.blocksize and qt.blocksize % tiles.block_red:
        raise ValueError(f"{tiles}: block_red and blocksize={qt.blocksize} must nest")
    operands = common.weight_operands(qt)
    if tiles.split == 1:
        out_shape = jax.ShapeDtypeStruct((m, n), x.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((tiles.split, m, n), jnp.float32)
    inputs = [x, *operands]
    aliases = {}
    if debug_poison_output:
        inputs.append(jnp.full(out_shape.shape, jnp.nan, out_shape.dtype))
        aliases = {len(inputs) - 1: 0}
    kernel = functools.partial(
        _kernel, m=m, n=n, k=k, tiles=tiles, blocksize=qt.blocksize, nested_blocksize=qt.nested_blocksize,
        double_quant=qt.double_quant, out_dtype=x.dtype, interpret=interpret,
        table_values=codebooks.codebook(qt.quant_type),
    )
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(pl.cdiv(m, tiles.block_m), pl.cdiv(n, tiles.block_out), tiles.split),
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="qlora_fused_dequant_matmul",
    )(*inputs)
    if tiles.split > 1:
        out = out.sum(axis=0).astype(x.dtype)
    return out
