"""Fused 4-bit dequant-matmul for Hopper with Pallas Mosaic GPU (``plgpu.kernel`` + ``wgmma``).

``y = x @ dequant(W).T`` for ``x: bf16[M, K]`` and a 4-bit QuantizedTensor ``W: [N, K]``.

Design:

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

Requirements (:mod:`qlora_jax.kernels.support`; else the dispatcher uses the Pallas-Triton kernel): NF4/FP4,
``N % 64 == 0``, ``K % blocksize == 0``, ``blocksize >= 64`` (a K-step covers at most one block;
narrower rows cannot be swizzled for TMA), bf16 activations. ``M`` is padded to the tile.
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
from qlora_jax.kernels import common, support

from qlora_jax.quant import QuantizedTensor, codebooks, decode_scales, dequantize

__all__ = [
    "MosaicTiles",
    "fused_matmul",
    "reference",
    "mosaic_tiles",
    "interpret_params",
    "interpret_scope",
]


def reference(x: jax.Array, qt: QuantizedTensor) -> jax.Array:
    """XLA reference: dequantize W to ``x.dtype``, then ``x @ W.T`` with float32 accumulation."""
    w = dequantize(qt, x.dtype)
    return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
    """``weight_lhs``: compute ``y.T`` with the weight as the wgmma LHS (few tokens).
    ``tile_n`` weight rows and ``tile_m`` tokens per CTA; ``max_concurrent_steps``: TMA pipeline
    depth. ``a_in_registers`` (only with ``weight_lhs``): feed the dequantized weight to ``wgmma``
    from registers instead of staging it in shared memory; the Mosaic GPU interpreter cannot run
    that variant, so only its lowering is tested."""

    weight_lhs: bool
    tile_n: int
    tile_m: int
    max_concurrent_steps: int = 3
    a_in_registers: bool = False


def mosaic_tiles(m: int, n: int) -> MosaicTiles:
    """Tiles per size class: ``y.T`` with 8/16/32-token tiles up to M=32, else 128x128 (64 rows of N if N % 128)."""
    if m <= 32:
        tile_m = 8 if m <= 8 else (16 if m <= 16 else 32)
        return MosaicTiles(weight_lhs=True, tile_n=64, tile_m=tile_m)
    tile_n = 128 if n % 128 == 0 else 64
    tile_m = 64 if m <= 64 else 128
    return MosaicTiles(weight_lhs=False, tile_n=tile_n, tile_m=tile_m)


def _kernel_call(codes, scales_t, x_even, x_odd, *, table, blocksize: int, tiles: MosaicTiles, interpret):
    n, half_k = codes.shape
    mp = x_even.shape[0]
    step_bytes = min(64, blocksize // 2)  # one scale per row per step
    steps = half_k // step_bytes
    tn, tm = tiles.tile_n, tiles.tile_m
    codes_transforms = (plgpu.TilingTransform((8, step_bytes)), plgpu.SwizzleTransform(step_bytes))
    bf16_transforms = (plgpu.TilingTransform((8, step_bytes)), plgpu.SwizzleTransform(2 * step_bytes))
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
            packed = codes_smem[...].astype(jnp.int32)  # Mosaic GPU has no 8-bit arithmetic
            scale = lax.broadcast_in_dim(scale_smem[0, :], (tn, step_bytes), [0])
            w_hi = (common.select_tree(packed >> 4, table) * scale).astype(jnp.bfloat16)
            w_lo = (common.select_tree(packed & 0xF, table) * scale).astype(jnp.bfloat16)
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
    return plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(out_shape, jnp.bfloat16),
        scratch_types=dict(
            out_smem=plgpu.SMEM(acc_shape, jnp.bfloat16),
            w_smem=plgpu.SMEM((2, tn, step_bytes), jnp.bfloat16, transforms=bf16_transforms),
        ),
        grid=(n // tn, mp // tm),
        grid_names=("n", "m"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=interpret,
        kernel_name="qlora_fused_dequant_matmul_mgpu",
    )(codes, scales_t, x_even, x_odd)


def interpret_params(interpret: bool | plgpu.InterpretGPUParams) -> plgpu.InterpretGPUParams | bool:
    """The ``interpret=`` argument of ``plgpu.kernel`` for our ``interpret`` flag or parameters."""
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams() if interpret else False


def interpret_scope():
    """An abstract-H100 mesh: the Mosaic GPU interpreter asks the device for GPU properties."""
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device))


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
    n = qt.shape[0]
    tiles = tiles or mosaic_tiles(m, n)
    mp = pl.cdiv(m, tiles.tile_m) * tiles.tile_m
    x = jnp.pad(x, ((0, mp - m), (0, 0)))
    scales_t = decode_scales(qt).reshape(n, k // qt.blocksize).T
    table = codebooks.codebook(qt.quant_type)
    call = functools.partial(_kernel_call, table=table, blocksize=qt.blocksize, tiles=tiles,
                             interpret=interpret_params(interpret))
    with interpret_scope() if interpret else contextlib.nullcontext():
        out = call(qt.codes, scales_t, x[:, 0::2], x[:, 1::2])
    return out[:, :m].T if tiles.weight_lhs else out[:m]
