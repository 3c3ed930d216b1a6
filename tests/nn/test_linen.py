"""qlora_jax.nn.linen: QLoRADense in place of nn.Dense and convert_params, against float64 references."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax.lora import LoraConfig
from qlora_jax.nn import QLoRAConversionError, QLoRARule
from qlora_jax.nn.linen import FROZEN, LORA, QLoRADense, convert_params
from qlora_jax.optim import make_optimizer
from qlora_jax.quant import QuantConfig, QuantizedTensor, dequantize, quantize

D, FF, OUT = 64, 128, 16


class Block(nn.Module):
    """A pre-norm residual MLP block written with nn.Dense, as a user would (auto-named layers)."""

    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm()(x)
        h = self.dense(FF)(h)
        return x + self.dense(D)(jax.nn.silu(h))


class Net(nn.Module):
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
        for _ in range(2):
            x = Block(dense=self.dense)(x)
        return nn.Dense(OUT, name="head")(x)


def quantized(**kw):
    return functools.partial(QLoRADense, **kw)


RULE = QLoRARule(r"Block_\d+\.Dense_\d+", lora=LoraConfig(r=4, alpha=8.0))


def dense_params(variables, path):
    """W [out, in] (dequantized), bias, adapters of the layer at ``path`` (a tuple of names)."""
    def get(collection):
        node = variables.get(collection, {})
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return node

    frozen, lora, params = get(FROZEN), get(LORA), get("params")
    if not frozen:
        return dict(W=np.asarray(params["kernel"], np.float64).T, b=np.asarray(params["bias"], np.float64))
    w = frozen["weight"]
    w = dequantize(w, jnp.float32) if isinstance(w, QuantizedTensor) else w
    p = dict(W=np.asarray(w, np.float64), b=np.asarray(frozen["bias"], np.float64))
    if lora:
        p.update(A=np.asarray(lora["lora_A"], np.float64), B=np.asarray(lora["lora_B"], np.float64))
    return p


DENSE_PATHS = [(f"Block_{i}", f"Dense_{j}") for i in range(2) for j in range(2)] + [("head",)]


def net_params(variables, dtype=np.float64) -> dict:
    """Every Dense layer's arrays and the layer norms, as ``dtype`` numpy arrays."""
    p = {path: jax.tree.map(lambda a: np.asarray(a, dtype), dense_params(variables, path)) for path in DENSE_PATHS}
    for i in range(2):
        ln = variables["params"][f"Block_{i}"]["LayerNorm_0"]
        p[f"ln{i}"] = (np.asarray(ln["scale"], dtype), np.asarray(ln["bias"], dtype))
    return p


def ref_net(xp, p, x, scaling, lora=None):
    """float64 (numpy) or differentiable (jax.numpy) reference of Net; ``lora`` overrides {path: (A, B)}."""
    lora = lora or {}

    def lin(h, path):
        y = h @ p[path]["W"].T + p[path]["b"]
        a, b = lora.get(path, (p[path].get("A"), p[path].get("B")))
        return y if a is None else y + scaling * ((h @ a.T) @ b.T)

    for i in range(2):
        scale, bias = p[f"ln{i}"]
        mean = x.mean(axis=-1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
        h = (x - mean) / xp.sqrt(var + 1e-6) * scale + bias
        h = lin(h, (f"Block_{i}", "Dense_0"))
        x = x + lin(h / (1 + xp.exp(-h)), (f"Block_{i}", "Dense_1"))
    return lin(x, ("head",))


@pytest.fixture(scope="module")
def converted(module_rng):
    x = jnp.asarray(module_rng.normal(size=(4, D)), jnp.float32)
    variables = jax.jit(Net().init)(jax.random.key(int(module_rng.integers(2**31))), x)
    qvars, report = convert_params(variables, RULE, key=jax.random.key(int(module_rng.integers(2**31))))
    return variables, qvars, report, x


def test_convert_params_selects_exactly_the_rule_and_lines_up_with_qlora_dense(converted):
    variables, qvars, report, x = converted
    assert [layer.path for layer in report.layers] == ["Block_0.Dense_0", "Block_0.Dense_1", "Block_1.Dense_0",
                                                       "Block_1.Dense_1"]
    assert set(qvars["params"]) == {"Block_0", "Block_1", "head"}
    assert set(qvars["params"]["Block_0"]) == {"LayerNorm_0"}  # the converted kernels left "params"
    assert qvars[FROZEN]["Block_0"]["Dense_0"]["weight"].shape == (FF, D)  # bitsandbytes' [out, in]
    assert qvars[LORA]["Block_1"]["Dense_1"]["lora_A"].shape == (4, FF)  # PEFT's [r, in]
    assert qvars[LORA]["Block_1"]["Dense_1"]["lora_B"].shape == (D, 4)  # PEFT's [out, r]
    np.testing.assert_array_equal(qvars[FROZEN]["Block_0"]["Dense_1"]["weight"].codes,
                                  quantize(np.asarray(variables["params"]["Block_0"]["Dense_1"]["kernel"]).T).codes)
    assert report.trainable_params == sum(int(np.prod(a.shape)) for a in jax.tree.leaves(qvars[LORA]))
    # QLoRADense takes nn.Dense's automatic names, so the QLoRA model's own init has the same tree.
    model = Net(dense=quantized(lora=RULE.lora))
    fresh = jax.eval_shape(model.init, jax.random.key(0), x)
    assert jax.tree.structure(fresh) == jax.tree.structure(qvars)


def test_qlora_dense_matches_float64_reference_and_the_original(converted, rng):
    variables, qvars, _, x = converted
    model = Net(dense=quantized(lora=RULE.lora))
    apply = jax.jit(model.apply)
    y0 = apply(qvars, x)
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(y0, ref_net(np, net_params(qvars), x64, RULE.lora.scaling), rtol=2e-5, atol=2e-5)
    y_orig = np.asarray(Net().apply(variables, x), np.float64)
    assert 1e-4 < np.linalg.norm(y0 - y_orig) / np.linalg.norm(y_orig) < 0.15  # B = 0: NF4's error only
    lora = jax.tree.map(lambda a: a, qvars[LORA])
    for block in lora.values():
        for layer in block.values():
            layer["lora_B"] = jnp.asarray(rng.normal(size=layer["lora_B"].shape), jnp.float32)
    moved = {**qvars, LORA: lora}
    y = apply(moved, x)
    np.testing.assert_allclose(y, ref_net(np, net_params(moved), x64, RULE.lora.scaling), rtol=5e-5, atol=5e-5)
    assert np.linalg.norm(y - y0) > 1e-2 * np.linalg.norm(y0)


def test_training_the_lora_collection_alone_with_reference_gradients(converted, rng):
    _, qvars, _, x = converted
    model = Net(dense=quantized(lora=RULE.lora))
    lora = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), qvars[LORA])
    others = {k: v for k, v in qvars.items() if k != LORA}
    target = jnp.asarray(rng.normal(size=(4, OUT)), jnp.float32)

    def loss(lora):
        return jnp.mean((model.apply({**others, LORA: lora}, x) - target) ** 2)

    frozen = net_params(qvars, np.float32)

    def ref_loss(pairs):
        return jnp.mean((ref_net(jnp, frozen, x, RULE.lora.scaling, lora=pairs) - target) ** 2)

    paths = [(f"Block_{i}", f"Dense_{j}") for i in range(2) for j in range(2)]
    pairs = {p: (lora[p[0]][p[1]]["lora_A"], lora[p[0]][p[1]]["lora_B"]) for p in paths}
    ref = jax.jit(jax.grad(ref_loss))(pairs)
    grads = jax.jit(jax.grad(loss))(lora)
    for p in paths:
        for i, name in enumerate(("lora_A", "lora_B")):  # float32 sums in different orders: relative to the scale
            want = np.asarray(ref[p][i])
            np.testing.assert_allclose(grads[p[0]][p[1]][name], want, rtol=2e-3, atol=1e-4 * np.abs(want).max())
    tx = make_optimizer("adamw", 1e-3, max_grad_norm=None)
    state = tx.init(lora)
    updates, _ = jax.jit(tx.update)(grads, state, lora)
    new = optax.apply_updates(lora, updates)
    assert all(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(lora),
                                                                      strict=True))


def test_adapter_dtypes_follow_the_compute_dtype(rng):
    x = jnp.ones((2, D), jnp.bfloat16)
    key = jax.random.key(int(rng.integers(2**31)))
    # (fields, LoraConfig.dtype, adapters' dtype, output dtype for bf16 inputs: nn.Dense's promotion)
    cases = [(dict(dtype=jnp.bfloat16), None, jnp.bfloat16, jnp.bfloat16), ({}, None, jnp.float32, jnp.float32),
             (dict(dtype=jnp.bfloat16), "float32", jnp.float32, jnp.bfloat16),
             (dict(param_dtype=jnp.bfloat16), None, jnp.bfloat16, jnp.bfloat16)]
    for kw, lora_dtype, expected, out_dtype in cases:
        layer = QLoRADense(FF, lora=LoraConfig(r=4, dtype=lora_dtype), **kw)
        v = jax.eval_shape(layer.init, key, x)
        assert v[LORA]["lora_A"].dtype == expected and v[LORA]["lora_B"].dtype == expected, (kw, lora_dtype)
        assert jax.eval_shape(layer.apply, v, x).dtype == out_dtype
    # The converter: the rule's dtype (the layer's compute dtype), else the kernel's, unless LoraConfig.dtype says.
    variables = jax.jit(Net().init)(key, jnp.ones((2, D)))
    for rule, expected in ((QLoRARule(lora=LoraConfig(r=2), dtype="bfloat16"), jnp.bfloat16),
                           (QLoRARule(lora=LoraConfig(r=2)), jnp.float32),
                           (QLoRARule(lora=LoraConfig(r=2, dtype="float32"), dtype="bfloat16"), jnp.float32)):
        qvars, _ = convert_params(variables, rule, key=key)
        assert {a.dtype for a in jax.tree.leaves(qvars[LORA])} == {jnp.dtype(expected)}


def test_lora_dropout_needs_and_uses_the_dropout_rng(rng):
    layer = QLoRADense(D, lora=LoraConfig(r=4, dropout=0.5))
    x = jnp.asarray(rng.normal(size=(8, D)), jnp.float32)
    v = jax.jit(functools.partial(layer.init, deterministic=True))(jax.random.key(0), x)
    apply = jax.jit(layer.apply, static_argnames="deterministic")
    drop = {"dropout": jax.random.key(int(rng.integers(2**31)))}
    zero_b = {**v, LORA: {**v[LORA], "lora_B": jnp.zeros((D, 4))}}
    # B = 0: the base path has no dropout, so training and inference agree exactly.
    np.testing.assert_array_equal(apply(zero_b, x, deterministic=False, rngs=drop), apply(zero_b, x,
                                                                                         deterministic=True))
    v = {**v, LORA: {**v[LORA], "lora_B": jnp.ones((D, 4))}}
    on, off = apply(v, x, deterministic=False, rngs=drop), apply(v, x, deterministic=True)
    a, b = np.asarray(v[LORA]["lora_A"], np.float64), np.asarray(v[LORA]["lora_B"], np.float64)

    class SameScope(nn.Module):  # an nn.Dropout where QLoRADense has its own (Dropout_0): the same mask
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.5, deterministic=False)(x)

    dropped = np.asarray(SameScope().apply({}, x, rngs=drop), np.float64)
    assert 0.3 < np.mean(dropped == 0) < 0.7
    x64 = np.asarray(x, np.float64)
    expected = np.asarray(off, np.float64) + layer.lora.scaling * ((dropped - x64) @ a.T) @ b.T
    np.testing.assert_allclose(on, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="deterministic"):
        layer.apply(v, x)


def test_bad_conversions_are_named(converted):
    variables, qvars, _, _ = converted
    key = jax.random.key(0)
    with pytest.raises(QLoRAConversionError, match=r"matches no .*nearest Dense paths|matches no module"):
        convert_params(variables, QLoRARule(r"Block_\d+\.Dense_7"), key=key)
    with pytest.raises(QLoRAConversionError, match=r"'Block_0.LayerNorm_0', which is not an nn.Dense"):
        convert_params(variables, QLoRARule("LayerNorm_0"), key=key)
    with pytest.raises(QLoRAConversionError, match="converted already"):
        convert_params(qvars, RULE, key=key)
    with pytest.raises(ValueError, match="kernel_backend, which in Linen is a field of QLoRADense"):
        convert_params(variables, QLoRARule(kernel_backend="xla"), key=key)
    with pytest.raises(QLoRAConversionError, match="in_features=64 is not a multiple of blocksize=128"):
        convert_params(variables, QLoRARule("all-linear", quant=QuantConfig(blocksize=128), on_ragged_blocks="error"),
                       key=key)
    with pytest.raises(QLoRAConversionError, match="variables model.init returned"):
        convert_params(variables["params"], RULE, key=key)
    x = jnp.ones((2, D))
    with pytest.raises(ValueError, match=r"QLoRADense at Block_0/Dense_0: the frozen weight is nf4\+DQ/64 but the "
                                         r"layer's quant is fp4\+DQ/64"):
        Net(dense=quantized(lora=RULE.lora, quant=QuantConfig(quant="fp4"))).apply(qvars, x)
    with pytest.raises(ValueError, match="lora=None but the variables hold adapters"):
        Net(dense=quantized(lora=None)).apply(qvars, x)
    with pytest.raises(ValueError, match="do not fit r=8"):
        Net(dense=quantized(lora=LoraConfig(r=8))).apply(qvars, x)
