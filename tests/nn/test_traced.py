"""apply_qlora by what each weight does (a traced forward pass): third-party NNX LLMs and in-repo patterns.

The third-party models are google-tunix's Llama3 and Qwen3 (installed from the package index with
--no-deps, requirements/thirdparty.txt; only their model modules are imported, as the package's
__init__ pulls in trainers and hub clients). The reference for every conversion is the model's
own code run on plain weights equal to ``dequant(W) + scaling * B @ A`` (float32), which shares
nothing with the rewritten forward pass but the model file.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qlora_jax.lora import LoraConfig
from qlora_jax.nn import QLoRAConversionError, QLoRARule, apply_qlora
from qlora_jax.nn.dataflow import dequantize_stacked
from qlora_jax.nn.traced import PackedWeight, QLoRAWeight, adapter_names
from qlora_jax.quant import dequantize

SEED = 20261206


def _tunix_models():
    if "tunix" not in sys.modules:
        spec = importlib.util.find_spec("tunix")
        if spec is None:
            pytest.fail("google-tunix is not installed (scripts/setup_venv.sh installs requirements/thirdparty.txt)")
        # tunix/__init__.py imports its trainers (grain, datasets, hub clients): load the model modules alone.
        pkg = types.ModuleType("tunix")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["tunix"] = pkg
    from tunix.models.llama3 import model as llama3
    from tunix.models.qwen3 import model as qwen3

    return llama3, qwen3


def _llama3(tied: bool = False):
    llama3, _ = _tunix_models()
    cfg = llama3.ModelConfig(num_layers=2, vocab_size=128, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16,
                             num_kv_heads=2, rope_theta=10000, norm_eps=1e-5, weight_tying=tied)
    return llama3.Llama3(cfg, rngs=nnx.Rngs(SEED))


def _qwen3():
    _, qwen3 = _tunix_models()
    cfg = qwen3.ModelConfig(num_layers=2, vocab_size=128, embed_dim=64, hidden_dim=128, num_heads=4, head_dim=16,
                            num_kv_heads=2, rope_theta=10000, norm_eps=1e-6)
    return qwen3.Qwen3(cfg, rngs=nnx.Rngs(SEED))


def _inputs(batch=2, length=8, vocab=128):
    rng = np.random.default_rng(SEED)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, length)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)), (batch, length, length))
    return tokens, positions, mask


def _randomise_weights(model, scale=0.05):
    """Model weights of a useful size (tunix initialises N(0, 0.01^2)): seeded normal draws."""
    rng = np.random.default_rng(SEED + 1)
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if var.ndim >= 2:
            var.set_value(jnp.asarray(rng.normal(0, scale, var.shape), var.dtype))


def _merged_weights(converted, lora_values=None):
    """``{path: dequant(W) + s * B @ A}`` in each converted weight's own layout and dtype (float32 merge)."""
    conv_vars = dict(nnx.to_flat_state(nnx.state(converted)))
    lora_values = lora_values or {}
    merged = {}
    for path, var in conv_vars.items():
        if not isinstance(var, QLoRAWeight):
            continue
        packed: PackedWeight = var.get_raw_value()
        w = dequantize_stacked(packed.packed)
        if packed.has_lora:
            a_path, b_path = ((*path[:-1], n) for n in adapter_names(path[-1]))
            a = lora_values.get(a_path, conv_vars[a_path].get_raw_value()).astype(jnp.float32)
            b = lora_values.get(b_path, conv_vars[b_path].get_raw_value()).astype(jnp.float32)
            w = w + packed.scaling * jnp.matmul(b, a)
        merged[path] = packed.layout.unpack(w).astype(packed.dtype)
    return merged


def _merged_reference(original, converted, lora_values=None):
    """The original model (its own code, plain weights) with the converted weights merged."""
    merged = _merged_weights(converted, lora_values)
    graphdef, state = nnx.split(original)
    flat = [(p, v.replace(merged[p]) if p in merged else v) for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat), copy=True)


def _set_adapters_b(model, scale=0.02):
    rng = np.random.default_rng(SEED + 2)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
        if str(path[-1]).endswith("_lora_B"):
            var.set_value(jnp.asarray(rng.normal(0, scale, var.shape), var.dtype))


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_every_projection_of_a_tunix_model_is_converted(family):
    model = _llama3() if family == "llama3" else _qwen3()
    tokens, positions, mask = _inputs()
    report = apply_qlora(model, QLoRARule("all-linear", lora=LoraConfig(r=4), exclude=("lm_head",)),
                         tokens, positions, None, mask, rngs=nnx.Rngs(1))
    converted = {layer.path for layer in report.layers}
    expected = {f"layers.{i}.{group}.{name}.{'w' if group == 'attn' else 'kernel'}"
                for i in range(2) for name in PROJECTIONS for group in ["attn" if name in PROJECTIONS[:4] else "mlp"]}
    assert converted == expected, sorted(converted ^ expected)
    # The head (excluded) and nothing else is left, and the report says why.
    assert [(w.path, w.reason) for w in report.left] == [("lm_head.w", "excluded by rule 0")]
    summary = report.summary()
    assert "14 layers replaced" in summary and "lm_head.w: [64, 128], excluded by rule 0" in summary
    # Naming the projections (PEFT-style module names) selects the same weights.
    named = _llama3() if family == "llama3" else _qwen3()
    by_name = apply_qlora(named, QLoRARule(list(PROJECTIONS), lora=LoraConfig(r=4)), tokens, positions, None, mask,
                          rngs=nnx.Rngs(1))
    assert {layer.path for layer in by_name.layers} == expected
    assert [(w.path, w.reason) for w in by_name.left] == [("lm_head.w", "not selected")]
    # Shapes the model reads at run time are the original ones.
    assert model.layers[0].attn.q_proj.w.shape == (64, 4, 16)
    assert model.layers[0].attn.head_dim == 16


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_tunix_logits_equal_the_model_on_merged_weights(family):
    original = _llama3() if family == "llama3" else _qwen3()
    _randomise_weights(original)
    model = nnx.clone(original)
    tokens, positions, mask = _inputs()
    apply_qlora(model, QLoRARule("all-linear", lora=LoraConfig(r=4)), tokens, positions, None, mask,
                rngs=nnx.Rngs(1))
    float_logits, _ = original(tokens, positions, None, mask)
    logits, _ = model(tokens, positions, None, mask)
    reference = _merged_reference(original, model)
    ref_logits, _ = reference(tokens, positions, None, mask)
    # B = 0: the converted model computes the model on its dequantized weights. Same float32 ops but
    # in another association order (per-matrix matmuls): rounding error ~ sqrt(K) ulp of the sums.
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4, atol=1e-4)
    # ...and the float model within NF4's error: each weight is off by up to half a code step.
    assert float(jnp.abs(logits - float_logits).max()) > 1e-3  # it is quantized
    rel = float(jnp.linalg.norm(logits - float_logits) / jnp.linalg.norm(float_logits))
    assert rel < 0.25, rel
    # With B != 0, the adapters enter the forward pass as scaling * B @ A.
    _set_adapters_b(model)
    logits, _ = model(tokens, positions, None, mask)
    ref_logits, _ = _merged_reference(original, model)(tokens, positions, None, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_tunix_optimizer_step_trains_only_adapters_with_reference_gradients(family):
    original = _llama3() if family == "llama3" else _qwen3()
    _randomise_weights(original)
    model = nnx.clone(original)
    tokens, positions, mask = _inputs()
    apply_qlora(model, QLoRARule("all-linear", lora=LoraConfig(r=4)), tokens, positions, None, mask,
                rngs=nnx.Rngs(1))
    _set_adapters_b(model)
    targets = jnp.roll(tokens, -1, axis=1)

    def loss_fn(m):
        logits, _ = m(tokens, positions, None, mask)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    # Reference: jax.grad through the model's own code on W = dequant + s * B @ A.
    values = {p: v.get_raw_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
    ref_grads = jax.grad(lambda lv: loss_fn(_merged_reference(original, model, lv)))(values)
    got = {p: v.get_raw_value() for p, v in nnx.to_flat_state(grads)}
    assert set(got) == set(ref_grads) and len(got) == 2 * 15
    for p in got:
        np.testing.assert_allclose(np.asarray(got[p]), np.asarray(ref_grads[p]), rtol=2e-3, atol=2e-6,
                                   err_msg=str(p))
    # One AdamW step of the host codebase's kind: nnx.Optimizer over nnx.LoRAParam.
    packed_before = jax.tree.map(np.asarray, nnx.state(model, QLoRAWeight))
    other_before = jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam)))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(m, opt):
        loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        opt.update(m, g)
        return loss

    loss0 = float(step(model, optimizer))
    jax.tree.map(np.testing.assert_array_equal, packed_before, jax.tree.map(np.asarray, nnx.state(model, QLoRAWeight)))
    jax.tree.map(np.testing.assert_array_equal, other_before,
                 jax.tree.map(np.asarray, nnx.state(model, nnx.Not(nnx.LoRAParam))))
    changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), lora_before,
                           nnx.state(model, nnx.LoRAParam))
    assert all(jax.tree.leaves(changed))
    assert float(loss_fn(model)) < loss0


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_tunix_kv_cache_generation_path_matches_the_reference(family):
    original = _llama3() if family == "llama3" else _qwen3()
    _randomise_weights(original)
    model = nnx.clone(original)
    tokens, positions, mask = _inputs(batch=1, length=4)
    apply_qlora(model, QLoRARule("all-linear", lora=LoraConfig(r=4)), tokens, positions, None, mask,
                rngs=nnx.Rngs(1))
    _set_adapters_b(model)
    reference = _merged_reference(original, model)

    def greedy(m, steps=6, size=16):
        cache = {f"layer_{i}": {"k": jnp.zeros((1, size, 2, 16)), "v": jnp.zeros((1, size, 2, 16)),
                                "end_index": jnp.zeros((1,), jnp.int32)} for i in range(2)}
        call = nnx.jit(lambda mm, t, p, c, k: mm(t, p, c, k))
        seq = list(np.asarray(tokens[0]))
        prefill_mask = jnp.zeros((1, 4, size), bool).at[:, :, :4].set(jnp.tril(jnp.ones((4, 4), bool)))
        logits, cache = call(m, tokens, positions, cache, prefill_mask)
        out = []
        for t in range(steps):
            nxt = int(jnp.argmax(logits[0, -1]))
            out.append(nxt)
            seq.append(nxt)
            pos = len(seq) - 1
            step_mask = (jnp.arange(size) <= pos)[None, None, :]
            logits, cache = call(m, jnp.asarray([[nxt]], jnp.int32), jnp.asarray([[pos]]), cache, step_mask)
            del t
        return out

    assert greedy(model) == greedy(reference)


# ------------------------------------------------------------------------------------------------
# In-repo models written in the patterns real JAX LLM code uses.


class Einsum(nnx.Module):
    """A codebase's own einsum module: an equation and a Param ``w``."""

    def __init__(self, eq, shape, *, rngs):
        self.eq, self.w = eq, nnx.Param(jax.random.normal(rngs.params(), shape) * 0.1)

    def __call__(self, x):
        return jnp.einsum(self.eq, x, self.w.value)


class DenseGeneral(nnx.Module):
    """A ``lax.dot_general`` over two contracting axes (heads and head_dim -> model)."""

    def __init__(self, shape, *, rngs):
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), shape) * 0.1)

    def __call__(self, x):
        return jax.lax.dot_general(x, self.kernel[...], (((2, 3), (0, 1)), ((), ())))


class Patterns(nnx.Module):
    """Fused qkv, stacked kv, a two-axis output projection, scanned MLP layers and a tied head."""

    def __init__(self, d=64, heads=2, hd=32, layers=3, vocab=96, *, rngs):
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (vocab, d)) * 0.1)
        self.qkv = Einsum("BTD,SNDH->SBTNH", (3, heads, d, hd), rngs=rngs)
        self.q = Einsum("BTD,NDH->BTNH", (heads, d, hd), rngs=rngs)
        self.kv = Einsum("BSD,CKDH->CBSKH", (2, heads, d, hd), rngs=rngs)
        self.out = DenseGeneral((heads, hd, d), rngs=rngs)
        self.mlp_in = nnx.Param(jax.random.normal(rngs.params(), (layers, d, 2 * d)) * 0.1)
        self.mlp_out = nnx.Param(jax.random.normal(rngs.params(), (layers, 2 * d, d)) * 0.1)

    def __call__(self, tokens):
        x = self.embed[...][tokens]
        q, k, v = self.qkv(x)
        q2 = self.q(x)
        k2, v2 = self.kv(x)
        x = x + self.out(q * k + v + q2 + k2 * v2)

        def layer(h, weights):
            w_in, w_out = weights
            return h + jax.nn.gelu(h @ w_in) @ w_out, None

        x, _ = jax.lax.scan(layer, x, (self.mlp_in[...], self.mlp_out[...]))
        return x @ self.embed[...].T


def _patterns():
    model = Patterns(rngs=nnx.Rngs(SEED))
    tokens = jnp.asarray(np.random.default_rng(SEED).integers(0, 96, (2, 5)), jnp.int32)
    return model, tokens


def test_patterns_layouts_and_logits():
    original, tokens = _patterns()
    model = nnx.clone(original)
    report = apply_qlora(model, QLoRARule("all-linear", lora=LoraConfig(r=4)), tokens, rngs=nnx.Rngs(2))
    layouts = {layer.path: (layer.layout, layer.stacked, layer.shape) for layer in report.layers}
    # Stacked projections are one matrix (and one adapter) each; heads stay inside a matrix.
    assert layouts["qkv.w"] == ("batch (0:3) out (1:2,3:32) x in (2:64)", (3,), (64, 64))
    assert layouts["kv.w"] == ("batch (0:2) out (1:2,3:32) x in (2:64)", (2,), (64, 64))
    assert layouts["q.w"] == ("out (0:2,2:32) x in (1:64)", (), (64, 64))
    assert layouts["out.kernel"] == ("out (2:64) x in (0:2,1:32)", (), (64, 64))
    # Scanned layers: one matrix per layer, the layer axis in front.
    assert layouts["mlp_in"] == ("layers (0:3) out (2:128) x in (1:64)", (3,), (128, 64))
    assert layouts["mlp_out"] == ("layers (0:3) out (2:64) x in (1:128)", (3,), (64, 128))
    assert model.qkv.w_lora_A.shape == (3, 4, 64) and model.qkv.w_lora_B.shape == (3, 64, 4)
    # The tied embedding is used by a lookup: left in float32, and said so.
    assert [(w.path, w.reason) for w in report.left] == [("embed", "embedding (used by lookup)")]
    _set_adapters_b(model)
    reference = _merged_reference(original, model)
    np.testing.assert_allclose(np.asarray(model(tokens)), np.asarray(reference(tokens)), rtol=1e-4, atol=1e-5)
    # Under nnx.jit too.
    jitted = nnx.jit(lambda m, t: m(t))
    np.testing.assert_allclose(np.asarray(jitted(model, tokens)), np.asarray(reference(tokens)), rtol=1e-4,
                               atol=1e-5)


def test_packed_bytes_are_bitsandbytes_matrices():
    original, tokens = _patterns()
    model = nnx.clone(original)
    apply_qlora(model, QLoRARule(["kv.w"], lora=None), tokens)
    packed = model.kv.w.get_raw_value().packed
    w = np.asarray(original.kv.w[...])  # [C, K, D, H]
    from qlora_jax.quant import quantize

    for c in range(2):
        matrix = np.transpose(w[c], (0, 2, 1)).reshape(2 * 32, 64)  # [(K, H), D] = [out, in]
        expected = quantize(jnp.asarray(matrix), "nf4", blocksize=64, double_quant=True)
        np.testing.assert_array_equal(np.asarray(packed.codes[c]), np.asarray(expected.codes))
        np.testing.assert_array_equal(np.asarray(packed.scales[c]), np.asarray(expected.scales))
        np.testing.assert_array_equal(np.asarray(packed.nested_scales[c]), np.asarray(expected.nested_scales))


def test_zero_initialised_weight_quantizes_to_zeros():
    original, tokens = _patterns()
    original.q.w.set_value(jnp.zeros_like(original.q.w[...]))
    model = nnx.clone(original)
    apply_qlora(model, QLoRARule(["q.w"], lora=LoraConfig(r=2)), tokens, rngs=nnx.Rngs(0))
    deq = dequantize(model.q.w.get_raw_value().packed, jnp.float32)
    assert np.all(np.asarray(deq) == 0.0)
    assert np.all(np.isfinite(np.asarray(model(tokens))))


def test_bad_input_errors_name_the_path():
    original, tokens = _patterns()
    with pytest.raises(QLoRAConversionError, match=r"'embed'.*lookup"):
        apply_qlora(nnx.clone(original), QLoRARule(["embed"], lora=None), tokens)
    from qlora_jax.quant import QuantConfig

    with pytest.raises(QLoRAConversionError, match=r"'out\.kernel'.*blocksize=128"):
        # out.kernel contracts heads x head_dim = 64 values: not a whole block of 128.
        apply_qlora(nnx.clone(original), QLoRARule(["out.kernel"], lora=None, quant=QuantConfig(blocksize=128),
                                                   on_ragged_blocks="error"), tokens)
    model = nnx.clone(original)
    apply_qlora(model, QLoRARule(["q.w"], lora=None), tokens)
    with pytest.raises(QLoRAConversionError, match=r"'q\.w'.*converted already"):
        apply_qlora(model, QLoRARule(["q.w"], lora=None), tokens)

    class TwoLayouts(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((64, 64)))

        def __call__(self, x):
            return x @ self.w[...] + x @ self.w[...].T

    with pytest.raises(QLoRAConversionError, match=r"'w'.*different layouts"):
        apply_qlora(TwoLayouts(), QLoRARule(["w"], lora=None), jnp.ones((2, 64)))

    class Unused(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((64, 64)))
            self.spare = nnx.Param(jnp.ones((64, 64)))

        def __call__(self, x):
            return jnp.tanh(x @ self.w[...])

    with pytest.raises(QLoRAConversionError, match=r"'spare', which no contraction consumes"):
        apply_qlora(Unused(), QLoRARule(["spare"], lora=None), jnp.ones((2, 64)))

    class NonLinear(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((64, 64)))

        def __call__(self, x):
            return x @ jnp.tanh(self.w[...])

    with pytest.raises(QLoRAConversionError, match=r"'w', which a non-linear operation also uses \(tanh\)"):
        apply_qlora(NonLinear(), QLoRARule(["w"], lora=None), jnp.ones((2, 64)))


def test_untraced_all_linear_refuses_weights_it_cannot_classify():
    original, _ = _patterns()
    with pytest.raises(QLoRAConversionError, match=r"without example inputs.*qkv\.w \[3, 2, 64, 32\]"):
        apply_qlora(original, QLoRARule("all-linear", lora=None))


def test_bare_read_of_a_converted_weight_is_a_clear_error():
    original, tokens = _patterns()
    model = nnx.clone(original)
    apply_qlora(model, QLoRARule(["q.w"], lora=None), tokens)
    with pytest.raises(RuntimeError, match="converted by apply_qlora"):
        model.q(jnp.ones((1, 2, 64)))
    assert model.q.w.shape == (2, 64, 32)


# ------------------------------------------------------------------------------------------------
# Linen, unmodified: gemma 2.0.0's Transformer (google-deepmind/gemma from the package index).


def _gemma(qkv: bool):
    from gemma import modules as gemma_modules
    from gemma import transformer as gemma_transformer

    cfg = gemma_transformer.TransformerConfig(
        num_layers=2, num_embed=128, embed_dim=64, hidden_dim=128, num_heads=2, head_dim=32,
        num_kv_heads=2 if qkv else 1, final_logit_softcap=30.0, use_post_attn_norm=True, use_post_ffw_norm=True,
        attention_types=[gemma_modules.AttentionType.GLOBAL, gemma_modules.AttentionType.LOCAL_SLIDING],
        sliding_window_size=4)
    model = gemma_transformer.Transformer(cfg)
    tokens, positions, mask = _inputs()
    variables = model.init(jax.random.key(SEED), tokens, positions, None, mask)
    rng = np.random.default_rng(SEED + 3)
    variables = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype) if x.ndim >= 2 else x,
                             variables)
    return model, variables, (tokens, positions, None, mask)


def _linen_merged(variables, converted):
    """The original variables with every packed weight replaced by dequant(W) + s * B @ A."""
    from flax import traverse_util

    from qlora_jax.nn.linen import FROZEN, LORA

    params = traverse_util.flatten_dict(dict(variables["params"]))
    lora = traverse_util.flatten_dict(dict(converted.get(LORA, {})))
    for path, packed in traverse_util.flatten_dict(dict(converted[FROZEN])).items():
        w = dequantize_stacked(packed.packed)
        if packed.has_lora:
            a_name, b_name = adapter_names(path[-1])
            w = w + packed.scaling * jnp.matmul(lora[(*path[:-1], b_name)], lora[(*path[:-1], a_name)])
        params[path] = packed.layout.unpack(w).astype(packed.dtype)
    return {**variables, "params": traverse_util.unflatten_dict(params)}


@pytest.mark.parametrize("qkv", [False, True], ids=["kv-stack", "fused-qkv"])
def test_gemma_linen_every_projection_logits_and_gradients(qkv):
    from qlora_jax.nn.linen import LORA, apply_converted, convert_variables, qlora_module

    model, variables, args = _gemma(qkv)
    converted, report = convert_variables(model, variables, QLoRARule("all-linear", lora=LoraConfig(r=4)), *args,
                                          key=jax.random.key(1))
    per_layer = ["attn.qkv_einsum.w"] if qkv else ["attn.q_einsum.w", "attn.kv_einsum.w"]
    per_layer += ["attn.attn_vec_einsum.w", "mlp.gating_einsum", "mlp.linear"]
    assert {layer.path for layer in report.layers} == {f"layer_{i}.{n}" for i in range(2) for n in per_layer}
    assert [(w.path, w.reason) for w in report.left] == [("embedder.input_embedding", "embedding (used by lookup)")]
    stacked = {layer.path: layer.stacked for layer in report.layers}
    assert stacked["layer_0.attn.qkv_einsum.w" if qkv else "layer_0.attn.kv_einsum.w"] == ((3,) if qkv else (2,))
    # Random adapters B, so that the LoRA path is checked too.
    rng = np.random.default_rng(SEED + 4)
    converted[LORA] = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, 0.02, x.shape), x.dtype) if "lora_B" in str(p[-1]) else x,
        converted[LORA])
    logits, _ = apply_converted(model, converted, *args)
    ref_logits, _ = model.apply(_linen_merged(variables, converted), *args)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-4, atol=1e-4)
    # A trainer that calls model.apply gets the same through qlora_module.
    wrapped = qlora_module(model)
    np.testing.assert_array_equal(np.asarray(wrapped.apply(converted, *args)[0]), np.asarray(logits))
    targets = jnp.roll(args[0], -1, axis=1)

    def loss(lora, apply_fn, base):
        out, _ = apply_fn({**base, LORA: lora}, *args)
        return optax.softmax_cross_entropy_with_integer_labels(out, targets).mean()

    grads = jax.jit(jax.grad(lambda lora: loss(lora, wrapped.apply, converted)))(converted[LORA])
    ref = jax.grad(lambda lora: loss(lora, lambda v, *a: model.apply(_linen_merged(variables, v), *a),
                                     converted))(converted[LORA])
    jax.tree.map(lambda g, r: np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-3, atol=2e-6),
                 grads, ref)


def test_linen_einsum_with_its_equation_at_call_time():
    import flax.linen as nn

    from qlora_jax.nn.linen import apply_converted, convert_variables

    class CallTimeEinsum(nn.Module):
        shape: tuple

        @nn.compact
        def __call__(self, eqn, x):
            return jnp.einsum(eqn, x, self.param("w", nn.initializers.normal(0.1), self.shape))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = CallTimeEinsum((64, 2, 32), name="proj")("BTD,DNH->BTNH", x)
            return CallTimeEinsum((2, 32, 64), name="out")("BTNH,NHD->BTD", jax.nn.relu(h))

    model = Block()
    x = jnp.asarray(np.random.default_rng(SEED).normal(size=(2, 3, 64)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    converted, report = convert_variables(model, variables, QLoRARule("all-linear", lora=LoraConfig(r=2)), x,
                                          key=jax.random.key(1))
    assert [layer.layout for layer in report.layers] == ["out (1:2,2:32) x in (0:64)", "out (2:64) x in (0:2,1:32)"]
    np.testing.assert_allclose(np.asarray(apply_converted(model, converted, x)),
                               np.asarray(model.apply(_linen_merged(variables, converted), x)), rtol=1e-5, atol=1e-6)


def test_sharding_annotations_are_carried_and_a_sharded_forward_agrees():
    from qlora_jax.nn.traced import state_shardings

    original = _llama3()
    _randomise_weights(original)
    model = nnx.clone(original)
    tokens, positions, mask = _inputs()
    apply_qlora(model, QLoRARule("all-linear", lora=LoraConfig(r=4)), tokens, positions, None, mask,
                rngs=nnx.Rngs(1))
    _set_adapters_b(model)
    attn = model.layers[0].attn
    # tunix annotates q_proj.w [D, N, H] as ('fsdp', 'tp', None): rows (N, H) -> 'tp', columns (D) -> 'fsdp'.
    assert attn.q_proj.w.get_metadata()["packed_sharding"] == ("tp", "fsdp")
    assert attn.q_proj.w_lora_A.get_metadata()["out_sharding"] == (None, "fsdp")
    assert attn.q_proj.w_lora_B.get_metadata()["out_sharding"] == ("tp", None)
    expected, _ = model(tokens, positions, None, mask)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("fsdp", "tp"))
    placed = jax.device_put(nnx.state(model), state_shardings(model, mesh))
    nnx.update(model, placed)
    codes = attn.q_proj.w.get_raw_value().packed.codes
    assert codes.sharding.spec == jax.sharding.PartitionSpec("tp", None)
    assert len(codes.addressable_shards) == 4 and codes.addressable_shards[0].data.shape == (32, 32)
    logits, _ = nnx.jit(lambda m, *a: m(*a))(model, tokens, positions, None, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)


class ScannedBlocks(nnx.Module):
    """Layers built by nnx.vmap (stacked Params [L, ...]) and run by nnx.scan, with an Einsum inside."""

    def __init__(self, layers=3, d=64, *, rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return _Block(d, rngs=r)

        self.blocks = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def run(block, h):
            return block(h)

        return run(self.blocks, x)


class _Block(nnx.Module):
    def __init__(self, d, *, rngs):
        self.up = nnx.Linear(d, 2 * d, use_bias=False, rngs=rngs)
        self.heads = Einsum("BD,DNH->BNH", (d, 2, d), rngs=rngs)

    def __call__(self, h):
        return h + jnp.tanh(self.up(h))[:, : h.shape[-1]] + self.heads(h).mean(axis=1)


def test_nnx_vmap_stacked_layers_run_by_nnx_scan():
    original = ScannedBlocks(rngs=nnx.Rngs(SEED))
    x = jnp.asarray(np.random.default_rng(SEED).normal(size=(2, 64)), jnp.float32)
    model = nnx.clone(original)
    report = apply_qlora(model, QLoRARule("all-linear", lora=LoraConfig(r=2)), x, rngs=nnx.Rngs(3))
    layouts = {layer.path: layer.layout for layer in report.layers}
    assert layouts == {"blocks.up.kernel": "layers (0:3) out (2:128) x in (1:64)",
                       "blocks.heads.w": "layers (0:3) out (2:2,3:64) x in (1:64)"}
    assert model.blocks.up.kernel_lora_A.shape == (3, 2, 64)
    _set_adapters_b(model)
    reference = _merged_reference(original, model)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(reference(x)), rtol=1e-5, atol=1e-5)


def test_tunix_peft_trainer_trains_the_converted_model():
    """The host codebase's own trainer (tunix's PeftTrainer: nnx.Optimizer(wrt=nnx.LoRAParam)) runs unchanged."""
    _tunix_models()
    from tunix.sft import peft_trainer
    from tunix.sft import utils as sft_utils

    model = _llama3()
    _randomise_weights(model)
    tokens, positions, mask = _inputs()
    apply_qlora(model, QLoRARule("all-linear", lora=LoraConfig(r=4)), tokens, positions, None, mask,
                rngs=nnx.Rngs(1))
    rng = np.random.default_rng(SEED + 5)
    data = jnp.asarray(rng.integers(0, 128, (2, 8)), jnp.int32)
    batches = [peft_trainer.TrainingInput(input_tokens=data, input_mask=jnp.ones((2, 8), bool))] * 6

    def model_inputs(x):
        return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
                "positions": sft_utils.build_positions_from_mask(x.input_mask),
                "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask)}

    def loss():
        return float(peft_trainer._default_loss_fn(model, **model_inputs(batches[0])))

    packed_before = jax.tree.map(np.asarray, nnx.state(model, QLoRAWeight))
    lora_before = jax.tree.map(np.asarray, nnx.state(model, nnx.LoRAParam))
    loss_before = loss()
    config = peft_trainer.TrainingConfig(eval_every_n_steps=100, max_steps=6)
    trainer = peft_trainer.PeftTrainer(model, optax.adamw(1e-2), config).with_gen_model_input_fn(model_inputs)
    trainer.train(batches)
    assert trainer.train_steps == 6
    jax.tree.map(np.testing.assert_array_equal, packed_before, jax.tree.map(np.asarray, nnx.state(model, QLoRAWeight)))
    changed = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), lora_before, nnx.state(model, nnx.LoRAParam))
    assert all(jax.tree.leaves(changed))
    assert loss() < loss_before


@pytest.mark.slow
def test_bench_vs_qwix_smoke():
    """The benchmark's harness on tiny shapes (no timing is asserted; the byte ratio is arithmetic)."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "experiments.bench_vs_qwix", "--smoke"], check=True,
                         capture_output=True, text=True).stdout
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]] for line in out.splitlines()
            if line.startswith("| ") and "qlora-jax" not in line}
    stored = rows["frozen bytes of the converted weights (as stored)"]
    # NF4 + DQ at block 64: 4 + 8/64 + 32/(64*256) bits per weight = 0.516 bytes; qwix: one uint4 per byte plus
    # a float32 scale per 64 contracted values = 1.0625 bytes; so 0.4856 (the head is not converted by either).
    assert float(stored[2]) == pytest.approx((4 + 8 / 64 + 32 / (64 * 256)) / 8 / 1.0625, rel=0.01)
    assert set(rows) >= {"logits error vs the float model (relative, Frobenius)",
                         "peak host memory (MiB, converting and training, after the float model is built)"}
    assert any(key.startswith("training step") for key in rows)


def test_gemma_linen_kv_cache_decoding_matches_the_reference():
    from qlora_jax.nn.linen import LORA, apply_converted, convert_variables

    model, variables, args = _gemma(qkv=False)
    tokens, positions, _, _ = args
    converted, _ = convert_variables(model, variables, QLoRARule("all-linear", lora=LoraConfig(r=4)), *args,
                                     key=jax.random.key(1))
    rng = np.random.default_rng(SEED + 6)
    converted[LORA] = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(rng.normal(0, 0.02, x.shape), x.dtype) if "lora_B" in str(p[-1]) else x,
        converted[LORA])
    merged = _linen_merged(variables, converted)

    def greedy(apply, size=16, steps=6):
        # The model's own decoding path: a prefill, then one token at a time through its KV cache (past the
        # sliding window of 4 on the local layer).
        cache = model.config.init_cache(1, jnp.float32, cache_length=size)
        prompt, pos = tokens[:1], positions[:1]
        n = prompt.shape[1]
        prefill = jnp.zeros((1, n, size), bool).at[:, :, :n].set(jnp.tril(jnp.ones((n, n), bool)))
        logits, cache = apply(prompt, pos, cache, prefill)
        out = []
        for t in range(n, n + steps):
            nxt = int(jnp.argmax(logits[0, -1]))
            out.append(nxt)
            logits, cache = apply(jnp.asarray([[nxt]], jnp.int32), jnp.asarray([[t]]), cache,
                                  (jnp.arange(size) <= t)[None, None, :])
        return out

    ours = greedy(jax.jit(lambda *a: apply_converted(model, converted, *a)))
    reference = greedy(jax.jit(lambda *a: model.apply(merged, *a)))
    assert ours == reference


def test_converted_third_party_step_lowers_to_the_fused_cuda_kernels():
    """The contractions of a converted tunix model go through quantized_matmul: with backend="pallas_triton",
    a training step (forward + input gradient) exports for CUDA with one fused kernel per matmul and its VJP."""
    from qlora_jax.kernels import lowering

    model = _llama3()
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):  # a bfloat16 model: the kernels' activations
        var.set_value(var[...].astype(jnp.bfloat16))
    tokens, positions, mask = _inputs()
    report = apply_qlora(model, QLoRARule("all-linear", lora=LoraConfig(r=4), kernel_backend="pallas_triton"),
                         tokens, positions, None, mask, rngs=nnx.Rngs(1))
    graphdef, state = nnx.split(model)
    lora, rest = state.split(nnx.LoRAParam, ...)

    def loss(lora_state, x):
        m = nnx.merge(graphdef, lora_state, rest)
        logits, _ = m(tokens, positions, None, mask)
        return jnp.mean(logits.astype(jnp.float32) ** 2) + 0 * x

    def kernel_calls(exported) -> int:
        # The module outlines each kernel shape once (func.func @fused_matmul...) and calls it per use.
        module = exported.mlir_module()
        blocks = module.split("func.func ")[1:]
        with_kernel = {re.match(r"(?:private |public )?@([\w$.]+)", b).group(1) for b in blocks
                       if f"custom_call @{lowering.TRITON_TARGET}" in b}
        return sum(len(re.findall(rf"call @{re.escape(name)}\(", module)) for name in with_kernel)

    forward = kernel_calls(lowering.export_for_cuda(lambda lv, x: loss(lv, x), lora, jnp.float32(0)))
    step = kernel_calls(lowering.export_for_cuda(jax.grad(loss), lora, jnp.float32(0)))
    assert forward == len(report.layers) == 15  # every converted contraction is a fused kernel
    # The backward adds the input-gradient kernels: at least those of the 10 matmuls whose dx a trainable
    # adapter needs (all but layer 0's q, k, v, gate and up, which only the frozen embedding output feeds).
    assert step - forward >= 10


class TwoMethods(nnx.Module):
    """A model whose decoding runs through a method of its own besides __call__."""

    def __init__(self, *, rngs):
        self.proj = nnx.Param(jax.random.normal(rngs.params(), (64, 32)) * 0.1)

    def __call__(self, x):
        return jnp.tanh(x @ self.proj[...])

    def decode(self, x, temperature):
        return jax.nn.softmax((x @ self.proj[...]) / temperature)


def test_methods_named_run_converted_and_dropout_is_refused():
    original = TwoMethods(rngs=nnx.Rngs(SEED))
    x = jnp.asarray(np.random.default_rng(SEED).normal(size=(3, 64)), jnp.float32)
    model = nnx.clone(original)
    apply_qlora(model, QLoRARule("all-linear", lora=LoraConfig(r=2)), x, rngs=nnx.Rngs(1),
                methods=("__call__", "decode"))
    _set_adapters_b(model)
    reference = _merged_reference(original, model)
    np.testing.assert_allclose(np.asarray(model.decode(x, 0.5)), np.asarray(reference.decode(x, 0.5)), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(reference(x)), rtol=1e-5, atol=1e-6)
    # A method not named reads the weight bare: a clear error, never the adapters silently dropped.
    only_call = nnx.clone(original)
    apply_qlora(only_call, QLoRARule("all-linear", lora=LoraConfig(r=2)), x, rngs=nnx.Rngs(1))
    with pytest.raises(RuntimeError, match=r"methods=\[\.\.\.\]\) names them"):
        only_call.decode(x, 0.5)
    with pytest.raises(NotImplementedError, match="LoRA dropout"):
        apply_qlora(nnx.clone(original), QLoRARule("all-linear", lora=LoraConfig(r=2, dropout=0.1)), x,
                    rngs=nnx.Rngs(1))
    import flax.linen as nn

    from qlora_jax.nn.linen import convert_variables

    class Dense(nn.Module):
        @nn.compact
        def __call__(self, v):
            return nn.Dense(8)(v)

    variables = Dense().init(jax.random.key(0), x)
    with pytest.raises(NotImplementedError, match="LoRA dropout"):
        convert_variables(Dense(), variables, QLoRARule("all-linear", lora=LoraConfig(r=2, dropout=0.1)), x,
                          key=jax.random.key(1))
