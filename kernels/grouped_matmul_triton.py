"""The grouped 4-bit expert matmul (MoE) and its input gradient, as Pallas-Triton kernels, beside their XLA reference.

The rows of ``x`` are sorted by expert: expert ``g`` owns rows ``offsets[g] : offsets[g] + group_sizes[g]``
(int32 ``[E]`` each). ``W`` is a *stacked* :class:`~qlora_jax.quant.QuantizedTensor` (see
:func:`qlora_jax.models.moe.quantize_experts`): the metadata of ONE expert matrix ``[N, K]``
(out, in), arrays with a leading expert axis (``codes`` uint8 ``[E, N, K // 2]``, ``scales``
``[E, N, K // blocksize]``, ``nested_scales`` ``[E, n]``, ``offset`` ``[E]``), every expert
quantized on its own (its own double-quant offset and nested scales). Two kernels:

* forward, :func:`grouped_fused_matmul`: ``y[rows of g] = x[rows of g] @ dequant(W_g).T``;
* input gradient, :func:`grouped_fused_matmul_grad`: ``dx[rows of g] = dy[rows of g] @ dequant(W_g)``
  (the base weights are frozen: the custom VJP of :func:`qlora_jax.models.moe.grouped_matmul`
  needs only this product).

Grid: ``(row tile, output tile)``. The row tiles are laid out per expert (XLA computes the
schedule, :func:`tile_schedule`): expert ``g`` gets ``ceil(group_sizes[g] / block_m)`` tiles
starting at its first row, so a tile never mixes experts, an expert without rows gets no tile,
and ``ceil(rows / block_m) + E`` tiles always suffice (each expert wastes less than one tile).
Programs past the schedule's end do nothing. Each program walks the reduction dimension like
the dense kernels of :mod:`.matmul_triton`: load the activation tile (rows past the expert's
masked), load the expert's packed weight tile, decode its block scales (double quantization
included, with that expert's nested scales and offset: :func:`.common.decode_block_scales`),
turn codes into values (:func:`.common.dequantize_packed_tile`) and feed a ``dot`` with float32
accumulation. No expert is ever dequantized whole, in any precision. The output starts as zeros
(an aliased zero buffer), so rows no expert owns (past ``sum(group_sizes)``) come out as zeros, as
in the reference.

No reduction split (``MatmulTiles.split`` must be 1): the row tiles of all experts already give
``E`` times more programs than a dense matmul of one expert.

:func:`reference` is the XLA computation (one expert dequantized at a time, then row-tile
``dot`` s): the ``"xla"`` backend of :func:`qlora_jax.kernels.grouped_quantized_matmul` and what
the kernels must match.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from qlora_jax.kernels import common, support
from qlora_jax.kernels.tiles import MatmulTiles, matmul_grad_tiles, matmul_tiles

from qlora_jax.quant import QuantizationError, QuantizedTensor, codebooks, dequantize

__all__ = [
    "default_tile_rows",
    "reference",
    "tile_schedule",
    "num_row_tiles",
    "grouped_tiles",
    "check_stacked",
    "unsupported_reason",
    "grouped_fused_matmul",
    "grouped_fused_matmul_grad",
]

_INT32_LIMIT = 2**31


def default_tile_rows(rows: int, num_experts: int) -> int:
    """The reference's row tile: the next power of two of ``rows / num_experts`` in ``[8, 256]``."""
    per_expert = max(1, -(-rows // num_experts))
    return int(min(256, max(8, 1 << (per_expert - 1).bit_length())))


def _num_experts_of(w: Any) -> int:
    return int(w.codes.shape[0]) if isinstance(w, QuantizedTensor) else int(w.shape[0])


def _matrix_shape(w: Any) -> tuple[int, int]:
    return tuple(w.shape) if isinstance(w, QuantizedTensor) else tuple(w.shape[1:])


def _expert(w: QuantizedTensor, e: Any) -> QuantizedTensor:
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, e, 0, keepdims=False), w)


def reference(x: jax.Array, group_sizes: jax.Array, offsets: jax.Array, w: Any, *, transpose: bool = False,
              tile: int | None = None, vary: str | None = None) -> jax.Array:
    """XLA reference: ``y[rows of e] = x[rows of e] @ W_e.T`` (``@ W_e`` if ``transpose``).

    Expert ``e`` owns rows ``offsets[e] : offsets[e] + group_sizes[e]``; other rows come out as
    zeros. Each expert with rows is dequantized once (to ``x.dtype``), then multiplied ``tile``
    rows at a time with float32 accumulation; an expert without rows is not even dequantized.

    Args:
      x: ``[R, in]`` rows sorted by expert (``[R, out]`` with ``transpose``).
      group_sizes: int32 ``[E]``.
      offsets: int32 ``[E]``, each expert's first row.
      w: a stacked QuantizedTensor (metadata of one ``[out, in]`` matrix, arrays ``[E, ...]``) or
        an array ``[E, out, in]``.
      transpose: multiply by ``W_e`` instead of ``W_e.T`` (the input gradient).
      tile: rows per ``dot`` (static); default :func:`default_tile_rows`.
      vary: inside ``shard_map``, the mesh axis the result varies over (the experts' axis).

    Returns:
      ``[R, out]`` (``[R, in]`` with ``transpose``) in ``x.dtype``.
    """
    n = x.shape[0]
    num_experts = _num_experts_of(w)
    tile = tile or default_tile_rows(n, num_experts)
    out_dim = _matrix_shape(w)[1 if transpose else 0]
    xp = jnp.pad(x, ((0, tile), (0, 0)))  # a window starting inside the rows never gets clamped
    out = jnp.zeros((n + tile, out_dim), x.dtype)
    if vary is not None:
        out = jax.lax.pcast(out, (vary,), to="varying")
    contract = 0 if transpose else 1

    def expert_body(e, out):
        size, start = group_sizes[e], offsets[e]

        def run(out):
            if isinstance(w, QuantizedTensor):
                we = dequantize(_expert(w, e), x.dtype)
            else:
                we = jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False).astype(x.dtype)

            def tile_body(j, out):
                s = start + j * tile
                rows = jax.lax.dynamic_slice_in_dim(xp, s, tile, axis=0)
                y = jax.lax.dot_general(rows, we, (((1,), (contract,)), ((), ())),
                                        preferred_element_type=jnp.float32).astype(x.dtype)
                valid = (jnp.arange(tile) + j * tile < size)[:, None]
                old = jax.lax.dynamic_slice_in_dim(out, s, tile, axis=0)
                return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(valid, y, old), s, axis=0)

            return jax.lax.fori_loop(0, (size + tile - 1) // tile, tile_body, out)

        # An expert without tokens is not even dequantized.
        return jax.lax.cond(size > 0, run, lambda out: out, out)

    return jax.lax.fori_loop(0, num_experts, expert_body, out)[:n]


# ------------------------------------------------------------------------------------------ schedule and rules


def num_row_tiles(rows: int, num_experts: int, block_m: int) -> int:
    """The static number of row tiles: enough for any split of ``rows`` rows among the experts."""
    return -(-rows // block_m) + num_experts


def tile_schedule(group_sizes: jax.Array, offsets: jax.Array, block_m: int,
                  num_tiles: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row tile: ``(expert, first row, rows)``, int32 ``[num_tiles]`` each.

    Expert ``g`` gets ``ceil(group_sizes[g] / block_m)`` consecutive tiles; tile ``j`` of them
    covers rows ``offsets[g] + j * block_m`` onwards, ``min(block_m, group_sizes[g] - j * block_m)``
    of them. Tiles past the last expert's have 0 rows (their programs do nothing).
    """
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    counts = (sizes + block_m - 1) // block_m
    ends = jnp.cumsum(counts)
    tile = jnp.arange(num_tiles, dtype=jnp.int32)
    expert = jnp.searchsorted(ends, tile, side="right").astype(jnp.int32)
    valid = expert < sizes.shape[0]
    expert = jnp.minimum(expert, sizes.shape[0] - 1)
    local = tile - (ends[expert] - counts[expert])
    start = offsets.astype(jnp.int32)[expert] + local * block_m
    rows = jnp.where(valid, jnp.clip(sizes[expert] - local * block_m, 0, block_m), 0)
    return expert, start, rows.astype(jnp.int32)


def grouped_tiles(rows: int, num_experts: int, n: int, k: int, *, transpose: bool = False) -> MatmulTiles:
    """Tiles for the grouped kernels: the dense choice (:mod:`.tiles`) for the average rows per
    expert, without a reduction split."""
    per_expert = max(1, -(-rows // num_experts))
    choose = matmul_grad_tiles if transpose else matmul_tiles
    return dataclasses.replace(choose(per_expert, n, k), split=1)


def check_stacked(qt: Any) -> int:
    """Checks a stacked QuantizedTensor (one expert's metadata, arrays ``[E, ...]``); returns ``E``.

    Raises:
      TypeError: ``qt`` is not a QuantizedTensor.
      ValueError: ``qt`` is not a 2-D matrix per expert, or its arrays disagree on ``E``.
      QuantizationError: an expert's arrays disagree with the metadata.
    """
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"qt must be a stacked qlora_jax.quant.QuantizedTensor, got {type(qt).__name__}")
    if len(qt.shape) != 2:
        raise ValueError(f"qt must describe one [out, in] expert matrix, got shape {list(qt.shape)}")
    arrays = {name: getattr(qt, name) for name in ("codes", "scales", "nested_scales", "offset")}
    arrays = {name: a for name, a in arrays.items() if a is not None}
    if any(len(a.shape) < 1 for a in arrays.values()):
        raise ValueError("qt's arrays must have a leading expert axis (stack them with moe.quantize_experts)")
    experts = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(experts.values())) != 1:
        raise ValueError(f"qt's arrays disagree on the number of experts (leading axis): {experts}")
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), qt)
    try:
        one.validate()
    except QuantizationError as error:
        raise QuantizationError(f"one expert of the stacked weight: {error}") from None
    return experts["codes"]


def unsupported_reason(qt: QuantizedTensor, dtype: Any, rows: int, *, transpose: bool = False) -> str | None:
    """Why the grouped kernels cannot take this problem, or None.

    The dense kernels' rules (:mod:`.support`: 4-bit type, K whole blocks with a power-of-two
    factor >= 16, bf16/f16 activations, rows present) for one expert matrix, plus int32 indexing
    of the whole stack.
    """
    problem = support.Problem.of_weight("matmul_grad" if transpose else "matmul", qt, dtype, rows)
    reason = support.unsupported_reason(problem, "pallas_triton")
    if reason is not None:
        return reason
    n, k = qt.shape
    if int(qt.codes.shape[0]) * n * k >= _INT32_LIMIT:
        return "the stacked experts have 2^31 or more weights (the kernels index in int32)"
    return None


# ------------------------------------------------------------------------------------------ kernels


def _weight_operands(qt: QuantizedTensor) -> list[jax.Array]:
    """The stacked weight flattened over the expert axis, in :func:`.common.unpack_weight_refs`' order."""
    num_experts = int(qt.codes.shape[0])
    n = qt.shape[0]
    operands = [qt.codes.reshape(num_experts * n, -1), qt.scales.reshape(num_experts * n, -1)]
    if qt.double_quant:
        operands += [qt.nested_scales.reshape(-1), qt.offset.reshape(num_experts).astype(jnp.float32),
                     common.dynamic_map()]
    operands.append(common.code_table(qt.quant_type))
    return operands


def _scales(scale_refs, expert, rows, mask, block_col, *, n, k, blocksize, nested_blocksize, nested_per_expert,
            interpret):
    return common.decode_block_scales(
        scale_refs, rows, mask, block_col, blocks_per_row=k // blocksize, nested_blocksize=nested_blocksize,
        interpret=interpret, expert=expert, expert_rows=n, nested_per_expert=nested_per_expert,
    )


def _forward_kernel(*refs, num_rows: int, n: int, k: int, tiles: MatmulTiles, blocksize: int,
                    nested_blocksize: int, nested_per_expert: int, double_quant: bool, out_dtype: Any,
                    interpret: bool, table_values: Any):
    # Inputs: the schedule (expert, first row, rows per tile), x, the weight's operands, the zero
    # output buffer it aliases; the output comes last.
    expert_ref, start_ref, count_ref, x_ref, out_ref = refs[0], refs[1], refs[2], refs[3], refs[-1]
    codes_ref, scale_refs, table_ref = common.unpack_weight_refs(refs[4:], double_quant)
    bm, bn, bk = tiles.block_m, tiles.block_out, tiles.block_red
    pid_t, pid_n = pl.program_id(0), pl.program_id(1)
    expert, start, count = expert_ref[pid_t], start_ref[pid_t], count_ref[pid_t]

    @pl.when(count > 0)
    def _():
        local = jnp.arange(bm, dtype=jnp.int32)
        mask_x = (local < count) & (start + local < num_rows)
        rows_w = pid_n * bn + jnp.arange(bn, dtype=jnp.int32)
        mask_w = rows_w < n
        rows_w_safe = jnp.minimum(rows_w, n - 1)

        def body(step, acc):
            k0 = pl.multiple_of(step * bk, bk)
            x = plt.load(x_ref.at[pl.ds(start, bm), pl.ds(k0, bk)], mask=mask_x[:, None], other=0.0)
            packed = common.load_codes(codes_ref, expert * n + pid_n * bn, bn, k0, bk, mask_w)
            scale = _scales(scale_refs, expert, rows_w_safe, mask_w, common.block_columns(k0, bk, blocksize), n=n,
                            k=k, blocksize=blocksize, nested_blocksize=nested_blocksize,
                            nested_per_expert=nested_per_expert, interpret=interpret)
            w = common.dequantize_packed_tile(packed, scale, table_ref, x.dtype, table_values=table_values,
                                              lookup=tiles.lookup)
            return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, k // bk, body, jnp.zeros((bm, bn), jnp.float32))
        plt.store(out_ref.at[pl.ds(start, bm), pl.ds(pid_n * bn, bn)], acc.astype(out_dtype),
                  mask=mask_x[:, None] & mask_w[None, :])


def _grad_kernel(*refs, num_rows: int, n: int, k: int, tiles: MatmulTiles, blocksize: int, nested_blocksize: int,
                 nested_per_expert: int, double_quant: bool, out_dtype: Any, interpret: bool, table_values: Any):
    # Inputs as the forward's, with dy in place of x.
    expert_ref, start_ref, count_ref, dy_ref, out_ref = refs[0], refs[1], refs[2], refs[3], refs[-1]
    codes_ref, scale_refs, table_ref = common.unpack_weight_refs(refs[4:], double_quant)
    bm, bk, bn = tiles.block_m, tiles.block_out, tiles.block_red
    pid_t, pid_k = pl.program_id(0), pl.program_id(1)
    expert, start, count = expert_ref[pid_t], start_ref[pid_t], count_ref[pid_t]

    @pl.when(count > 0)
    def _():
        local = jnp.arange(bm, dtype=jnp.int32)
        mask_dy = (local < count) & (start + local < num_rows)
        k0 = pl.multiple_of(pid_k * bk, bk)
        block_col = common.block_columns(k0, bk, blocksize)

        def body(step, acc):
            n0 = pl.multiple_of(step * bn, bn)
            rows_w = n0 + jnp.arange(bn, dtype=jnp.int32)
            mask_w = rows_w < n
            dy = plt.load(dy_ref.at[pl.ds(start, bm), pl.ds(n0, bn)], mask=mask_dy[:, None] & mask_w[None, :],
                          other=0.0)
            # Rows past N belong to the next expert (or to no one): masked, and given a zero scale.
            packed = common.load_codes(codes_ref, expert * n + n0, bn, k0, bk, mask_w)
            scale = _scales(scale_refs, expert, jnp.minimum(rows_w, n - 1), mask_w, block_col, n=n, k=k,
                            blocksize=blocksize, nested_blocksize=nested_blocksize,
                            nested_per_expert=nested_per_expert, interpret=interpret)
            scale = jnp.where(mask_w[:, None] if scale.ndim == 2 else mask_w, scale, 0.0)
            w = common.dequantize_packed_tile(packed, scale, table_ref, dy.dtype, table_values=table_values,
                                              lookup=tiles.lookup)
            return acc + jax.lax.dot_general(dy, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, pl.cdiv(n, bn), body, jnp.zeros((bm, bk), jnp.float32))
        plt.store(out_ref.at[pl.ds(start, bm), pl.ds(k0, bk)], acc.astype(out_dtype), mask=mask_dy[:, None])


def _check_problem(a: jax.Array, group_sizes: jax.Array, offsets: jax.Array, qt: QuantizedTensor,
                   transpose: bool) -> int:
    """Raises naming the argument when the kernel cannot take ``(a, group_sizes, offsets, qt)``; returns E."""
    num_experts = check_stacked(qt)
    n, k = qt.shape
    width = n if transpose else k
    name = "dy" if transpose else "x"
    if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{name} must be [rows, {width}] for experts [N, K] = {list(qt.shape)}, got {list(a.shape)}")
    for label, array in (("group_sizes", group_sizes), ("offsets", offsets)):
        if tuple(array.shape) != (num_experts,) or not jnp.issubdtype(array.dtype, jnp.integer):
            raise ValueError(f"{label} must be an integer [{num_experts}] (one per expert), got "
                             f"{jnp.dtype(array.dtype).name}{list(array.shape)}")
    reason = unsupported_reason(qt, a.dtype, a.shape[0], transpose=transpose)
    if reason is not None:
        raise ValueError(f"the pallas_triton grouped {'input-gradient' if transpose else 'matmul'} kernel cannot "
                         f"take this problem: {reason}")
    return num_experts


def _check_tiles(tiles: MatmulTiles, qt: QuantizedTensor, transpose: bool) -> None:
    k = qt.shape[1]
    if tiles.split != 1:
        raise ValueError(f"{tiles}: the grouped kernels take no reduction split (split must be 1)")
    tile_k = tiles.block_out if transpose else tiles.block_red
    if k % tile_k:
        raise ValueError(f"{tiles} does not divide K={k}")
    if tile_k % qt.blocksize and qt.blocksize % tile_k:
        raise ValueError(f"{tiles}: the K-tile and blocksize={qt.blocksize} must nest")


def _call(kernel: Any, a: jax.Array, group_sizes: jax.Array, offsets: jax.Array, qt: QuantizedTensor,
          tiles: MatmulTiles, *, out_cols: int, grid_cols: int, interpret: bool, name: str) -> jax.Array:
    num_experts = int(qt.codes.shape[0])
    rows = a.shape[0]
    n, k = qt.shape
    num_tiles = num_row_tiles(rows, num_experts, tiles.block_m)
    schedule = tile_schedule(group_sizes, offsets, tiles.block_m, num_tiles)
    nested_per_expert = int(qt.nested_scales.shape[1]) if qt.double_quant else 0
    body = functools.partial(
        kernel, num_rows=rows, n=n, k=k, tiles=tiles, blocksize=qt.blocksize, nested_blocksize=qt.nested_blocksize,
        nested_per_expert=nested_per_expert, double_quant=qt.double_quant, out_dtype=a.dtype, interpret=interpret,
        table_values=codebooks.codebook(qt.quant_type),
    )
    # The zero buffer the output aliases: rows no expert owns stay zero.
    return common.triton_call(
        body, [*schedule, a, *_weight_operands(qt)], jax.ShapeDtypeStruct((rows, out_cols), a.dtype),
        grid=(num_tiles, grid_cols), num_warps=tiles.num_warps, num_stages=tiles.num_stages, interpret=interpret,
        name=name, poison=(0,),
    )


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def grouped_fused_matmul(x: jax.Array, group_sizes: jax.Array, offsets: jax.Array, qt: QuantizedTensor, *,
                         tiles: MatmulTiles | None = None, interpret: bool = False) -> jax.Array:
    """``y[rows of g] = x[rows of g] @ dequant(W_g).T`` -> ``[R, N]`` in ``x.dtype`` (float32 accumulation).

    Args:
      x: bf16/f16 ``[R, K]``, rows sorted by expert.
      group_sizes: int32 ``[E]``: rows per expert.
      offsets: int32 ``[E]``: each expert's first row.
      qt: the stacked experts (one ``[N, K]`` matrix's metadata, arrays ``[E, ...]``).
      tiles: overrides :func:`grouped_tiles` (``block_out`` tiles N, ``block_red`` steps K; split 1).
      interpret: run the kernel through the Pallas interpreter (CPU tests).

    Returns:
      ``[R, N]`` in ``x.dtype``; rows no expert owns are zeros.

    Raises:
      ValueError / TypeError / QuantizationError: a problem the kernel cannot take, named.
    """
    num_experts = _check_problem(x, group_sizes, offsets, qt, transpose=False)
    tiles = tiles or grouped_tiles(x.shape[0], num_experts, *qt.shape)
    _check_tiles(tiles, qt, transpose=False)
    n = qt.shape[0]
    return _call(_forward_kernel, x, group_sizes, offsets, qt, tiles, out_cols=n, grid_cols=pl.cdiv(n, tiles.block_out),
                 interpret=interpret, name="qlora_grouped_dequant_matmul")


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def grouped_fused_matmul_grad(dy: jax.Array, group_sizes: jax.Array, offsets: jax.Array, qt: QuantizedTensor, *,
                              tiles: MatmulTiles | None = None, interpret: bool = False) -> jax.Array:
    """``dx[rows of g] = dy[rows of g] @ dequant(W_g)`` -> ``[R, K]`` in ``dy.dtype`` (float32 accumulation).

    Args as :func:`grouped_fused_matmul`, with ``dy`` bf16/f16 ``[R, N]``; ``tiles.block_out``
    tiles K and ``tiles.block_red`` steps through N (default :func:`grouped_tiles` with
    ``transpose=True``).

    Returns:
      ``[R, K]`` in ``dy.dtype``; rows no expert owns are zeros.
    """
    num_experts = _check_problem(dy, group_sizes, offsets, qt, transpose=True)
    tiles = tiles or grouped_tiles(dy.shape[0], num_experts, *qt.shape, transpose=True)
    _check_tiles(tiles, qt, transpose=True)
    k = qt.shape[1]
    return _call(_grad_kernel, dy, group_sizes, offsets, qt, tiles, out_cols=k, grid_cols=k // tiles.block_out,
                 interpret=interpret, name="qlora_grouped_dequant_matmul_grad")
