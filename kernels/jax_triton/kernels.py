"""The 4-bit kernels in the Triton language (``@triton.jit``), called from JAX by :mod:`.ops`.

Weight layout (:mod:`qlora_jax.quant.tensor`, bitsandbytes' bytes): ``W[N, K]`` as ``codes``
uint8 ``[N, K // 2]`` (element ``2j`` in the high nibble), ``scales`` ``[N, K // BLOCKSIZE]``
(float32 absmax, or uint8 codes into the signed dynamic map ``dyn`` with double quantization),
``nested`` float32 (one per ``NESTED_BS`` flattened scales) and ``offset`` float32 ``[1]``.
Without double quantization ``nested``/``offset``/``dyn`` are one-element placeholders that the
kernel never reads (``DOUBLE_QUANT`` is a compile-time constant).

Exactness contract (the values of :func:`qlora_jax.quant.dequantize`, tested through Triton's
interpreter against float64 numpy):

* the double-quant scale is ``round32(round32(dyn[q] * nested) + offset)``; the kernels are
  compiled with ``enable_fp_fusion=False`` (:data:`qlora_jax.kernels.jax_triton.ops.BACKEND_OPTIONS`) so
  that no multiply and add contract into an FMA;
* a weight is ``round(round32(code * scale), dtype)``, rounded to nearest even (asked for
  explicitly: Triton's interpreter would otherwise truncate to bf16);
* quantization multiplies by ``div_rn(1, absmax)``, the IEEE reciprocal (Triton's ``/`` on
  float32 is the approximate ``div.full.f32``), as bitsandbytes' CUDA ``kQuantizeBlockwise``.

``INTERPRET`` is True only under Triton's interpreter, where two operations are written out
because the interpreter gets them wrong (:func:`_round_to`, :func:`_dot`).

Every ``[R, C]`` tile covers ``C // BLOCKSIZE`` whole quantization blocks per row, or lies inside
one block (``C <= BLOCKSIZE``); :func:`_scale_tile` returns ``[R, max(1, C // BLOCKSIZE)]``.
All block dimensions are powers of two (Triton's rule); ``tl.dot`` needs them >= 16.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["fused_matmul_kernel", "fused_matmul_grad_kernel", "dequantize_kernel", "quantize_kernel"]


@triton.jit
def _scale_tile(scales_ptr, nested_ptr, offset_ptr, dyn_ptr, rows, row_mask, col0,
                BLOCKS_PER_ROW: tl.constexpr, COLS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                NESTED_BS: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """float32 absmax ``[R, max(1, COLS // BLOCKSIZE)]`` of the blocks under columns ``col0 + [0, COLS)``.

    ``rows`` (int32 ``[R]``) must be clamped to valid rows; ``row_mask`` still guards the loads.
    """
    NUM: tl.constexpr = COLS // BLOCKSIZE if COLS > BLOCKSIZE else 1
    block_cols = col0 // BLOCKSIZE + tl.arange(0, NUM)
    index = rows[:, None] * BLOCKS_PER_ROW + block_cols[None, :]
    raw = tl.load(scales_ptr + index, mask=row_mask[:, None], other=0)
    if DOUBLE_QUANT:
        dyn = tl.load(dyn_ptr + raw.to(tl.int32))
        nested = tl.load(nested_ptr + index // NESTED_BS, mask=row_mask[:, None], other=0.0)
        scale = dyn * nested + tl.load(offset_ptr)
    else:
        scale = raw.to(tl.float32)
    return scale


@triton.jit
def _round_to(values, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """float32 ``values`` in ``dtype``, rounded to nearest even.

    On the GPU that is the conversion instruction itself. Triton's interpreter truncates to bf16
    (and its "rtne" rounds ties up), so there the rounding is written out on the bits.
    """
    if dtype == tl.float32:
        return values
    if INTERPRET and dtype == tl.bfloat16:
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return values.to(dtype)


@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr):
    """``a @ b`` with float32 accumulation. The interpreter multiplies bf16 operands as their raw
    16-bit integers, so there both are widened to float32 first (exact) for an IEEE float32 dot."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _dequantize_tile(packed, scale, table_ptr, ROWS: tl.constexpr, BYTES: tl.constexpr, NUM: tl.constexpr,
                     out_dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """uint8 ``[ROWS, BYTES]`` codes and float32 ``[ROWS, NUM]`` scales -> ``[ROWS, 2 * BYTES]`` values.

    The 16-entry table is gathered through ``table_ptr`` (it stays in L1); the two nibbles of a
    byte become neighbours with ``tl.join`` (a register interleave, no shared memory).
    """
    high = tl.load(table_ptr + (packed >> 4).to(tl.int32))
    low = tl.load(table_ptr + (packed & 0xF).to(tl.int32))
    high = tl.reshape(high, (ROWS, NUM, BYTES // NUM)) * scale[:, :, None]
    low = tl.reshape(low, (ROWS, NUM, BYTES // NUM)) * scale[:, :, None]
    pairs = tl.join(_round_to(high, out_dtype, INTERPRET), _round_to(low, out_dtype, INTERPRET))
    return tl.reshape(pairs, (ROWS, 2 * BYTES))


@triton.jit
def fused_matmul_kernel(x_ptr, codes_ptr, scales_ptr, nested_ptr, offset_ptr, dyn_ptr, table_ptr, out_ptr,
                        M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                        NESTED_BS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SPLIT: tl.constexpr,
                        INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """``out = x[M, K] @ dequant(W[N, K]).T``: one ``BLOCK_M x BLOCK_N`` tile per program.

    Program ``(i, j, s)`` walks the ``s``-th of ``SPLIT`` equal chunks of K in ``BLOCK_K`` steps.
    ``SPLIT == 1``: ``out`` is ``[M, N]`` in x's dtype; else float32 partial sums ``[SPLIT, M, N]``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    STEPS: tl.constexpr = K // BLOCK_K // SPLIT
    NUM: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1
    rows_x = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_x = rows_x < M
    rows_w = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_w = rows_w < N
    rows_w_safe = tl.minimum(rows_w, N - 1)
    cols = tl.arange(0, BLOCK_K)
    bytes_ = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(STEPS):
        k0 = (pid_s * STEPS + step) * BLOCK_K
        x = tl.load(x_ptr + rows_x[:, None] * K + (k0 + cols)[None, :], mask=mask_x[:, None], other=0.0)
        packed = tl.load(codes_ptr + rows_w_safe[:, None] * (K // 2) + (k0 // 2 + bytes_)[None, :],
                         mask=mask_w[:, None], other=0)
        scale = _scale_tile(scales_ptr, nested_ptr, offset_ptr, dyn_ptr, rows_w_safe, mask_w, k0,
                            K // BLOCKSIZE, BLOCK_K, BLOCKSIZE, NESTED_BS, DOUBLE_QUANT)
        w = _dequantize_tile(packed, scale, table_ptr, BLOCK_N, BLOCK_K // 2, NUM, x.dtype, INTERPRET)
        acc += _dot(x, tl.trans(w), INTERPRET)
    mask = mask_x[:, None] & mask_w[None, :]
    offsets = rows_x[:, None] * N + rows_w[None, :]
    if SPLIT == 1:
        tl.store(out_ptr + offsets, _round_to(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:
        tl.store(out_ptr + pid_s * M * N + offsets, acc, mask=mask)


@triton.jit
def fused_matmul_grad_kernel(dy_ptr, codes_ptr, scales_ptr, nested_ptr, offset_ptr, dyn_ptr, table_ptr, out_ptr,
                             M: tl.constexpr, N: tl.constexpr, K: tl.constexpr, BLOCKSIZE: tl.constexpr,
                             NESTED_BS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SPLIT: tl.constexpr,
                             INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    """``out = dy[M, N] @ dequant(W[N, K])``: one ``BLOCK_M x BLOCK_K`` tile of dx per program.

    The reduction runs over the weight's rows N in ``BLOCK_N`` steps, ragged at the end: rows past
    N get a zero scale and a zero ``dy``, so they add exactly nothing. ``SPLIT`` as in the forward.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    STEPS: tl.constexpr = (N + BLOCK_N * SPLIT - 1) // (BLOCK_N * SPLIT)
    NUM: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1
    rows_dy = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_dy = rows_dy < M
    k0 = pid_k * BLOCK_K
    red = tl.arange(0, BLOCK_N)
    bytes_ = tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for step in range(STEPS):
        n0 = (pid_s * STEPS + step) * BLOCK_N
        rows_w = n0 + red
        mask_w = rows_w < N
        rows_w_safe = tl.minimum(rows_w, N - 1)
        dy = tl.load(dy_ptr + rows_dy[:, None] * N + rows_w[None, :], mask=mask_dy[:, None] & mask_w[None, :],
                     other=0.0)
        packed = tl.load(codes_ptr + rows_w_safe[:, None] * (K // 2) + (k0 // 2 + bytes_)[None, :],
                         mask=mask_w[:, None], other=0)
        scale = _scale_tile(scales_ptr, nested_ptr, offset_ptr, dyn_ptr, rows_w_safe, mask_w, k0,
                            K // BLOCKSIZE, BLOCK_K, BLOCKSIZE, NESTED_BS, DOUBLE_QUANT)
        # Rows past N must add nothing even if the clamped row's scale is not finite.
        scale = tl.where(mask_w[:, None], scale, 0.0)
        w = _dequantize_tile(packed, scale, table_ptr, BLOCK_N, BLOCK_K // 2, NUM, dy.dtype, INTERPRET)
        acc += _dot(dy, w, INTERPRET)
    offsets = rows_dy[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :]
    if SPLIT == 1:
        tl.store(out_ptr + offsets, _round_to(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask_dy[:, None])
    else:
        tl.store(out_ptr + pid_s * M * K + offsets, acc, mask=mask_dy[:, None])


@triton.jit
def dequantize_kernel(codes_ptr, scales_ptr, nested_ptr, offset_ptr, dyn_ptr, table_ptr, out_ptr,
                      N: tl.constexpr, K: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BS: tl.constexpr,
                      DOUBLE_QUANT: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                      BLOCK_COLS: tl.constexpr):
    """``out[N, K] = dequant(W)`` in out's dtype, one ``BLOCK_ROWS x BLOCK_COLS`` tile per program."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    NUM: tl.constexpr = BLOCK_COLS // BLOCKSIZE if BLOCK_COLS > BLOCKSIZE else 1
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    mask = rows < N
    rows_safe = tl.minimum(rows, N - 1)
    c0 = pid_c * BLOCK_COLS
    packed = tl.load(codes_ptr + rows_safe[:, None] * (K // 2) + (c0 // 2 + tl.arange(0, BLOCK_COLS // 2))[None, :],
                     mask=mask[:, None], other=0)
    scale = _scale_tile(scales_ptr, nested_ptr, offset_ptr, dyn_ptr, rows_safe, mask, c0,
                        K // BLOCKSIZE, BLOCK_COLS, BLOCKSIZE, NESTED_BS, DOUBLE_QUANT)
    values = _dequantize_tile(packed, scale, table_ptr, BLOCK_ROWS, BLOCK_COLS // 2, NUM, out_ptr.dtype.element_ty,
                              INTERPRET)
    tl.store(out_ptr + rows[:, None] * K + (c0 + tl.arange(0, BLOCK_COLS))[None, :], values, mask=mask[:, None])


@triton.jit
def _count_above(values, thresholds_ptr, COUNT: tl.constexpr):
    """int32 number of the ``COUNT`` float32 thresholds strictly below each value (NaN -> 0)."""
    count = tl.zeros(values.shape, dtype=tl.int32)
    for i in tl.static_range(COUNT):
        count += (values > tl.load(thresholds_ptr + i)).to(tl.int32)
    return count


@triton.jit
def quantize_kernel(w_ptr, thresholds_ptr, magnitude_ptr, codes_ptr, absmax_ptr, N: tl.constexpr, K: tl.constexpr,
                    BLOCKSIZE: tl.constexpr, NF4: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """First stage of 4-bit quantization: ``codes`` uint8 ``[N, K // 2]`` and float32 ``absmax``
    ``[N, K // BLOCKSIZE]`` of ``w[N, K]``, one tile of whole blocks (``BLOCK_COLS >= BLOCKSIZE``) per program.

    A block holding NaN or Inf gets a NaN absmax; an all-zero block scales to NaN and gets code 0:
    both as bitsandbytes' CUDA kernel. The code is the number of decision thresholds strictly
    below the scaled value (NF4: the 15 float32 midpoints of the code, ``thresholds_ptr``), or for
    FP4 the sign bit plus ``magnitude[number of the 7 thresholds below |value|]``, as bitsandbytes'
    ``dQuantizeNF4``/``dQuantizeFP4``.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    BLOCKS: tl.constexpr = BLOCK_COLS // BLOCKSIZE
    rows = pid_r * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    mask = rows < N
    rows_safe = tl.minimum(rows, N - 1)
    c0 = pid_c * BLOCK_COLS
    x = tl.load(w_ptr + rows_safe[:, None] * K + (c0 + tl.arange(0, BLOCK_COLS))[None, :], mask=mask[:, None],
                other=0.0).to(tl.float32)
    x = tl.reshape(x, (BLOCK_ROWS, BLOCKS, BLOCKSIZE))
    magnitude = tl.abs(x)
    absmax = tl.max(magnitude, axis=2)
    # NaN and Inf both fail `< inf`: such a block gets a NaN absmax.
    non_finite = tl.max(tl.where(magnitude < float("inf"), 0, 1), axis=2)
    absmax = tl.where(non_finite == 0, absmax, float("nan"))
    unit = x * tl.div_rn(tl.full(absmax.shape, 1.0, tl.float32), absmax)[:, :, None]
    if NF4:
        code = _count_above(unit, thresholds_ptr, 15)
    else:
        code = tl.load(magnitude_ptr + _count_above(tl.abs(unit), thresholds_ptr, 7)) + tl.where(unit < 0, 8, 0)
    high, low = tl.split(tl.reshape(code, (BLOCK_ROWS, BLOCK_COLS // 2, 2)))
    packed = ((high << 4) | low).to(tl.uint8)
    tl.store(codes_ptr + rows[:, None] * (K // 2) + (c0 // 2 + tl.arange(0, BLOCK_COLS // 2))[None, :], packed,
             mask=mask[:, None])
    tl.store(absmax_ptr + rows[:, None] * (K // BLOCKSIZE) + (c0 // BLOCKSIZE + tl.arange(0, BLOCKS))[None, :],
             absmax, mask=mask[:, None])
