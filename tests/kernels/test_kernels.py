"""The Pallas kernels, run through the interpreters on CPU, against float64 numpy references.

Every kernel call starts from a NaN (or 0xFF) output buffer (``debug_poison_output``), so a tile
a kernel forgets to write fails the comparison instead of passing on stale zeros. References are
independent of the code under test: dequantized values are rebuilt from the raw bytes in numpy
float32 (one IEEE operation at a time, which is exactly the kernels' contract), products in
float64. Shapes are small because the Pallas interpreter is slow.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from kernel_refs import (
    DEQUANT_CASES,
    MATMUL_SHAPES,
    activations,
    assert_product_close,
    matmul_case_id,
    reference_values,
    weights,
)
from qlora_jax.kernels import (
    dequantize_triton,
    matmul_mosaic,
    matmul_triton,
    quantize_triton,
)
from qlora_jax.kernels import (
    tiles as tiles_lib,
)
from qlora_jax.kernels.ops import Target
from qlora_jax.kernels.tiles import DequantTiles, MatmulTiles

from qlora_jax import kernels
from qlora_jax.quant import DYNAMIC_MAP_SIGNED, QuantizationError, QuantizedTensor, quantize

# (m, n, k, quant_type, blocksize, double_quant, dtype, tiles)
MATMUL_CASES = MATMUL_SHAPES + [
    (4, 40, 512, "nf4", 64, True, "bfloat16", MatmulTiles(16, 16, 64, split=4)),  # split reduction
    (7, 32, 256, "nf4", 128, False, "bfloat16", MatmulTiles(16, 32, 32, split=2)),  # step < block
    (9, 64, 256, "fp4", 64, True, "bfloat16", MatmulTiles(16, 32, 128, lookup="select")),  # select-tree LUT
]


@pytest.mark.parametrize("case", MATMUL_CASES, ids=matmul_case_id)
def test_fused_matmul_kernel_against_float64(rng, case):
    m, n, k, qtype, bs, dq, dtype, tiles = case
    qt = quantize(weights(rng, (n, k)), qtype, blocksize=bs, double_quant=dq)
    x = activations(rng, (m, k), dtype)
    y = matmul_triton.fused_matmul(x, qt, tiles=tiles, interpret=True, debug_poison_output=True)
    assert y.dtype == jnp.dtype(dtype) and y.shape == (m, n)
    assert_product_close(y, x, reference_values(qt, dtype).T, dtype)


@pytest.mark.parametrize("case", MATMUL_CASES, ids=matmul_case_id)
def test_fused_matmul_grad_kernel_against_float64(rng, case):
    m, n, k, qtype, bs, dq, dtype, tiles = case
    qt = quantize(weights(rng, (n, k)), qtype, blocksize=bs, double_quant=dq)
    dy = activations(rng, (m, n), dtype)
    if tiles is not None:  # the same shapes, transposed roles: block_out tiles K, block_red steps N
        tiles = MatmulTiles(tiles.block_m, min(tiles.block_red * 2, 128), tiles.block_out, tiles.split,
                            lookup=tiles.lookup)
    dx = matmul_triton.fused_matmul_grad(dy, qt, tiles=tiles, interpret=True, debug_poison_output=True)
    assert dx.dtype == jnp.dtype(dtype) and dx.shape == (m, k)
    assert_product_close(dx, dy, reference_values(qt, dtype), dtype)


@pytest.mark.parametrize(
    "shape,qtype,bs,dq,dtype,tiles",
    [
        *DEQUANT_CASES,
        ((3, 1024), "nf4", 1024, False, "bfloat16", None),
        ((5, 256), "fp4", 64, True, "bfloat16", DequantTiles(8, 128, lookup="select")),
    ],
)
def test_dequantize_kernel_is_exact(rng, shape, qtype, bs, dq, dtype, tiles):
    qt = quantize(weights(rng, shape), qtype, blocksize=bs, double_quant=dq)
    out = dequantize_triton.dequantize_kernel(qt, jnp.dtype(dtype), tiles=tiles, interpret=True,
                                              debug_poison_output=True)
    assert out.dtype == jnp.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32), np.float64), reference_values(qt, dtype))


def test_dequantize_entry_point_dispatches_and_falls_back(rng):
    nf4 = quantize(weights(rng, (2, 8, 128)), "nf4", blocksize=64)
    int8 = quantize(weights(rng, (8, 128)), "int8", blocksize=64)
    out = kernels.dequantize_fused(nf4, jnp.bfloat16, backend="pallas_triton", interpret=True)
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32), np.float64), reference_values(nf4, "bfloat16"))
    assert kernels.resolve_backend("dequantize", int8, dtype=jnp.bfloat16, backend="pallas_triton")[0] == "xla"
    fallback = kernels.dequantize_fused(int8, jnp.float32, backend="pallas_triton", interpret=True)
    np.testing.assert_array_equal(np.asarray(fallback), np.asarray(int8.dequantize(jnp.float32)))


def test_dequantize_double_quant_rounds_the_product_before_the_offset(rng):
    """A scale where an FMA would round differently must come out as bitsandbytes computes it."""
    qt = quantize(weights(rng, (64, 256)), "nf4", blocksize=64)
    q = np.asarray(qt.scales).reshape(-1)
    nested = np.asarray(qt.nested_scales)[np.arange(q.size) // 256]
    offset = np.float32(np.asarray(qt.offset))
    rounded = ((DYNAMIC_MAP_SIGNED[q] * nested).astype(np.float32) + offset).astype(np.float32)
    fused = (DYNAMIC_MAP_SIGNED[q].astype(np.float64) * nested + offset).astype(np.float32)
    assert np.any(rounded != fused), "no block distinguishes the two roundings; the test would be vacuous"
    out = dequantize_triton.dequantize_kernel(qt, jnp.float32, interpret=True, debug_poison_output=True)
    np.testing.assert_array_equal(np.asarray(out, np.float64), reference_values(qt, "float32"))


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize(
    "shape,bs,dtype,tiles",
    [
        ((17, 256), 64, np.float32, None),  # ragged rows, zero block
        ((8, 512), 128, ml_dtypes.bfloat16, DequantTiles(2, 256)),  # two blocks per tile row
        ((3, 64), 32, np.float16, None),
        ((2, 4, 128), 64, np.float32, None),
    ],
)
def test_quantize_kernel_bytes_match_bitsandbytes_cuda(rng, bnb_cuda_reference, qtype, shape, bs, dtype, tiles):
    w = weights(rng, shape, np.float32)
    w.reshape(-1)[:bs] = 0.0  # an all-zero block: NaN scaled values, code 0 in bitsandbytes' CUDA kernel
    w = w.astype(dtype)
    codes, absmax = quantize_triton.quantize_blocks(jnp.asarray(w), qtype, blocksize=bs, tiles=tiles, interpret=True,
                                                    debug_poison_output=True)
    bnb_codes, bnb_absmax = bnb_cuda_reference.quantize_4bit(np.asarray(w, np.float32), qtype, bs)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), bnb_codes)
    np.testing.assert_array_equal(np.asarray(absmax).reshape(-1), bnb_absmax)
    for double_quant in (False, True):
        ours = kernels.quantize_fused(jnp.asarray(w), qtype, blocksize=bs, double_quant=double_quant,
                                      backend="pallas_triton", interpret=True)
        expected = quantize(w, qtype, blocksize=bs, double_quant=double_quant, bnb_backend="cuda")
        assert ours.shape == expected.shape and ours.dtype == expected.dtype
        for field in ("codes", "scales", "nested_scales", "offset"):
            a, b = getattr(ours, field), getattr(expected, field)
            assert (a is None) == (b is None), field
            if a is not None:
                assert a.dtype == b.dtype and a.shape == b.shape, field
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=field)


def test_quantize_kernel_nonfinite_blocks_under_jit_match_the_reference(rng):
    w = weights(rng, (4, 256))
    w[0, 3] = np.inf
    w[2, 70] = np.nan
    fn = jax.jit(lambda a: kernels.quantize_fused(a, "nf4", blocksize=64, backend="pallas_triton", interpret=True))
    ours = fn(jnp.asarray(w))
    expected = jax.jit(lambda a: quantize(a, "nf4", blocksize=64, double_quant=True))(jnp.asarray(w))
    _, absmax = quantize_triton.quantize_blocks(jnp.asarray(w), "nf4", blocksize=64, interpret=True)
    assert np.isnan(np.asarray(absmax)[0, 0]) and np.isnan(np.asarray(absmax)[2, 1])
    assert np.isfinite(np.asarray(absmax)[1]).all()
    for field in ("codes", "scales", "nested_scales", "offset"):
        np.testing.assert_array_equal(np.asarray(getattr(ours, field)), np.asarray(getattr(expected, field)))


def test_quantize_refuses_nonfinite_outside_jit(rng):
    w = weights(rng, (4, 128))
    w[1, 5] = np.nan
    with pytest.raises(QuantizationError, match=r"non-finite.*\(1, 5\)"):
        kernels.quantize_fused(jnp.asarray(w), backend="pallas_triton", interpret=True)


def _linear_loss(matmul, c):
    return lambda x: jnp.sum(matmul(x).astype(jnp.float32) * c)


@pytest.mark.parametrize("backend,dq", [("pallas_triton", True), ("pallas_triton", False), ("jax_triton", True),
                                        ("jax_triton", False), ("xla", True)])
def test_custom_vjp_against_float64_and_jax_grad_of_the_reference(rng, backend, dq):
    n, k = 48, 256
    qt = quantize(weights(rng, (n, k)), "nf4", blocksize=64, double_quant=dq)
    x = activations(rng, (2, 3, k), "bfloat16")
    c = jnp.asarray(rng.standard_normal((2, 3, n)), jnp.float32)
    w64 = reference_values(qt, "bfloat16")

    def matmul(x):
        return kernels.quantized_matmul(x, qt, backend=backend, interpret=True)

    loss, dx = jax.jit(jax.value_and_grad(_linear_loss(matmul, c)))(x)
    # The cotangent reaching the bf16 output is c rounded to bf16; dx = ct @ W, rounded to bf16.
    ct = c.astype(jnp.bfloat16)
    assert dx.dtype == jnp.bfloat16 and dx.shape == x.shape
    assert_product_close(dx.reshape(6, k), ct.reshape(6, n), w64, "bfloat16")
    x64 = np.asarray(x.astype(jnp.float32), np.float64).reshape(6, k)
    c64 = np.asarray(c, np.float64).reshape(6, n)
    y64 = x64 @ w64.T
    # Each y is within bf16 rounding (+ float32 accumulation) of y64; the loss adds c * y.
    y_tol = 2.0**-8 * np.abs(y64) + 4 * k * 2.0**-24 * (np.abs(x64) @ np.abs(w64).T)
    assert abs(float(loss) - np.sum(y64 * c64)) <= np.sum(np.abs(c64) * y_tol) + 1e-4

    ref_dx = jax.grad(_linear_loss(lambda x: matmul_triton.reference(x, qt), c))(x)
    np.testing.assert_allclose(np.asarray(dx, np.float32), np.asarray(ref_dx, np.float32), rtol=2**-7, atol=1e-3)


def test_weight_cotangent_is_zero_of_the_right_kind(rng):
    qt = quantize(weights(rng, (32, 128)), "nf4", blocksize=64)
    x = activations(rng, (4, 128), "bfloat16")
    grad = jax.grad(lambda q: jnp.sum(kernels.quantized_matmul(x, q, backend="pallas_triton", interpret=True)
                                      .astype(jnp.float32)), allow_int=True)(qt)
    assert isinstance(grad, QuantizedTensor)
    assert grad.codes.dtype == jax.dtypes.float0 and grad.scales.dtype == jax.dtypes.float0
    assert grad.nested_scales.dtype == jnp.float32 and not np.any(np.asarray(grad.nested_scales))
    assert grad.offset.dtype == jnp.float32 and float(grad.offset) == 0.0


def test_leading_batch_dims_and_matmul_grad_entry_point(rng):
    qt = quantize(weights(rng, (32, 128)), "fp4", blocksize=64)
    x = activations(rng, (2, 2, 3, 128), "bfloat16")
    y = kernels.quantized_matmul(x, qt, backend="pallas_triton", interpret=True)
    assert y.shape == (2, 2, 3, 32)
    w64 = reference_values(qt, "bfloat16")
    assert_product_close(y.reshape(12, 32), x.reshape(12, 128), w64.T, "bfloat16")
    dy = activations(rng, (3, 5, 32), "bfloat16")
    dx = kernels.quantized_matmul_grad(dy, qt, backend="pallas_triton", interpret=True)
    assert dx.shape == (3, 5, 128)
    assert_product_close(dx.reshape(15, 128), dy.reshape(15, 32), w64, "bfloat16")


def mosaic_interpret_checked(run):
    """Runs ``run(interpret_params)`` in the Mosaic GPU interpreter with its race detector on.

    The interpreter also starts every buffer (outputs included) as NaN and raises on
    out-of-bounds reads, so an unwritten tile or a bad TMA window fails the comparison.
    """
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call  # the detector's state

    result = jax.block_until_ready(run(plgpu.InterpretGPUParams(detect_races=True)))
    assert not interpret_pallas_call.get_races().races_found, "the Mosaic GPU interpreter found a data race"
    return result


@pytest.mark.parametrize(
    "m,n,k,bs,dq,tiles",
    [
        (1, 64, 256, 64, True, None),  # weight as wgmma LHS, computes y.T
        (20, 128, 128, 128, False, None),
        (70, 128, 256, 64, True, None),  # activations as LHS, ragged M
        (16, 64, 128, 64, True, matmul_mosaic.MosaicTiles(True, 64, 16, max_concurrent_steps=2)),
    ],
)
def test_mosaic_gpu_kernel_in_its_interpreter(rng, m, n, k, bs, dq, tiles):
    qt = quantize(weights(rng, (n, k)), "nf4", blocksize=bs, double_quant=dq)
    x = activations(rng, (m, k), "bfloat16")
    y = mosaic_interpret_checked(lambda params: matmul_mosaic.fused_matmul(x, qt, tiles=tiles, interpret=params))
    assert y.dtype == jnp.bfloat16 and y.shape == (m, n)
    assert_product_close(y, x, reference_values(qt, "bfloat16").T, "bfloat16")


@pytest.mark.parametrize(
    "m,n,k,bs,dq",
    [
        (1, 64, 128, 64, True),  # two quantization blocks per tile row (iota select)
        (70, 128, 256, 64, False),  # two M tiles of 64, ragged
        (5, 64, 512, 256, True),  # one block per tile row
    ],
)
def test_mosaic_gpu_grad_kernel_in_its_interpreter(rng, m, n, k, bs, dq):
    qt = quantize(weights(rng, (n, k)), "nf4", blocksize=bs, double_quant=dq)
    dy = activations(rng, (m, n), "bfloat16")
    dx = mosaic_interpret_checked(lambda params: matmul_mosaic.fused_matmul_grad(dy, qt, interpret=params))
    assert dx.dtype == jnp.bfloat16 and dx.shape == (m, k)
    assert_product_close(dx, dy, reference_values(qt, "bfloat16"), "bfloat16")


def test_mosaic_backend_custom_vjp(rng):
    qt = quantize(weights(rng, (64, 128)), "nf4", blocksize=64)
    x = activations(rng, (3, 128), "bfloat16")
    c = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    for op in ("matmul", "matmul_grad"):
        assert kernels.resolve_backend(op, qt, dtype=x.dtype, m=3, backend="mosaic")[0] == "mosaic"
    def matmul(x):
        return kernels.quantized_matmul(x, qt, backend="mosaic", interpret=True)

    y = matmul(x)
    dx = jax.grad(_linear_loss(matmul, c))(x)
    w64 = reference_values(qt, "bfloat16")
    assert_product_close(y, x, w64.T, "bfloat16")
    assert_product_close(dx, c.astype(jnp.bfloat16), w64, "bfloat16")


def test_unsupported_shapes_fall_back_to_xla_and_stay_correct(rng):
    odd_k = quantize(weights(rng, (8, 100)), "nf4", blocksize=64)  # K not a multiple of the block
    int8 = quantize(weights(rng, (8, 128)), "int8", blocksize=64)
    nf4 = quantize(weights(rng, (8, 128)), "nf4", blocksize=64)
    x32 = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
    cases = [(odd_k, "bfloat16", "not a multiple"), (int8, "bfloat16", "int8"), (nf4, "float32", "float32")]
    for qt, dtype, why in cases:
        x = activations(rng, (3, qt.shape[1]), dtype)
        backend, reason = kernels.resolve_backend("matmul", qt, dtype=x.dtype, m=3, backend="pallas_triton")
        assert backend == "xla" and why in reason
        y = kernels.quantized_matmul(x, qt, backend="pallas_triton", interpret=True)
        expected = np.asarray(x.astype(jnp.float32), np.float64) @ qt.dequantize(dtype).astype(jnp.float32).T
        np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected, rtol=2**-7, atol=1e-4)
    assert kernels.resolve_backend("matmul", nf4, dtype=x32.dtype, m=3, backend="mosaic")[0] == "xla"
    backend, reason = kernels.resolve_backend("matmul", nf4, dtype=jnp.bfloat16, m=2**31 // 64, backend="pallas_triton")
    assert backend == "xla" and "int32" in reason
    empty = kernels.quantized_matmul(jnp.zeros((0, 128), jnp.bfloat16), nf4, backend="pallas_triton", interpret=True)
    assert empty.shape == (0, 8)


H100 = Target("gpu", "cuda", (9, 0), 132)
A100 = Target("gpu", "cuda", (8, 0), 108)


@pytest.mark.parametrize(
    "op,m,target,expected",
    [
        ("matmul", 1, H100, "jax_triton"),
        ("matmul", 64, H100, "jax_triton"),
        ("matmul", 65, H100, "xla"),
        ("matmul_grad", 4096, H100, "xla"),
        ("matmul", 128, A100, "jax_triton"),
        ("matmul", 129, A100, "xla"),
        ("dequantize", None, H100, "jax_triton"),
        ("matmul", 1, Target("cpu"), "xla"),
        ("matmul", 1, Target("tpu"), "xla"),
        ("matmul", 1, Target("gpu", "rocm", (9, 4), 304), "xla"),
        ("matmul", 1, Target("gpu", "cuda", (7, 0), 80), "xla"),
    ],
)
def test_auto_backend_policy(rng, op, m, target, expected):
    qt = quantize(weights(rng, (64, 128)), "nf4", blocksize=64)
    backend, reason = kernels.resolve_backend(op, qt, dtype=jnp.bfloat16, m=m, target=target)
    assert backend == expected, reason


def test_current_target_reads_an_abstract_device():
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", platform="gpu", num_cores=132)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=device)):
        assert kernels.current_target() == H100
    assert kernels.current_target().platform == jax.devices()[0].platform


def test_bad_inputs_are_named(rng):
    qt = quantize(weights(rng, (32, 128)), "nf4", blocksize=64)
    with pytest.raises(ValueError, match=r"last dimension \(64\) != the weight's in_features K \(128\)"):
        kernels.quantized_matmul(jnp.zeros((2, 64), jnp.bfloat16), qt)
    with pytest.raises(TypeError, match="QuantizedTensor"):
        kernels.quantized_matmul(jnp.zeros((2, 128), jnp.bfloat16), jnp.zeros((32, 128)))
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.quantized_matmul(jnp.zeros((2, 128), jnp.bfloat16), qt, backend="cuda")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*interpret=True"):
        kernels.quantized_matmul(jnp.zeros((2, 128), jnp.bfloat16), qt, backend="pallas_triton")
    with pytest.raises(ValueError, match=r"dy's last dimension \(31\) != the weight's out_features N \(32\)"):
        kernels.quantized_matmul_grad(jnp.zeros((2, 31), jnp.bfloat16), qt)
    with pytest.raises(ValueError, match="must be a power of two"):
        MatmulTiles(16, 48, 64)
    with pytest.raises(ValueError, match="does not divide K"):
        matmul_triton.fused_matmul(jnp.zeros((2, 128), jnp.bfloat16), qt, tiles=MatmulTiles(16, 16, 256),
                                   interpret=True)


@pytest.mark.parametrize("m", [1, 16, 17, 100, 256, 4096, 16384])
@pytest.mark.parametrize("n,k", [(4096, 4096), (11008, 4096), (4096, 11008)])
def test_tile_choices_are_valid_for_llama_shapes(m, n, k):
    for choose, red, out in ((tiles_lib.matmul_tiles, k, n), (tiles_lib.matmul_grad_tiles, n, k)):
        t = choose(m, n, k, 132)
        assert tiles_lib.size_class(m) == ("decode" if m <= 16 else "prefill" if m >= 256 else "medium")
        assert t.block_m == (16 if m <= 16 else 128 if m >= 256 else (32 if m <= 32 else 64))
        steps = math.ceil(red / t.block_red)
        assert steps % t.split == 0
        tiles = math.ceil(m / t.block_m) * math.ceil(out / t.block_out)
        # The split only fills the GPU and never writes more partials than a quarter of the weight.
        assert t.split == 1 or tiles < 132
        assert t.split * m * out * 8 <= max(out * red / 2 / 4, m * out * 8)
