"""Byte-exactness against bitsandbytes.

* ``bnb_backend="cpu"`` against bitsandbytes 0.50's own CPU backend (the oracle environment).
* ``bnb_backend="cuda"`` against bitsandbytes' CUDA quantization code compiled for the host.
* The serialized format both ways, with no re-quantization.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qlora_jax.quant import (
    DYNAMIC_MAP_SIGNED,
    DYNAMIC_MAP_UNSIGNED,
    FP4_CODE,
    NF4_CODE,
    blockwise,
    bnb_format,
    quantize,
)
from qlora_jax.quant.tensor import dequantize, double_quantize

# (shape, blocksize): multiples of the block, a tail block, odd sizes, a tensor smaller than one
# block, 3-D, and enough blocks for several (and a partial) nested block of 256.
CASES = [
    ((64, 64), 64),
    ((128, 320), 64),
    ((300, 128), 64),
    ((3, 7), 64),
    ((33, 65), 64),
    ((4, 6, 48), 32),
    ((96, 200), 128),
    ((16, 1024), 256),
    ((5, 4097), 4096),
    ((1, 1001), 64),
]


def realistic_weights(rng: np.random.Generator, shape) -> np.ndarray:
    """Gaussian weights with per-row scales and a few outliers, like a trained linear layer."""
    w = rng.standard_normal(shape) * np.exp(rng.normal(-3.0, 0.5, size=shape[:-1] + (1,)))
    outliers = rng.random(shape) < 0.002
    w = np.where(outliers, w * rng.uniform(5, 20, size=shape), w)
    return w.astype(np.float32)


def _case_name(i, quant_type, double_quant, dtype):
    return f"c{i}_{quant_type}_{int(double_quant)}_{dtype}"


@pytest.fixture(scope="module")
def bnb_results(oracle, request, module_rng):
    """One oracle run over every case, on weights from the run's seed (QLORA_JAX_TEST_SEED)."""
    rng = module_rng
    arrays, cases, inputs = {}, [], {}
    for i, (shape, blocksize) in enumerate(CASES):
        w = realistic_weights(rng, shape)
        for quant_type in ("nf4", "fp4"):
            for double_quant in (False, True):
                for dtype in ("float32", "bfloat16"):
                    name = _case_name(i, quant_type, double_quant, dtype)
                    if dtype == "bfloat16":
                        wd = w.astype(ml_dtypes.bfloat16)
                        arrays[f"{name}/w"] = wd.view(np.uint16)
                    else:
                        wd = w
                        arrays[f"{name}/w"] = w
                    inputs[name] = wd
                    cases.append(
                        dict(name=name, op="quantize_4bit", quant_type=quant_type, blocksize=blocksize,
                             double_quant=double_quant, dtype=dtype)
                    )
    results = oracle.run("bnb_quant.py", arrays, {"cases": cases})
    return cases, inputs, results


def bnb_cpu_dequantize_is_sound(shape, blocksize) -> bool:
    """bitsandbytes 0.50.2's CPU ``dequantize_4bit`` is wrong when blocks straddle rows.

    Its native kernel (taken when the last dimension is even) assumes each row holds whole blocks;
    for e.g. ``[4, 6, 48]`` at blocksize 32 it scales most values by the wrong absmax. There we
    compare against a float64 reconstruction from bitsandbytes' own codes and scales instead.
    """
    return shape[-1] % 2 == 1 or shape[-1] % blocksize == 0


def reference_dequantize(packed, absmax, quant_type, blocksize, numel, nested_absmax=None, offset=None):
    """numpy reconstruction from bitsandbytes' codes and scales, rounding each float32 step as it does."""
    packed = packed.reshape(-1)
    codes = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[:numel]
    table = NF4_CODE if quant_type == "nf4" else FP4_CODE
    if nested_absmax is not None:
        scales = DYNAMIC_MAP_SIGNED[absmax] * np.repeat(nested_absmax, 256)[: absmax.size]
        scales = (scales + np.float32(offset)).astype(np.float32)
    else:
        scales = absmax.astype(np.float32)
    return table[codes] * np.repeat(scales, blocksize)[:numel]


def bnb_values(results, name, case, shape):
    """bitsandbytes' dequantized values, or the reconstruction where its CPU kernel is wrong."""
    if bnb_cpu_dequantize_is_sound(shape, case["blocksize"]):
        return results[f"{name}/dequantized"].reshape(-1)
    values = reference_dequantize(
        results[f"{name}/packed"], results[f"{name}/absmax"], case["quant_type"], case["blocksize"],
        int(np.prod(shape)), results.get(f"{name}/nested_absmax"), results.get(f"{name}/offset"),
    )
    if case["dtype"] == "bfloat16":
        values = values.astype(ml_dtypes.bfloat16)
    return values.astype(np.float32)


def _ulps(a: np.float32, b: np.float32) -> int:
    return abs(int(np.float32(a).view(np.int32)) - int(np.float32(b).view(np.int32)))


def test_code_tables_match_bitsandbytes(oracle):
    out = oracle.run("bnb_quant.py", {}, {"cases": [{"name": "maps", "op": "dynamic_maps"}]})
    np.testing.assert_array_equal(DYNAMIC_MAP_SIGNED.view(np.uint32), out["maps/signed"].view(np.uint32))
    np.testing.assert_array_equal(DYNAMIC_MAP_UNSIGNED.view(np.uint32), out["maps/unsigned"].view(np.uint32))
    np.testing.assert_array_equal(NF4_CODE.view(np.uint32), out["maps/nf4"].view(np.uint32))
    np.testing.assert_array_equal(FP4_CODE.view(np.uint32), out["maps/fp4"].view(np.uint32))


def test_4bit_codes_and_absmax_identical_to_bnb_cpu(bnb_results):
    cases, inputs, results = bnb_results
    for case in cases:
        name = case["name"]
        if case["double_quant"]:
            continue
        qt = quantize(inputs[name], case["quant_type"], blocksize=case["blocksize"], double_quant=False,
                      bnb_backend="cpu")
        np.testing.assert_array_equal(np.asarray(qt.codes).reshape(-1), results[f"{name}/packed"].reshape(-1),
                                      err_msg=f"{name}: packed codes")
        np.testing.assert_array_equal(np.asarray(qt.scales).reshape(-1), results[f"{name}/absmax"],
                                      err_msg=f"{name}: absmax")


def test_double_quant_identical_to_bnb_cpu(bnb_results):
    """Offset within an ulp of torch.mean's; given bnb's offset, every byte and float identical."""
    cases, inputs, results = bnb_results
    for case in cases:
        name = case["name"]
        if not case["double_quant"]:
            continue
        ours = quantize(inputs[name], case["quant_type"], blocksize=case["blocksize"], bnb_backend="cpu")
        bnb_offset = results[f"{name}/offset"]
        assert _ulps(np.asarray(ours.offset), bnb_offset) <= 2, (name, float(ours.offset), float(bnb_offset))

        same = quantize(inputs[name], case["quant_type"], blocksize=case["blocksize"], bnb_backend="cpu",
                        offset=bnb_offset)
        np.testing.assert_array_equal(np.asarray(same.codes).reshape(-1), results[f"{name}/packed"].reshape(-1))
        np.testing.assert_array_equal(np.asarray(same.scales).reshape(-1), results[f"{name}/absmax"],
                                      err_msg=f"{name}: nested codes")
        np.testing.assert_array_equal(np.asarray(same.nested_scales), results[f"{name}/nested_absmax"],
                                      err_msg=f"{name}: nested absmax")
        assert np.asarray(same.offset).view(np.uint32) == bnb_offset.view(np.uint32)
        expected = bnb_values(results, name, case, inputs[name].shape)
        np.testing.assert_allclose(np.asarray(dequantize(same).astype(jnp.float32)).reshape(-1), expected,
                                   rtol=0, atol=0, err_msg=name)
        # With our own offset the values still agree to float32 rounding of the scales.
        np.testing.assert_allclose(np.asarray(dequantize(ours).astype(jnp.float32)).reshape(-1), expected,
                                   rtol=1e-5 if case["dtype"] == "float32" else 8e-3, atol=1e-9, err_msg=name)


def test_dequantized_values_match_bnb_cpu(bnb_results):
    cases, inputs, results = bnb_results
    for case in cases:
        name = case["name"]
        if case["double_quant"]:
            continue
        qt = quantize(inputs[name], case["quant_type"], blocksize=case["blocksize"], double_quant=False,
                      bnb_backend="cpu")
        np.testing.assert_allclose(np.asarray(dequantize(qt).astype(jnp.float32)).reshape(-1),
                                   bnb_values(results, name, case, inputs[name].shape), rtol=0, atol=0,
                                   err_msg=name)


def test_import_bnb_state_dict_without_requantization(bnb_results):
    """bitsandbytes' serialized tensors load as-is and dequantize to bitsandbytes' own values."""
    cases, inputs, results = bnb_results
    for case in cases:
        name = case["name"]
        prefix = f"{name}/state/"
        state = {"weight": results[f"{name}/packed"]}
        state.update({"weight." + k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)})
        qt = bnb_format.from_bnb_state_dict(state, "weight")
        np.testing.assert_array_equal(np.asarray(qt.codes).reshape(-1), results[f"{name}/packed"].reshape(-1))
        np.testing.assert_allclose(np.asarray(dequantize(qt).astype(jnp.float32)).reshape(-1),
                                   bnb_values(results, name, case, inputs[name].shape), rtol=0, atol=0,
                                   err_msg=name)
        assert qt.shape == inputs[name].shape
        assert qt.dtype == case["dtype"] and qt.double_quant == case["double_quant"]


def test_exported_state_dict_loads_in_bnb(oracle, rng):
    """Our serialized tensors, read by bitsandbytes' QuantState.from_dict, give our values."""
    arrays, cases, expected = {}, [], {}
    for i, (shape, blocksize) in enumerate(c for c in CASES if bnb_cpu_dequantize_is_sound(*c)):
        w = realistic_weights(rng, shape)
        for quant_type in ("nf4", "fp4"):
            for double_quant in (False, True):
                name = f"e{i}_{quant_type}_{int(double_quant)}"
                qt = quantize(w, quant_type, blocksize=blocksize, double_quant=double_quant)
                for key, value in bnb_format.to_bnb_state_dict(qt, "weight").items():
                    arrays[f"{name}/state/{key}"] = value
                cases.append({"name": name, "op": "dequantize_state"})
                expected[name] = np.asarray(dequantize(qt, jnp.float32))
    out = oracle.run("bnb_quant.py", arrays, {"cases": cases})
    for name, values in expected.items():
        np.testing.assert_allclose(out[f"{name}/dequantized"].reshape(values.shape), values, rtol=0, atol=0,
                                   err_msg=name)


def test_dynamic_map_cpu_lookup_matches_bnb(oracle, rng):
    """The 8-bit dynamic-map quantizer (bitsandbytes' CPU lookup table), on heavy-tailed data."""
    a = (rng.standard_normal(256 * 40) * np.exp(rng.normal(0, 3, 256 * 40))).astype(np.float32)
    a[256:512] = 0.0  # an all-zero block
    tail = a[: 256 * 39 + 77]
    out = oracle.run("bnb_quant.py", {"q/a": tail}, {"cases": [{"name": "q", "op": "quantize_blockwise",
                                                                  "blocksize": 256}]})
    blocks = blockwise.pad_to_blocks(jnp.asarray(tail), 256)
    absmax = blockwise.block_absmax(blocks)
    codes = blockwise.encode_dynamic8(blocks, absmax, DYNAMIC_MAP_SIGNED, "cpu")
    np.testing.assert_array_equal(np.asarray(absmax), out["q/absmax"])
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1)[: tail.size], out["q/codes"])


def test_int8_blockwise_matches_llm_int8_rowwise(oracle, rng):
    """With one block per row, our Int8 is bitsandbytes' LLM.int8() row-wise quantization."""
    arrays, cases = {}, []
    for cols in (64, 128, 256):
        w = realistic_weights(rng, (48, cols))
        arrays[f"r{cols}/w"] = w
        cases.append({"name": f"r{cols}", "op": "int8_vectorwise"})
    out = oracle.run("bnb_quant.py", arrays, {"cases": cases})
    for cols in (64, 128, 256):
        qt = quantize(arrays[f"r{cols}/w"], "int8", blocksize=cols, double_quant=False)
        np.testing.assert_array_equal(np.asarray(qt.codes), out[f"r{cols}/codes"])
        np.testing.assert_array_equal(np.asarray(qt.scales).reshape(-1), out[f"r{cols}/row_absmax"])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_cuda_mode_matches_bnb_cuda_code(bnb_cuda_reference, rng, quant_type):
    """``bnb_backend="cuda"`` gives the bytes of bitsandbytes' CUDA kernels (compiled for the host)."""
    for shape, blocksize in CASES:
        w = realistic_weights(rng, shape)
        flat = w.reshape(-1)
        if flat.size >= 2 * blocksize:
            flat[:blocksize] = 0.0  # an all-zero block: NaN scaled values in the kernel
            flat[blocksize + 3] = 1e-6  # tiny values, where the backends' FP4 zeros differ
            flat[blocksize + 4] = -1e-6
        ours = quantize(w, quant_type, blocksize=blocksize, bnb_backend="cuda")
        packed, absmax = bnb_cuda_reference.quantize_4bit(w, quant_type, blocksize)
        np.testing.assert_array_equal(np.asarray(ours.codes).reshape(-1), packed, err_msg=f"{shape}")
        # Double quantization of those absmax with our offset, by the CUDA 8-bit kernel.
        centered = (absmax - np.asarray(ours.offset)).astype(np.float32)
        nested_codes, nested_absmax = bnb_cuda_reference.quantize_blockwise_8bit(centered, DYNAMIC_MAP_SIGNED, 256)
        np.testing.assert_array_equal(np.asarray(ours.scales).reshape(-1), nested_codes, err_msg=f"{shape}")
        np.testing.assert_array_equal(np.asarray(ours.nested_scales), nested_absmax)


def test_cuda_dynamic_search_matches_bnb_cuda_code(bnb_cuda_reference, rng):
    a = (rng.standard_normal(256 * 64) * np.exp(rng.normal(0, 3, 256 * 64))).astype(np.float32)
    a[:256] = 0.0
    codes_ref, absmax_ref = bnb_cuda_reference.quantize_blockwise_8bit(a, DYNAMIC_MAP_SIGNED, 256)
    blocks = blockwise.pad_to_blocks(jnp.asarray(a), 256)
    absmax = blockwise.block_absmax(blocks)
    codes = blockwise.encode_dynamic8(blocks, absmax, DYNAMIC_MAP_SIGNED, "cuda")
    np.testing.assert_array_equal(np.asarray(absmax), absmax_ref)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), codes_ref)


def test_backends_agree_on_nf4_values(rng):
    """The two backends may differ in bytes (zero blocks, tie-breaking) but not in NF4 values."""
    w = realistic_weights(rng, (64, 256))
    a = np.asarray(quantize(w, "nf4", bnb_backend="cuda", double_quant=False).dequantize())
    b = np.asarray(quantize(w, "nf4", bnb_backend="cpu", double_quant=False).dequantize())
    np.testing.assert_array_equal(a, b)
    _, _, off = double_quantize(jnp.abs(jnp.asarray(w[0])))
    assert np.isfinite(np.asarray(off))
