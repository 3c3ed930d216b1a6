"""The grouped (MoE) 4-bit matmul kernels, run through the Pallas interpreter on CPU.

Against two references: the XLA path (:func:`qlora_jax.kernels.grouped_matmul_triton.reference`,
what ``backend="xla"`` runs) and, for the rows each expert owns, the float64 product of the
values rebuilt from the raw bytes (``kernel_refs``). Tiny shapes (the interpreter is slow): four
experts, one group empty and one holding every row, rows past the groups' sum (owned by no
expert, so zeros).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_refs import activations, assert_product_close, reference_values, weights
from qlora_jax.kernels import grouped_matmul_triton as grouped
from qlora_jax.kernels.ops import Target
from qlora_jax.kernels.tiles import MatmulTiles

from qlora_jax import kernels
from qlora_jax.models import moe
from qlora_jax.quant import quantize

E = 4
SPREAD = np.array([5, 0, 19, 9], np.int32)  # expert 1 empty
ALL_IN_ONE = np.array([0, 33, 0, 0], np.int32)  # every row to expert 1 (three row tiles of 16)
UNOWNED = 3  # rows after the groups' sum

# (quant_type, double_quant, blocksize, N, K, sizes, forward tiles, input-gradient tiles)
CASES = [
    # blocksize 32: 384 blocks per expert, two nested scales each (the per-expert nested index).
    ("nf4", True, 32, 96, 128, SPREAD, None, None),
    # several K-steps inside one block; the gradient steps through N in 16s.
    ("nf4", False, 128, 64, 128, ALL_IN_ONE, MatmulTiles(16, 32, 32), MatmulTiles(16, 64, 16)),
    ("fp4", True, 64, 48, 128, ALL_IN_ONE, None, None),  # ragged N tiles (48 of 32-wide)
    ("fp4", False, 64, 64, 128, SPREAD, MatmulTiles(32, 64, 64, lookup="select"), None),
]


def _case_id(case) -> str:
    qtype, dq, bs, n, k, sizes, tiles, _ = case
    return f"{qtype}{'-dq' if dq else ''}-bs{bs}-n{n}-k{k}-{'spread' if sizes is SPREAD else 'one'}" + (
        "-tiles" if tiles else "")


def _experts(rng, qtype, dq, bs, n, k):
    return moe.quantize_experts(weights(rng, (E, n, k)), qtype, blocksize=bs, double_quant=dq)


def _offsets(sizes):
    return jnp.asarray(np.cumsum(sizes) - sizes, jnp.int32)


def _close_to_reference(actual, expected, a, w_abs_product):
    """Kernel vs XLA path: the same bf16 operands and dequantized values, float32 sums in another order.

    Each output is its float32 sum S rounded once to bf16 (at most half an ulp, 2^-8 |S|, and
    |S| <= (1 + 2^-7) |output|); the bf16 x bf16 products are exact in float32, so the two sums
    differ by at most both accumulation errors, 2 * red * 2^-24 * sum |a||w| (red: the reduction
    length). So |kernel - xla| <= 2^-8 (1 + 2^-7) (|kernel| + |xla|) + 2 red 2^-24 sum |a||w|.
    """
    got = np.asarray(actual.astype(jnp.float32), np.float64)
    ref = np.asarray(expected.astype(jnp.float32), np.float64)
    red = np.asarray(a).shape[-1]
    tol = 2.0**-8 * (1 + 2.0**-7) * (np.abs(got) + np.abs(ref)) + 2 * red * 2.0**-24 * w_abs_product + 1e-30
    assert np.all(np.isfinite(got))
    bad = np.abs(got - ref) > tol
    assert not bad.any(), f"{bad.sum()} of {bad.size} differ; max |diff| {np.max(np.abs(got - ref)):.3g}"


def _per_expert_magnitude(a, sizes, w_abs, transpose):
    """sum |a_row| |W_g| per output, float64, for the rows of each expert (0 elsewhere)."""
    a = np.abs(np.asarray(jnp.asarray(a).astype(jnp.float32), np.float64))
    out = np.zeros((a.shape[0], w_abs.shape[2] if transpose else w_abs.shape[1]))
    start = 0
    for g, size in enumerate(sizes):
        wg = w_abs[g] if transpose else w_abs[g].T
        out[start:start + size] = a[start:start + size] @ wg
        start += size
    return out


def _check_against_float64(actual, a, sizes, w64, transpose):
    start = 0
    for g, size in enumerate(sizes):
        if size:
            assert_product_close(actual[start:start + size], a[start:start + size], w64[g] if transpose else w64[g].T,
                                 "bfloat16")
        start += size
    # Rows no expert owns are exact zeros (the kernel's output starts as a zero buffer).
    assert not np.any(np.asarray(actual[start:].astype(jnp.float32)))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_grouped_kernels_against_xla_reference_and_float64(rng, case):
    qtype, dq, bs, n, k, sizes, tiles, grad_tiles = case
    qt = _experts(rng, qtype, dq, bs, n, k)
    rows = int(sizes.sum()) + UNOWNED
    x = activations(rng, (rows, k), "bfloat16")
    dy = activations(rng, (rows, n), "bfloat16")
    group_sizes, offsets = jnp.asarray(sizes), _offsets(sizes)
    w64 = np.stack([reference_values(moe.expert_slice(qt, g), "bfloat16") for g in range(E)])

    y = grouped.grouped_fused_matmul(x, group_sizes, offsets, qt, tiles=tiles, interpret=True)
    assert y.dtype == jnp.bfloat16 and y.shape == (rows, n)
    _check_against_float64(y, x, sizes, w64, transpose=False)
    _close_to_reference(y, grouped.reference(x, group_sizes, offsets, qt), x,
                        _per_expert_magnitude(x, sizes, np.abs(w64), transpose=False))

    dx = grouped.grouped_fused_matmul_grad(dy, group_sizes, offsets, qt, tiles=grad_tiles, interpret=True)
    assert dx.dtype == jnp.bfloat16 and dx.shape == (rows, k)
    _check_against_float64(dx, dy, sizes, w64, transpose=True)
    _close_to_reference(dx, grouped.reference(dy, group_sizes, offsets, qt, transpose=True), dy,
                        _per_expert_magnitude(dy, sizes, np.abs(w64), transpose=True))


@pytest.mark.parametrize("qtype,dq,sizes", [("nf4", True, SPREAD), ("fp4", False, ALL_IN_ONE)],
                         ids=["nf4-dq-spread", "fp4-one"])
def test_jax_grad_through_moe_grouped_matmul_runs_the_kernels(rng, qtype, dq, sizes):
    """moe.grouped_matmul's custom VJP with the kernel forced vs with XLA forced: loss and dx."""
    n, k = 64, 128
    qt = _experts(rng, qtype, dq, 64, n, k)
    rows = int(sizes.sum()) + UNOWNED
    x = activations(rng, (rows, k), "bfloat16")
    c = jnp.asarray(rng.standard_normal((rows, n)), jnp.float32)
    group_sizes = jnp.asarray(sizes)

    def objective(backend):
        def loss(x):
            y = moe.grouped_matmul(x, group_sizes, qt, backend=backend, interpret=True)
            return jnp.sum(y.astype(jnp.float32) * c), y
        return jax.jit(jax.value_and_grad(loss, has_aux=True))

    (loss, y), dx = objective("pallas_triton")(x)
    (ref_loss, ref_y), ref_dx = objective("xla")(x)
    w64 = np.stack([reference_values(moe.expert_slice(qt, g), "bfloat16") for g in range(E)])
    w_abs = np.abs(w64)
    y_mag = _per_expert_magnitude(x, sizes, w_abs, transpose=False)
    _close_to_reference(y, ref_y, x, y_mag)
    # loss = sum c * y: each y within the bound above, so the losses within sum |c| * that bound,
    # plus each loss's own float32 sum of rows * n terms (rows * n * 2^-24 * sum |c y|, twice).
    y_abs = sum(np.abs(np.asarray(v.astype(jnp.float32), np.float64)) for v in (y, ref_y))
    c_abs = np.abs(np.asarray(c, np.float64))
    y_tol = 2.0**-8 * (1 + 2.0**-7) * y_abs + 2 * k * 2.0**-24 * y_mag
    assert abs(float(loss) - float(ref_loss)) <= np.sum(c_abs * y_tol) + rows * n * 2.0**-24 * np.sum(c_abs * y_abs)
    # The cotangent reaching the bf16 output is c rounded to bf16, the same for both backends.
    ct = c.astype(jnp.bfloat16)
    assert dx.dtype == jnp.bfloat16 and dx.shape == x.shape
    _close_to_reference(dx, ref_dx, ct, _per_expert_magnitude(ct, sizes, w_abs, transpose=True))
    assert not np.any(np.asarray(dx[int(sizes.sum()):].astype(jnp.float32)))  # unowned rows: no gradient
    _check_against_float64(dx, ct, sizes, w64, transpose=True)


H100 = Target("gpu", "cuda", (9, 0), 132)


def test_grouped_backend_rules_and_fallbacks(rng):
    nf4 = _experts(rng, "nf4", True, 64, 32, 128)
    bf16 = jnp.bfloat16
    resolve = kernels.resolve_grouped_backend
    assert resolve(nf4, dtype=bf16, rows=40)[0] == "xla"  # auto on this CPU
    assert resolve(nf4, dtype=bf16, rows=40, interpret=True)[0] == "pallas_triton"
    assert resolve(nf4, dtype=bf16, rows=4 * 64, target=H100)[0] == "pallas_triton"  # 64 rows per expert
    backend, reason = resolve(nf4, dtype=bf16, rows=4 * 64 + 1, target=H100)
    assert backend == "xla" and "65 rows per expert > 64" in reason
    backend, reason = resolve(nf4, dtype=jnp.float32, rows=40, backend="pallas_triton")
    assert backend == "xla" and "float32" in reason
    backend, reason = resolve(nf4, dtype=bf16, rows=0, backend="pallas_triton")
    assert backend == "xla" and "empty batch" in reason
    backend, reason = resolve(nf4, dtype=bf16, rows=40, backend="pallas_triton", expert_parallel=True)
    assert backend == "xla" and "expert parallelism" in reason
    int8 = moe.quantize_experts(weights(rng, (E, 32, 128)), "int8")
    backend, reason = resolve(int8, dtype=bf16, rows=40, backend="pallas_triton")
    assert backend == "xla" and "int8" in reason
    with pytest.raises(ValueError, match="unknown grouped-matmul backend 'jax_triton'"):
        resolve(nf4, dtype=bf16, rows=40, backend="jax_triton")

    # A fallback runs the XLA path: float32 activations give the reference's values exactly.
    sizes = jnp.asarray(SPREAD)
    x32 = jnp.asarray(rng.standard_normal((int(SPREAD.sum()), 128)), jnp.float32)
    y = kernels.grouped_quantized_matmul(x32, sizes, _offsets(SPREAD), nf4, backend="pallas_triton", interpret=True)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(grouped.reference(x32, sizes, _offsets(SPREAD), nf4)))


def test_grouped_bad_inputs_are_named(rng):
    nf4 = _experts(rng, "nf4", True, 64, 32, 128)
    x = jnp.zeros((8, 128), jnp.bfloat16)
    sizes, offsets = jnp.asarray([2, 2, 2, 2], jnp.int32), jnp.asarray([0, 2, 4, 6], jnp.int32)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*interpret=True"):
        kernels.grouped_quantized_matmul(x, sizes, offsets, nf4, backend="pallas_triton")
    with pytest.raises(ValueError, match=r"x must be \[rows, 128\]"):
        kernels.grouped_quantized_matmul(jnp.zeros((8, 64), jnp.bfloat16), sizes, offsets, nf4)
    with pytest.raises(ValueError, match=r"dy must be \[rows, 32\]"):
        kernels.grouped_quantized_matmul(x, sizes, offsets, nf4, transpose=True)
    with pytest.raises(ValueError, match=r"group_sizes must be \[4\]"):
        kernels.grouped_quantized_matmul(x, sizes[:3], offsets, nf4)
    with pytest.raises(TypeError, match="stacked qlora_jax.quant.QuantizedTensor"):
        kernels.grouped_quantized_matmul(x, sizes, offsets, jnp.zeros((4, 32, 128)))
    with pytest.raises(ValueError, match="leading expert axis"):
        kernels.grouped_quantized_matmul(x, sizes, offsets, quantize(weights(rng, (32, 128)), "nf4"))
    with pytest.raises(ValueError, match="no reduction split"):
        grouped.grouped_fused_matmul(x, sizes, offsets, nf4, tiles=MatmulTiles(16, 32, 64, split=2), interpret=True)
