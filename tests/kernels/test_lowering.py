"""The Pallas kernels' real CUDA lowering, checked without a GPU (the jax_triton kernels': kernels/test_jax_triton.py).

``jax.export(..., platforms=["cuda"])`` under an abstract H100 (or A100) runs every Pallas
lowering rule (jaxpr -> Triton IR, jaxpr -> Mosaic GPU MLIR) on the host. Only shapes and dtypes
are needed, so these run at the real LLaMA-7B sizes. PTX compilation itself needs a GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from qlora_jax.kernels import (
    dequantize_triton,
    lowering,
    matmul_mosaic,
    matmul_triton,
)
from qlora_jax.kernels import tiles as tiles_lib
from qlora_jax.kernels.jax_triton import ops as jt_ops

from qlora_jax import kernels
from qlora_jax.quant import QuantizedTensor

LLAMA_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # weight [N, K] = [out, in]
SIZE_CLASSES = [1, 16, 100, 4096]  # decode, decode, medium, prefill


def abstract_weight(n: int, k: int, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True):
    """A QuantizedTensor of ShapeDtypeStructs: what export needs, no data."""
    blocks = n * k // blocksize
    sds = jax.ShapeDtypeStruct
    return QuantizedTensor(
        codes=sds((n, k // 2), jnp.uint8),
        scales=sds((n, k // blocksize), jnp.uint8 if double_quant else jnp.float32),
        nested_scales=sds((-(-blocks // 256),), jnp.float32) if double_quant else None,
        offset=sds((), jnp.float32) if double_quant else None,
        shape=(n, k), dtype="bfloat16", quant_type=quant_type, blocksize=blocksize,
    )


@pytest.mark.parametrize("m", SIZE_CLASSES)
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
def test_triton_matmul_and_grad_lower_for_h100(m, n, k):
    qt = abstract_weight(n, k)
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    dy = jax.ShapeDtypeStruct((m, n), jnp.bfloat16)
    forward = lowering.export_for_cuda(lambda x, q: matmul_triton.fused_matmul(x, q), x, qt)
    backward = lowering.export_for_cuda(lambda dy, q: matmul_triton.fused_matmul_grad(dy, q), dy, qt)
    for exported in (forward, backward):
        assert lowering.TRITON_TARGET in lowering.custom_call_targets(exported)
        # Double-quant scales are decoded with an explicitly rounded product (no FMA).
        assert "mul.rn.f32" in exported.mlir_module()


@pytest.mark.parametrize("lookup", ["gather", "select"])
def test_triton_select_tree_lookup_lowers(lookup):
    qt = abstract_weight(11008, 4096)
    for m in (1, 100, 512):
        tiles = dataclasses.replace(tiles_lib.matmul_tiles(m, 11008, 4096), lookup=lookup)
        x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16)
        exported = lowering.export_for_cuda(lambda x, q, t=tiles: matmul_triton.fused_matmul(x, q, tiles=t), x, qt)
        assert lowering.TRITON_TARGET in lowering.custom_call_targets(exported)
    tiles = dataclasses.replace(tiles_lib.dequantize_tiles(11008, 4096), lookup=lookup)
    exported = lowering.export_for_cuda(lambda q: dequantize_triton.dequantize_kernel(q, tiles=tiles), qt)
    assert lowering.TRITON_TARGET in lowering.custom_call_targets(exported)


@pytest.mark.parametrize("quant_type,double_quant,blocksize", [("nf4", True, 64), ("fp4", False, 128)])
def test_triton_kernels_lower_for_a100(quant_type, double_quant, blocksize):
    qt = abstract_weight(4096, 4096, quant_type, blocksize, double_quant)
    for m in (1, 512):
        x = jax.ShapeDtypeStruct((m, 4096), jnp.float16)
        exported = lowering.export_for_cuda(lambda x, q: matmul_triton.fused_matmul(x, q), x, qt, device=lowering.A100)
        assert lowering.TRITON_TARGET in lowering.custom_call_targets(exported)
        exported = lowering.export_for_cuda(lambda x, q: matmul_triton.fused_matmul_grad(x, q), x, qt,
                                            device=lowering.A100)
        assert lowering.TRITON_TARGET in lowering.custom_call_targets(exported)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("double_quant,blocksize", [(True, 64), (False, 64), (True, 4096)])
def test_triton_dequantize_lowers(dtype, double_quant, blocksize):
    qt = abstract_weight(11008, 4096, double_quant=double_quant, blocksize=blocksize)
    exported = lowering.export_for_cuda(lambda q: dequantize_triton.dequantize_kernel(q, dtype), qt)
    assert lowering.TRITON_TARGET in lowering.custom_call_targets(exported)
    assert ("mul.rn.f32" in exported.mlir_module()) == double_quant


@pytest.mark.parametrize("quant_type,blocksize", [("nf4", 64), ("fp4", 64), ("nf4", 4096)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_triton_quantize_lowers_with_ieee_division(quant_type, blocksize, dtype):
    w = jax.ShapeDtypeStruct((4096, 11008 if blocksize < 4096 else 4096), dtype)
    exported = lowering.export_for_cuda(lambda w: kernels.quantize_fused(w, quant_type, blocksize=blocksize,
                                                                   backend="pallas_triton"), w)
    assert lowering.TRITON_TARGET in lowering.custom_call_targets(exported)
    # Triton's float32 `/` is the approximate div.full.f32; bitsandbytes' bytes need div.rn.
    assert "div.rn.f32" in exported.mlir_module()


@pytest.mark.parametrize("a_in_registers", [False, True])
@pytest.mark.parametrize("m", SIZE_CLASSES)
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
def test_mosaic_gpu_matmul_lowers_for_h100(m, n, k, a_in_registers):
    qt = abstract_weight(n, k)
    tiles = matmul_mosaic.mosaic_tiles(m, n)
    tiles = matmul_mosaic.MosaicTiles(tiles.weight_lhs, tiles.tile_n, tiles.tile_m, a_in_registers=a_in_registers)
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16)
    exported = lowering.export_for_cuda(lambda x, q: matmul_mosaic.fused_matmul(x, q, tiles=tiles), x, qt)
    assert lowering.MOSAIC_GPU_TARGET in lowering.custom_call_targets(exported)


@pytest.mark.parametrize("blocksize", [64, 256])
@pytest.mark.parametrize("m", SIZE_CLASSES)
@pytest.mark.parametrize("n,k", LLAMA_SHAPES)
def test_mosaic_gpu_grad_lowers_for_h100(m, n, k, blocksize):
    qt = abstract_weight(n, k, blocksize=blocksize)
    dy = jax.ShapeDtypeStruct((m, n), jnp.bfloat16)
    exported = lowering.export_for_cuda(lambda dy, q: matmul_mosaic.fused_matmul_grad(dy, q), dy, qt)
    assert lowering.MOSAIC_GPU_TARGET in lowering.custom_call_targets(exported)


@pytest.mark.parametrize("m,expected", [(1, True), (64, True), (65, False), (4096, False)])
def test_auto_dispatch_under_an_abstract_h100(m, expected):
    """backend="auto" reads the abstract device: fused (jax_triton) kernels for memory-bound M, XLA above."""
    qt = abstract_weight(4096, 4096)
    x = jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16)
    with jt_ops.autotune_disabled():
        exported = lowering.export_for_cuda(lambda x, q: kernels.quantized_matmul(x, q), x, qt)
    assert (lowering.JAX_TRITON_TARGET in lowering.custom_call_targets(exported)) == expected


def test_training_step_lowers_with_both_kernels():
    """jax.grad through the custom VJP: the forward and the input-gradient kernel both lower."""
    qt = abstract_weight(11008, 4096)
    x = jax.ShapeDtypeStruct((2, 8, 4096), jnp.bfloat16)

    def loss(x, q):
        return jnp.sum(kernels.quantized_matmul(x, q, backend="pallas_triton").astype(jnp.float32) ** 2)

    exported = lowering.export_for_cuda(jax.grad(loss), x, qt)
    assert exported.mlir_module().count(f"custom_call @{lowering.TRITON_TARGET}") == 2
    assert exported.out_avals[0].shape == (2, 8, 4096)


def test_mosaic_backend_training_step_lowers():
    """jax.grad through the custom VJP with backend="mosaic": both Mosaic GPU kernels lower."""
    qt = abstract_weight(4096, 11008)
    x = jax.ShapeDtypeStruct((256, 11008), jnp.bfloat16)

    def loss(x, q):
        return jnp.sum(kernels.quantized_matmul(x, q, backend="mosaic").astype(jnp.float32) ** 2)

    exported = lowering.export_for_cuda(jax.grad(loss), x, qt)
    assert exported.mlir_module().count(f"custom_call @{lowering.MOSAIC_GPU_TARGET}") == 2


def abstract_experts(num_experts: int, n: int, k: int, quant_type: str = "nf4", blocksize: int = 64,
                     double_quant: bool = True):
    """A stacked QuantizedTensor of ShapeDtypeStructs (moe.quantize_experts' layout): export needs no data."""
    one = abstract_weight(n, k, quant_type, blocksize, double_quant)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct((num_experts, *a.shape), a.dtype), one)


@pytest.mark.parametrize("device,quant_type,double_quant,dtype", [
    (lowering.H100, "nf4", True, jnp.bfloat16),
    (lowering.A100, "fp4", False, jnp.float16),
])
def test_grouped_moe_training_step_lowers(device, quant_type, double_quant, dtype):
    """jax.grad through moe.grouped_matmul's custom VJP at Mixtral-8x7B's w1 ([8, 14336, 4096]):
    the grouped forward and input-gradient kernels both lower."""
    from qlora_jax.models import moe

    qt = abstract_experts(8, 14336, 4096, quant_type, double_quant=double_quant)
    x = jax.ShapeDtypeStruct((1024, 4096), dtype)
    sizes = jax.ShapeDtypeStruct((8,), jnp.int32)

    def loss(x, sizes, q):
        return jnp.sum(moe.grouped_matmul(x, sizes, q, backend="pallas_triton").astype(jnp.float32) ** 2)

    exported = lowering.export_for_cuda(jax.grad(loss), x, sizes, qt, device=device)
    assert exported.mlir_module().count(f"custom_call @{lowering.TRITON_TARGET}") == 2
    assert ("mul.rn.f32" in exported.mlir_module()) == double_quant
    assert exported.out_avals[0].shape == (1024, 4096)


@pytest.mark.parametrize("rows,expected", [(8 * 64, True), (8 * 64 + 1, False)])
def test_grouped_auto_dispatch_under_an_abstract_h100(rows, expected):
    """backend="auto" (what moe_block uses) picks the grouped kernel while rows per expert <= 64 on Hopper."""
    from qlora_jax.models import moe

    qt = abstract_experts(8, 4096, 1024)
    x = jax.ShapeDtypeStruct((rows, 1024), jnp.bfloat16)
    sizes = jax.ShapeDtypeStruct((8,), jnp.int32)
    exported = lowering.export_for_cuda(lambda x, s, q: moe.grouped_matmul(x, s, q), x, sizes, qt)
    assert (lowering.TRITON_TARGET in lowering.custom_call_targets(exported)) == expected
