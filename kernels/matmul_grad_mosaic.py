"""Input gradient ``dx = dy @ dequant(W)`` for Hopper with Pallas Mosaic GPU (``wgmma``).

``dy: bf16[M, N]``, a 4-bit QuantizedTensor ``W: [N, K]``, ``dx: bf16[M, K]``. The same ideas as
the forward (:mod:`qlora_jax.kernels.matmul_mosaic`), transposed:

* the two nibbles of a byte are elements ``2j`` and ``2j + 1`` of a row of W, which here are two
  *output* columns; the kernel keeps two accumulators, ``dx[:, 0::2] = dy @ W_hi`` and
  ``dx[:, 1::2] = dy @ W_lo``, and XLA interleaves them afterwards;
* each CTA owns ``tile_m`` rows of dx and 64 byte-columns of W (128 columns of dx: one or, at
  blocksize 64, two quantization blocks per weight row) and walks N in steps of 64 weight rows:
  TMA brings the codes tile and the ``dy`` tile, the warpgroup decodes (select tree) and scales
  the weight tile into shared memory, and two ``wgmma`` take ``dy`` (LHS) against it (RHS, N-major,
  which needs 128-byte rows: hence 64 byte-columns);
* block scales are decoded by XLA beforehand (float32 ``[K / blocksize, N]``), as in the forward.

``dy`` is the wgmma LHS, so M is padded to 64 (or 128 above 64 rows): this kernel is meant for
the compute-bound training regime; the Triton kernel serves few-token backward passes.
Requirements (:mod:`qlora_jax.kernels.support`): NF4/FP4, ``N % 64 == 0``, ``K % 128 == 0``, ``blocksize >= 64``, bf16.
:func:`reference` beside it is the XLA computation the kernel must match.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from qlora_jax.kernels import common, matmul_mosaic, support

from qlora_jax.quant import QuantizedTensor, codebooks, decode_scales, dequantize

__all__ = ["MosaicGradTiles", "fused_matmul_grad", "reference", "mosaic_grad_tiles"]

_RED_ROWS = 64  # weight rows (N) per pipeline step


def reference(dy: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """XLA reference: dequantize W to ``dy.dtype``, then ``dy @ W`` with float32 accumulation."""
    w = dequantize(qt, dy.dtype)
    return jax.lax.dot_general(dy, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32).astype(dy.dtype)


@dataclasses.dataclass(frozen=True)
class MosaicGradTiles:
    """``tile_m`` rows of dy per CTA (64 or 128); ``max_concurrent_steps``: TMA pipeline depth."""

    tile_m: int
    max_concurrent_steps: int = 3


def mosaic_grad_tiles(m: int) -> MosaicGradTiles:
    return MosaicGradTiles(tile_m=64 if m <= 64 else 128)


def _kernel_call(codes, scales_t, dy, *, table, blocksize: int, tiles: MosaicGradTiles, interpret):
    n, half_k = codes.shape
    mp = dy.shape[0]
    # 64 byte-columns per CTA: the weight tile is wgmma's N-major RHS, which needs 128-byte rows.
    # With blocksize 64 such a tile spans two quantization blocks per weight row.
    step_bytes = 64
    blocks_per_tile = max(1, 2 * step_bytes // blocksize)
    tm = tiles.tile_m
    codes_transforms = (plgpu.TilingTransform((8, step_bytes)), plgpu.SwizzleTransform(step_bytes))
    w_transforms = (plgpu.TilingTransform((8, step_bytes)), plgpu.SwizzleTransform(2 * step_bytes))
    dy_transforms = (plgpu.TilingTransform((8, _RED_ROWS)), plgpu.SwizzleTransform(2 * _RED_ROWS))

    def kernel(codes_gmem, scales_gmem, dy_gmem, even_gmem, odd_gmem, out_smem, w_smem):
        pl.run_scoped(functools.partial(body, codes_gmem, scales_gmem, dy_gmem, even_gmem, odd_gmem, out_smem, w_smem),
                      plgpu.ACC((tm, step_bytes), jnp.float32), plgpu.ACC((tm, step_bytes), jnp.float32))

    def body(codes_gmem, scales_gmem, dy_gmem, even_gmem, odd_gmem, out_smem, w_smem, acc_even, acc_odd):
        pid_k = lax.axis_index("k")
        pid_m = lax.axis_index("m")
        block_row = (pid_k * 2 * step_bytes) // blocksize // blocks_per_tile

        def step(_, codes_smem, scale_smem, dy_smem):
            packed = codes_smem[...].astype(jnp.int32)
            scale = lax.broadcast_in_dim(scale_smem[0, :], (_RED_ROWS, step_bytes), [0])
            if blocks_per_tile == 2:
                column = lax.broadcasted_iota(jnp.int32, (_RED_ROWS, step_bytes), 1)
                second = lax.broadcast_in_dim(scale_smem[1, :], (_RED_ROWS, step_bytes), [0])
                scale = jnp.where(column < step_bytes // 2, scale, second)
            w_smem[0] = (common.select_tree(packed >> 4, table) * scale).astype(jnp.bfloat16)
            w_smem[1] = (common.select_tree(packed & 0xF, table) * scale).astype(jnp.bfloat16)
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
    return plgpu.kernel(
        kernel,
        out_type=(half, half),
        scratch_types=dict(
            out_smem=plgpu.SMEM((tm, step_bytes), jnp.bfloat16),
            w_smem=plgpu.SMEM((2, _RED_ROWS, step_bytes), jnp.bfloat16, transforms=w_transforms),
        ),
        grid=(half_k // step_bytes, mp // tm),
        grid_names=("k", "m"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
        kernel_name="qlora_fused_dequant_matmul_grad_mgpu",
    )(codes, scales_t, dy)


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def fused_matmul_grad(dy: jax.Array, qt: QuantizedTensor, *, tiles: MosaicGradTiles | None = None,
                      interpret: bool | plgpu.InterpretGPUParams = False) -> jax.Array:
    """``dy[M, N] @ dequant(W[N, K])`` -> bf16 ``[M, K]`` (float32 accumulation in ``wgmma``).

    ``interpret`` runs the Mosaic GPU interpreter (CPU tests; slow): ``True`` for its defaults
    (buffers start as NaN, out-of-bounds reads raise), or an ``InterpretGPUParams`` (e.g. with
    ``detect_races=True``).
    """
    qt.validate()
    m, n = dy.shape
    if len(qt.shape) == 2 and n != qt.shape[0]:
        raise ValueError(f"dy must be [M, N={qt.shape[0]}], got {list(dy.shape)}")
    support.check(support.Problem.of_weight("matmul_grad", qt, dy.dtype, m), "mosaic")
    k = qt.shape[1]
    tiles = tiles or mosaic_grad_tiles(m)
    mp = pl.cdiv(m, tiles.tile_m) * tiles.tile_m
    dy = jnp.pad(dy, ((0, mp - m), (0, 0)))
    scales_t = decode_scales(qt).reshape(n, k // qt.blocksize).T
    call = functools.partial(_kernel_call, table=codebooks.codebook(qt.quant_type), blocksize=qt.blocksize,
                             tiles=tiles, interpret=matmul_mosaic.interpret_params(interpret))
    with matmul_mosaic.interpret_scope() if interpret else contextlib.nullcontext():
        even, odd = call(qt.codes, scales_t, dy)
    return jnp.stack([even[:m], odd[:m]], axis=-1).reshape(m, k)
