"""Mixture-of-experts block with 4-bit experts against transformers and bitsandbytes on CPU.

References (tests/oracles/hf_moe.py, the .venv-oracle environment):

* transformers 5's own ``MixtralSparseMoeBlock`` / ``Qwen3MoeSparseMoeBlock`` (eager experts) with
  random weights: router logits, top-k choices and weights, the block's float32 output;
* bitsandbytes 0.50's ``quantize_4bit`` on its CPU backend, expert matrix by expert matrix: the
  bytes, and the dequantized experts, on which transformers' block runs in float64 (the reference
  of our 4-bit block: bitsandbytes' Linear4bit computes ``x @ dequantize(W).T``, so float64 on the
  bnb-dequantized weights is that product without rounding);
* torch autograd in float64 through transformers' block with ``W + s * B @ A`` per expert: the
  gradients of the expert LoRA adapters;
* a tiny ``MixtralForCausalLM`` / ``Qwen3MoeForCausalLM`` with ``output_router_logits=True``:
  transformers' ``aux_loss`` from its router logits.

Tolerances: float32 results are compared with a float64 value; the error of a float32 chain of dot
products with inner dimensions n_1, n_2... is at most (n_1 + n_2 + ...) u times the same chain on
absolute values (Higham, "Accuracy and Stability of Numerical Algorithms", 3.1), u = 2^-24. The
block is the chain H (router / gate / up), I (down), k (combine), plus a few rounded element-wise
operations (softmax, silu, products): ``_bound`` computes that absolute-value chain in float64.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qlora_jax.models import moe
from qlora_jax.quant import dequantize

REPO = pathlib.Path(__file__).resolve().parents[2]
# I = 64, a whole block per row: bitsandbytes 0.50's CPU dequantize_4bit is wrong when the last
# dimension is shorter than the block (a [64, 32] NF4 weight dequantizes with errors of ~2, against
# ~0.45 for [32, 64]); our quantizer handles that layout (test_quant), the oracle cannot.
E, K, H, I, R = 4, 2, 64, 64, 4  # noqa: E741 - experts, top-k, hidden, expert intermediate, LoRA rank
U32 = 2.0 ** -24
B, S = 2, 6
LORA_SCALING = 2.0
MATRIX_SHAPES = {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}
CASES = {
    # name: (model_type, config, quant_type, double_quant)
    "mixtral": ("mixtral", dict(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K),
                "nf4", True),
    "qwen3_norm": ("qwen3_moe", dict(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                                     norm_topk_prob=True), "fp4", True),
    "qwen3_nonorm": ("qwen3_moe", dict(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                                       num_experts_per_tok=K, norm_topk_prob=False), "nf4", False),
}
AUX_MODEL = dict(vocab_size=97, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 max_position_embeddings=64)


def _config(name: str) -> moe.MoeConfig:
    model_type, config, _, _ = CASES[name]
    return moe.MoeConfig.from_hf_config({"model_type": model_type, **config})


@pytest.fixture(scope="module")
def hf(oracle, module_rng):
    """One oracle run: every block case and the two tiny causal LMs."""
    rng = module_rng
    arrays, cases = {}, []
    for i, (name, (model_type, config, quant_type, double_quant)) in enumerate(CASES.items()):
        arrays[f"{name}/x"] = rng.standard_normal((B, S, H)).astype(np.float32)
        arrays[f"{name}/cotangent"] = rng.standard_normal((B, S, H)).astype(np.float32)
        for m, (out, inp) in MATRIX_SHAPES.items():
            arrays[f"{name}/lora/{m}/lora_A"] = (rng.standard_normal((E, R, inp)) / np.sqrt(inp)).astype(np.float32)
            arrays[f"{name}/lora/{m}/lora_B"] = (0.3 * rng.standard_normal((E, out, R)) / np.sqrt(R)).astype(np.float32)
        cases.append(dict(name=name, op="block", model_type=model_type, config=config, seed=100 + i,
                          quant_type=quant_type, double_quant=double_quant, lora_scaling=LORA_SCALING))
    for name, model_type in (("aux_mixtral", "mixtral"), ("aux_qwen3", "qwen3_moe")):
        config = dict(CASES["mixtral" if model_type == "mixtral" else "qwen3_norm"][1], **AUX_MODEL)
        arrays[f"{name}/input_ids"] = rng.integers(0, AUX_MODEL["vocab_size"], (B, S)).astype(np.int64)
        if model_type == "mixtral":
            mask = np.ones((B, S), np.int64)
            mask[1, S - 2:] = 0
            arrays[f"{name}/attention_mask"] = mask
        cases.append(dict(name=name, op="model_aux", model_type=model_type, config=config, seed=7))
    out = oracle.run("hf_moe.py", arrays, {"cases": cases})
    return arrays, out


def _params(out: dict, name: str) -> dict:
    return {"gate": jnp.asarray(out[f"{name}/gate"]),
            "experts": {m: jnp.asarray(out[f"{name}/{m}"]) for m in moe.EXPERT_MATRICES}}


def _quantized(out: dict, name: str, bnb_offset: bool = True) -> dict:
    """The case's experts quantized by us; with ``bnb_offset``, given bitsandbytes' double-quant offsets."""
    _, _, quant_type, double_quant = CASES[name]
    params = _params(out, name)
    params["experts"] = {
        m: moe.quantize_experts(np.asarray(w), quant_type, double_quant=double_quant, bnb_backend="cpu",
                                offset=out[f"{name}/q/{m}/offset"] if double_quant and bnb_offset else None)
        for m, w in params["experts"].items()}
    return params


def _lora(arrays: dict, name: str) -> dict:
    return {m: {ab: jnp.asarray(arrays[f"{name}/lora/{m}/{ab}"]) for ab in ("lora_A", "lora_B")}
            for m in moe.EXPERT_MATRICES}


def _silu(v):
    return v / (1.0 + np.exp(-v))


def _reference(x, gate, mats, config, lora=None, scaling=1.0):
    """The block in float64 with numpy: dense over (token, chosen expert); also its absolute-value chain."""
    x = np.asarray(x, np.float64).reshape(-1, H)
    mats = {m: np.asarray(w, np.float64) for m, w in mats.items()}
    if lora:
        mats = {m: w + scaling * np.einsum("eor,eri->eoi", np.asarray(lora[m]["lora_B"], np.float64),
                                           np.asarray(lora[m]["lora_A"], np.float64)) for m, w in mats.items()}
    logits = x @ np.asarray(gate, np.float64).T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    index = np.argsort(-probs, axis=-1, kind="stable")[:, :config.top_k]
    weight = np.take_along_axis(probs, index, -1)
    if config.norm_topk_prob:
        weight = weight / weight.sum(-1, keepdims=True)
    out, bound = np.zeros_like(x), np.zeros_like(x)
    ax = np.abs(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(index[t]):
            g, u = mats["gate_proj"][e] @ x[t], mats["up_proj"][e] @ x[t]
            out[t] += weight[t, j] * (mats["down_proj"][e] @ (_silu(g) * u))
            ag, au = np.abs(mats["gate_proj"][e]) @ ax[t], np.abs(mats["up_proj"][e]) @ ax[t]
            bound[t] += abs(weight[t, j]) * (np.abs(mats["down_proj"][e]) @ (ag * au))
    return out.reshape(-1, H), index, weight, bound


def _tolerance(bound: np.ndarray) -> np.ndarray:
    """(H + I + k + 16) u times the absolute-value chain (module docstring; 16 covers the element-wise ops)."""
    return (H + I + K + 16) * U32 * bound


# ------------------------------------------------------------------------------------------ routing and forward


@pytest.mark.parametrize("name", list(CASES))
def test_router_choices_and_weights_equal_transformers(hf, name):
    arrays, out = hf
    config = _config(name)
    x = jnp.asarray(arrays[f"{name}/x"]).reshape(-1, H)
    logits, weight, index = moe.route(x, jnp.asarray(out[f"{name}/gate"]), config)
    np.testing.assert_array_equal(np.asarray(index), out[f"{name}/top_k_index"])
    # Logits: one dot product of length H; weights: a float32 softmax (a few u) and one division.
    bound = np.abs(arrays[f"{name}/x"].reshape(-1, H)) @ np.abs(out[f"{name}/gate"]).T
    np.testing.assert_allclose(np.asarray(logits), out[f"{name}/router_logits"], rtol=0, atol=H * U32 * bound.max())
    np.testing.assert_allclose(np.asarray(weight), out[f"{name}/top_k_weights"], rtol=16 * U32 + H * U32 * bound.max(),
                               atol=0)
    assert weight.dtype == jnp.float32
    if not config.norm_topk_prob:
        assert np.all(np.asarray(weight).sum(-1) < 1.0)  # Qwen3 without renormalisation keeps raw probabilities


@pytest.mark.parametrize("name", list(CASES))
def test_float32_block_equals_transformers(hf, name):
    arrays, out = hf
    config = _config(name)
    params = _params(out, name)
    result = moe.moe_block(params, jnp.asarray(arrays[f"{name}/x"]), config)
    ref, index, _, bound = _reference(arrays[f"{name}/x"], out[f"{name}/gate"],
                                      {m: out[f"{name}/{m}"] for m in moe.EXPERT_MATRICES}, config)
    np.testing.assert_array_equal(index, out[f"{name}/top_k_index"])  # the float64 reference routes alike
    ours = np.asarray(result.hidden).reshape(-1, H)
    theirs = out[f"{name}/out"].reshape(-1, H)
    tol = _tolerance(bound)
    assert np.all(np.abs(theirs - ref) <= tol), "transformers' float32 block is outside the bound itself"
    assert np.all(np.abs(ours - ref) <= tol)
    assert np.all(np.abs(ours - theirs) <= 2 * tol)
    assert result.hidden.shape == (B, S, H) and result.hidden.dtype == jnp.float32
    assert result.router_logits.shape == (B * S, E)


@pytest.mark.parametrize("name", list(CASES))
def test_bfloat16_block_equals_transformers(hf, name):
    """Both sides round the same bfloat16 inputs and weights, then ~6 times in the chain (gate, up, silu,
    product, down, the weighted cast, the sum), each time by at most 2^-8 of a value bounded by the
    absolute-value chain: each side is within 8 * 2^-8 of that bound from the float64 result."""
    arrays, out = hf
    config = _config(name)
    x = jnp.asarray(arrays[f"{name}/x"]).astype(jnp.bfloat16)
    result = moe.moe_block(_params(out, name), x, config)
    assert result.hidden.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(result.expert_index), out[f"{name}/top_k_index_bf16"])
    bf = lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float64)  # noqa: E731
    mats = {m: bf(out[f"{name}/{m}"]) for m in moe.EXPERT_MATRICES}
    ref, _, _, bound = _reference(bf(x), bf(out[f"{name}/gate"]), mats, config)
    tol = 8 * 2.0 ** -8 * bound
    assert np.all(np.abs(out[f"{name}/out_bf16"].reshape(-1, H) - ref) <= tol)
    assert np.all(np.abs(np.asarray(result.hidden, np.float64).reshape(-1, H) - ref) <= tol)


@pytest.mark.parametrize("name", list(CASES))
def test_expert_bytes_identical_to_bitsandbytes(hf, name):
    """Per expert: our offset within 2 ulps of bitsandbytes' torch.mean (test_bnb_exactness's contract);
    given bitsandbytes' offsets, every byte and float identical."""
    _, out = hf
    _, _, _, double_quant = CASES[name]
    if double_quant:
        own = _quantized(out, name, bnb_offset=False)
        for m in moe.EXPERT_MATRICES:
            ours = np.asarray(own["experts"][m].offset).view(np.int32).astype(np.int64)
            theirs = out[f"{name}/q/{m}/offset"].view(np.int32).astype(np.int64)
            assert np.all(np.abs(ours - theirs) <= 2), m
    params = _quantized(out, name)
    for m in moe.EXPERT_MATRICES:
        qt = params["experts"][m]
        assert qt.shape == MATRIX_SHAPES[m] and qt.codes.shape[0] == E
        np.testing.assert_array_equal(np.asarray(qt.codes).reshape(E, -1), out[f"{name}/q/{m}/packed"])
        if double_quant:
            np.testing.assert_array_equal(np.asarray(qt.scales).reshape(E, -1), out[f"{name}/q/{m}/absmax"])
            np.testing.assert_array_equal(np.asarray(qt.nested_scales), out[f"{name}/q/{m}/nested_absmax"])
            np.testing.assert_array_equal(np.asarray(qt.offset), out[f"{name}/q/{m}/offset"])
        else:
            np.testing.assert_array_equal(np.asarray(qt.scales).reshape(E, -1), out[f"{name}/q/{m}/absmax"])
        # One expert at a time dequantizes to bitsandbytes' values exactly.
        for e in range(E):
            np.testing.assert_array_equal(np.asarray(dequantize(moe.expert_slice(qt, e), jnp.float32)),
                                          out[f"{name}/q/{m}/dequantized"][e])


@pytest.mark.parametrize("name", list(CASES))
def test_4bit_block_equals_float64_on_bitsandbytes_dequantized_experts(hf, name):
    arrays, out = hf
    config = _config(name)
    result = moe.moe_block(_quantized(out, name), jnp.asarray(arrays[f"{name}/x"]), config)
    deq = {m: out[f"{name}/q/{m}/dequantized"] for m in moe.EXPERT_MATRICES}
    ref, _, _, bound = _reference(arrays[f"{name}/x"], out[f"{name}/gate"], deq, config)
    # transformers' float64 block still takes a float32 softmax in its router (Mixtral: .float()).
    np.testing.assert_allclose(ref, out[f"{name}/out_q64"].reshape(-1, H), rtol=0, atol=16 * U32 * bound.max())
    assert np.all(np.abs(np.asarray(result.hidden).reshape(-1, H) - out[f"{name}/out_q64"].reshape(-1, H))
                  <= _tolerance(bound))


@pytest.mark.parametrize("name", list(CASES))
def test_expert_lora_gradients_equal_float64_autograd(hf, name):
    """d sum(out * c) / d(lora_A, lora_B) of every expert matrix, 4-bit experts, against torch float64."""
    arrays, out = hf
    config = _config(name)
    params = _quantized(out, name)
    x, cot = jnp.asarray(arrays[f"{name}/x"]), jnp.asarray(arrays[f"{name}/cotangent"])

    def objective(lora):
        y = moe.moe_block(params, x, config, lora=lora, lora_scaling=LORA_SCALING).hidden
        return jnp.sum(y * cot)

    value, grads = jax.jit(jax.value_and_grad(objective))(_lora(arrays, name))
    np.testing.assert_allclose(float(value), float(np.sum(out[f"{name}/out_lora64"] * arrays[f"{name}/cotangent"])),
                               rtol=(H + I + K + 16 + B * S * H) * U32)
    # Norm-wise: each gradient is a chain of products of inner dimensions <= H + I + T*k; its
    # relative error in the Frobenius norm is bounded by that many u (the inputs are well scaled).
    n = H + I + B * S * K + 16
    for m in moe.EXPERT_MATRICES:
        for ab in ("lora_A", "lora_B"):
            ref = out[f"{name}/grad/{m}/{ab}"]
            ours = np.asarray(grads[m][ab], np.float64)
            assert ours.shape == ref.shape
            assert np.linalg.norm(ours - ref) <= n * U32 * np.linalg.norm(ref) + 1e-30, (m, ab)


def test_frozen_experts_get_no_gradient_and_the_input_gradient_uses_dequantized_weights(hf):
    arrays, out = hf
    config = _config("mixtral")
    params = _quantized(out, "mixtral")
    deq = {"gate": params["gate"],
           "experts": {m: jnp.asarray(out[f"mixtral/q/{m}/dequantized"]) for m in moe.EXPERT_MATRICES}}
    x, cot = jnp.asarray(arrays["mixtral/x"]), jnp.asarray(arrays["mixtral/cotangent"])

    def objective(p, x):
        return jnp.sum(moe.moe_block(p, x, config).hidden * cot)

    gp, gx = jax.grad(objective, argnums=(0, 1), allow_int=True)(params, x)
    _, gx_dense = jax.grad(objective, argnums=(0, 1))(deq, x)
    for m in moe.EXPERT_MATRICES:
        qt = gp["experts"][m]
        for leaf in jax.tree.leaves(qt):
            assert leaf.dtype == jax.dtypes.float0 or not np.any(np.asarray(leaf))
    # The same float32 arithmetic on the same (dequantized) values, summed in another order.
    dense_bound = np.abs(np.asarray(gx_dense)).max()
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_dense), rtol=0, atol=(H + I + 16) * U32 * 8 * dense_bound)


# ------------------------------------------------------------------------------------------ auxiliary loss


@pytest.mark.parametrize("name,model_type", [("aux_mixtral", "mixtral"), ("aux_qwen3", "qwen3_moe")])
def test_aux_loss_equals_transformers(hf, name, model_type):
    arrays, out = hf
    logits = [jnp.asarray(layer) for layer in out[f"{name}/router_logits"]]
    mask = arrays.get(f"{name}/attention_mask")
    config = moe.MoeConfig(E, K, routing=model_type, router_aux_loss_coef=0.02)
    term, aux = moe.aux_loss_term(logits, config, None if mask is None else jnp.asarray(mask))
    # Sums of at most L*T*k ones (exact) and L*T probabilities (a float32 softmax each).
    rows = len(logits) * B * S
    np.testing.assert_allclose(float(aux), float(out[f"{name}/aux_loss"]), rtol=(rows + 16) * U32)
    assert float(term) == pytest.approx(0.02 * float(aux), rel=2 * U32)
    if mask is not None:  # the mask matters: without it the loss differs
        unmasked = moe.load_balancing_loss(logits, E, K)
        assert float(unmasked) != pytest.approx(float(aux), rel=1e-4)


# ------------------------------------------------------------------------------------------ load extremes


def test_one_expert_idle_another_takes_every_token(rng):
    """Expert 0 is in every token's top 2, expert 3 in none; 4-bit and float experts against float64."""
    config = moe.MoeConfig(E, K, routing="qwen3_moe", norm_topk_prob=True)
    x = np.abs(rng.standard_normal((B, S, H))).astype(np.float32) + 0.1  # positive: the sign of the logits is known
    gate = 0.05 * rng.standard_normal((E, H))
    gate[0] += 1.0
    gate[3] -= 1.0
    gate = gate.astype(np.float32)
    mats = {m: (rng.standard_normal((E, *shape)) / np.sqrt(shape[1])).astype(np.float32)
            for m, shape in MATRIX_SHAPES.items()}
    lora = {m: {"lora_A": jnp.asarray(rng.standard_normal((E, R, shape[1])) / np.sqrt(shape[1]), jnp.float32),
                "lora_B": jnp.asarray(0.2 * rng.standard_normal((E, shape[0], R)), jnp.float32)}
            for m, shape in MATRIX_SHAPES.items()}
    quantized = {m: moe.quantize_experts(w) for m, w in mats.items()}
    deq = {m: np.stack([np.asarray(dequantize(moe.expert_slice(q, e), jnp.float32)) for e in range(E)])
           for m, q in quantized.items()}
    for experts, ref_mats in ((quantized, deq), ({m: jnp.asarray(w) for m, w in mats.items()}, mats)):
        params = {"gate": jnp.asarray(gate), "experts": experts}
        result = moe.moe_block(params, jnp.asarray(x), config, lora=lora, lora_scaling=LORA_SCALING)
        counts = np.bincount(np.asarray(result.expert_index).reshape(-1), minlength=E)
        assert counts[0] == B * S and counts[3] == 0 and counts.sum() == B * S * K
        ref, index, _, bound = _reference(x, gate, ref_mats, config, lora=lora, scaling=LORA_SCALING)
        np.testing.assert_array_equal(np.asarray(result.expert_index), index)
        assert np.all(np.abs(np.asarray(result.hidden).reshape(-1, H) - ref) <= _tolerance(bound) * 4)

        def objective(lora, params=params):
            return jnp.sum(moe.moe_block(params, jnp.asarray(x), config, lora=lora,
                                         lora_scaling=LORA_SCALING).hidden ** 2)

        grads = jax.grad(objective)(lora)
        for m in moe.EXPERT_MATRICES:
            assert not np.any(np.asarray(grads[m]["lora_A"][3]))  # the idle expert learns nothing
            assert not np.any(np.asarray(grads[m]["lora_B"][3]))
            assert np.all(np.isfinite(np.asarray(grads[m]["lora_A"])))
            assert np.any(np.asarray(grads[m]["lora_B"][0]))


@pytest.mark.parametrize("tile_rows", [1, 3, 8, 64])
def test_grouped_matmul_any_tile_equals_per_expert_products(rng, tile_rows):
    """Groups of sizes 0, 5, 1 and 14 (one empty), tiles smaller and larger than the groups."""
    sizes = np.array([0, 5, 1, 14], np.int32)
    x = rng.standard_normal((int(sizes.sum()), H)).astype(np.float32)
    w = (rng.standard_normal((E, I, H)) / 8).astype(np.float32)
    qt = moe.quantize_experts(w, "nf4")
    y = np.asarray(moe.grouped_matmul(jnp.asarray(x), jnp.asarray(sizes), qt, tile_rows=tile_rows))
    start = 0
    for e, size in enumerate(sizes):
        we = np.asarray(dequantize(moe.expert_slice(qt, e), jnp.float32), np.float64)
        rows = x[start:start + size].astype(np.float64)
        np.testing.assert_allclose(y[start:start + size], rows @ we.T, rtol=0,
                                   atol=H * U32 * (np.abs(rows) @ np.abs(we).T).max(initial=0.0))
        start += size


# ------------------------------------------------------------------------------------------ expert parallelism


@pytest.mark.parametrize("devices", [2, 4])
def test_expert_axis_sharding_equals_single_device(hf, devices):
    """Experts split over an `expert` mesh axis (shard_map, one psum) against one device: the same sums,
    up to the order XLA picks for the split ragged_dot."""
    arrays, out = hf
    config = _config("mixtral")
    params = _quantized(out, "mixtral")
    lora = _lora(arrays, "mixtral")
    x, cot = jnp.asarray(arrays["mixtral/x"]), jnp.asarray(arrays["mixtral/cotangent"])
    mesh = Mesh(np.array(jax.devices()[:devices]), ("expert",))

    def step(params, lora, x, mesh=None):
        def objective(lora):
            y = moe.moe_block(params, x, config, lora=lora, lora_scaling=LORA_SCALING, mesh=mesh).hidden
            return jnp.sum(y * cot), y
        return jax.value_and_grad(objective, has_aux=True)(lora)

    (value, y), grads = jax.jit(step)(params, lora, x)
    sharded_params = jax.device_put(params, moe.expert_shardings(params, mesh))
    sharded_lora = jax.device_put(lora, moe.expert_shardings(lora, mesh))
    assert sharded_params["experts"]["gate_proj"].codes.sharding.spec == P("expert")
    assert sharded_params["gate"].sharding.spec == P()
    assert sharded_lora["up_proj"]["lora_A"].sharding.spec == P("expert")
    (s_value, s_y), s_grads = jax.jit(functools.partial(step, mesh=mesh))(
        sharded_params, sharded_lora, jax.device_put(x, NamedSharding(mesh, P())))
    # Every row is computed on one device (the others add exact zeros); XLA may still order a split
    # ragged_dot's sums differently: at most the H + I terms of one row's chain reordered.
    np.testing.assert_allclose(np.asarray(s_y), np.asarray(y), rtol=0, atol=(H + I) * U32 * np.abs(np.asarray(y)).max())
    assert float(s_value) == pytest.approx(float(value), rel=(B * S * H + H + I) * U32)
    for m in moe.EXPERT_MATRICES:
        for ab in ("lora_A", "lora_B"):
            ours, ref = np.asarray(s_grads[m][ab]), np.asarray(grads[m][ab])
            # Sums over at most T*k rows and H or I columns: (T*k + H + I) u of the absolute sum.
            scale = np.abs(ref).max()
            np.testing.assert_allclose(ours, ref, rtol=0, atol=(B * S * K + H + I) * U32 * scale)
    six = _good_params(np.random.default_rng(0), e=6)
    with pytest.raises(moe.MoeError, match="num_experts = 6 is not divisible by the 'expert' mesh axis"):
        moe.moe_block(six, x, moe.MoeConfig(6, 2), mesh=Mesh(np.array(jax.devices()[:4]), ("expert",)))


@pytest.mark.parametrize("devices", [2, 4])
def test_expert_axis_with_lora_dropout_equals_single_device(rng, devices):
    """LoRA dropout under expert parallelism: every device draws the whole (token, expert) row mask
    from the replicated key and keeps its own experts' rows, so the forward and the adapters'
    gradients equal the single-device ones with the same key (up to the reordering below)."""
    config = moe.MoeConfig(E, K)
    def experts(shape):
        return (rng.standard_normal((E, *shape)) / np.sqrt(shape[1])).astype(np.float32)

    params = {"gate": jnp.asarray(rng.standard_normal((E, H)), jnp.float32),
              "experts": {m: moe.quantize_experts(experts(shape), "nf4", bnb_backend="cpu")
                          for m, shape in MATRIX_SHAPES.items()}}
    lora = {m: {"lora_A": jnp.asarray(rng.standard_normal((E, R, shape[1])) / np.sqrt(shape[1]), jnp.float32),
                "lora_B": jnp.asarray(rng.standard_normal((E, shape[0], R)) / np.sqrt(R), jnp.float32)}
            for m, shape in MATRIX_SHAPES.items()}
    x = jnp.asarray(rng.standard_normal((B, S, H)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((B, S, H)), jnp.float32)
    key = jax.random.key(3)
    mesh = Mesh(np.array(jax.devices()[:devices]), ("expert",))

    def step(params, lora, x, key, rate, mesh=None):
        def objective(lora):
            y = moe.moe_block(params, x, config, lora=lora, lora_scaling=LORA_SCALING, mesh=mesh,
                              dropout_rate=rate, dropout_key=key).hidden
            return jnp.sum(y * cot), y
        return jax.value_and_grad(objective, has_aux=True)(lora)

    (value, y), grads = jax.jit(step, static_argnums=4)(params, lora, x, key, 0.3)
    (_, y_plain), _ = jax.jit(step, static_argnums=4)(params, lora, x, key, 0.0)
    replicated = NamedSharding(mesh, P())
    (s_value, s_y), s_grads = jax.jit(functools.partial(step, mesh=mesh), static_argnums=4)(
        jax.device_put(params, moe.expert_shardings(params, mesh)),
        jax.device_put(lora, moe.expert_shardings(lora, mesh)),
        jax.device_put(x, replicated), jax.device_put(key, replicated), 0.3)
    # Same bounds as test_expert_axis_sharding_equals_single_device: each row is computed on one
    # device with the same mask, so only XLA's order of a split ragged_dot's sums may differ (the
    # H + I terms of one row's chain; for the gradients, sums over T*k rows and H or I columns).
    atol = (H + I) * U32 * np.abs(np.asarray(y)).max()
    np.testing.assert_allclose(np.asarray(s_y), np.asarray(y), rtol=0, atol=atol)
    # The dropout did act (on both paths): the adapters' share of the output moved far beyond that bound.
    assert np.abs(np.asarray(y) - np.asarray(y_plain)).max() > 1e3 * atol
    assert float(s_value) == pytest.approx(float(value), rel=(B * S * H + H + I) * U32)
    for m in moe.EXPERT_MATRICES:
        for ab in ("lora_A", "lora_B"):
            ref = np.asarray(grads[m][ab])
            np.testing.assert_allclose(np.asarray(s_grads[m][ab]), ref, rtol=0,
                                       atol=(B * S * K + H + I) * U32 * np.abs(ref).max())


# ------------------------------------------------------------------------------------------ Hugging Face names


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe"])
def test_stack_hf_experts_from_saved_folder_and_fused_layout(oracle, tmp_path, model_type):
    """The per-expert tensors save_pretrained writes, and transformers 5's fused parameters, stack to the
    module's own expert tensors exactly."""
    from safetensors.numpy import load_file

    name = CASES["mixtral" if model_type == "mixtral" else "qwen3_norm"]
    config = dict(name[1], **AUX_MODEL)
    out = oracle.run("hf_moe.py", {}, {"cases": [dict(name="m", op="save_model", model_type=model_type,
                                                      config=config, seed=3, dir=str(tmp_path))]})
    tensors = load_file(tmp_path / "model.safetensors")
    moe_config = moe.MoeConfig.from_hf_config({"model_type": model_type, **config})
    expected = {"gate_proj": out["m/gate_up_proj"][:, :I], "up_proj": out["m/gate_up_proj"][:, I:],
                "down_proj": out["m/down_proj"]}
    fused = {"model.layers.0.mlp.gate.weight": out["m/gate"],
             "model.layers.0.mlp.experts.gate_up_proj": out["m/gate_up_proj"],
             "model.layers.0.mlp.experts.down_proj": out["m/down_proj"]}
    for source in (tensors, fused):
        params = moe.stack_hf_experts(source, "model.layers.0", moe_config)
        np.testing.assert_array_equal(params["gate"], out["m/gate"])
        for m in moe.EXPERT_MATRICES:
            np.testing.assert_array_equal(params["experts"][m], expected[m])
    # A missing expert tensor, and a config with fewer experts than the files hold.
    block, theirs = ("block_sparse_moe", "w3") if model_type == "mixtral" else ("mlp", "up_proj")
    missing = dict(tensors)
    del missing[f"model.layers.0.{block}.experts.2.{theirs}.weight"]
    with pytest.raises(moe.MoeError, match=rf"'model\.layers\.0\.{block}\.experts\.2\.{theirs}\.weight' is missing"):
        moe.stack_hf_experts(missing, "model.layers.0", moe_config)
    fewer = dataclasses.replace(moe_config, num_experts=3)
    with pytest.raises(moe.MoeError, match=r"experts\.3\.\w+\.weight' exists but num_experts = 3"):
        moe.stack_hf_experts(tensors, "model.layers.0", fewer)
    with pytest.raises(moe.MoeError, match=r"router 'gate' has 4 rows \(experts\) but num_experts = 3"):
        moe.stack_hf_experts(fused, "model.layers.0", fewer)


# ------------------------------------------------------------------------------------------ bad input


def _good_params(rng, e=E, h=H, i=I):
    return {"gate": jnp.asarray(rng.standard_normal((e, h)), jnp.float32),
            "experts": {"gate_proj": jnp.zeros((e, i, h)), "up_proj": jnp.zeros((e, i, h)),
                        "down_proj": jnp.zeros((e, h, i))}}


def test_bad_input_errors_name_the_tensor_or_field(rng):
    x = jnp.zeros((1, 3, H), jnp.float32)
    config = moe.MoeConfig(E, K)
    with pytest.raises(moe.MoeError, match="top_k"):
        moe.MoeConfig(E, E + 1)
    with pytest.raises(moe.MoeError, match="norm_topk_prob"):
        moe.MoeConfig(E, K, routing="mixtral", norm_topk_prob=False)
    with pytest.raises(moe.MoeError, match="num_local_experts"):
        moe.MoeConfig.from_hf_config({"model_type": "mixtral", "num_experts_per_tok": 2})
    # Expert count of the tensors disagrees with the config.
    params = _good_params(rng)
    params["experts"]["up_proj"] = jnp.zeros((E - 1, I, H))
    with pytest.raises(moe.MoeError, match=r"experts\.up_proj.*3 experts.*num_experts = 4"):
        moe.moe_block(params, x, config)
    # Quantized experts: the stacked expert axis is checked too.
    params = _good_params(rng)
    params["experts"]["down_proj"] = moe.quantize_experts(np.zeros((E + 1, H, I), np.float32))
    with pytest.raises(moe.MoeError, match=r"experts\.down_proj.*5 experts"):
        moe.moe_block(params, x, config)
    # top_k larger than the experts the tensors hold (config from a wrong config.json).
    with pytest.raises(moe.MoeError, match="gate.*2 rows"):
        moe.moe_block(_good_params(rng, e=2), x, moe.MoeConfig(E, 3))
    # Router of the wrong shape.
    params = _good_params(rng)
    params["gate"] = jnp.zeros((E, H // 2))
    with pytest.raises(moe.MoeError, match=r"router 'gate' is \[4, 32\] but the hidden size is 64"):
        moe.moe_block(params, x, config)
    params["gate"] = jnp.zeros((E, H, 1))
    with pytest.raises(moe.MoeError, match=r"router 'gate' has shape \[4, 64, 1\]"):
        moe.moe_block(params, x, config)
    # A missing expert tensor; an expert matrix of the wrong per-expert shape.
    params = _good_params(rng)
    del params["experts"]["gate_proj"]
    with pytest.raises(moe.MoeError, match=r"'experts\.gate_proj' is missing"):
        moe.moe_block(params, x, config)
    params = _good_params(rng)
    params["experts"]["down_proj"] = jnp.zeros((E, H, I + 2))
    with pytest.raises(moe.MoeError, match=rf"experts\.down_proj.*\[{H}, {I + 2}\]; expected \[{H}, {I}\]"):
        moe.moe_block(params, x, config)
    # LoRA of the wrong shape; a router logits list of the wrong width.
    lora = moe.init_expert_lora(jax.random.key(0), _good_params(rng), R)
    lora["up_proj"]["lora_B"] = jnp.zeros((E, I + 1, R))
    with pytest.raises(moe.MoeError, match=r"experts\.up_proj"):
        moe.moe_block(_good_params(rng), x, config, lora=lora)
    with pytest.raises(moe.MoeError, match=r"router_logits\[0\]"):
        moe.load_balancing_loss([jnp.zeros((3, E + 1))], E, K)


def test_peft_initialisation_of_expert_adapters(rng):
    lora = moe.init_expert_lora(jax.random.key(1), _good_params(rng), R, targets=("gate_proj", "down_proj"))
    assert set(lora) == {"gate_proj", "down_proj"}
    assert lora["gate_proj"]["lora_A"].shape == (E, R, H) and lora["down_proj"]["lora_B"].shape == (E, H, R)
    assert not np.any(np.asarray(lora["down_proj"]["lora_B"]))  # B = 0: a fresh adapter changes nothing
    a = np.asarray(lora["down_proj"]["lora_A"])
    assert np.abs(a).max() <= 1 / np.sqrt(I) and np.abs(a).max() > 0.8 / np.sqrt(I)  # kaiming_uniform(a=sqrt(5))


# ------------------------------------------------------------------------------------------ benchmark


@pytest.mark.slow
def test_bench_moe_smoke(tmp_path):
    out = tmp_path / "bench_moe.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    subprocess.run([sys.executable, "-m", "experiments.bench_moe", "--smoke", f"--json={out}"], cwd=REPO,
                   check=True, env=env, timeout=900)
    report = json.loads(out.read_text())
    assert {row["variant"] for row in report["rows"]} == {"grouped_4bit", "per_expert_loop", "dequantize_all"}
    for row in report["rows"]:
        assert row["seconds"] > 0
        assert row["peak_bytes"] is None or row["peak_bytes"] > 0
        assert row["max_abs_diff_vs_grouped"] <= row["tolerance"]
    assert report["shapes"]["num_experts"] >= 4
    assert report["grouped_backend"][0] == "xla"  # "auto" on CPU: the grouped kernel needs a CUDA GPU
