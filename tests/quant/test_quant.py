"""Data types against float64 numpy references; the pytree under jit, sharding and Orbax; errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qlora_jax.quant import (
    DYNAMIC_MAP_SIGNED,
    FP4_CODE,
    NF4_CODE,
    QuantizationError,
    QuantizedTensor,
    blockwise,
    decode_scales,
    dequantize,
    quantize,
)
from qlora_jax.quant.report import storage_report, storage_report_for

SHAPES = [(64, 128), (48, 200), (3, 7), (33, 65), (2, 3, 64), (1000,)]


def weights(rng, shape, dtype=np.float32):
    w = rng.standard_normal(shape) * np.exp(rng.normal(-2.0, 0.7, size=shape[:-1] + (1,)))
    return w.astype(dtype)


def reference_blocks(w: np.ndarray, blocksize: int):
    """float64 flat blocks (zero padded) and their absmax."""
    flat = np.asarray(w, np.float64).reshape(-1)
    nb = -(-flat.size // blocksize)
    padded = np.zeros(nb * blocksize)
    padded[: flat.size] = flat
    blocks = padded.reshape(nb, blocksize)
    return blocks, np.abs(blocks).max(axis=1)


def reference_codes_4bit(w, quant_type, blocksize):
    """Nearest code in float64, and how much nearer it is than the runner-up."""
    blocks, absmax = reference_blocks(w, blocksize)
    unit = blocks / np.where(absmax == 0, 1, absmax)[:, None]
    table = (NF4_CODE if quant_type == "nf4" else FP4_CODE).astype(np.float64)
    dist = np.abs(unit[..., None] - table)
    best = np.argmin(dist, axis=-1)
    two = np.partition(dist, 1, axis=-1)
    gap = two[..., 1] - two[..., 0]
    return best.reshape(-1)[: np.size(w)], gap.reshape(-1)[: np.size(w)], absmax


def unpacked_codes(qt: QuantizedTensor) -> np.ndarray:
    packed = np.asarray(qt.codes).reshape(-1)
    return np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[: qt.numel]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
def test_4bit_codes_are_nearest_in_float64(rng, quant_type, shape):
    w = weights(rng, shape)
    qt = quantize(w, quant_type, blocksize=64, double_quant=False)
    best, gap, absmax = reference_codes_4bit(w, quant_type, 64)
    ours = unpacked_codes(qt)
    table = NF4_CODE if quant_type == "nf4" else FP4_CODE
    # Codes may differ only where two table entries are equally near in float32 (a tie), and then
    # only between entries of equal value (FP4's two zeros) or across that float32 tie.
    differ = table[ours] != table[best]
    assert np.all(gap[differ] < 1e-6), f"{differ.sum()} codes are not the nearest"
    np.testing.assert_array_equal(np.asarray(qt.scales).reshape(-1), absmax.astype(np.float32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_matches_float64_reconstruction(rng, quant_type, shape):
    w = weights(rng, shape)
    qt = quantize(w, quant_type, blocksize=64, double_quant=False)
    scales = np.repeat(np.asarray(qt.scales, np.float64).reshape(-1), 64)[: qt.numel]
    if quant_type == "int8":
        expected = np.asarray(qt.codes, np.float64).reshape(-1) * scales / 127.0
    else:
        table = (NF4_CODE if quant_type == "nf4" else FP4_CODE).astype(np.float64)
        expected = table[unpacked_codes(qt)] * scales
    got = np.asarray(dequantize(qt)).reshape(-1)
    np.testing.assert_allclose(got, expected, rtol=3e-7, atol=1e-30)
    # Reconstruction error is bounded by half the widest gap of the code table, per block.
    if quant_type == "int8":
        half_gap = 0.5 / 127
    else:
        table = np.sort(NF4_CODE if quant_type == "nf4" else FP4_CODE)
        half_gap = np.max(np.diff(table)) / 2
    err = np.abs(got - w.reshape(-1))
    assert np.all(err <= half_gap * scales * (1 + 1e-5) + 1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_int8_codes_match_float64_rounding(rng, shape):
    w = weights(rng, shape)
    qt = quantize(w, "int8", blocksize=64, double_quant=False)
    blocks, absmax = reference_blocks(w, 64)
    exact = (blocks * 127.0 / absmax[:, None]).reshape(-1)[: w.size]
    ours = np.asarray(qt.codes).reshape(-1).astype(np.float64)
    off = np.abs(ours - np.round(exact))
    # Only float32-vs-float64 rounding at exact .5 ties may move a code, by one step.
    assert np.all((off == 0) | (np.abs(np.abs(exact - np.floor(exact)) - 0.5) < 1e-4))


@pytest.mark.parametrize("shape", [(256, 512), (300, 128), (3, 7)])
def test_double_quant_scales_against_float64(rng, shape):
    w = weights(rng, shape)
    plain = quantize(w, "nf4", double_quant=False)
    dq = quantize(w, "nf4", double_quant=True)
    absmax = np.asarray(plain.scales, np.float64).reshape(-1)
    np.testing.assert_array_equal(np.asarray(dq.codes), np.asarray(plain.codes))
    assert abs(float(dq.offset) - absmax.mean()) <= 2 * np.spacing(np.float32(absmax.mean()))
    centered = absmax - float(dq.offset)
    nb = -(-centered.size // 256)
    padded = np.zeros(nb * 256)
    padded[: centered.size] = centered
    nested = np.abs(padded.reshape(nb, 256)).max(axis=1)
    np.testing.assert_allclose(np.asarray(dq.nested_scales), nested, rtol=1e-6)
    # The 8-bit dynamic map's widest step bounds the error of each decoded scale.
    decoded = np.asarray(decode_scales(dq), np.float64).reshape(-1)
    half_gap = np.max(np.diff(DYNAMIC_MAP_SIGNED.astype(np.float64))) / 2
    bound = half_gap * np.repeat(nested, 256)[: decoded.size] * (1 + 1e-5) + 1e-7
    assert np.all(np.abs(decoded - absmax) <= bound)


def test_pack_unpack_roundtrip(rng):
    codes = rng.integers(0, 16, size=(7, 10), dtype=np.uint8)
    packed = blockwise.pack_4bit(jnp.asarray(codes))
    assert packed.shape == (7, 5) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(packed), (codes[:, 0::2] << 4) | codes[:, 1::2])
    np.testing.assert_array_equal(np.asarray(blockwise.unpack_4bit(packed)), codes)


def test_nf4_error_below_fp4_on_gaussian_weights(rng):
    """The paper's data-type finding (Fig. 3, weight space) on N(0, 1) weights."""
    w = rng.standard_normal((512, 512)).astype(np.float32)
    mse = {t: float(np.mean((np.asarray(dequantize(quantize(w, t))) - w) ** 2)) for t in ("nf4", "fp4")}
    assert mse["nf4"] < 0.8 * mse["fp4"], mse


def test_accepts_bfloat16_and_float16_and_keeps_dtype(rng):
    w = weights(rng, (32, 128))
    for dtype in (ml_dtypes.bfloat16, np.float16):
        wd = w.astype(dtype)
        qt = quantize(wd)
        ref = quantize(wd.astype(np.float32))  # bitsandbytes upcasts to float32 first, as we do
        np.testing.assert_array_equal(np.asarray(qt.codes), np.asarray(ref.codes))
        assert dequantize(qt).dtype == jnp.dtype(dtype)
        assert qt.dtype == jnp.dtype(dtype).name


# ---------------------------------------------------------------------------- storage report


def test_storage_report_bits_per_param():
    assert round(storage_report_for((4096, 4096), "nf4", 64, True).bits_per_param, 3) == 4.127
    assert storage_report_for((4096, 4096), "nf4", 64, False).bits_per_param == 4.5
    assert storage_report_for((4096, 4096), "int8", 64, False).bits_per_param == 8.5
    assert storage_report_for((4096, 4096), "bf16").bits_per_param == 16.0


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_storage_report_counts_the_real_arrays(rng, quant_type, double_quant):
    for shape in [(256, 512), (33, 65)]:
        qt = quantize(weights(rng, shape), quant_type, double_quant=double_quant)
        real = storage_report(qt)
        assert real == storage_report_for(shape, quant_type, 64, double_quant)
        leaves = jax.tree.leaves(qt)
        assert real.total_bytes == sum(x.size * x.dtype.itemsize for x in leaves)


# ---------------------------------------------------------------------------- pytree, jit, sharding, orbax


def test_quantize_and_dequantize_under_jit(rng):
    w = jnp.asarray(weights(rng, (64, 256)))
    eager = quantize(w, "nf4")
    traced = jax.jit(lambda x: quantize(x, "nf4"))(w)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(traced), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(jax.jit(dequantize)(eager)), np.asarray(dequantize(eager)))
    assert len(jax.tree.leaves(eager)) == 4 and len(jax.tree.leaves(quantize(w, double_quant=False))) == 2


def test_nonfinite_under_jit_gives_nan_not_finite_garbage(rng):
    w = weights(rng, (4, 128))
    w[1, 70] = np.nan
    w[2, 5] = np.inf
    qt = jax.jit(lambda x: quantize(x, "nf4", double_quant=False))(jnp.asarray(w))
    out = np.asarray(dequantize(qt)).reshape(-1)
    bad_blocks = {(128 + 70) // 64, (256 + 5) // 64}
    for b in range(8):
        block = out[b * 64 : (b + 1) * 64]
        assert np.all(np.isnan(block)) if b in bad_blocks else np.all(np.isfinite(block))


def test_sharded_rows_dequantize_like_unsharded(rng):
    devices = jax.devices()
    assert len(devices) >= 4, "conftest asks XLA for 8 host devices"
    mesh = jax.make_mesh((len(devices),), ("rows",), axis_types=(jax.sharding.AxisType.Auto,))
    w = weights(rng, (16 * len(devices), 256))
    qt = quantize(w, "nf4")
    row = NamedSharding(mesh, P("rows"))
    rep = NamedSharding(mesh, P())
    sharded = QuantizedTensor(
        codes=jax.device_put(qt.codes, row), scales=jax.device_put(qt.scales, row),
        nested_scales=jax.device_put(qt.nested_scales, rep), offset=jax.device_put(qt.offset, rep),
        shape=qt.shape, dtype=qt.dtype, quant_type=qt.quant_type, blocksize=qt.blocksize,
    )
    assert sharded.codes.addressable_shards[0].data.shape == (16, 128)
    out = jax.jit(dequantize)(sharded)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dequantize(qt)))


def test_orbax_roundtrip(rng, tmp_path):
    tree = {"q_proj": quantize(weights(rng, (64, 128)), "nf4"), "fp4": quantize(weights(rng, (3, 7)), "fp4",
                                                                              double_quant=False)}
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", tree)
        ckpt.wait_until_finished()
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
        restored = ckpt.restore(tmp_path / "ckpt", target)
    assert jax.tree.structure(restored) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored["q_proj"].shape == (64, 128) and restored["fp4"].quant_type == "fp4"


# ---------------------------------------------------------------------------- errors


def test_nonfinite_weights_are_refused(rng):
    w = weights(rng, (8, 64))
    w[3, 17] = np.nan
    with pytest.raises(QuantizationError, match=r"non-finite.*\(3, 17\)"):
        quantize(w)
    w[3, 17] = -np.inf
    with pytest.raises(QuantizationError, match="non-finite"):
        quantize(w)


@pytest.mark.parametrize("blocksize", [0, 48, 100, 8192])
def test_unsupported_blocksize(rng, blocksize):
    with pytest.raises(QuantizationError, match=f"unsupported blocksize {blocksize}"):
        quantize(weights(rng, (4, 64)), blocksize=blocksize)


@pytest.mark.parametrize("dtype", [np.int32, np.float64, np.bool_, np.complex64])
def test_wrong_dtype(dtype):
    with pytest.raises(QuantizationError, match="dtype"):
        quantize(np.ones((4, 64), dtype))


def test_unknown_quant_type_and_empty_tensor(rng):
    with pytest.raises(QuantizationError, match="quant_type"):
        quantize(weights(rng, (4, 64)), "nf3")
    with pytest.raises(QuantizationError, match="at least one element"):
        quantize(np.zeros((0, 64), np.float32))


def test_corrupt_quantized_tensor_is_named(rng):
    qt = quantize(weights(rng, (64, 128)), "nf4")
    bad_codes = QuantizedTensor(qt.codes[:, :-1], qt.scales, qt.nested_scales, qt.offset, qt.shape, qt.dtype,
                                qt.quant_type, qt.blocksize)
    with pytest.raises(QuantizationError, match=r"codes is uint8\[64, 63\].*needs uint8\[64, 64\]"):
        dequantize(bad_codes)
    mismatched = QuantizedTensor(qt.codes, qt.scales, qt.nested_scales, qt.offset, (64, 256), qt.dtype,
                                 qt.quant_type, qt.blocksize)
    with pytest.raises(QuantizationError, match="codes"):
        dequantize(mismatched)
    float_scales = QuantizedTensor(qt.codes, qt.scales.astype(jnp.float32), qt.nested_scales, qt.offset, qt.shape,
                                   qt.dtype, qt.quant_type, qt.blocksize)
    with pytest.raises(QuantizationError, match="scales is float32"):
        dequantize(float_scales)
    no_nested = QuantizedTensor(qt.codes, qt.scales, None, qt.offset, qt.shape, qt.dtype, qt.quant_type,
                                qt.blocksize)
    with pytest.raises(QuantizationError, match="offset but no nested_scales"):
        dequantize(no_nested)
    with pytest.raises(QuantizationError, match="blocksize"):
        dequantize(QuantizedTensor(qt.codes, qt.scales, qt.nested_scales, qt.offset, qt.shape, qt.dtype,
                                   qt.quant_type, 96))
