"""Independent references for the kernel tests (shared by the test modules).

Dequantized values are rebuilt from the raw bytes in numpy float32, one IEEE operation at a time
(exactly the kernels' contract); products are taken in float64.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from qlora_jax.kernels.tiles import DequantTiles

from qlora_jax.quant import DYNAMIC_MAP_SIGNED, FP4_CODE, NF4_CODE, QuantizedTensor

__all__ = ["NP_DTYPES", "DEQUANT_CASES", "MATMUL_SHAPES", "matmul_case_id", "weights", "activations",
           "reference_values", "assert_product_close"]

NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def weights(rng, shape, dtype=np.float32):
    """Gaussian rows with log-normal per-row magnitudes, like trained linear layers."""
    w = rng.standard_normal(shape) * np.exp(rng.normal(-2.0, 0.7, size=shape[:-1] + (1,)))
    return w.astype(dtype)


def activations(rng, shape, dtype):
    return jnp.asarray(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def reference_values(qt: QuantizedTensor, dtype: str) -> np.ndarray:
    """The weight as the kernels must produce it, from the raw bytes: float64 ``qt.shape``.

    Scale: ``round32(round32(dyn[q] * nested) + offset)`` (double quant) or the float32 absmax;
    value: ``round32(code * scale)``, then rounded to ``dtype``.
    """
    packed = np.asarray(qt.codes).reshape(-1)
    codes = np.stack([packed >> 4, packed & 0xF], axis=-1).reshape(-1)[: qt.numel]
    table = NF4_CODE if qt.quant_type == "nf4" else FP4_CODE
    if qt.double_quant:
        q = np.asarray(qt.scales).reshape(-1)
        nested = np.asarray(qt.nested_scales, np.float32)[np.arange(q.size) // qt.nested_blocksize]
        product = (DYNAMIC_MAP_SIGNED[q] * nested).astype(np.float32)
        scales = (product + np.float32(np.asarray(qt.offset))).astype(np.float32)
    else:
        scales = np.asarray(qt.scales, np.float32).reshape(-1)
    values = (table[codes] * np.repeat(scales, qt.blocksize)[: qt.numel]).astype(np.float32)
    return values.astype(NP_DTYPES[dtype]).astype(np.float64).reshape(qt.shape)


def assert_product_close(actual, x, w, dtype: str, *, rounded_partials: bool = False):
    """``actual`` (rounded to ``dtype``) vs the float64 product ``x @ w``.

    Allowed: rounding the result to ``dtype`` (half an ulp: 2^-8 relative for bf16, 2^-11 for
    f16) plus float32 accumulation in any order (K * 2^-24 of sum |x||w|, with margin).
    ``rounded_partials``: the product is a sum of partial products each rounded to ``dtype``
    first (a tensor-parallel reduction), which adds up to half an ulp of sum |x||w|.
    """
    x = np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)
    expected = x @ w
    magnitude = np.abs(x) @ np.abs(w)
    half_ulp = {"bfloat16": 2.0**-8, "float16": 2.0**-11}[dtype]
    tol = half_ulp * np.abs(expected) + 4 * x.shape[-1] * 2.0**-24 * magnitude + 1e-30
    if rounded_partials:
        tol = tol + half_ulp * magnitude
    got = np.asarray(jnp.asarray(actual).astype(jnp.float32), np.float64)
    assert got.shape == expected.shape
    assert np.all(np.isfinite(got)), "non-finite output: a tile was not written (poisoned buffer)"
    bad = np.abs(got - expected) > tol
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} outputs off; worst at "
        f"{np.unravel_index(np.argmax(np.abs(got - expected) - tol), got.shape)}: "
        f"max |err| {np.max(np.abs(got - expected)):.3g} vs typical |y| {np.median(np.abs(expected)):.3g}"
    )


# (m, n, k, quant_type, blocksize, double_quant, dtype, tiles): shapes every matmul backend is
# tested at (each test module adds its own explicit-tile cases).
MATMUL_SHAPES = [
    (1, 80, 256, "nf4", 64, True, "bfloat16", None),  # decode, ragged N
    (3, 64, 512, "nf4", 64, False, "bfloat16", None),
    (16, 48, 256, "fp4", 128, True, "bfloat16", None),
    (128, 96, 128, "nf4", 64, True, "bfloat16", None),  # medium class, two M tiles
    (300, 64, 128, "nf4", 64, True, "bfloat16", None),  # prefill class, ragged M
    (5, 64, 256, "nf4", 256, True, "float16", None),
]


# (shape, quant_type, blocksize, double_quant, dtype, tiles): cases every dequantize kernel is
# tested at (each test module adds its own).
DEQUANT_CASES = [
    ((24, 256), "nf4", 64, True, "bfloat16", None),
    ((37, 128), "nf4", 64, False, "bfloat16", None),  # ragged rows
    ((2, 12, 256), "fp4", 128, True, "float16", None),  # leading dims flatten
    ((16, 512), "nf4", 256, True, "float32", DequantTiles(4, 64)),  # tile narrower than a block
    ((9, 64), "nf4", 32, True, "bfloat16", DequantTiles(8, 64)),  # two blocks per tile row
]


def matmul_case_id(case) -> str:
    """A readable pytest id for a MATMUL_SHAPES-style case."""
    m, n, k, qtype, bs, dq, dtype, tiles = case
    return f"m{m}-n{n}-k{k}-{qtype}-bs{bs}{'-dq' if dq else ''}-{dtype[:4]}{'-tiles' if tiles else ''}"
