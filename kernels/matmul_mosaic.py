"""The fused 4-bit matmul and its input gradient for Hopper, with Pallas Mosaic GPU (``plgpu.kernel`` + ``wgmma``).

Forward, :func:`fused_matmul`: ``y = x @ dequant(W).T`` for ``x: bf16[M, K]`` and a 4-bit
QuantizedTensor ``W: [N, K]``.

* bitsandbytes packs element ``2j`` of a row in the high nibble and ``2j + 1`` in the low one.
  Rather than interleaving the nibbles in registers (no cheap shuffle in Mosaic GPU), the kernel
  splits the contraction into even and odd elements: ``y = x[:, 0::2] @ W_hi.T + x[:, 1::2] @ W_lo.T``.
  XLA makes the two strided halves of ``x`` (``M * K`` bf16 each, cheap next to the weight for
  small M); every K-step then issues two ``wgmma`` against them.
* The weight tile ``uint8[tile_n, step_bytes]`` arrives by TMA into shared memory; the warpgroup
  upcasts it, decodes both nibbles with a 15-select tree (Mosaic GPU has no gather), multiplies
  by the row's block scale and stores the two bf16 tiles into a swizzled shared-memory buffer
  that ``wgmma`` reads. Staging through shared memory (rather than feeding ``wgmma`` its A
  operand from registers) is what the Mosaic GPU interpreter can run, so it is what the CPU tests
  check; ``a_in_registers=True`` feeds registers instead (lowering-tested only).
* Block scales (double quantization included) are decoded by XLA into float32 ``[K / blocksize, N]``
  before the kernel: the kernel has no table lookup for the 256-entry dynamic map. That costs
  ~7 bytes per 64 weights next to the 32 bytes of codes; the Triton kernels decode in-kernel.
* Two orientations: for few tokens (``M <= 32``) the weight is the ``wgmma`` LHS (its rows fill
  the 64-row instruction) and the kernel computes ``y.T``; for more tokens ``x`` is the LHS and
  the dequantized weight tile the RHS, giving ``y`` directly.

Input gradient, :func:`fused_matmul_grad`: ``dx = dy @ dequant(W)`` for ``dy: bf16[M, N]``,
``dx: bf16[M, K]``. The same ideas, transposed:

* the two nibbles of a byte are elements ``2j`` and ``2j + 1`` of a row of W, which here are two
  *output* columns; the kernel keeps two accumulators, ``dx[:, 0::2] = dy @ W_hi`` and
  ``dx[:, 1::2] = dy @ W_lo``, and XLA interleaves them afterwards;
* each CTA owns ``tile_m`` rows of dx and 64 byte-columns of W (128 columns of dx: one or, at
  blocksize 64, two quantization blocks per weight row) and walks N in steps of 64 weight rows:
  TMA brings the codes tile and the ``dy`` tile, the warpgroup decodes (select tree) and scales
  the weight tile into shared memory, and two ``wgmma`` take ``dy`` (LHS) against it (RHS, N-major,
  which needs 128-byte rows: hence 64 byte-columns);
* block scales are decoded by XLA beforehand, as in the forward.

``dy`` is the wgmma LHS, so M is padded to 64 (or 128 above 64 rows): this kernel is meant for
the compute-bound training regime; the Triton kernel serves few-token backward passes.

Requirements (:mod:`qlora_jax.kernels.support`; else the dispatcher uses the Pallas-Triton
kernels): NF4/FP4, ``N % 64 == 0``, ``K % blocksize == 0`` (the gradient: ``K % 128 == 0``),
``blocksize >= 64`` (a K-step covers at most one block; narrower rows cannot be swizzled for
TMA), bf16 activations. ``M`` is padded to the tile. :func:`reference` and :func:`reference_grad`
(those of :mod:`.matmul_triton`: the same XLA computations) are what the kernels must match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from qlora_jax.kernels import common, support
from qlora_jax.kernels.matmul_triton import reference, reference_grad

from qlora_jax.quant import QuantizedTensor, codebooks, decode_scales

__all__ = [
    "MosaicTiles",
    "MosaicGradTiles",
    "fused_matmul",
    "fused_matmul_grad",
    "reference",
    "reference_grad",
    "mosaic_tiles",
    "mosaic_grad_tiles",
    "interpret_params",
    "interpret_scope",
]

_RED_ROWS = 64  # input gradient: weight rows (N) per pipeline step


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
    """Forward tiles. ``weight_lhs``: compute ``y.T`` with the weight as the wgmma LHS (few tokens).
    ``tile_n`` weight rows and ``tile_m`` tokens per CTA; ``max_concurrent_steps``: TMA pipeline
    depth. ``a_in_registers`` (only with ``weight_lhs``): feed the dequantized weight to ``wgmma``
    from registers instead of staging it in shared memory; the Mosaic GPU interpreter cannot run
    that variant, so only its lowering is tested."""

    weight_lhs: bool
    tile_n: int
    tile_m: int
    max_concurrent_steps: int = 3
    a_in_registers: bool = False


@dataclasses.dataclass(frozen=True)
class MosaicGradTiles:
    """Input-gradient tiles: ``tile_m`` rows of dy per CTA (64 or 128); ``max_concurrent_steps``:
    TMA pipeline depth."""

    tile_m: int
    max_concurrent_steps: int = 3


def mosaic_tiles(m: int, n: int) -> MosaicTiles:
    """Tiles per size class: ``y.T`` with 8/16/32-token tiles up to M=32, else 128x128 (64 rows of N if N % 128)."""
    if m <= 32:
        tile_m = 8 if m <= 8 else (16 if m <= 16 else 32)
        return MosaicTiles(weight_lhs=True, tile_n=64, tile_m=tile_m)
    tile_n = 128 if n % 128 == 0 else 64
    tile_m = 64 if m <= 64 else 128
    return MosaicTiles(weight_lhs=False, tile_n=tile_n, tile_m=tile_m)


def mosaic_grad_tiles(m: int) -> MosaicGradTiles:
    """Input-gradient tiles: 64 rows of dy per CTA up to M=64, else 128."""
    return MosaicGradTiles(tile_m=64 if m <= 64 else 128)


def interpret_params(interpret: bool | plgpu.InterpretGPUParams) -> plgpu.InterpretGPUParams | bool:
    """The ``interpret=`` argument of ``plgpu.kernel`` for our ``interpret`` flag or parameters."""
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams() if interpret else False


def interpret_scope():
    """An abstract-H100 mesh: the Mosaic GPU interpreter asks the device for GPU properties."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))


def _swizzled(cols: int, row_bytes: int) -> tuple[Any, Any]:
    """TMA transforms of a tile ``cols`` elements (``row_bytes`` bytes) wide: 8-row tiling, that swizzle."""
    return plgpu.TilingTransform((8, cols)), plgpu.SwizzleTransform(row_bytes)


def _decode_nibbles(codes_smem: Any, scale: jax.Array, table: Any) -> tuple[jax.Array, jax.Array]:
    """bf16 values of the high and low nibbles of a codes tile, times ``scale`` (select tree)."""
    packed = codes_smem[...].astype(jnp.int32)  # Mosaic GPU has no 8-bit arithmetic
    high = (common.select_tree(packed >> 4, table) * scale).astype(jnp.bfloat16)
    low = (common.select_tree(packed & 0xF, table) * scale).astype(jnp.bfloat16)
    return high, low


def _mosaic_call(kernel: Any, operands: tuple[jax.Array, ...], *, out_type: Any, scratch_types: dict[str, Any],
                 grid: tuple[int, int], grid_names: tuple[str, str], interpret: Any, name: str) -> Any:
    """``plgpu.kernel`` with warpgroup semantics over a 2-D grid, applied to ``operands``."""
    return plgpu.kernel(
        kernel,
        out_type=out_type,
        scratch_types=scratch_types,
        grid=grid,
        grid_names=grid_names,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
        kernel_name=name,
    )(*operands)


def _launch(kernel_call: Any, qt: QuantizedTensor, activations: tuple[jax.Array, ...], *, tiles: Any,
            interpret: bool | plgpu.InterpretGPUParams) -> Any:
    """Decodes the block scales with XLA (float32 ``[K / blocksize, N]``) and runs ``kernel_call``
    on ``(codes, scales, *activations)``, under the interpreter's abstract H100 if asked."""
    n, k = qt.shape
    scales_t = decode_scales(qt).reshape(n, k // qt.blocksize).T
    call = functools.partial(kernel_call, table=codebooks.codebook(qt.quant_type), blocksize=qt.blocksize,
                             tiles=tiles, interpret=interpret_params(interpret))
    with interpret_scope() if interpret else contextlib.nullcontext():
        return call(qt.codes, scales_t, *activations)


def _forward_call(codes, scales_t, x_even, x_odd, *, table, blocksize: int, tiles: MosaicTiles, interpret):
    n, half_k = codes.shape
    mp = x_even.shape[0]
    step_bytes = min(64, blocksize // 2)  # one scale per row per step
    steps = half_k // step_bytes
    tn, tm = tiles.tile_n, tiles.tile_m
    codes_transforms = _swizzled(step_bytes, step_bytes)
    bf16_transforms = _swizzled(step_bytes, 2 * step_bytes)
    acc_shape = (tn, tm) if tiles.weight_lhs else (tm, tn)

    def kernel(codes_gmem, scales_gmem, xe_gmem, xo_gmem, out_gmem, out_smem, w_smem):
        # The accumulator gets its own scope: the interpreter refuses register and shared
        # allocations in one scope.
        pl.run_scoped(functools.partial(body, codes_gmem, scales_gmem, xe_gmem, xo_gmem, out_gmem, out_smem, w_smem),
                      plgpu.ACC(acc_shape, jnp.float32))

    def body(codes_gmem, scales_gmem, xe_gmem, xo_gmem, out_gmem, out_smem, w_smem, acc):
        pid_n = lax.axis_index("n")
        pid_m = lax.axis_index("m")

        def step(_, codes_smem, scale_smem, xe_smem, xo_smem):
            scale = lax.broadcast_in_dim(scale_smem[0, :], (tn, step_bytes), [0])
            w_hi, w_lo = _decode_nibbles(codes_smem, scale, table)
            if tiles.a_in_registers and tiles.weight_lhs:
                plgpu.wgmma(acc, w_hi, xe_smem.transpose((1, 0)))
                plgpu.wgmma(acc, w_lo, xo_smem.transpose((1, 0)))
            else:
                w_smem[0] = w_hi
                w_smem[1] = w_lo
                plgpu.commit_smem()
                if tiles.weight_lhs:
                    plgpu.wgmma(acc, w_smem.at[0], xe_smem.transpose((1, 0)))
                    plgpu.wgmma(acc, w_smem.at[1], xo_smem.transpose((1, 0)))
                else:
                    plgpu.wgmma(acc, xe_smem, w_smem.at[0].transpose((1, 0)))
                    plgpu.wgmma(acc, xo_smem, w_smem.at[1].transpose((1, 0)))
            plgpu.wgmma_wait(0)

        plgpu.emit_pipeline(
            step,
            grid=(steps,),
            max_concurrent_steps=tiles.max_concurrent_steps,
            in_specs=[
                plgpu.BlockSpec((tn, step_bytes), lambda s: (pid_n, s), transforms=codes_transforms),
                plgpu.BlockSpec((1, tn), lambda s: ((s * 2 * step_bytes) // blocksize, pid_n)),
                plgpu.BlockSpec((tm, step_bytes), lambda s: (pid_m, s), transforms=bf16_transforms),
                plgpu.BlockSpec((tm, step_bytes), lambda s: (pid_m, s), transforms=bf16_transforms),
            ],
        )(codes_gmem, scales_gmem, xe_gmem, xo_gmem)
        out_smem[...] = acc[...].astype(jnp.bfloat16)
        plgpu.commit_smem()
        if tiles.weight_lhs:
            target = out_gmem.at[pl.ds(pid_n * tn, tn), pl.ds(pid_m * tm, tm)]
        else:
            target = out_gmem.at[pl.ds(pid_m * tm, tm), pl.ds(pid_n * tn, tn)]
        plgpu.copy_smem_to_gmem(out_smem, target)
        plgpu.wait_smem_to_gmem(0)

    out_shape = (n, mp) if tiles.weight_lhs else (mp, n)
    return _mosaic_call(
        kernel, (codes, scales_t, x_even, x_odd),
        out_type=jax.ShapeDtypeStruct(out_shape, jnp.bfloat16),
        scratch_types=dict(
            out_smem=plgpu.SMEM(acc_shape, jnp.bfloat16),
            w_smem=plgpu.SMEM((2, tn, step_bytes), jnp.bfloat16, transforms=bf16_transforms),
        ),
        grid=(n // tn, mp // tm), grid_names=("n", "m"), interpret=interpret,
        name="qlora_fused_dequant_matmul_mgpu",
    )


def _grad_call(codes, scales_t, dy, *, table, blocksize: int, tiles: MosaicGradTiles, interpret):
    n, half_k = codes.shape
    mp = dy.shape[0]
    # 64 byte-columns per CTA: the weight tile is wgmma's N-major RHS, which needs 128-byte rows.
    # With blocksize 64 such a tile spans two quantization blocks per weight row.
    step_bytes = 64
    blocks_per_tile = max(1, 2 * step_bytes // blocksize)
    tm = tiles.tile_m
    codes_transforms = _swizzled(step_bytes, step_bytes)
    w_transforms = _swizzled(step_bytes, 2 * step_bytes)
    dy_transforms = _swizzled(_RED_ROWS, 2 * _RED_ROWS)

    def kernel(codes_gmem, scales_gmem, dy_gmem, even_gmem, odd_gmem, out_smem, w_smem):
        pl.run_scoped(functools.partial(body, codes_gmem, scales_gmem, dy_gmem, even_gmem, odd_gmem, out_smem, w_smem),
                      plgpu.ACC((tm, step_bytes), jnp.float32), plgpu.ACC((tm, step_bytes), jnp.float32))

    def body(codes_gmem, scales_gmem, dy_gmem, even_gmem, odd_gmem, out_smem, w_smem, acc_even, acc_odd):
        pid_k = lax.axis_index("k")
        pid_m = lax.axis_index("m")
        block_row = (pid_k * 2 * step_bytes) // blocksize // blocks_per_tile

        def step(_, codes_smem, scale_smem, dy_smem):
            scale = lax.broadcast_in_dim(scale_smem[0, :], (_RED_ROWS, step_bytes), [0])
            if blocks_per_tile == 2:
                column = lax.broadcasted_iota(jnp.int32, (_RED_ROWS, step_bytes), 1)
                second = lax.broadcast_in_dim(scale_smem[1, :], (_RED_ROWS, step_bytes), [0])
                scale = jnp.where(column < step_bytes // 2, scale, second)
            w_smem[0], w_smem[1] = _decode_nibbles(codes_smem, scale, table)
            plgpu.commit_smem()
            plgpu.wgmma(acc_even, dy_smem, w_smem.at[0])
            plgpu.wgmma(acc_odd, dy_smem, w_smem.at[1])
            plgpu.wgmma_wait(0)

        plgpu.emit_pipeline(
            step,
            grid=(n // _RED_ROWS,),
            max_concurrent_steps=tiles.max_concurrent_steps,
            in_specs=[
                plgpu.BlockSpec((_RED_ROWS, step_bytes), lambda s: (s, pid_k), transforms=codes_transforms),
                plgpu.BlockSpec((blocks_per_tile, _RED_ROWS), lambda s: (block_row, s)),
                plgpu.BlockSpec((tm, _RED_ROWS), lambda s: (pid_m, s), transforms=dy_transforms),
            ],
        )(codes_gmem, scales_gmem, dy_gmem)
        for acc, out_gmem in ((acc_even, even_gmem), (acc_odd, odd_gmem)):
            out_smem[...] = acc[...].astype(jnp.bfloat16)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, out_gmem.at[pl.ds(pid_m * tm, tm), pl.ds(pid_k * step_bytes, step_bytes)])
            plgpu.wait_smem_to_gmem(0)

    half = jax.ShapeDtypeStruct((mp, half_k), jnp.bfloat16)
    return _mosaic_call(
        kernel, (codes, scales_t, dy),
        out_type=(half, half),
        scratch_types=dict(
            out_smem=plgpu.SMEM((tm, step_bytes), jnp.bfloat16),
            w_smem=plgpu.SMEM((2, _RED_ROWS, step_bytes), jnp.bfloat16, transforms=w_transforms),
        ),
        grid=(half_k // step_bytes, mp // tm), grid_names=("k", "m"), interpret=interpret,
        name="qlora_fused_dequant_matmul_grad_mgpu",
    )


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def fused_matmul(x: jax.Array, qt: QuantizedTensor, *, tiles: MosaicTiles | None = None,
                 interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
    """``x[M, K] @ dequant(W[N, K]).T`` -> bf16 ``[M, N]`` (float32 accumulation in ``wgmma``).

    ``interpret`` runs the Mosaic GPU interpreter (CPU tests; slow): ``True`` for its defaults
    (buffers start as NaN, out-of-bounds reads raise), or an ``InterpretGPUParams`` (e.g. with
    ``detect_races=True``).
    """
    qt.validate()
    m, k = x.shape
    if len(qt.shape) == 2 and k != qt.shape[1]:
        raise ValueError(f"x must be [M, K={qt.shape[1]}], got {list(x.shape)}")
    support.check(support.Problem.of_weight("matmul", qt, x.dtype, m), "mosaic")
    tiles = tiles or mosaic_tiles(m, qt.shape[0])
    mp = pl.cdiv(m, tiles.tile_m) * tiles.tile_m
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
    out = _launch(_forward_call, qt, (x[:, 0::2], x[:, 1::2]), tiles=tiles, interpret=interpret)
    return out[:, :m].T if tiles.weight_lhs else out[:m]


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def fused_matmul_grad(dy: jax.Array, qt: QuantizedTensor, *, tiles: MosaicGradTiles | None = None,
                      interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
    """``dy[M, N] @ dequant(W[N, K])`` -> bf16 ``[M, K]`` (float32 accumulation in ``wgmma``).

    ``interpret`` as for :func:`fused_matmul`.
    """
    qt.validate()
    m, n = dy.shape
    if len(qt.shape) == 2 and n != qt.shape[0]:
        raise ValueError(f"dy must be [M, N={qt.shape[0]}], got {list(dy.shape)}")
    support.check(support.Problem.of_weight("matmul_grad", qt, dy.dtype, m), "mosaic")
    tiles = tiles or mosaic_grad_tiles(m)
    mp = pl.cdiv(m, tiles.tile_m) * tiles.tile_m
    dy = jnp.pad(dy, ((0, mp - m), (0, 0)))
    even, odd = _launch(_grad_call, qt, (dy,), tiles=tiles, interpret=interpret)
    return jnp.stack([even[:m], odd[:m]], axis=-1).reshape(m, qt.shape[1])
