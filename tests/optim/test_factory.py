"""make_optimizer, the weight-decay mask, the learning-rate schedules, and the optimizer benchmark's smoke run."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qlora_jax import optim

REPO = pathlib.Path(__file__).resolve().parents[2]


def llama_like(rng) -> dict:
    """The trainable trees the recipes build: LoRA on stacked layers; full finetuning adds the rest."""
    def normal(*shape):
        return jnp.asarray(rng.normal(0, 0.1, size=shape), jnp.float32)

    return {
        "embed_tokens": normal(50, 16),
        "norm": 1.0 + normal(16),
        "layers": {
            "input_layernorm": 1.0 + normal(2, 16),
            "self_attn": {"q_proj": {"lora_A": normal(2, 4, 16), "lora_B": normal(2, 16, 4), "bias": normal(2, 16)}},
            "mlp": {"down_proj": {"weight": normal(2, 16, 24)}},
        },
    }


def test_default_decay_mask_is_hugging_face_rule(rng):
    mask = optim.decay_mask(llama_like(rng))
    assert mask == {
        "embed_tokens": True,
        "norm": False,
        "layers": {
            "input_layernorm": False,
            "self_attn": {"q_proj": {"lora_A": True, "lora_B": True, "bias": False}},
            "mlp": {"down_proj": {"weight": True}},
        },
    }


def test_mask_pytree_is_looked_up_by_path(rng):
    params = llama_like(rng)
    given = jax.tree.map(lambda _: False, params)
    given["embed_tokens"] = True
    fn = optim.as_mask_fn(given)
    assert fn(params) == given
    partial = {"embed_tokens": params["embed_tokens"], "norm": None}
    assert fn(partial) == {"embed_tokens": True, "norm": None}
    with pytest.raises(TypeError, match="Python bools"):
        optim.as_mask_fn({"a": jnp.array(True)})
    with pytest.raises(KeyError, match="no entry for parameter"):
        fn({"other": jnp.zeros(2)})


def test_warmup_constant_schedule_is_hugging_faces():
    schedule = optim.warmup_constant_schedule(2e-4, warmup_steps=6)
    for step in range(12):
        expected = 2e-4 * min(1.0, step / 6)  # transformers.get_constant_schedule_with_warmup
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    assert float(optim.warmup_constant_schedule(3e-4)(0)) == pytest.approx(3e-4)
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.warmup_constant_schedule(1e-4, -1)


@pytest.mark.parametrize("name", ["adamw", "paged_adamw_32bit"])
def test_make_optimizer_is_clipped_masked_adamw_with_warmup(rng, name):
    """Against optax's own pieces: clip 0.3, adamw(b2=0.999) with the HF mask, linear warmup."""
    params = llama_like(rng)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 1.0, size=x.shape), jnp.float32), params)
             for _ in range(6)]
    ours = optim.make_optimizer(name, 1e-2, warmup_steps=3, weight_decay=0.05,
                                **({"placement": "layers"} if name.startswith("paged") else {}))
    mask = {"embed_tokens": True, "norm": False,
            "layers": {"input_layernorm": False,
                       "self_attn": {"q_proj": {"lora_A": True, "lora_B": True, "bias": False}},
                       "mlp": {"down_proj": {"weight": True}}}}
    reference = optax.chain(
        optax.clip_by_global_norm(0.3),
        optax.adamw(lambda c: 1e-2 * jnp.minimum(1.0, c / 3), b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05,
                    mask=mask))
    p, s = params, ours.init(params)
    rp, rs = params, reference.init(params)
    step, ref_step = jax.jit(ours.update), jax.jit(reference.update)
    for g in grads:
        u, s = step(g, s, p)
        p = optax.apply_updates(p, u)
        ru, rs = ref_step(g, rs, rp)
        rp = optax.apply_updates(rp, ru)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(rp), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(s) if x.ndim}  # the moments (counts: device)
    assert kinds == ({"pinned_host"} if name.startswith("paged") else {"device"})


@pytest.mark.parametrize("name", ["adamw", "paged_adamw"])
def test_bfloat16_parameters_keep_float32_moments(rng, name):
    """bfloat16 adapters (qlora.py --bf16): float32 Adam state, updates as float64 AdamW computes them."""
    params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), llama_like(rng))
    tx = optim.make_optimizer(name, 1e-2, max_grad_norm=None)
    state = tx.init(params)
    moments = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert moments and all(x.dtype == jnp.float32 for x in moments)
    p = params
    m = v = jax.tree.map(lambda x: np.zeros(x.shape, np.float64), params)
    step = jax.jit(tx.update)
    for t in range(1, 4):
        g = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 1.0, size=x.shape), jnp.bfloat16), params)
        u, state = step(g, state, p)
        p = optax.apply_updates(p, u)
        g64 = jax.tree.map(lambda x: np.asarray(x, np.float64), g)
        m = jax.tree.map(lambda mi, gi: 0.9 * mi + 0.1 * gi, m, g64)
        v = jax.tree.map(lambda vi, gi: 0.999 * vi + 0.001 * gi * gi, v, g64)
        direction = jax.tree.map(lambda mi, vi, t=t: (mi / (1 - 0.9**t)) / (np.sqrt(vi / (1 - 0.999**t)) + 1e-8), m, v)
        # The parameters are bfloat16: compare each step's update against the float64 direction.
        for ours, ref in zip(jax.tree.leaves(u), jax.tree.leaves(direction), strict=True):
            np.testing.assert_allclose(np.asarray(ours, np.float64), -1e-2 * ref, rtol=1e-2, atol=1e-7)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
    assert not all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params), strict=True))


def test_make_optimizer_accepts_a_schedule_and_no_clipping(rng):
    params = llama_like(rng)
    schedule = optax.linear_schedule(1e-3, 0.0, 10)
    tx = optim.make_optimizer("adamw_8bit", schedule, max_grad_norm=None)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    # Without clipping, Adam's first step is lr * sign(g) for every parameter.
    np.testing.assert_allclose(np.asarray(updates["embed_tokens"]), -1e-3, rtol=1e-4)


def test_make_optimizer_errors():
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'.*paged_adamw_8bit"):
        optim.make_optimizer("sgd", 1e-3)
    with pytest.raises(ValueError, match="warmup_steps only applies"):
        optim.make_optimizer("adamw", optax.constant_schedule(1e-3), warmup_steps=5)
    with pytest.raises(ValueError, match="learning_rate must be non-negative"):
        optim.make_optimizer("adamw", -1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        optim.make_optimizer("adamw", 1e-3, max_grad_norm=-1.0)


def test_bench_optimizer_smoke(tmp_path):
    """The benchmark's CPU smoke run: paged "auto" and streaming beside plain AdamW, in one process."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.bench_optimizer", "--smoke", "--noisolate",
         "--variants=adamw,paged_adamw:auto,paged_adamw:layers", f"--json={out}"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r["variant"]: r for r in json.loads(out.read_text())["records"]}
    base, auto, layers = (records[v] for v in ("adamw", "paged_adamw:auto", "paged_adamw:layers"))
    # "auto" on CPU (no separate device memory): the state stays on the device, nothing moves.
    assert auto["placement"]["where"] == "device" and "no separate device memory" in auto["placement"]["reason"]
    assert auto["bytes_to_device_per_step"] == auto["bytes_to_host_per_step"] == 0
    # Where the state lives, measured from the arrays, agrees with the moment sizes computed from the
    # shapes (plus the int32 step counters, which stay on the device).
    for record, kind in ((base, "device"), (auto, "device"), (layers, "pinned_host")):
        measured = record["state_bytes_by_memory_kind"]
        assert 0 <= measured[kind] - record["computed_state_bytes"] <= 64, (record["variant"], measured)
        assert sum(measured.values()) - measured[kind] <= 64
    assert layers["state_memory_kinds_after_steps"] == ["device", "pinned_host"]
    # Streamed: each step copies the state both ways, plus the first layer's state again.
    per_layer = layers["computed_state_bytes"] // 4
    assert layers["bytes_to_host_per_step"] - layers["computed_state_bytes"] in range(0, 65)
    assert layers["bytes_to_device_per_step"] - layers["bytes_to_host_per_step"] == per_layer
    assert all(r["step_seconds_median"] > 0 and r["hlo_copy_start"] == 0 for r in records.values())
    assert records["paged_adamw:auto"]["time_ratio"] > 0 and base["time_ratio"] == 1.0
    # CPU reports no memory statistics: the table says so instead of printing a number.
    assert base["peak_device_bytes"] is None and "not available" in proc.stdout
    assert "paged_adamw:layers" in proc.stdout and "vs base" in proc.stdout


@pytest.mark.parametrize("schedule_type", optim.SCHEDULE_TYPES)
@pytest.mark.parametrize("max_steps,warmup_ratio", [(20, 0.0), (20, 0.03), (37, 0.25)])
def test_lr_schedule_is_hugging_faces(schedule_type, max_steps, warmup_ratio):
    """transformers.get_scheduler's lambdas (optimization.py), written out, times the base rate."""
    lr = 3e-4
    warmup = math.ceil(warmup_ratio * max_steps)  # TrainingArguments.get_warmup_steps

    def hf(step):
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, max_steps - warmup)
        if schedule_type == "constant":
            return 1.0
        if schedule_type == "linear":
            return max(0.0, (max_steps - step) / max(1, max_steps - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    schedule = optim.lr_schedule(schedule_type, lr, max_steps=max_steps, warmup_ratio=warmup_ratio)
    ours = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(max_steps + 1)))
    np.testing.assert_allclose(ours, [lr * hf(step) for step in range(max_steps + 1)], rtol=1e-5, atol=1e-10)
    assert optim.schedules.warmup_steps_for(max_steps, warmup_ratio, warmup_steps=5) == 5
    with pytest.raises(ValueError, match="unknown lr_scheduler_type 'step'"):
        optim.lr_schedule("step", lr, max_steps=10)
    with pytest.raises(ValueError, match="warmup_ratio"):
        optim.lr_schedule("linear", lr, max_steps=10, warmup_ratio=1.5)
