"""The training objective of ``make_train_step`` against an independent reference.

The reference is transformers + PEFT in float64 (tests/oracles/hf_train.py), with the masking and
token weighting written out there: position t predicts token t + 1, a target is a token where
both loss_mask and attention_mask are 1, and every target token of the optimizer step weighs the
same. Checked here: the loss and every LoRA gradient (response-only mask, right padding), gradient
accumulation over micro-batches whose padding and target counts differ, and a data-parallel mesh.

Tolerances, from the arithmetic: our step runs in float32 (unit roundoff u = 6e-8). Each value
passes through about 20 dependent stages (2 layers forward and backward, the head, softmax),
each a sum of at most K = 256 products. Rounding errors of independent terms add like a random
walk, about sqrt(K)·u = 1e-6 of the terms' magnitudes per stage, and the stages' errors add up
(20 · sqrt(K) · u = 1.9e-5); a factor of 4 covers the walk's tails. So a gradient matrix is
compared with atol = 80·sqrt(K)·u·max|g| = 7.6e-5·max|g| (its largest entries set the scale of
what the sums carry), and the loss, a mean of O(1) cross-entropies, with rtol = 80·sqrt(K)·u.
A wrong mask, weighting or scaling moves them by far more (test_the_response_mask_...).
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from qlora_jax.checkpoints.load import load_base_params, open_checkpoint, read_config
from qlora_jax.models.spec import ModelSpec
from qlora_jax.peft_io import load_peft_adapter
from qlora_jax.quant import QuantConfig
from qlora_jax.train import make_train_step

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS, SEQ = 6, 12
U32, K = float(np.finfo(np.float32).eps) / 2, 256
GRAD_ATOL_FRACTION = 80 * K**0.5 * U32
LOSS_RTOL = 80 * K**0.5 * U32


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("objective")


@pytest.fixture(scope="module")
def batch(module_rng) -> dict[str, np.ndarray]:
    """Six rows with different right padding and response-only loss masks (a prompt of 2-5 tokens
    that is not a target), so that rows and micro-batches hold different numbers of targets."""
    rng = module_rng
    ids = rng.integers(0, CONFIG["vocab_size"], size=(ROWS, SEQ)).astype(np.int32)
    attention = np.zeros((ROWS, SEQ), np.int32)
    loss_mask = np.zeros((ROWS, SEQ), np.int32)
    lengths = [SEQ, SEQ - 5, 7, SEQ - 1, 5, SEQ - 3]
    for row, length in enumerate(lengths):
        attention[row, :length] = 1
        prompt = int(rng.integers(2, 6))
        loss_mask[row, prompt:length] = 1
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}


@pytest.fixture(scope="module")
def reference(oracle, workdir, batch) -> dict:
    """A random Llama (transformers), a random PEFT adapter (non-zero A and B) on every projection,
    and the float64 loss and gradients of the whole six-row batch and of its first two rows."""
    ids = batch["input_ids"]
    oracle.run("hf_models.py", {"model/input_ids": ids, "adapter/input_ids": ids}, {"cases": [
        dict(name="model", op="make_model", model_type="llama", config=CONFIG, seed=11, dir=str(workdir / "model")),
        dict(name="adapter", op="peft_random", dir=str(workdir / "model"), r=4, alpha=8, targets=TARGETS, seed=5,
             save_dir=str(workdir / "adapter")),
    ]})
    cases = {"all": slice(0, ROWS), "first_two": slice(0, 2)}
    arrays = {f"{name}/{key}": value[rows] for name, rows in cases.items() for key, value in batch.items()}
    out = oracle.run("hf_train.py", arrays, {"cases": [
        dict(name=name, dir=str(workdir / "model"), adapter_dir=str(workdir / "adapter"),
             save_dir=str(workdir / f"grads_{name}")) for name in cases]})
    source, config_file = open_checkpoint(workdir / "model")
    config = read_config(config_file)
    base, _ = load_base_params(source, config, QuantConfig(quant="float32", dtype="float32"))
    adapter, lora_config = load_peft_adapter(workdir / "adapter", config, dtype="float32")
    grads = {name: load_peft_adapter(workdir / f"grads_{name}", config, dtype="float32")[0] for name in cases}
    return dict(config=config, base=base, adapter=adapter, lora_config=lora_config, out=out, grads=grads)


def capture_gradients() -> optax.GradientTransformation:
    """An "optimizer" whose state becomes the gradients it is given, unchanged (and no update)."""
    return optax.GradientTransformation(
        init=lambda params: jax.tree.map(jnp.zeros_like, params),
        update=lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def micro_batches(batch: dict[str, np.ndarray], rows: slice, accum: int) -> dict[str, jax.Array]:
    """``batch[rows]`` as ``[accum, B, T]``: ``accum`` micro-batches of consecutive rows."""
    return {k: jnp.asarray(v[rows].reshape(accum, -1, SEQ)) for k, v in batch.items()}


def step_gradients(reference, batch, *, accum: int, rows: slice = slice(0, ROWS), shardings=None, remat=False):
    spec = ModelSpec(reference["config"], reference["lora_config"], compute_dtype="float32", remat=remat)
    step = make_train_step(spec, capture_gradients())
    micro = micro_batches(batch, rows, accum)
    if shardings is not None:
        micro = jax.device_put(micro, shardings)
    trainable = reference["adapter"]
    _, grads, metrics = jax.jit(step)(trainable, capture_gradients().init(trainable), reference["base"], micro, None)
    return grads, metrics


def assert_gradients_close(got, want):
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    assert len(flat_got) == len(flat_want) == 2 * len(TARGETS)
    for path, value in flat_got:
        expected = np.asarray(flat_want[path], np.float64)
        scale = np.abs(expected).max()
        assert scale > 0, f"{jax.tree_util.keystr(path)}: the reference gradient is zero, so it checks nothing"
        np.testing.assert_allclose(np.asarray(value, np.float64), expected, rtol=0,
                                   atol=GRAD_ATOL_FRACTION * scale, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("remat", [False, True], ids=["stored", "rematerialised"])
def test_loss_and_lora_gradients_equal_peft_in_float64(reference, batch, remat):
    """With each layer's activations stored, or recomputed in the backward pass (remat)."""
    grads, metrics = step_gradients(reference, batch, accum=1, remat=remat)
    out = reference["out"]
    assert float(metrics["tokens"]) == out["all/tokens"]
    np.testing.assert_allclose(float(metrics["loss"]), out["all/loss"], rtol=LOSS_RTOL)
    assert_gradients_close(grads, reference["grads"]["all"])


def test_the_response_mask_decides_the_gradients(reference, batch):
    """The prompt tokens are not targets: with them counted, the gradients differ beyond tolerance."""
    everything = dict(batch, loss_mask=np.ones_like(batch["loss_mask"]))
    grads, metrics = step_gradients(reference, everything, accum=1)
    assert float(metrics["tokens"]) > reference["out"]["all/tokens"]
    want = reference["grads"]["all"]
    differences = [np.abs(np.asarray(g) - np.asarray(w)).max() / np.abs(np.asarray(w)).max()
                   for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True)]
    assert max(differences) > 100 * GRAD_ATOL_FRACTION


def test_accumulation_weighs_every_target_token_the_same(reference, batch):
    """Three micro-batches of two rows, with 11 to 19 targets each, give the loss and gradients of
    the six-row batch (the mean over all its targets, not the mean of the micro-batches' means)."""
    counts = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).reshape(3, -1).sum(axis=1)
    assert len(set(counts.tolist())) > 1, "micro-batches with equal target counts would not test the weighting"
    one, one_metrics = step_gradients(reference, batch, accum=1)
    three, three_metrics = step_gradients(reference, batch, accum=3)
    out = reference["out"]
    assert float(three_metrics["tokens"]) == out["all/tokens"]
    np.testing.assert_allclose(float(three_metrics["loss"]), out["all/loss"], rtol=LOSS_RTOL)
    np.testing.assert_allclose(float(three_metrics["loss"]), float(one_metrics["loss"]), rtol=LOSS_RTOL)
    assert_gradients_close(three, reference["grads"]["all"])
    assert_gradients_close(three, one)
    # A micro-batch on its own is its own mean: the first two rows against their reference.
    first, _ = step_gradients(reference, batch, accum=1, rows=slice(0, 2))
    assert_gradients_close(first, reference["grads"]["first_two"])


def test_accumulated_sgd_step_updates_the_adapters_as_one_batch(reference, batch):
    """The adapters after one optimizer step: 3 micro-batches against one batch of six rows."""
    spec = ModelSpec(reference["config"], reference["lora_config"], compute_dtype="float32")
    learning_rate = 0.5
    step = jax.jit(make_train_step(spec, optax.sgd(learning_rate)))
    trainable = reference["adapter"]
    state = optax.sgd(learning_rate).init(trainable)
    after_one, _, _ = step(trainable, state, reference["base"], micro_batches(batch, slice(0, ROWS), 1), None)
    after_three, _, _ = step(trainable, state, reference["base"], micro_batches(batch, slice(0, ROWS), 3), None)
    # The updated adapters are trainable - lr * g: what moved is -lr times the reference gradients,
    # and the two ways of batching move the adapters alike.
    def moved(after):
        return jax.tree.map(lambda new, old: np.asarray(new, np.float64) - np.asarray(old, np.float64), after,
                            trainable)

    want = jax.tree.map(lambda g: -learning_rate * np.asarray(g, np.float64), reference["grads"]["all"])
    assert_gradients_close(moved(after_three), want)
    assert_gradients_close(moved(after_three), moved(after_one))


def test_a_data_parallel_mesh_gives_the_same_objective(reference, batch):
    """Rows split over two devices (and over two micro-batches): the same loss and gradients."""
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    sharding = NamedSharding(mesh, P(None, "data", None))
    grads, metrics = step_gradients(reference, batch, accum=3, shardings=sharding)
    out = reference["out"]
    np.testing.assert_allclose(float(metrics["loss"]), out["all/loss"], rtol=LOSS_RTOL)
    assert_gradients_close(grads, reference["grads"]["all"])


def _cross_entropy_reference(hidden, head, targets, mask, softcap):
    """Float64 numpy: the summed masked loss and its gradients with respect to hidden and head."""
    h, w = hidden.astype(np.float64), head.astype(np.float64)
    raw = h @ w.T
    logits = raw if softcap is None else np.tanh(raw / softcap) * softcap
    logz = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    loss = np.sum((logz - logits[np.arange(len(targets)), targets]) * mask)
    dlogits = np.exp(logits - logz[:, None])
    dlogits[np.arange(len(targets)), targets] -= 1.0
    dlogits *= mask[:, None]
    if softcap is not None:
        dlogits *= 1.0 - np.tanh(raw / softcap) ** 2
    return loss, dlogits @ w, dlogits.T @ h


@pytest.mark.parametrize("softcap", [None, 5.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("head_frozen", [True, False], ids=["frozen_head", "trained_head"])
def test_chunked_cross_entropy_and_its_gradients_equal_float64(rng, softcap, head_frozen):
    """Both backward paths (the frozen head's gradient taken in the forward pass, and autodiff
    through recomputed chunks) against float64: N = 37 tokens in chunks of 8 (padded), a third of
    them masked out. Tolerance as the module docstring derives it (a few stages, K <= 256)."""
    from qlora_jax.train import chunked_cross_entropy

    n, d, v = 37, 48, 96
    hidden = rng.standard_normal((n, d)).astype(np.float32)
    head = (rng.standard_normal((v, d)) / d**0.5).astype(np.float32)
    targets = rng.integers(0, v, n).astype(np.int32)
    mask = (rng.random(n) > 1 / 3).astype(np.float32)
    want_loss, want_dh, want_dw = _cross_entropy_reference(hidden, head, targets, mask, softcap)

    def loss(h, w):
        return chunked_cross_entropy(h, w, jnp.asarray(targets), jnp.asarray(mask), 8, softcap=softcap,
                                     head_frozen=head_frozen)[0]

    got_loss, (got_dh, got_dw) = jax.value_and_grad(loss, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(head))
    np.testing.assert_allclose(float(got_loss), want_loss, rtol=LOSS_RTOL)
    np.testing.assert_allclose(np.asarray(got_dh), want_dh, rtol=0,
                               atol=GRAD_ATOL_FRACTION * np.abs(want_dh).max())
    if head_frozen:
        # The documented contract: the head's cotangent is zero (QLoRA never asks for it).
        np.testing.assert_array_equal(np.asarray(got_dw), 0.0)
    else:
        np.testing.assert_allclose(np.asarray(got_dw), want_dw, rtol=0,
                                   atol=GRAD_ATOL_FRACTION * np.abs(want_dw).max())
    count = chunked_cross_entropy(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(targets),
                                  jnp.asarray(mask), 8)[1]
    assert float(count) == mask.sum()


def test_a_frozen_quantized_head_takes_the_same_hidden_gradient(rng):
    """A packed NF4 head (integer codes: float0 cotangents): both paths give one hidden gradient."""
    from qlora_jax.quant import quantize
    from qlora_jax.train import chunked_cross_entropy

    n, d, v = 24, 64, 128
    hidden = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    head = quantize(jnp.asarray(rng.standard_normal((v, d)) / d**0.5, jnp.float32), "nf4")
    targets = jnp.asarray(rng.integers(0, v, n), jnp.int32)
    mask = jnp.ones((n,), jnp.float32)

    def grad(frozen):
        return jax.grad(lambda h: chunked_cross_entropy(h, head, targets, mask, 8, head_frozen=frozen)[0])(hidden)

    fused, autodiff = np.asarray(grad(True)), np.asarray(grad(False))
    np.testing.assert_allclose(fused, autodiff, rtol=0, atol=GRAD_ATOL_FRACTION * np.abs(autodiff).max())
