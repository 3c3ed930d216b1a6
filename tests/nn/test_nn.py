"""qlora_jax.nn on NNX models written here: apply_qlora against float64 references, training, bad input."""

from __future__ import annotations

import functools
import json
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qlora_jax.lora import LoraConfig
from qlora_jax.nn import (
    EinsumLayout,
    FrozenWeights,
    QLoRAConversionError,
    QLoRAEinsum,
    QLoRALinear,
    QLoRARule,
    apply_qlora,
    pack_weight,
    set_kernel_backend,
)
from qlora_jax.optim import make_optimizer
from qlora_jax.quant import QuantConfig, QuantizedTensor, dequantize, quantize
from qlora_jax.quant.bnb_format import to_bnb_state_dict

D, HEADS, FF, VOCAB, T = 64, 4, 128, 32, 8
REPO = pathlib.Path(__file__).resolve().parents[2]
# Dequantization for the references, compiled once per shape.
dequantize32 = jax.jit(functools.partial(dequantize, dtype=jnp.float32))


def seed_of(rng: np.random.Generator) -> int:
    return int(rng.integers(2**31))


class Attention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(D, D, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).reshape(b, t, HEADS, D // HEADS) for p in (self.q_proj, self.k_proj, self.v_proj))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // HEADS)
        scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e30)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self.o_proj(out.reshape(b, t, D))


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(D, rngs=rngs)
        self.attn = Attention(rngs)
        self.norm2 = nnx.RMSNorm(D, rngs=rngs)
        self.up_proj = nnx.Linear(D, FF, rngs=rngs)
        self.down_proj = nnx.Linear(FF, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down_proj(jax.nn.silu(self.up_proj(self.norm2(x))))


class TinyTransformer(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(VOCAB, D, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(2)])
        self.head = nnx.Linear(D, VOCAB, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, **kw):
        self.fc1 = nnx.Linear(D, FF, rngs=rngs, **kw)
        self.fc2 = nnx.Linear(FF, D, rngs=rngs, **kw)

    def __call__(self, x):
        return self.fc2(jax.nn.silu(self.fc1(x)))


# ---- float64 references (numpy) / float32 (jax.numpy) from the converted model's arrays ----

def linear_params(layer) -> dict:
    """W [out, in] (dequantized), bias, adapters and scaling of a (QLoRA or plain) linear layer."""
    if isinstance(layer, nnx.Linear):
        return dict(W=np.asarray(layer.kernel[...]).T, b=None if layer.bias is None else np.asarray(layer.bias[...]))
    weight = layer.weight.get_value()
    w = dequantize32(weight) if isinstance(weight, QuantizedTensor) else weight
    p = dict(W=np.asarray(w, np.float32), b=None if layer.bias is None else np.asarray(layer.bias[...], np.float32))
    if layer.lora_A is not None:
        p.update(A=np.asarray(layer.lora_A[...], np.float32), B=np.asarray(layer.lora_B[...], np.float32),
                 s=layer.scaling)
    return p


def transformer_params(model: TinyTransformer) -> dict:
    layers = []
    for block in model.layers:
        entry = {n: linear_params(getattr(block.attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        entry.update(up_proj=linear_params(block.up_proj), down_proj=linear_params(block.down_proj),
                     norm1=np.asarray(block.norm1.scale[...]), norm2=np.asarray(block.norm2.scale[...]))
        layers.append(entry)
    return dict(embed=np.asarray(model.embed.embedding[...]), layers=layers, head=linear_params(model.head))


def ref_linear(xp, x, p, lora=None):
    """x @ W.T + b + s * x @ A.T @ B.T; ``lora`` overrides the (A, B) pair (for jax.grad)."""
    y = x @ p["W"].T
    if p.get("b") is not None:
        y = y + p["b"]
    a, b = lora if lora is not None else (p.get("A"), p.get("B"))
    if a is not None:
        y = y + p["s"] * ((x @ a.T) @ b.T)
    return y


def ref_transformer(xp, p, ids, lora=None):
    lora = lora or {}

    def lin(x, layer, i, name):
        return ref_linear(xp, x, p["layers"][i][name] if layer is None else layer, lora.get((i, name)))

    def rms(x, scale):
        return x / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale

    h = p["embed"][ids]
    b, t, _ = h.shape
    mask = np.tril(np.ones((t, t), bool))
    for i, layer in enumerate(p["layers"]):
        x = rms(h, layer["norm1"])
        q, k, v = (lin(x, None, i, n).reshape(b, t, HEADS, D // HEADS) for n in ("q_proj", "k_proj", "v_proj"))
        scores = xp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D // HEADS)
        scores = xp.where(mask, scores, -1e30)
        probs = xp.exp(scores - scores.max(axis=-1, keepdims=True))
        probs = probs / probs.sum(axis=-1, keepdims=True)
        h = h + lin(xp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, D), None, i, "o_proj")
        x = rms(h, layer["norm2"])
        up = lin(x, None, i, "up_proj")
        h = h + lin(up / (1 + xp.exp(-up)), None, i, "down_proj")
    return ref_linear(xp, h, p["head"])


@nnx.jit
def forward(model, x):
    return model(x)


def as64(tree):
    return jax.tree.map(lambda a: a.astype(np.float64) if isinstance(a, np.ndarray) else a, tree)


def randomize_lora_b(model, rng):
    """Non-zero B everywhere, so that the adapters change the output (fresh B is zero, as in PEFT)."""
    for _, layer in nnx.iter_modules(model):
        if isinstance(layer, (QLoRALinear, QLoRAEinsum)) and layer.lora_B is not None:
            b = layer.lora_B[...]
            layer.lora_B.set_value(jnp.asarray(rng.normal(size=b.shape) * 0.5, b.dtype))


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


TRANSFORMER_RULES = [
    QLoRARule(r"layers\.\d+\.attn\.(q|v)_proj", lora=LoraConfig(r=4, alpha=8.0)),
    QLoRARule(("up_proj", "down_proj"), lora=LoraConfig(r=2, alpha=4.0, use_rslora=True),
              quant=QuantConfig(quant="int8", blocksize=32)),
    QLoRARule("head", lora=None, quant=QuantConfig(quant="fp4", double_quant=False, blocksize=32)),
]


@pytest.fixture(scope="module")
def converted_transformer(module_rng):
    """(original model, converted model, report, ids), converted once per module (it compiles)."""
    seed = seed_of(module_rng)
    original, model = TinyTransformer(nnx.Rngs(seed)), TinyTransformer(nnx.Rngs(seed))
    report = apply_qlora(model, TRANSFORMER_RULES, rngs=nnx.Rngs(seed + 1))
    ids = jnp.asarray(module_rng.integers(0, VOCAB, (2, T)), jnp.int32)
    return original, model, report, ids


@pytest.fixture
def transformer(converted_transformer):
    """The module's converted transformer, cloned for each test: tests that set adapters or take
    optimizer steps change their own copy, so no test sees another's changes, in any order."""
    original, model, report, ids = converted_transformer
    return nnx.clone(original), nnx.clone(model), report, ids


def test_rules_convert_exactly_the_selected_layers(transformer):
    _, model, report, _ = transformer
    expected = {f"layers.{i}.{n}": rule for i in range(2) for n, rule in
                (("attn.q_proj", 0), ("attn.v_proj", 0), ("up_proj", 1), ("down_proj", 1))} | {"head": 2}
    assert {layer.path: layer.rule for layer in report.layers} == expected
    kinds = {".".join(map(str, p)): type(m) for p, m in nnx.iter_modules(model)}
    for path, kind in kinds.items():
        if path.endswith(("_proj", "head")):
            assert kind is (QLoRALinear if path in expected else nnx.Linear), path
    assert model.head.lora_A is None and model.head.weight.get_value().quant_type == "fp4"
    assert model.layers[0].up_proj.weight.get_value().quant_type == "int8"
    assert model.layers[0].attn.q_proj.lora_A[...].shape == (4, D)  # PEFT's [r, in]
    assert model.layers[0].down_proj.lora_B[...].shape == (D, 2)  # PEFT's [out, r]
    assert model.layers[1].attn.v_proj.scaling == 8.0 / 4 and model.layers[1].up_proj.scaling == 4.0 / math.sqrt(2)
    lora_values = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    assert report.trainable_params == lora_values == 2 * (2 * 4 * (D + D) + 2 * ((D + FF) + (FF + D)))
    assert report.bytes_after < report.bytes_before


# Relative output error of one layer quantized with each data type on Gaussian-like weights (NF4's
# weight MSE is ~0.87% of E[w^2], FP4's ~1.6%, Int8's ~0.004%: errors of ~9%, ~13%, ~0.6%), with margin.
LAYER_ERROR = {"nf4": 0.12, "fp4": 0.17, "int8": 0.01}


def test_fresh_adapters_leave_the_model_within_quantization_error(transformer, rng):
    original, _, _, ids = transformer
    fresh = nnx.clone(original)
    report = apply_qlora(fresh, TRANSFORMER_RULES, rngs=nnx.Rngs(1))  # B = 0, as PEFT initialises it
    # Exactly the model with dequantized weights...
    np.testing.assert_allclose(forward(fresh, ids), ref_transformer(np, as64(transformer_params(fresh)),
                                                                    np.asarray(ids)), rtol=2e-5, atol=2e-5)
    # ... whose every layer is the original's within its data type's error.
    modules = dict(nnx.iter_modules(fresh))
    originals = dict(nnx.iter_modules(original))
    for layer in report.layers:
        path = tuple(int(k) if k.isdigit() else k for k in layer.path.split("."))
        x = jnp.asarray(rng.normal(size=(4, layer.shape[1])), jnp.float32)
        quant_type = modules[path].weight.get_value().quant_type
        error = rel_err(forward(modules[path], x), np.asarray(forward(originals[path], x), np.float64))
        assert 1e-4 < error < LAYER_ERROR[quant_type], (layer.path, quant_type, error)


def test_transformer_matches_float64_reference(transformer, rng):
    _, model, _, ids = transformer
    randomize_lora_b(model, rng)
    y = forward(model, ids)
    ref = ref_transformer(np, as64(transformer_params(model)), np.asarray(ids))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref, rtol=5e-5, atol=5e-5)
    params = as64(transformer_params(model))
    zero_b = {(i, n): (params["layers"][i][n]["A"], 0 * params["layers"][i][n]["B"]) for i in range(2)
              for n in ("q_proj", "v_proj", "up_proj", "down_proj")}
    no_adapters = ref_transformer(np, params, np.asarray(ids), lora=zero_b)
    assert rel_err(y, no_adapters) > 1e-2  # the adapters are really in the output


def test_training_step_moves_only_adapters_with_reference_gradients(transformer, rng):
    _, model, _, ids = transformer
    randomize_lora_b(model, rng)
    targets = jnp.asarray(rng.integers(0, VOCAB, ids.shape), jnp.int32)

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(ids), targets).mean()

    params = transformer_params(model)
    names = [(i, n) for i in range(2) for n in ("q_proj", "v_proj", "up_proj", "down_proj")]

    def ref_loss(lora):
        logits = ref_transformer(jnp, params, ids, lora=lora)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    lora0 = {k: (jnp.asarray(params["layers"][k[0]][k[1]]["A"]), jnp.asarray(params["layers"][k[0]][k[1]]["B"]))
             for k in names}
    ref_grads = jax.jit(jax.grad(ref_loss))(lora0)
    grads = nnx.jit(nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam)))(model)
    for i, name in names:
        layer = model.layers[i].attn if name in ("q_proj", "v_proj") else model.layers[i]
        g = getattr(grads.layers[i].attn if name in ("q_proj", "v_proj") else grads.layers[i], name)
        for j, matrix in enumerate(("lora_A", "lora_B")):  # float32 sums in other orders: relative to the scale
            want = np.asarray(ref_grads[(i, name)][j])
            np.testing.assert_allclose(g[matrix][...], want, rtol=2e-3, atol=1e-4 * np.abs(want).max())
        assert getattr(layer, name).lora_A[...].dtype == jnp.float32

    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    optimizer = nnx.Optimizer(model, make_optimizer("adamw", 1e-3, max_grad_norm=None), wrt=nnx.LoRAParam)

    @nnx.jit
    def step(m, opt):
        loss, g = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        opt.update(m, g)
        return loss

    step(model, optimizer)
    after = nnx.to_pure_dict(nnx.state(model))
    lora_paths = {jax.tree_util.keystr(p) for p, _ in
                  jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)))[0]}
    changed = set()
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after), strict=True):
        if not np.array_equal(old, np.asarray(new)):
            changed.add(jax.tree_util.keystr(path))
    assert changed == lora_paths  # every adapter moved (Adam's first step is ~lr * sign(g)), nothing else


def test_paged_adamw_trains_through_nnx_optimizer_like_adamw(rng):
    seed = seed_of(rng)
    ids = jnp.asarray(rng.integers(0, VOCAB, (2, 6)), jnp.int32)
    results = []
    # State streamed through host memory ("layers"; "auto" keeps it on the device on CPU). The
    # model's `layers` is an nnx.List of separate blocks: the default predicate must not take it
    # for arrays stacked over a layer axis.
    for name, placement in (("adamw", None), ("paged_adamw_32bit", "layers")):
        model = TinyTransformer(nnx.Rngs(seed))
        apply_qlora(model, LoraConfig(r=4), rngs=nnx.Rngs(seed))
        randomize_lora_b(model, np.random.default_rng(seed))
        kwargs = {} if placement is None else {"placement": placement}
        opt = nnx.Optimizer(model, make_optimizer(name, 1e-2, **kwargs), wrt=nnx.LoRAParam)

        @nnx.jit
        def step(m, o):
            o.update(m, nnx.grad(lambda m: jnp.mean(m(ids) ** 2), argnums=nnx.DiffState(0, nnx.LoRAParam))(m))

        for _ in range(2):
            step(model, opt)
        results.append(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    for a, b in zip(*results, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("quant,bound", [(QuantConfig(quant="nf4"), 0.15), (QuantConfig(quant="int8"), 0.02),
                                         (QuantConfig(quant="bf16"), 0.01)])
def test_mlp_all_linear_within_data_type_error(rng, quant, bound):
    seed = seed_of(rng)
    original, model = MLP(nnx.Rngs(seed)), MLP(nnx.Rngs(seed))
    report = apply_qlora(model, QLoRARule(quant=quant, lora=LoraConfig(r=8)), rngs=nnx.Rngs(seed))
    assert [layer.path for layer in report.layers] == ["fc1", "fc2"]
    x = np.asarray(rng.normal(size=(3, 5, D)), np.float32)
    y, y_orig = forward(model, jnp.asarray(x)), np.asarray(forward(original, jnp.asarray(x)), np.float64)
    assert rel_err(y, y_orig) < bound
    p1, p2 = (as64(linear_params(layer)) for layer in (model.fc1, model.fc2))
    h = ref_linear(np, x.astype(np.float64), p1)
    np.testing.assert_allclose(y, ref_linear(np, h / (1 + np.exp(-h)), p2), rtol=2e-5, atol=2e-5)


def test_from_linear_packs_bitsandbytes_layout(rng):
    linear = nnx.Linear(D, 48, rngs=nnx.Rngs(seed_of(rng)))
    layer = QLoRALinear.from_linear(linear, lora=LoraConfig(r=4), rngs=nnx.Rngs(0))
    qt = layer.weight.get_value()
    expected = quantize(np.asarray(linear.kernel[...]).T)  # [out, in], as bitsandbytes' Linear4bit
    assert qt.shape == (48, D) and isinstance(layer.weight, FrozenWeights)
    for key, value in to_bnb_state_dict(expected, "w").items():
        np.testing.assert_array_equal(to_bnb_state_dict(qt, "w")[key], value)
    assert layer.lora_A[...].shape == (4, D) and layer.lora_B[...].shape == (48, 4)
    assert not np.any(np.asarray(layer.lora_B[...]))
    bound = 1 / math.sqrt(D)  # PEFT's kaiming_uniform(a=sqrt(5)) on [r, in]
    a = np.asarray(layer.lora_A[...])
    assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.8 * bound


def test_adapters_follow_the_compute_dtype(rng):
    seed = seed_of(rng)
    # (nnx.Linear's dtypes, LoraConfig.dtype, the adapters' dtype)
    cases = [(dict(dtype=jnp.bfloat16), None, jnp.bfloat16), (dict(param_dtype=jnp.bfloat16), None, jnp.bfloat16),
             ({}, None, jnp.float32), (dict(dtype=jnp.bfloat16), "float32", jnp.float32)]
    for kw, lora_dtype, expected in cases:
        layer = QLoRALinear.from_linear(nnx.Linear(D, D, rngs=nnx.Rngs(seed), **kw), lora=LoraConfig(
            r=4, dtype=lora_dtype), rngs=nnx.Rngs(seed))
        assert layer.lora_A[...].dtype == expected and layer.lora_B[...].dtype == expected, (kw, lora_dtype)
    assert forward(layer, jnp.ones((2, D))).dtype == jnp.bfloat16  # the layer's own dtype, not the adapters'
    model = MLP(nnx.Rngs(seed), dtype=jnp.bfloat16)
    apply_qlora(model, LoraConfig(r=4), rngs=nnx.Rngs(seed))
    assert model.fc1.lora_A[...].dtype == jnp.bfloat16 and forward(model, jnp.ones((2, D))).dtype == jnp.bfloat16
    model = MLP(nnx.Rngs(seed), dtype=jnp.bfloat16)
    apply_qlora(model, QLoRARule(lora=LoraConfig(r=4), dtype="float32"), rngs=nnx.Rngs(seed))
    assert model.fc1.lora_A[...].dtype == jnp.float32 and forward(model, jnp.ones((2, D))).dtype == jnp.float32


def test_lora_dropout_touches_only_the_adapter_path(rng):
    linear = nnx.Linear(D, D, rngs=nnx.Rngs(seed_of(rng)))
    layer = QLoRALinear.from_linear(linear, lora=LoraConfig(r=4, dropout=0.5), rngs=nnx.Rngs(seed_of(rng)))
    x = jnp.asarray(rng.normal(size=(16, D)), jnp.float32)
    base = np.asarray(layer(x))
    np.testing.assert_array_equal(layer(x), base)  # B = 0: dropout has nothing to drop
    layer.lora_B.set_value(jnp.asarray(rng.normal(size=(D, 4)), jnp.float32))
    p = as64(linear_params(layer))
    # The layer's next dropout mask, drawn from a copy of its stream: x * mask / keep on the adapter path only.
    dropped = np.asarray(nnx.clone(layer).lora_dropout(x), np.float64)
    assert 0.3 < np.mean(dropped == 0) < 0.7
    train = np.asarray(layer(x))
    expected = ref_linear(np, np.asarray(x, np.float64), p, lora=(0 * p["A"], 0 * p["B"]))
    expected = expected + p["s"] * (dropped @ p["A"].T) @ p["B"].T
    np.testing.assert_allclose(train, expected, rtol=2e-5, atol=2e-5)
    assert not np.allclose(layer(x), train)  # a fresh mask per call
    layer.eval()
    np.testing.assert_allclose(layer(x), ref_linear(np, np.asarray(x, np.float64), p), rtol=2e-5, atol=2e-5)
    # Through apply_qlora: each layer gets its own dropout stream (its key is part of the model's state).
    model = MLP(nnx.Rngs(seed_of(rng)))
    report = apply_qlora(model, LoraConfig(r=4, dropout=0.1), rngs=nnx.Rngs(0))
    assert isinstance(model.fc1.lora_dropout, nnx.Dropout) and model.fc1.lora_dropout.rate == 0.1
    assert report.bytes_after == sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


def bias_broadcast(einsum_str: str, kernel_shape: tuple[int, ...], out_ndim: int) -> list[int]:
    """nnx.Einsum's bias broadcast: the kernel's size for output axes that come from the kernel, else 1."""
    rhs, out = einsum_str.split(",")[1].split("->")
    ellipsis = out_ndim - len(out.replace("...", ""))
    shape = []
    for c in out.replace("...", "."):
        shape += [1] * ellipsis if c == "." else [kernel_shape[rhs.index(c)] if c in rhs else 1]
    return shape


GEMMA_CASES = [
    ("BTD,NDH->BTNH", (4, D, 16), None, (2, 5, D)),
    ("BSD,CKDH->CBSKH", (2, 2, D, 16), None, (2, 5, D)),
    ("BTNH,NHD->BTD", (4, 16, D), (D,), (2, 5, 4, 16)),
    ("ECD,EDF->ECF", (3, D, 32), (3, 32), (3, 6, D)),
    ("...D,DF->...F", (D, 48), (48,), (2, 3, 5, D)),
]


@pytest.mark.parametrize("einsum_str,kernel_shape,bias_shape,x_shape", GEMMA_CASES)
def test_einsum_layers_match_float64_reference(rng, einsum_str, kernel_shape, bias_shape, x_shape):
    seed = seed_of(rng)
    einsum = nnx.Einsum(einsum_str, kernel_shape, bias_shape, rngs=nnx.Rngs(seed))
    if bias_shape is not None:
        einsum.bias.set_value(jnp.asarray(rng.normal(size=bias_shape), jnp.float32))
    layer = QLoRAEinsum.from_einsum(einsum, lora=LoraConfig(r=2), rngs=nnx.Rngs(seed))
    layout = layer.layout
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    y0 = np.asarray(forward(layer, x))
    layer.lora_B.set_value(jnp.asarray(rng.normal(size=layer.lora_B[...].shape), jnp.float32))
    # Reference: the einsum itself with the kernel rebuilt from dequantized matrices plus adapters.
    deq = functools.partial(dequantize, dtype=jnp.float32)
    for _ in layout.batch_axes:  # one [out, in] matrix per batch index
        deq = jax.vmap(deq)
    w = np.asarray(jax.jit(deq)(layer.weight.get_value()), np.float64)
    a, b = np.asarray(layer.lora_A[...], np.float64), np.asarray(layer.lora_B[...], np.float64)
    kernel = np.asarray(layout.unpack(jnp.asarray(w + layer.scaling * b @ a)), np.float64)
    ref = np.einsum(einsum_str, np.asarray(x, np.float64), kernel)
    if bias_shape is not None:
        ref = ref + np.asarray(layer.bias[...], np.float64).reshape(bias_broadcast(einsum_str, kernel_shape,
                                                                                     ref.ndim))
    np.testing.assert_allclose(forward(layer, x), ref, rtol=2e-5, atol=2e-5)
    # B = 0: the original einsum within NF4's error.
    y_orig = np.asarray(forward(einsum, x), np.float64)
    assert rel_err(y0, y_orig) < 0.15
    kernel0 = np.asarray(einsum.kernel[...])
    np.testing.assert_array_equal(layout.unpack(layout.pack(jnp.asarray(kernel0))), kernel0)


def test_einsum_packing_rule_is_the_documented_one(rng):
    layout = EinsumLayout.parse("BTD,NDH->BTNH", (4, D, 16))
    assert (layout.batch_axes, layout.out_axes, layout.in_axes) == ((), (0, 2), (1,))
    kernel = rng.normal(size=(4, D, 16)).astype(np.float32)
    matrix = np.asarray(layout.pack(jnp.asarray(kernel)))
    n, d, h = 3, 17, 5
    assert matrix.shape == (4 * 16, D) and matrix[n * 16 + h, d] == kernel[n, d, h]
    moe = EinsumLayout.parse("ECD,EDF->ECF", (3, D, 32))
    assert (moe.batch_axes, moe.out_axes, moe.in_axes) == ((0,), (2,), (1,))
    kernel = rng.normal(size=(3, D, 32)).astype(np.float32)
    np.testing.assert_array_equal(moe.pack(jnp.asarray(kernel)), np.swapaxes(kernel, 1, 2))
    for bad, match in (("BTD,DD->BT", "repeats"), ("BT,DH->BTH", "neither"), ("BTD,DH->BH", "summed"),
                       ("BTD,DH", "explicit"), ("BTD,...H->BTH", "named")):
        with pytest.raises(ValueError, match=match):
            EinsumLayout.parse(bad, (D, 16) if bad.count(",") else (D,))


def test_gemma_style_attention_module_converts_by_rule(rng):
    class GemmaAttention(nnx.Module):
        def __init__(self, rngs):
            self.q_einsum = nnx.Einsum("BTD,NDH->BTNH", (4, D, 16), rngs=rngs)
            self.kv_einsum = nnx.Einsum("BSD,CKDH->CBSKH", (2, 1, D, 16), rngs=rngs)
            self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (4, 16, D), rngs=rngs)

        def __call__(self, x):
            q = self.q_einsum(x)
            k, v = self.kv_einsum(x)
            logits = jnp.einsum("BTNH,BSKH->BNTS", q, k)
            return self.attn_vec_einsum(jnp.einsum("BNTS,BSKH->BTNH", jax.nn.softmax(logits, -1), v))

    seed = seed_of(rng)
    original, model = GemmaAttention(nnx.Rngs(seed)), GemmaAttention(nnx.Rngs(seed))
    report = apply_qlora(model, QLoRARule(r".*_einsum", lora=LoraConfig(r=4)), rngs=nnx.Rngs(seed))
    assert sorted((layer.path, layer.kind, layer.shape) for layer in report.layers) == [
        ("attn_vec_einsum", "Einsum", (D, 64)), ("kv_einsum", "Einsum", (32, D)), ("q_einsum", "Einsum", (64, D))]
    x = jnp.asarray(rng.normal(size=(2, 5, D)), jnp.float32)
    assert rel_err(model(x), np.asarray(original(x), np.float64)) < 0.2


def test_stacked_layers_under_nnx_scan(rng):
    class Stack(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=3)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r):
                return MLP(r)

            self.layers = make(rngs)

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(h, layer):
                return h + layer(h)

            return body(x, self.layers)

    seed = seed_of(rng)
    model = Stack(nnx.Rngs(seed))
    kernels = np.asarray(model.layers.fc1.kernel[...])
    report = apply_qlora(model, LoraConfig(r=4), rngs=nnx.Rngs(seed))
    assert [(layer.path, layer.stacked) for layer in report.layers] == [("layers.fc1", (3,)), ("layers.fc2", (3,))]
    qt = model.layers.fc1.weight.get_value()
    assert model.layers.fc1.lora_A[...].shape == (3, 4, D)  # the built-in LLaMA's stacked [L, r, in]
    for i in range(3):  # each slice is exactly the quantization of that layer's [out, in] weight
        one = quantize(kernels[i].T)
        np.testing.assert_array_equal(qt.codes[i], one.codes)
        np.testing.assert_array_equal(qt.scales[i], one.scales)
    randomize_lora_b(model, rng)
    x = np.asarray(rng.normal(size=(2, D)), np.float32)
    h = x.astype(np.float64)
    for i in range(3):
        layer = {}
        for name in ("fc1", "fc2"):
            q = getattr(model.layers, name)
            w = q.weight.get_value()
            layer[name] = dict(W=np.asarray(dequantize32(jax.tree.map(lambda v, i=i: v[i], w)), np.float64),
                               b=np.asarray(q.bias[...][i], np.float64), A=np.asarray(q.lora_A[...][i], np.float64),
                               B=np.asarray(q.lora_B[...][i], np.float64), s=q.scaling)
        u = ref_linear(np, h, layer["fc1"])
        h = h + ref_linear(np, u / (1 + np.exp(-u)), layer["fc2"])
    np.testing.assert_allclose(model(jnp.asarray(x)), h, rtol=5e-5, atol=5e-5)
    with pytest.raises(ValueError, match="call it inside nnx.scan"):
        model.layers.fc1(jnp.asarray(x))


def test_kernel_backend_per_model_per_rule_per_layer(rng):
    seed = seed_of(rng)
    model = MLP(nnx.Rngs(seed), dtype=jnp.bfloat16)  # the kernels take 16-bit activations
    apply_qlora(model, [QLoRARule("fc1", lora=LoraConfig(r=2), kernel_backend="jax_triton"),
                        QLoRARule("fc2", lora=LoraConfig(r=2))], rngs=nnx.Rngs(seed), kernel_backend="xla")
    assert (model.fc1.kernel_backend, model.fc2.kernel_backend) == ("jax_triton", "xla")
    x = jnp.ones((2, D))
    # The backend reaches quantized_matmul: the Triton kernels need a GPU (or interpret mode).
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        model(x)
    assert set_kernel_backend(model, "xla", "fc1") == 1
    y_xla = np.asarray(model(x))
    assert set_kernel_backend(model, "auto") == 2
    np.testing.assert_array_equal(model(x), y_xla)  # auto is XLA on CPU
    with pytest.raises(ValueError, match="kernel_backend must be one of"):
        QLoRARule(kernel_backend="cuda")
    with pytest.raises(QLoRAConversionError, match="selects no QLoRA layer"):
        set_kernel_backend(model, "xla", "fc3")


def test_tied_layer_is_converted_once_everywhere(rng):
    class Tied(nnx.Module):
        def __init__(self, rngs):
            self.a = nnx.Linear(D, D, rngs=rngs)
            self.b = self.a

        def __call__(self, x):
            return self.b(self.a(x))

    model = Tied(nnx.Rngs(seed_of(rng)))
    report = apply_qlora(model, LoraConfig(r=2), rngs=nnx.Rngs(0))
    assert [layer.path for layer in report.layers] == ["a"]
    assert isinstance(model.a, QLoRALinear) and model.b is model.a


def test_ragged_input_dimension_fallback_or_error(rng):
    class Ragged(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(48, D, rngs=rngs)  # 48 inputs: blocks of 64 straddle rows

        def __call__(self, x):
            return self.proj(x)

    seed = seed_of(rng)
    model = Ragged(nnx.Rngs(seed))
    with pytest.raises(QLoRAConversionError, match="in_features=48 is not a multiple of blocksize=64"):
        apply_qlora(model, QLoRARule("proj", lora=LoraConfig(r=2), on_ragged_blocks="error"), rngs=nnx.Rngs(0))
    assert isinstance(model.proj, nnx.Linear)
    report = apply_qlora(model, QLoRARule("proj", lora=LoraConfig(r=2)), rngs=nnx.Rngs(0))
    assert report.ragged_layers == ("proj",)
    qt = model.proj.weight.get_value()
    assert qt.scales.shape == (48 * D // 64,)  # bitsandbytes' flat scales: blocks run across rows
    x = np.asarray(rng.normal(size=(3, 48)), np.float32)
    np.testing.assert_allclose(model(jnp.asarray(x)), ref_linear(np, x.astype(np.float64),
                                                                 as64(linear_params(model.proj))), rtol=2e-5, atol=2e-5)


def test_bad_rules_and_models_are_refused_before_anything_changes(rng):
    seed = seed_of(rng)
    model = TinyTransformer(nnx.Rngs(seed))
    state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))

    def refused(rules, match, **kw):
        with pytest.raises((QLoRAConversionError, ValueError, TypeError), match=match):
            apply_qlora(model, rules, rngs=nnx.Rngs(0), **kw)

    refused([QLoRARule("q_proj"), QLoRARule(r".*\.qkv_proj")],
            r"rule 1 \(module_path='.*qkv_proj'\) matches no module.*nearest paths are: .*q_proj \(Linear\)")
    refused(QLoRARule(r"layers\.\d+\.attn"), r"matches 'layers.0.attn', a Attention \(not a linear layer\)")
    refused(QLoRARule("embed"), r"matches 'embed', a Embed")
    refused([QLoRARule("all-linear"), QLoRARule("q_proj")], r"rule 1 .* only matches layers that rule\(s\) \[0\]")
    with pytest.raises(ValueError, match="needs rngs"):
        apply_qlora(model, LoraConfig(target_modules=("q_proj",)))
    with pytest.raises(ValueError, match="give the layers once"):
        QLoRARule("q_proj", lora=LoraConfig(target_modules=("v_proj",)))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        QLoRARule(r".*(q_proj")
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    jax.tree.map(np.testing.assert_array_equal, state, after)
    assert all(type(m) is not QLoRALinear for _, m in nnx.iter_modules(model))

    # A PEFT-style LoraConfig is a rule; converting twice is refused.
    apply_qlora(model, LoraConfig(r=2, target_modules="q_proj,v_proj"), rngs=nnx.Rngs(0))
    assert isinstance(model.layers[1].attn.v_proj, QLoRALinear) and isinstance(model.layers[1].attn.k_proj, nnx.Linear)
    refused(LoraConfig(r=2, target_modules=("q_proj",)), r"matches 'layers.0.attn.q_proj', which is a QLoRALinear "
                                                         "already")

    class Sub(nnx.Module):
        def __init__(self, rngs):
            self.lora_linear = nnx.LoRALinear(D, D, lora_rank=2, rngs=rngs)
            self.held = nnx.data((nnx.Linear(D, D, rngs=rngs),))

    sub = Sub(nnx.Rngs(0))
    with pytest.raises(QLoRAConversionError, match="a LoRALinear \\(a subclass that may compute otherwise\\)"):
        apply_qlora(sub, QLoRARule("lora_linear"), rngs=nnx.Rngs(0))
    with pytest.raises(QLoRAConversionError, match="sits in a tuple"):
        apply_qlora(sub, QLoRARule(r"held\.0"), rngs=nnx.Rngs(0))
    stacked = pack_weight(jnp.ones((2, D, D)), QuantConfig())
    with pytest.raises(NotImplementedError, match="dropout on a layer stacked over axes \\[2\\]"):
        QLoRALinear(stacked, lora=LoraConfig(r=2, dropout=0.1), rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_custom_model_example_trains_saves_and_restores(tmp_path):
    """`python -m experiments.custom_model`, shortened: only adapters move, the loss falls, restore is exact."""
    figures_path = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.custom_model", f"--workdir={tmp_path / 'run'}", "--pretrain_steps=40",
         "--steps=30", f"--json_out={figures_path}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figures = json.loads(figures_path.read_text())
    assert figures["frozen_unchanged"] and figures["restored_identical"], figures
    assert figures["qlora_loss_b_after"] < 0.5 * figures["qlora_loss_b_before"], figures
    # 2 blocks x (qkv, out, fc_in, fc_out), r=8: r * (in + out) each; the head is excluded.
    assert figures["layers_replaced"] == 8
    assert figures["trainable_params"] == 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))
    assert figures["adapter_bytes"] == 4 * figures["trainable_params"]  # float32 adapters on a float32 model
