"""Pieces shared by the Pallas kernels: code tables, exact float32 arithmetic, in-kernel decoding.

Everything here runs inside a Pallas kernel body (Triton, or for :func:`select_tree` also Mosaic
GPU) or its interpreter, on the layout of
:mod:`qlora_jax.quant.tensor`: a weight ``W[N, K]`` with

* ``codes``: uint8 ``[N, K // 2]``, element ``2j`` in the high nibble, ``2j + 1`` in the low one;
* ``scales``: one per block of ``blocksize`` consecutive elements of a row, ``[N, K // blocksize]``,
  float32 absmax, or uint8 codes into the signed dynamic map with double quantization;
* ``nested_scales``: float32, one per ``nested_blocksize`` consecutive (flattened) scales;
  ``offset``: the float32 mean that double quantization subtracted.

The kernels must give the bytes and values of the XLA reference (:func:`qlora_jax.quant.dequantize`),
so two float32 steps are written so that no compiler can change their rounding:

* the double-quant scale is ``round32(round32(dyn[q] * nested) + offset)``, as bitsandbytes; Triton
  (and LLVM on CPU) would contract the product and the sum into one FMA, so the product goes
  through :func:`rounded_product`;
* quantization divides ``1 / absmax`` with IEEE rounding, as bitsandbytes' CUDA kernel; Triton
  lowers ``/`` on float32 to the approximate ``div.full.f32``, so :func:`exact_reciprocal` asks
  for ``div.rn.f32``.

On the GPU both use inline PTX (``mul.rn`` / ``div.rn`` are never contracted or approximated);
under ``interpret=True`` (which runs the kernel through XLA on the host) they use plain JAX with an
optimization barrier, which is what :func:`qlora_jax.quant.decode_scales` does.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from qlora_jax.quant import codebooks

__all__ = [
    "KERNEL_QUANT_TYPES",
    "KERNEL_DTYPES",
    "LOOKUPS",
    "select_tree",
    "ScaleRefs",
    "code_table",
    "dynamic_map",
    "rounded_product",
    "exact_reciprocal",
    "weight_operands",
    "unpack_weight_refs",
    "load_codes",
    "block_columns",
    "decode_block_scales",
    "dequantize_packed_tile",
    "pow2_floor",
    "pow2_ceil",
    "largest_pow2_divisor",
    "triton_call",
]

# 4-bit types whose 16-entry table the kernels look up (int8 goes through XLA).
KERNEL_QUANT_TYPES = ("nf4", "fp4")
# Activation / output dtypes the Triton dot takes directly.
KERNEL_DTYPES = ("bfloat16", "float16")
# How a kernel turns a 4-bit code into its value: a table gather or a select tree.
LOOKUPS = ("gather", "select")


def code_table(quant_type: str) -> jax.Array:
    """The float32[16] value table of a 4-bit type, as a kernel operand (looked up by pointer)."""
    return jnp.asarray(codebooks.codebook(quant_type), jnp.float32)


def dynamic_map() -> jax.Array:
    """bitsandbytes' signed 8-bit dynamic map, float32[256]: the double-quant scale codes' values."""
    return jnp.asarray(codebooks.DYNAMIC_MAP_SIGNED, jnp.float32)


def rounded_product(a: jax.Array, b: jax.Array, *, interpret: bool) -> jax.Array:
    """``a * b`` rounded to float32 on its own, so that a following add cannot fuse into an FMA."""
    if interpret:
        return jax.lax.optimization_barrier(a * b)
    a, b = jnp.broadcast_arrays(a, b)
    [out] = plt.elementwise_inline_asm(
        "mul.rn.f32 $0, $1, $2;",
        args=[a.astype(jnp.float32), b.astype(jnp.float32)],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
    )
    return out


def exact_reciprocal(x: jax.Array, *, interpret: bool) -> jax.Array:
    """IEEE float32 ``1 / x`` (Triton's ``/`` is the 2-ulp ``div.full.f32``)."""
    if interpret:
        return jnp.float32(1.0) / x
    [out] = plt.elementwise_inline_asm(
        "div.rn.f32 $0, $1, $2;",
        args=[jnp.ones(x.shape, jnp.float32), x.astype(jnp.float32)],
        constraints="=r,r,r",
        pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
    )
    return out


@dataclasses.dataclass(frozen=True)
class ScaleRefs:
    """The refs a kernel needs to decode block scales: plain float32, or double-quantized.

    ``scales``: ``[N, K // blocksize]`` (uint8 or float32). With double quant, ``nested``
    float32 ``[ceil(num_blocks / nested_blocksize)]``, ``offset`` float32 ``[1]`` and ``dyn_map``
    float32 ``[256]``; otherwise those three are ``None``.
    """

    scales: Any
    nested: Any = None
    offset: Any = None
    dyn_map: Any = None

    @property
    def double_quant(self) -> bool:
        return self.nested is not None


def weight_operands(qt: Any) -> list[jax.Array]:
    """A 4-bit weight's kernel operands in the order :func:`unpack_weight_refs` reads them.

    ``codes, scales, [nested_scales, offset[1], dynamic_map,] code_table``.
    """
    operands = [qt.codes, qt.scales]
    if qt.double_quant:
        operands += [qt.nested_scales, jnp.reshape(qt.offset, (1,)).astype(jnp.float32), dynamic_map()]
    operands.append(code_table(qt.quant_type))
    return operands


def unpack_weight_refs(refs: Any, double_quant: bool) -> tuple[Any, ScaleRefs, Any]:
    """``(codes_ref, ScaleRefs, table_ref)`` from the refs of :func:`weight_operands` (extra refs
    after them are ignored)."""
    if double_quant:
        codes, scales, nested, offset, dyn, table = refs[:6]
        return codes, ScaleRefs(scales, nested, offset, dyn), table
    codes, scales, table = refs[:3]
    return codes, ScaleRefs(scales), table


def load_codes(codes_ref: Any, row0: Any, rows: int, col0: Any, cols: int, row_mask: jax.Array) -> jax.Array:
    """The packed codes of the weight tile ``W[row0:row0 + rows, col0:col0 + cols]``: uint8
    ``[rows, cols // 2]``, rows outside ``row_mask`` read as 0."""
    return plt.load(
        codes_ref.at[pl.ds(row0, rows), pl.ds(pl.multiple_of(col0 // 2, cols // 2), cols // 2)],
        mask=row_mask[:, None],
        other=0,
    )


def block_columns(col0: Any, cols: int, blocksize: int) -> Any:
    """The quantization-block column(s) of a tile ``cols`` wide from column ``col0``: a scalar
    when the tile lies inside one block, else int32 ``[cols // blocksize]`` (whole blocks)."""
    if cols <= blocksize:
        return col0 // blocksize
    return col0 // blocksize + jnp.arange(cols // blocksize, dtype=jnp.int32)


def decode_block_scales(
    refs: ScaleRefs,
    rows: jax.Array,
    row_mask: jax.Array,
    block_col: Any,
    *,
    blocks_per_row: int,
    nested_blocksize: int,
    interpret: bool,
    expert: Any = None,
    expert_rows: int = 0,
    nested_per_expert: int = 0,
) -> jax.Array:
    """float32 absmax of the blocks ``(rows[i], block_col)`` of a weight; ``rows`` int32 ``[R]``.

    ``block_col`` is a scalar block column, or an int32 ``[C]`` vector of them (giving ``[R, C]``).
    ``rows`` must already be clamped to valid rows; ``row_mask`` still guards the scale load so
    that a tile hanging over the last row reads nothing out of bounds.

    ``expert`` (an int32 scalar, the grouped kernels): the refs hold a stack of experts, each
    quantized on its own, flattened over the expert axis: ``scales`` ``[E * expert_rows, ...]``,
    ``nested`` ``[E * nested_per_expert]``, ``offset`` ``[E]``; ``rows`` are rows of that expert.
    """
    if expert is None:
        scale_rows, nested_base, offset_index = rows, 0, 0
    else:
        scale_rows, nested_base, offset_index = expert * expert_rows + rows, expert * nested_per_expert, expert
    if jnp.ndim(block_col) == 0:
        index = (scale_rows, block_col)
        mask = row_mask
    else:
        index = (scale_rows[:, None], block_col[None, :])
        mask = row_mask[:, None]
    raw = plt.load(refs.scales.at[index], mask=mask, other=0)
    if not refs.double_quant:
        return raw.astype(jnp.float32)
    # The nested scales group the flattened blocks of ONE expert matrix (its own double quant).
    flat_block = (rows[:, None] if jnp.ndim(block_col) else rows) * blocks_per_row + block_col
    nested = refs.nested[nested_base + flat_block // nested_blocksize]
    dyn = refs.dyn_map[raw.astype(jnp.int32)]
    return rounded_product(dyn, nested, interpret=interpret) + refs.offset[offset_index]


def select_tree(codes: jax.Array, table: Any) -> jax.Array:
    """``table[codes]`` for int32 codes in [0, 16) as a 4-level tree of 15 selects on the code bits.

    No memory access (works where there is no gather, e.g. Mosaic GPU), ~20 ALU operations.
    """
    values = [jnp.float32(v) for v in table]
    for bit in range(4):
        take_odd = ((codes >> bit) & 1) == 1
        values = [jnp.where(take_odd, values[2 * i + 1], values[2 * i]) for i in range(len(values) // 2)]
    return values[0]


def dequantize_packed_tile(
    packed: jax.Array,
    scale: jax.Array,
    table_ref: Any,
    out_dtype: Any,
    *,
    table_values: Any = None,
    lookup: str = "gather",
) -> jax.Array:
    """Values of a packed tile: uint8 ``[R, C]`` -> ``out_dtype`` ``[R, 2C]`` in element order.

    ``scale`` is float32 ``[R]`` (the tile lies in one block per row) or ``[R, B]`` (the tile
    spans ``B`` whole blocks per row). ``lookup="gather"`` reads the 16-entry table through
    ``table_ref`` (a pointer gather that stays in L1); ``"select"`` decodes with
    :func:`select_tree` over ``table_values``. The product is rounded to float32 and then to
    ``out_dtype``, as the reference does. The two nibbles of a byte become neighbours through a
    last-axis stack, which Triton lowers to ``tt.join`` (no shuffle through shared memory).
    """
    rows, cols = packed.shape
    high_codes = (packed >> 4).astype(jnp.int32)
    low_codes = (packed & 0xF).astype(jnp.int32)
    if lookup == "gather":
        high, low = table_ref[high_codes], table_ref[low_codes]
    elif lookup == "select":
        high, low = select_tree(high_codes, table_values), select_tree(low_codes, table_values)
    else:
        raise ValueError(f"unknown lookup {lookup!r}; expected one of {LOOKUPS}")
    if scale.ndim == 1:
        scale = scale[:, None]
    else:
        blocks = scale.shape[1]
        high = high.reshape(rows, blocks, cols // blocks)
        low = low.reshape(rows, blocks, cols // blocks)
        scale = scale[:, :, None]
    high = (high * scale).astype(out_dtype)
    low = (low * scale).astype(out_dtype)
    pairs = jax.lax.stack([high, low], axis=high.ndim)
    return pairs.reshape(rows, cols * 2)


def pow2_floor(x: int) -> int:
    """Largest power of two <= x (x >= 1)."""
    return 1 << (int(x).bit_length() - 1)


def pow2_ceil(x: int) -> int:
    """Smallest power of two >= x (x >= 1)."""
    return 1 << max(0, (int(x) - 1).bit_length())


def largest_pow2_divisor(x: int, cap: int) -> int:
    """Largest power of two that divides ``x`` and is at most ``cap``."""
    d = 1
    while d * 2 <= cap and x % (d * 2) == 0:
        d *= 2
    return d


def triton_call(
    kernel: Any,
    inputs: list[jax.Array],
    out_shape: Any,
    *,
    grid: tuple[int, ...],
    num_warps: int,
    num_stages: int,
    interpret: bool,
    name: str,
    poison: tuple[Any, ...] | None = None,
) -> Any:
    """``pl.pallas_call`` of ``kernel`` on the Triton backend over ``grid``.

    ``poison`` (one fill value per output, tests) appends each output's buffer filled with that
    value to the inputs and aliases it to the output, so that a tile the kernel fails to write
    shows up instead of stale memory; the kernel then receives those buffers after ``inputs``.
    """
    inputs = list(inputs)
    aliases = {}
    if poison is not None:
        for index, (shape, fill) in enumerate(zip(jax.tree.leaves(out_shape), poison, strict=True)):
            inputs.append(jnp.full(shape.shape, fill, shape.dtype))
            aliases[len(inputs) - 1] = index
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=grid,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)
