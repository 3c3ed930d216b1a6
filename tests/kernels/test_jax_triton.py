"""The jax_triton backend: its Triton-language kernels through Triton's interpreter on CPU, against
float64 numpy; their real CUDA lowering (jax_triton compiles them to PTX, no GPU needed); and the
fused kernels per shard on 8 simulated CPU devices and in the CUDA lowering of a sharded train step.

The interpreter runs in a worker process started with TRITON_INTERPRET=1 (kernels/jax_triton/interpreter.py);
outputs start poisoned (NaN / 0xFF) so that an unwritten tile fails the comparison.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from kernel_refs import (
    DEQUANT_CASES,
    MATMUL_SHAPES,
    activations,
    assert_product_close,
    matmul_case_id,
    reference_values,
    weights,
)
from qlora_jax.kernels import lowering, support
from qlora_jax.kernels.jax_triton import ops as jt_ops
from qlora_jax.kernels.tiles import DequantTiles, MatmulTiles

from qlora_jax import kernels, synthetic
from qlora_jax.distributed import make_mesh, param_shardings, shard_tree
from qlora_jax.distributed.sharding import batch_sharding
from qlora_jax.lora import LoraConfig
from qlora_jax.model import init_lora_params
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.spec import ModelSpec
from qlora_jax.quant import QuantizedTensor, quantize
from qlora_jax.train import make_train_step

# (m, n, k, quant_type, blocksize, double_quant, dtype, tiles): the Pallas tests' shapes.
CASES = MATMUL_SHAPES + [
    (4, 40, 512, "nf4", 64, True, "bfloat16", MatmulTiles(16, 16, 64, split=4)),  # split reduction
    (7, 32, 256, "nf4", 128, False, "bfloat16", MatmulTiles(16, 32, 64, split=2)),  # step < block
]


@pytest.mark.parametrize("case", CASES, ids=matmul_case_id)
def test_forward_and_input_grad_in_the_interpreter(rng, case):
    m, n, k, qtype, bs, dq, dtype, tiles = case
    qt = quantize(weights(rng, (n, k)), qtype, blocksize=bs, double_quant=dq)
    w64 = reference_values(qt, dtype)
    x = activations(rng, (m, k), dtype)
    y = jt_ops.fused_matmul(x, qt, tiles=tiles, interpret=True, debug_poison_output=True)
    assert y.dtype == jnp.dtype(dtype) and y.shape == (m, n)
    assert_product_close(y, x, w64.T, dtype)
    dy = activations(rng, (m, n), dtype)
    if tiles is not None:  # the same shapes, transposed roles: block_out tiles K, block_red steps N
        tiles = MatmulTiles(tiles.block_m, min(tiles.block_red * 2, 128), tiles.block_out, tiles.split)
    dx = jt_ops.fused_matmul_grad(dy, qt, tiles=tiles, interpret=True, debug_poison_output=True)
    assert dx.dtype == jnp.dtype(dtype) and dx.shape == (m, k)
    assert_product_close(dx, dy, w64, dtype)


@pytest.mark.parametrize("shape,qtype,bs,dq,dtype,tiles", DEQUANT_CASES)
def test_dequantize_is_exact_in_the_interpreter(rng, shape, qtype, bs, dq, dtype, tiles):
    qt = quantize(weights(rng, shape), qtype, blocksize=bs, double_quant=dq)
    out = jt_ops.dequantize_kernel(qt, jnp.dtype(dtype), tiles=tiles, interpret=True, debug_poison_output=True)
    assert out.dtype == jnp.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32), np.float64), reference_values(qt, dtype))


@pytest.mark.parametrize("qtype", ["nf4", "fp4"])
@pytest.mark.parametrize("shape,bs,dtype,tiles", [
    ((17, 256), 64, np.float32, None),  # ragged rows, zero block
    ((8, 512), 128, jnp.bfloat16, DequantTiles(2, 256)),  # two blocks per tile row
    ((3, 64), 32, np.float16, None),
])
def test_quantize_bytes_match_bitsandbytes_cuda(rng, bnb_cuda_reference, qtype, shape, bs, dtype, tiles):
    w = weights(rng, shape, np.float32)
    w.reshape(-1)[:bs] = 0.0  # an all-zero block: NaN scaled values, code 0 in bitsandbytes' CUDA kernel
    w = jnp.asarray(w).astype(dtype)
    codes, absmax = jt_ops.quantize_blocks(w, qtype, blocksize=bs, tiles=tiles, interpret=True,
                                           debug_poison_output=True)
    bnb_codes, bnb_absmax = bnb_cuda_reference.quantize_4bit(np.asarray(w.astype(jnp.float32)), qtype, bs)
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1), bnb_codes)
    np.testing.assert_array_equal(np.asarray(absmax).reshape(-1), bnb_absmax)
    # Double quantization on top, and a block with an Inf and one with a NaN (NaN absmax, as the
    # reference quantizer decides for non-finite blocks), under jit where nothing checks them.
    w = w.reshape(-1).at[bs + 3].set(jnp.inf).at[-2].set(jnp.nan).reshape(w.shape)
    ours = jax.jit(lambda a: kernels.quantize_fused(a, qtype, blocksize=bs, backend="jax_triton", interpret=True))(w)
    expected = jax.jit(lambda a: quantize(a, qtype, blocksize=bs, double_quant=True, bnb_backend="cuda"))(w)
    for field in ("codes", "scales", "nested_scales", "offset"):
        np.testing.assert_array_equal(np.asarray(getattr(ours, field)), np.asarray(getattr(expected, field)))


def test_autotune_configs_are_valid_for_llama_shapes():
    for n, k in ((4096, 4096), (11008, 4096), (4096, 11008)):
        for m in (1, 16, 17, 100, 256, 4096):
            for t in jt_ops.matmul_configs(m, n, k, 132):
                assert (k // t.split) % t.block_red == 0 and t.block_red >= jt_ops.MIN_K_TILE
            grads = jt_ops.matmul_grad_configs(m, n, k, 132)
            for t in grads:
                assert k % t.block_out == 0 and t.block_out >= jt_ops.MIN_K_TILE
            assert len({t.split for t in grads}) == 1  # the split fixes the output shape
            assert grads[0].block_m == (16 if m <= 16 else 128 if m >= 256 else grads[0].block_m)
        assert all(k % t.block_cols == 0 for t in jt_ops.dequantize_configs(n, k))
        assert all(k % t.block_cols == 0 and t.block_cols >= 64 for t in jt_ops.quantize_configs(n, k, 64))


def test_support_rules_are_one_source():
    qt = quantize(weights(np.random.default_rng(0), (64, 96)), "nf4", blocksize=32)  # K = 96: no 64-wide K-tile
    problem = support.Problem.of_weight("matmul", qt, jnp.bfloat16, 4)
    assert support.unsupported_reason(problem, "pallas_triton") is None
    assert "K-tile" in support.unsupported_reason(problem, "jax_triton")
    assert kernels.resolve_backend("matmul", qt, dtype=jnp.bfloat16, m=4, backend="jax_triton")[0] == "xla"
    with pytest.raises(ValueError, match="jax_triton matmul kernel cannot take this problem"):
        jt_ops.fused_matmul(jnp.zeros((4, 96), jnp.bfloat16), qt, interpret=True)
    with pytest.raises(ValueError, match="'triton' is now 'pallas_triton'"):
        kernels.quantized_matmul(jnp.zeros((4, 96), jnp.bfloat16), qt, backend="triton")


# ------------------------------------------------------------------ CUDA lowering (no GPU)


def abstract_weight(n: int, k: int, blocksize: int = 64, double_quant: bool = True) -> QuantizedTensor:
    sds = jax.ShapeDtypeStruct
    return QuantizedTensor(
        codes=sds((n, k // 2), jnp.uint8), scales=sds((n, k // blocksize), jnp.uint8 if double_quant else jnp.float32),
        nested_scales=sds((-(-n * k // blocksize // 256),), jnp.float32) if double_quant else None,
        offset=sds((), jnp.float32) if double_quant else None, shape=(n, k), dtype="bfloat16", quant_type="nf4",
        blocksize=blocksize,
    )


def test_autotuned_forward_lowers_to_ptx_for_h100_without_fma():
    """Every configuration of the decode class compiles to sm_90 PTX; no multiply-add contracts."""
    qt = abstract_weight(11008, 4096)
    exported = lowering.export_for_cuda(lambda x, q: jt_ops.fused_matmul(x, q),
                                        jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16), qt)
    [call] = lowering.jax_triton_ptx(exported)
    assert call.count(b".target sm_90") == len(jt_ops.matmul_configs(1, 11008, 4096, 132)) > 1
    assert b"fma.rn.f32" not in call and b"mul.rn.f32" in call  # the double-quant product is rounded alone


@pytest.mark.parametrize("m", [16, 100, 4096])
@pytest.mark.parametrize("n,k", [(4096, 4096), (4096, 11008)])
def test_forward_and_grad_lower_per_size_class(m, n, k):
    qt = abstract_weight(n, k)
    with jt_ops.autotune_disabled():
        forward = lowering.export_for_cuda(lambda x, q: jt_ops.fused_matmul(x, q),
                                           jax.ShapeDtypeStruct((m, k), jnp.bfloat16), qt)
        backward = lowering.export_for_cuda(lambda dy, q: jt_ops.fused_matmul_grad(dy, q),
                                            jax.ShapeDtypeStruct((m, n), jnp.float16), qt, device=lowering.A100)
    for exported, target in ((forward, b".target sm_90"), (backward, b".target sm_80")):
        [call] = lowering.jax_triton_ptx(exported)
        assert target in call and b"fma.rn.f32" not in call


def test_dequantize_and_quantize_lower():
    qt = abstract_weight(11008, 4096)
    with jt_ops.autotune_disabled():
        deq = lowering.export_for_cuda(lambda q: jt_ops.dequantize_kernel(q, jnp.bfloat16), qt)
        quant = lowering.export_for_cuda(lambda w: kernels.quantize_fused(w, backend="jax_triton"),
                                         jax.ShapeDtypeStruct((4096, 11008), jnp.bfloat16))
    [deq_call] = lowering.jax_triton_ptx(deq)
    assert b"fma.rn.f32" not in deq_call and b"cvt.rn.bf16" in deq_call
    [quant_call] = lowering.jax_triton_ptx(quant)
    assert b"div.rn.f32" in quant_call  # the IEEE reciprocal, as bitsandbytes' CUDA kernel


def test_auto_picks_jax_triton_for_decode_on_an_abstract_h100():
    qt = abstract_weight(4096, 4096)
    with jt_ops.autotune_disabled():
        decode = lowering.export_for_cuda(lambda x, q: kernels.quantized_matmul(x, q),
                                          jax.ShapeDtypeStruct((4, 4096), jnp.bfloat16), qt)
    assert lowering.JAX_TRITON_TARGET in lowering.custom_call_targets(decode)


# ------------------------------------------------------------------ sharding (8 simulated CPU devices)


def _loss_and_grad(tensor_parallel: str, c: jax.Array):
    def loss(x, q):
        y = kernels.quantized_matmul(x, q, backend="jax_triton", interpret=True, tensor_parallel=tensor_parallel)
        return jnp.sum(y.astype(jnp.float32) * c), y

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _place(qt: QuantizedTensor, mesh, rows, cols, nested) -> QuantizedTensor:
    def put(a, spec):
        return jax.device_put(a, NamedSharding(mesh, spec))

    return QuantizedTensor(put(qt.codes, P(rows, cols)), put(qt.scales, P(rows, cols)),
                           put(qt.nested_scales, nested), put(qt.offset, P()), qt.shape, qt.dtype, qt.quant_type,
                           qt.blocksize, qt.nested_blocksize)


@pytest.mark.parametrize("mesh_spec,n,k,tensor_parallel", [
    ("fsdp=8", 256, 256, "column"),  # 32 rows x 4 scales per device: nested scales split with the rows
    ("fsdp=8", 64, 128, "column"),  # 8 rows x 2 scales: not a nested block; each device decodes its own
    ("data=2,fsdp=2,tensor=2", 128, 256, "column"),
    ("fsdp=4,tensor=2", 64, 256, "row"),  # the weight's input features split over `tensor`
])
def test_sharded_matmul_and_grad_equal_unsharded(rng, mesh_spec, n, k, tensor_parallel):
    mesh = make_mesh(mesh_spec)
    qt = quantize(weights(rng, (n, k)), "nf4", blocksize=64)
    x = activations(rng, (8, 2, k), "bfloat16")
    c = jnp.asarray(rng.standard_normal((8, 2, n)), jnp.float32)
    step = _loss_and_grad(tensor_parallel, c)
    (loss, y), dx = step(x, qt)
    if tensor_parallel == "column":
        sharded = shard_tree({"w": qt}, param_shardings({"w": qt}, mesh))["w"]
    else:
        sharded = _place(qt, mesh, "fsdp", "tensor", P())
    with jax.set_mesh(mesh):
        (loss_s, y_s), dx_s = step(jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))), sharded)
        text = step.lower(x, sharded).as_text()
    assert "sdy.manual_computation" in text or "shard_map" in text  # the kernel ran per shard
    w64 = reference_values(qt, "bfloat16")
    ct = c.astype(jnp.bfloat16).reshape(16, n)  # the cotangent reaching the bf16 output
    tensor = "tensor" in mesh_spec
    # Both runs against float64. The devices' partial sums over a split reduction (row-parallel
    # forward, column-parallel input gradient) are rounded to bf16 before they are added.
    for got, reduced in ((y, False), (y_s, tensor and tensor_parallel == "row")):
        assert_product_close(got.reshape(16, n), x.reshape(16, k), w64.T, "bfloat16", rounded_partials=reduced)
    for got, reduced in ((dx, False), (dx_s, tensor and tensor_parallel == "column")):
        assert_product_close(got.reshape(16, k), ct, w64, "bfloat16", rounded_partials=reduced)
    # The loss sums products of either sign, so it can cancel: bound the difference by the sum of
    # magnitudes (each bf16 output is within a few ulps, 2^-8 relative, of the other run's).
    magnitude = float(jnp.sum(jnp.abs(y.astype(jnp.float32) * c)))
    assert abs(float(loss_s) - float(loss)) <= 1e-2 * magnitude, (float(loss_s), float(loss), magnitude)


CONFIG = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.mark.slow
def test_sharded_train_step_lowers_to_our_kernels_for_cuda():
    """The train step over an abstract 2x2x2 mesh of H100s: "auto" picks the jax_triton kernels
    (the rows per device are few), each inside a shard_map body; no dequantize-then-dot."""
    base = synthetic.abstract_base(CONFIG)
    spec = ModelSpec(CONFIG, LoraConfig(r=8))
    lora = init_lora_params(jax.random.key(1), spec)
    sgd = optax.sgd(1.0)
    step = make_train_step(spec, sgd)
    shape = {"data": 2, "fsdp": 2, "tensor": 2}
    mesh = lowering.abstract_mesh(shape)

    def abstract(tree, shardings):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

    replicated = NamedSharding(mesh, P())
    batch = {k: jax.ShapeDtypeStruct((1, 4, 16), jnp.int32, sharding=batch_sharding(mesh))
             for k in ("input_ids", "attention_mask", "loss_mask")}
    opt_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                             jax.eval_shape(sgd.init, lora))
    with jt_ops.autotune_disabled():
        exported = lowering.export_for_cuda(lambda t, o, f, b: step(t, o, f, b, None),
                                            abstract(lora, param_shardings(lora, mesh)), opt_state,
                                            abstract(base, param_shardings(base, mesh)), batch, mesh_shape=shape)
    text = exported.mlir_module()
    assert lowering.custom_call_targets(exported) == {lowering.JAX_TRITON_TARGET}
    assert text.count(f"custom_call @{lowering.JAX_TRITON_TARGET}") >= 7  # forward and input gradients
    assert "sdy.manual_computation" in text and "all_gather" in text
