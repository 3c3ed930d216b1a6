"""The fused 4-bit matmul and its input gradient, as Pallas-Triton kernels, beside their XLA reference.

``W`` is a 4-bit :class:`~qlora_jax.quant.QuantizedTensor` of shape ``[N, K]`` (out, in),
bitsandbytes' bytes; activations are bf16/f16. Two kernels, one per direction of the linear layer:

* forward, :func:`fused_matmul`: ``y[M, N] = x[M, K] @ dequant(W).T``. Each program owns a
  ``block_m x block_out`` tile of ``y`` and walks (its share of) K in ``block_red`` steps;
* input gradient, :func:`fused_matmul_grad`: ``dx[M, K] = dy[M, N] @ dequant(W)``. The base
  weight is frozen in QLoRA, so the backward pass needs only this product (no weight gradient).
  Each program owns a ``block_m x block_out`` tile of ``dx`` (``block_out`` columns of K) and
  walks (its share of) N in ``block_red`` steps. The reduction runs over the weight's rows, so a
  ragged N is masked inside the loop: rows past N get a zero scale and a zero ``dy``.

Per step both load the activation tile, load the packed weight tile ``uint8[rows, cols / 2]``,
decode the block scales (double quantization included, with pointer lookups into the 256-entry
dynamic map and the nested scales), turn the codes into values (a gather from the 16-entry table,
or a select tree: ``tiles.lookup``), interleave the two nibbles into the weight tile and feed a
tensor-core ``dot`` with float32 accumulation. The weight is never written out in 16-bit form.

Ragged edges (M and N not multiples of the tile) are masked; K must be a multiple of the
quantization block (the dispatcher in :mod:`qlora_jax.kernels.ops` sends other shapes to XLA).
With ``split > 1`` the programs write float32 partial sums ``[split, M, out]`` that XLA adds.

:func:`reference` and :func:`reference_grad` are the XLA computations the kernels must match (and
the ``"xla"`` backend of :func:`qlora_jax.kernels.quantized_matmul`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from qlora_jax.kernels import common, support
from qlora_jax.kernels.tiles import MatmulTiles, matmul_grad_tiles, matmul_tiles

from qlora_jax.quant import QuantizedTensor, codebooks, dequantize

__all__ = [
    "fused_matmul",
    "fused_matmul_grad",
    "reference",
    "reference_grad",
    "check_supported",
    "check_supported_grad",
]


def reference(x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """XLA reference: dequantize W to ``x.dtype``, then ``x @ W.T`` with float32 accumulation."""
    # The scopes name the ops in the compiled HLO; experiments.step_profile sorts time by them.
    with jax.named_scope("dequantize"):
        w = dequantize(qt, x.dtype)
    with jax.named_scope("base_matmul"):
        y = jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return y.astype(x.dtype)


def reference_grad(dy: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """XLA reference: dequantize W to ``dy.dtype``, then ``dy @ W`` with float32 accumulation."""
    with jax.named_scope("dequantize"):
        w = dequantize(qt, dy.dtype)
    with jax.named_scope("base_matmul"):
        dx = jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        return dx.astype(dy.dtype)


def _store(out_ref: Any, acc: jax.Array, rows: Any, cols: Any, mask: jax.Array, *, split: int, pid_split: Any,
           out_dtype: Any) -> None:
    """The output tile: in ``out_dtype`` without a split, else float32 partial sums at ``pid_split``."""
    if split == 1:
        plt.store(out_ref.at[rows, cols], acc.astype(out_dtype), mask=mask)
    else:
        plt.store(out_ref.at[pid_split, rows, cols], acc, mask=mask)


def _forward_kernel(*refs, m: int, n: int, k: int, tiles: MatmulTiles, blocksize: int, nested_blocksize: int,
                    double_quant: bool, out_dtype: Any, interpret: bool, table_values: Any):
    # Inputs: x, then the weight's operands (common.weight_operands), then possibly the poisoned
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
        packed = common.load_codes(codes_ref, pid_n * bn, bn, k0, bk, mask_w)
        scale = common.decode_block_scales(
            scale_refs, rows_w_safe, mask_w, common.block_columns(k0, bk, blocksize), blocks_per_row=k // blocksize,
            nested_blocksize=nested_blocksize, interpret=interpret,
        )
        w = common.dequantize_packed_tile(packed, scale, table_ref, x.dtype, table_values=table_values,
                                          lookup=tiles.lookup)
        return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((bm, bn), jnp.float32))
    _store(out_ref, acc, pl.ds(pid_m * bm, bm), pl.ds(pid_n * bn, bn), mask_x[:, None] & mask_w[None, :],
           split=tiles.split, pid_split=pid_split, out_dtype=out_dtype)


def _grad_kernel(*refs, m: int, n: int, k: int, tiles: MatmulTiles, blocksize: int, nested_blocksize: int,
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
    block_col = common.block_columns(k0, bk, blocksize)

    def body(step, acc):
        n0 = pl.multiple_of((pid_split * steps + step) * bn, bn)
        rows_w = n0 + jnp.arange(bn, dtype=jnp.int32)
        mask_w = rows_w < n
        dy = plt.load(
            dy_ref.at[pl.ds(pid_m * bm, bm), pl.ds(n0, bn)], mask=mask_dy[:, None] & mask_w[None, :], other=0.0
        )
        packed = common.load_codes(codes_ref, n0, bn, k0, bk, mask_w)
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
    _store(out_ref, acc, pl.ds(pid_m * bm, bm), pl.ds(k0, bk), mask_dy[:, None],
           split=tiles.split, pid_split=pid_split, out_dtype=out_dtype)


def check_supported(x: jax.Array, qt: QuantizedTensor) -> None:
    """Raises ValueError naming the problem when the forward cannot take ``(x, qt)`` (rules: :mod:`.support`)."""
    if x.ndim != 2 or len(qt.shape) != 2 or x.shape[1] != qt.shape[1]:
        raise ValueError(f"x must be [M, K] for a weight [N, K] = {list(qt.shape)}, got {list(x.shape)}")
    support.check(support.Problem.of_weight("matmul", qt, x.dtype, x.shape[0]), "pallas_triton")


def check_supported_grad(dy: jax.Array, qt: QuantizedTensor) -> None:
    """Raises ValueError naming the problem when the input gradient cannot take ``(dy, qt)``."""
    if dy.ndim != 2 or len(qt.shape) != 2 or dy.shape[1] != qt.shape[0]:
        raise ValueError(f"dy must be [M, N] for a weight [N, K] = {list(qt.shape)}, got {list(dy.shape)}")
    support.check(support.Problem.of_weight("matmul_grad", qt, dy.dtype, dy.shape[0]), "pallas_triton")


def _call(kernel: Any, a: jax.Array, qt: QuantizedTensor, tiles: MatmulTiles, *, out_cols: int, grid_cols: int,
          interpret: bool, debug_poison_output: bool, name: str) -> jax.Array:
    """Runs ``kernel`` on the activations ``a[M, red]`` and the weight: ``[M, out_cols]`` in ``a.dtype``."""
    m = a.shape[0]
    n, k = qt.shape
    if tiles.split == 1:
        out_shape = jax.ShapeDtypeStruct((m, out_cols), a.dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((tiles.split, m, out_cols), jnp.float32)
    body = functools.partial(
        kernel, m=m, n=n, k=k, tiles=tiles, blocksize=qt.blocksize, nested_blocksize=qt.nested_blocksize,
        double_quant=qt.double_quant, out_dtype=a.dtype, interpret=interpret,
        table_values=codebooks.codebook(qt.quant_type),
    )
    out = common.triton_call(
        body, [a, *common.weight_operands(qt)], out_shape, grid=(pl.cdiv(m, tiles.block_m), grid_cols, tiles.split),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages, interpret=interpret, name=name,
        poison=(jnp.nan,) if debug_poison_output else None,
    )
    if tiles.split > 1:
        out = out.sum(axis=0).astype(a.dtype)
    return out


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
    return _call(_forward_kernel, x, qt, tiles, out_cols=n, grid_cols=pl.cdiv(n, tiles.block_out),
                 interpret=interpret, debug_poison_output=debug_poison_output, name="qlora_fused_dequant_matmul")


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

    Options as :func:`fused_matmul`; ``tiles.block_out`` tiles K and ``tiles.block_red`` steps
    through N (default: :func:`~qlora_jax.kernels.tiles.matmul_grad_tiles`).
    """
    qt.validate()
    check_supported_grad(dy, qt)
    m = dy.shape[0]
    n, k = qt.shape
    tiles = tiles or matmul_grad_tiles(m, n, k)
    if k % tiles.block_out:
        raise ValueError(f"{tiles}: block_out must divide K={k}")
    if tiles.block_out % qt.blocksize and qt.blocksize % tiles.block_out:
        raise ValueError(f"{tiles}: block_out and blocksize={qt.blocksize} must nest")
    return _call(_grad_kernel, dy, qt, tiles, out_cols=k, grid_cols=k // tiles.block_out,
                 interpret=interpret, debug_poison_output=debug_poison_output, name="qlora_fused_dequant_matmul_grad")
