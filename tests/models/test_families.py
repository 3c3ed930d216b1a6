"""Qwen3, Gemma 2, Gemma 3 (text) and Phi-3 against transformers, PEFT and bitsandbytes on CPU.

Each family is a tiny random model made by transformers from a config with its features switched
on: GQA, q/k norms (Qwen3, Gemma 3), soft-caps small enough to bend the logits (Gemma 2),
``query_pre_attn_scalar`` other than ``head_dim``, windows shorter than the sequence with local
and global layers (Gemma 2/3), separate local/global RoPE bases with linear scaling on the global
layers (Gemma 3), fused projections (Phi-3), tied and untied heads. Tolerances are those of the
LLaMA tests (tests/models/test_models.py): float32 on both sides, so differences are summation order.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from qlora_jax.checkpoints.load import load_base_params, open_checkpoint, read_config
from qlora_jax.checkpoints.orbax_format import load_quantized, save_quantized
from qlora_jax.generate import SamplingConfig, generate_tokens
from qlora_jax.lora import LoraConfig
from qlora_jax.memory import KNOWN_MODELS, plan_memory
from qlora_jax.merge import export_merged
from qlora_jax.model import init_lora_params
from qlora_jax.models import layout, llama
from qlora_jax.models.config import LlamaConfig, UnsupportedArchitectureError
from qlora_jax.models.spec import ModelSpec
from qlora_jax.optim import make_optimizer
from qlora_jax.peft_io import load_peft_adapter, save_peft_adapter
from qlora_jax.quant import QuantConfig
from qlora_jax.train import make_train_step

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=2, eos_token_id=1,
            pad_token_id=0)
WINDOW = 6  # shorter than SEQ and than the generated text
MODELS = {
    "qwen3": ("qwen3", dict(BASE, num_hidden_layers=2, tie_word_embeddings=True)),
    "gemma2": ("gemma2", dict(BASE, num_hidden_layers=2, sliding_window=WINDOW, query_pre_attn_scalar=24,
                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0, tie_word_embeddings=True,
                              layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("gemma3_text", dict(BASE, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                   tie_word_embeddings=False,
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                   rope_parameters={
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                          "rope_theta": 1000000.0}})),
    "phi3": ("phi3", dict(BASE, num_hidden_layers=2, tie_word_embeddings=False)),
}
SEQ = 16
LOWEST_ID = 3  # ids 0-2 are the configs' pad, eos and bos tokens
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def hf(oracle, workdir, inputs):
    """Per family: the random model's folder and logits (float32), transformers+bitsandbytes NF4
    logits and the saved 4-bit checkpoint, and a greedy continuation of the first row."""
    ids, mask = inputs
    arrays, cases = {}, []
    for i, (name, (model_type, config)) in enumerate(MODELS.items()):
        for case in (name, f"{name}_nf4"):
            arrays[f"{case}/input_ids"], arrays[f"{case}/attention_mask"] = ids, mask
        arrays[f"{name}_gen/input_ids"] = ids[:1, :8]
        cases += [dict(name=name, op="make_model", model_type=model_type, config=config, seed=200 + i,
                       dir=str(workdir / name)),
                  dict(name=f"{name}_nf4", op="bnb4", dir=str(workdir / name), quant_type="nf4", double_quant=True,
                       save_dir=str(workdir / f"{name}_nf4_saved")),
                  dict(name=f"{name}_gen", op="generate", dir=str(workdir / name), max_new_tokens=NEW_TOKENS)]
    return oracle.run("hf_models.py", arrays, {"cases": cases})


def valid(logits, mask):
    return logits[mask.astype(bool)]


def ours(path, quant="float32", bnb_backend="cuda"):
    source, cfg = open_checkpoint(path)
    config = read_config(cfg)
    base, stats = load_base_params(source, config, QuantConfig(quant=quant, dtype="float32",
                                                               bnb_backend=bnb_backend))
    return config, base, stats


def run(config, base, ids, mask, lora=None, lora_config=None):
    spec = ModelSpec(config, lora_config, compute_dtype="float32")
    logits, _ = llama.forward(spec, base, lora, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    return np.asarray(logits)


@pytest.mark.parametrize("name", list(MODELS))
def test_float32_logits_match_transformers(hf, workdir, inputs, name):
    ids, mask = inputs
    config, base, _ = ours(workdir / name)
    assert config.family.name == {"gemma3": "gemma3_text"}.get(name, name)
    np.testing.assert_allclose(valid(run(config, base, ids, mask), mask), valid(hf[f"{name}/logits_f32"], mask),
                               atol=2e-4, rtol=1e-4)


def test_features_are_exercised(hf, workdir):
    """The configs switch on what they claim: the soft-caps bend logits, windows cut the sequence."""
    config = ours(workdir / "gemma2")[0]
    assert config.sliding_layers == (True, False) and config.sliding_window < SEQ
    assert np.abs(hf["gemma2/logits_f32"]).max() > 0.5 * config.final_logit_softcapping
    gemma3 = ours(workdir / "gemma3")[0]
    assert gemma3.rope_of(local=True) == (10000.0, None)
    assert gemma3.rope_of(local=False) == (1000000.0, {"factor": 4.0, "rope_type": "linear"})
    assert not gemma3.tie_word_embeddings and config.tie_word_embeddings


def bf16_logit_tolerance(config: LlamaConfig, logits_f32: np.ndarray) -> float:
    """Bound on the difference of two bf16 runs' logits: a few bf16 ulps of the largest logit
    (``logits_f32``, a float32 run's) accrued over the layers, as tests/models/test_models.py."""
    cap = config.final_logit_softcapping
    capping = 0.0
    if cap is not None:
        # Gemma 2's final soft-cap, cap·tanh(z / cap), comes after the head. The bf16 rounding
        # errors accrue before it, in the layers and the head's K-term sums, so they are a few ulps
        # of the largest pre-cap logit z = cap·atanh(logit / cap) (here 11.2 for capped logits
        # below 3.0): the LLaMA bound, with z as its scale. The cap cannot enlarge them (tanh's
        # slope is at most 1); scaling by the capped logits instead would understate them (0.03·3.0
        # = 0.09, less than the 0.12 the pre-cap errors leave after the cap). Its own bf16 operations
        # add a rounding of the tanh and of the product by cap on each side: 4·2^-9·cap. (The clip
        # keeps atanh finite: a float32 logit within 1e-6·cap of the cap is saturated anyway.)
        logits_f32 = cap * np.arctanh(np.clip(logits_f32 / cap, -1 + 1e-6, 1 - 1e-6))
        capping = 4 * 2.0**-9 * cap
    return 0.03 * np.abs(logits_f32).max() + capping


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_logits_match_transformers_within_bf16_tolerance(hf, workdir, inputs, name):
    ids, mask = inputs
    source, cfg = open_checkpoint(workdir / name)
    config = read_config(cfg)
    base, _ = load_base_params(source, config, QuantConfig(quant="bf16", dtype="bfloat16"))
    spec = ModelSpec(config, None, compute_dtype="bfloat16")
    got = valid(np.asarray(llama.forward(spec, base, None, jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0]),
                mask)
    expected = valid(hf[f"{name}/logits_bf16"], mask)
    np.testing.assert_allclose(got, expected, atol=bf16_logit_tolerance(config, hf[f"{name}/logits_f32"]))


@pytest.mark.parametrize("name", list(MODELS))
def test_nf4_logits_match_transformers_bitsandbytes(hf, workdir, inputs, name):
    ids, mask = inputs
    config, base, stats = ours(workdir / name, quant="nf4", bnb_backend="cpu")
    # One quantized tensor per linear layer: Phi-3's fused qkv_proj and gate_up_proj count once.
    assert stats.requantized == config.num_hidden_layers * len(layout.linear_layers(config))
    np.testing.assert_allclose(valid(run(config, base, ids, mask), mask), valid(hf[f"{name}_nf4/logits"], mask),
                               atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_bitsandbytes_checkpoint_loads_without_requantization(hf, workdir, inputs, name):
    ids, mask = inputs
    saved = workdir / f"{name}_nf4_saved"
    keys = list(load_file(saved / "model.safetensors"))
    config, base, stats = ours(saved, quant="nf4")
    fused = [n for n in ("qkv_proj", "gate_up_proj") if n in layout.linear_layers(config)]
    for n in fused:  # one 4-bit tensor per fused weight, as bitsandbytes stores it
        assert any(k.endswith(f"{n}.weight.quant_state.bitsandbytes__nf4") for k in keys)
    assert stats.prequantized == config.num_hidden_layers * len(layout.linear_layers(config))
    assert stats.requantized == 0
    np.testing.assert_allclose(valid(run(config, base, ids, mask), mask), valid(hf[f"{name}_nf4/logits"], mask),
                               atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_decode_matches_transformers_past_the_window(hf, workdir, inputs, name):
    ids, _ = inputs
    config, base, _ = ours(workdir / name)
    spec = ModelSpec(config, None, compute_dtype="float32")
    (tokens,) = generate_tokens(spec, base, None, [ids[0, :8].tolist()], SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert tokens == hf[f"{name}_gen/tokens"][0].tolist()


@pytest.mark.parametrize("name", list(MODELS))
def test_peft_adapters_both_ways(oracle, hf, workdir, inputs, name):
    ids, mask = inputs
    peft_dir, ours_dir = workdir / f"{name}_peft_adapter", workdir / f"{name}_our_adapter"
    config, base, _ = ours(workdir / name)
    lora_config = LoraConfig(r=4, alpha=8.0, target_modules="all-linear", dtype="float32")
    lora = init_lora_params(jax.random.key(7), ModelSpec(config, lora_config))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), lora)
    save_peft_adapter(ours_dir, lora, lora_config, config)
    arrays = {f"{c}/{k}": v for c in ("peft", "back") for k, v in (("input_ids", ids), ("attention_mask", mask))}
    out = oracle.run("hf_models.py", arrays, {"cases": [
        dict(name="peft", op="peft_random", dir=str(workdir / name), r=8, alpha=16, targets="all-linear", seed=3,
             save_dir=str(peft_dir)),
        dict(name="back", op="peft_load", dir=str(workdir / name), adapter_dir=str(ours_dir)),
    ]})
    # PEFT's adapter, loaded here: one adapter per linear layer, a fused one included.
    peft_lora, peft_config = load_peft_adapter(peft_dir, config)
    assert set(peft_config.target_modules) == set(layout.linear_layers(config))
    got = run(config, base, ids, mask, peft_lora, peft_config)
    np.testing.assert_allclose(valid(got, mask), valid(out["peft/logits"], mask), atol=2e-4, rtol=1e-4)
    assert np.abs(valid(got, mask) - valid(hf[f"{name}/logits_f32"], mask)).max() > 1e-2  # the adapter matters
    # Ours, loaded in PEFT.
    np.testing.assert_allclose(valid(run(config, base, ids, mask, lora, lora_config), mask),
                               valid(out["back/logits"], mask), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_merged_export_reloads_in_transformers(oracle, hf, workdir, inputs, name):
    ids, mask = inputs
    config, base, _ = ours(workdir / name)
    lora_config = LoraConfig(r=4, alpha=8.0, dtype="float32")
    lora = init_lora_params(jax.random.key(1), ModelSpec(config, lora_config))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.ndim), x.shape, x.dtype), lora)
    expected = run(config, base, ids, mask, lora, lora_config)
    export_merged(workdir / f"{name}_merged", config, base, lora, lora_config, dtype="float32")
    arrays = {"m/input_ids": ids, "m/attention_mask": mask}
    out = oracle.run("hf_models.py", arrays, {"cases": [
        dict(name="m", op="logits", dir=str(workdir / f"{name}_merged"))]})
    np.testing.assert_allclose(valid(out["m/logits"], mask), valid(expected, mask), atol=2e-4, rtol=1e-4)


# Five AdamW steps (torch.optim.AdamW's settings; clipping at QLoRA's 0.3) on one batch, from the
# same PEFT adapter: ours in float32 against transformers + PEFT in float64
# (tests/oracles/hf_train.py). A decay of 1.0: in five steps of lr=1e-3 a usual 0.1 moves the loss
# by less than the tolerance, so the test would not see whether it is applied.
ADAMW = dict(steps=5, lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=1.0, max_grad_norm=0.3)
PROMPT = 3  # the first tokens of each row are a prompt, not targets
# As tests/test_train_objective.py (same sizes: hidden 64, intermediate 128, vocab 256, K = 256):
# float32 rounding over ~20 dependent stages of K-term sums, 4x for the tails.
U32, K = float(np.finfo(np.float32).eps) / 2, 256
ROUNDING = 80 * K**0.5 * U32  # relative, of a loss; of a gradient entry, relative to the largest


@pytest.fixture(scope="module")
def adamw_reference(oracle, hf, workdir, inputs):
    """Per family: a random PEFT adapter (non-zero A and B, so every matrix has a gradient) and
    the losses of five AdamW steps from it, by transformers + PEFT + torch.optim.AdamW: over the
    float32 base in float64 ("<name>"), and over bitsandbytes' NF4 base in float32 ("<name>_nf4")."""
    ids, mask = inputs
    loss_mask = np.ones_like(mask)
    loss_mask[:, :PROMPT] = 0
    arrays = {f"{case}/{k}": v for name in MODELS for case in (name, f"{name}_nf4") for k, v in
              (("input_ids", ids), ("attention_mask", mask), ("loss_mask", loss_mask))}
    oracle.run("hf_models.py", arrays, {"cases": [
        dict(name=name, op="peft_random", dir=str(workdir / name), r=4, alpha=8, targets="all-linear", seed=40 + i,
             save_dir=str(workdir / f"{name}_adamw_init")) for i, name in enumerate(MODELS)]})
    cases = []
    for name in MODELS:
        common = dict(dir=str(workdir / name), adapter_dir=str(workdir / f"{name}_adamw_init"), adamw=ADAMW)
        cases += [dict(name=name, **common), dict(name=f"{name}_nf4", quant="nf4", dtype="float32", **common)]
    out = oracle.run("hf_train.py", arrays, {"cases": cases})
    return out, {"input_ids": ids[None], "attention_mask": mask[None], "loss_mask": loss_mask[None]}


def adamw_losses(spec, base, lora, batch, weight_decay):
    """The losses of our train step over ADAMW["steps"] steps, then after the last update."""
    optimizer = make_optimizer("adamw", ADAMW["lr"], b1=ADAMW["betas"][0], b2=ADAMW["betas"][1], eps=ADAMW["eps"],
                               weight_decay=weight_decay, max_grad_norm=ADAMW["max_grad_norm"])
    step = jax.jit(make_train_step(spec, optimizer))
    state = optimizer.init(lora)
    batch = jax.tree.map(jnp.asarray, batch)
    losses = []
    for _ in range(ADAMW["steps"] + 1):  # the last call's loss is the one after the fifth update
        lora, state, metrics = step(lora, state, base, batch, None)
        losses.append(float(metrics["loss"]))
    return np.array(losses)


@pytest.mark.parametrize("quant", ["float32", "nf4"])
@pytest.mark.parametrize("name", list(MODELS))
def test_five_adamw_steps_follow_peft(adamw_reference, workdir, name, quant):
    """Our train step with make_optimizer("adamw") follows PEFT's losses step by step.

    Tolerance, from the arithmetic. Each loss carries our float32 evaluation error,
    ROUNDING·|loss|. Our gradients differ from the float64 ones by delta = ROUNDING·max|g| per
    entry at most. AdamW's update lr·m̂/(√v̂ + eps) of an entry moves by about lr·delta/|g| for such
    a change (m̂/√v̂ is scale-free, so its sensitivity to one gradient is O(1/|g|)), which moves the
    loss by |g|·lr·delta/|g| = lr·delta; an entry whose gradient is within delta of zero may step
    the other way (at most 2·1.01·lr, as |m̂/√v̂| <= 1.01 over five steps at these betas), moving the
    loss by at most 2·delta·2.02·lr. So each entry moves a loss by at most 4·lr·delta per step;
    over the n entries these add like a random walk (sqrt(n)), 4x for its tails, and the steps'
    differences persist: after k steps, ROUNDING·|loss| + k·16·sqrt(n)·lr·delta. One step moves
    the loss by about lr·Σ|g|, far more (checked below); dropping the weight decay, lr·θ per step,
    is outside the tolerance too (checked below).

    Over the NF4 base (QLoRA: bitsandbytes' CPU bytes, dequantized exactly on both sides) the
    reference runs in float32 too, so both sides carry that error: ROUNDING doubles.
    """
    out, batch = adamw_reference
    case = name if quant == "float32" else f"{name}_nf4"
    config, base, _ = ours(workdir / name, quant=quant, bnb_backend="cpu")
    lora, lora_config = load_peft_adapter(workdir / f"{name}_adamw_init", config, dtype="float32")
    spec = ModelSpec(config, lora_config, compute_dtype="float32")
    losses = adamw_losses(spec, base, lora, batch, ADAMW["weight_decay"])
    want = out[f"{case}/losses"]
    n = sum(leaf.size for leaf in jax.tree.leaves(lora))
    rounding = ROUNDING * (1 if quant == "float32" else 2)
    delta = rounding * out[f"{case}/grad_max"].max()
    steps = np.arange(ADAMW["steps"] + 1)
    tolerance = rounding * np.abs(want) + steps * 16 * n**0.5 * ADAMW["lr"] * delta
    assert np.all(np.abs(losses - want) <= tolerance), (losses.tolist(), want.tolist(), tolerance.tolist())
    assert want[0] - want[-1] > 20 * tolerance[-1], "the steps must move the loss far beyond the tolerance"
    if quant != "float32":
        return
    without_decay = adamw_losses(spec, base, lora, batch, 0.0)
    assert np.any(np.abs(without_decay - want) > tolerance), "the tolerance must see the weight decay"


# Sharding (8 simulated CPU devices, tests/conftest.py): each family's NF4 model over an FSDP mesh
# (batch rows and weight rows split 8 ways) and a tensor-parallel one (weight rows split 8 ways,
# the batch whole), against the same jitted computation on one device. Float32 compute: the
# partitioner may reorder K-term sums (a LoRA A split over its input features is a partial sum
# and an all-reduce; the loss is summed per device, then across), so the bound is ROUNDING above,
# the same float32 summation-order argument; 2x for the NF4 base as in the AdamW test.
# One mesh with both parameter axes: every weight splits its rows 8 ways (over fsdp x tensor, the
# same layout fsdp=8 or tensor=8 gives the parameters) while the batch splits over fsdp only, so
# the step has both FSDP's and tensor parallelism's collectives (tests/distributed covers the
# other meshes on the built-in Llama).
SHARD_MESHES = {"fsdp2-tensor4": "fsdp=2,tensor=4"}


@pytest.fixture(scope="module")
def shard_batch_rows(module_rng):
    """Eight rows (the mesh's fsdp axis splits them four per device), right-padded by 0 to 7 tokens."""
    ids = module_rng.integers(3, BASE["vocab_size"], size=(1, 8, SEQ)).astype(np.int32)
    mask = (np.arange(SEQ)[None, None, :] < SEQ - np.arange(8)[None, :, None]).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "loss_mask": mask.copy()}


@pytest.mark.parametrize("mesh_name", list(SHARD_MESHES))
@pytest.mark.parametrize("name", list(MODELS))
def test_sharded_nf4_model_matches_one_device(hf, workdir, shard_batch_rows, name, mesh_name):
    """Logits, and one SGD step's loss and updated adapters, equal one device's up to float32
    summation order; every quantized weight (Phi-3's fused qkv/gate_up included) is split."""
    import optax

    from qlora_jax.distributed import make_mesh, param_shardings, shard_batch, shard_tree

    config, base, _ = ours(workdir / name, quant="nf4", bnb_backend="cpu")
    lora_config = LoraConfig(r=4, alpha=8.0, target_modules="all-linear", dtype="float32")
    spec = ModelSpec(config, lora_config, compute_dtype="float32")
    lora = init_lora_params(jax.random.key(11), spec)
    # Non-zero B, so A has a gradient too and the adapters change the logits.
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size + 1), x.shape, x.dtype), lora)
    batch = shard_batch_rows
    mesh = make_mesh(SHARD_MESHES[mesh_name])
    sharded_base = shard_tree(base, param_shardings(base, mesh))
    sharded_lora = shard_tree(lora, param_shardings(lora, mesh))
    for linear in layout.linear_layers(config):
        codes = layout.get_layer_entry(sharded_base["layers"], linear)["weight"].codes
        rows = {s.index[1].start for s in codes.addressable_shards}
        assert len(rows) == 8, (linear, codes.shape)  # 1/8 of the packed rows per device

    forward = jax.jit(lambda b, lo, ids, m: llama.forward(spec, b, lo, ids, attention_mask=m)[0])
    ids, mask = batch["input_ids"][0], batch["attention_mask"][0]
    want = np.asarray(forward(base, lora, jnp.asarray(ids), jnp.asarray(mask)))
    sharded_batch = shard_batch(batch, mesh)
    got = forward(sharded_base, sharded_lora, sharded_batch["input_ids"][0], sharded_batch["attention_mask"][0])
    assert len(got.sharding.device_set) == 8
    rounding = 2 * ROUNDING
    scale = np.abs(valid(want, mask)).max()
    np.testing.assert_allclose(valid(np.asarray(got), mask), valid(want, mask), rtol=0, atol=rounding * scale)
    if config.final_logit_softcapping is not None:  # Gemma 2: the cap is where the logits live
        assert scale > 0.5 * config.final_logit_softcapping

    # SGD is linear in the gradients, so the update compares them; a large rate keeps the update
    # far above the float32 rounding of the parameters it is added to.
    sgd = optax.sgd(1000.0)
    step = jax.jit(make_train_step(spec, sgd))
    ref_lora, _, ref = step(lora, sgd.init(lora), base, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    new_lora, _, metrics = step(sharded_lora, sgd.init(sharded_lora), sharded_base, sharded_batch, None)
    np.testing.assert_allclose(float(metrics["loss"]), float(ref["loss"]), rtol=rounding, atol=0)
    for old, a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(new_lora), jax.tree.leaves(ref_lora), strict=True):
        old, a, b = (np.asarray(v, np.float64) for v in (old, a, b))
        got_update, want_update = a - old, b - old
        # A gradient entry to ROUNDING of the largest; each side's new value rounded once (U32).
        tolerance = rounding * np.abs(want_update).max() + U32 * (np.abs(a) + np.abs(b))
        assert np.all(np.abs(got_update - want_update) <= tolerance)
        assert np.abs(want_update).max() > 100 * tolerance.max()  # the step moves it far beyond the bound


# The fused dequant-matmul kernels per family (ModelSpec.kernel_backend), run on the CPU through
# the Pallas interpreter, against the XLA backend (dequantize, then dot). The kernels take bf16
# (or f16) activations and K a whole number of blocks with a power-of-two factor >= 16; the
# families' projections (K = 64 or 128, blocksize 64, Phi-3's fused qkv [128, 64] and gate_up
# [256, 64] included) meet that, so the kernel runs on every one: asserted, not assumed.
KERNEL = "pallas_triton"


@pytest.mark.parametrize("name", list(MODELS))
def test_family_projections_through_the_pallas_kernels(hf, workdir, module_rng, name):
    """Each projection's NF4 weight, forward and input gradient, by the kernel and by XLA, both
    within the kernel tests' bound of the float64 product of the same bytes (tests/kernel_refs.py)."""
    from kernel_refs import activations, assert_product_close, reference_values

    from qlora_jax import kernels

    config, base, _ = ours(workdir / name, quant="nf4", bnb_backend="cpu")
    m = 2 * SEQ  # the rows of the family tests' batch
    for linear in layout.linear_layers(config):
        stacked = layout.get_layer_entry(base["layers"], linear)["weight"]
        qt = jax.tree.map(lambda a: a[-1], stacked)  # the last layer's (the metadata is one layer's)
        for op in ("matmul", "matmul_grad"):
            assert kernels.resolve_backend(op, qt, dtype=jnp.bfloat16, m=m, backend=KERNEL, interpret=True) == (
                KERNEL, "requested"), (linear, qt.shape)
        w = reference_values(qt, "bfloat16")
        x = activations(module_rng, (m, qt.shape[1]), "bfloat16")
        dy = activations(module_rng, (m, qt.shape[0]), "bfloat16")
        for backend in (KERNEL, "xla"):
            # The input gradient through the custom VJP, as training runs it.
            y, vjp = jax.vjp(lambda a, qt=qt, backend=backend: kernels.quantized_matmul(
                a, qt, backend=backend, interpret=True), x)
            (dx,) = vjp(dy)
            assert_product_close(y, x, w.T, "bfloat16")
            assert_product_close(dx, dy, w, "bfloat16")


@pytest.mark.parametrize("name", list(MODELS))
def test_family_model_with_the_pallas_backend_matches_xla(hf, workdir, inputs, monkeypatch, name):
    """The whole NF4 model with ModelSpec.kernel_backend="pallas_triton" (interpreted): its bf16
    logits and the adapters' gradients (through the kernels' input gradients) are XLA's up to the
    per-product bf16 rounding, and every quantized matmul of the family ran the kernel."""
    import qlora_jax.linear
    from qlora_jax import kernels

    ran = []

    def interpreted(x, qweight, *, backend="auto", **kw):
        if backend != "xla":
            m = int(np.prod(x.shape[:-1]))
            ran.append((tuple(qweight.shape), *(kernels.resolve_backend(op, qweight, dtype=x.dtype, m=m,
                                                                       backend=backend, interpret=True)[0]
                                                for op in ("matmul", "matmul_grad"))))
        return kernels.quantized_matmul(x, qweight, backend=backend, interpret=True, **kw)

    # The model calls the matmul without interpret (a GPU run); on the CPU the interpreter runs it.
    monkeypatch.setattr(qlora_jax.linear, "quantized_matmul", interpreted)
    ids, mask = inputs
    config, base, _ = ours(workdir / name, quant="nf4", bnb_backend="cpu")
    lora_config = LoraConfig(r=4, alpha=8.0, target_modules="all-linear", dtype="float32")
    lora = init_lora_params(jax.random.key(5), ModelSpec(config, lora_config))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size + 2), x.shape, x.dtype), lora)
    out = {}
    for backend in ("xla", KERNEL):
        spec = ModelSpec(config, lora_config, compute_dtype="bfloat16", kernel_backend=backend)

        def loss(lo, spec=spec):
            logits = llama.forward(spec, base, lo, jnp.asarray(ids), attention_mask=jnp.asarray(mask))[0]
            return jnp.sum(valid(logits.astype(jnp.float32), mask) ** 2) / mask.sum(), logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(lora)
        out[backend] = np.asarray(logits, np.float32), grads
        # The kernels are in the computation (forward and input gradient), the XLA path has none.
        kernel_calls = str(jax.make_jaxpr(jax.grad(lambda lo, loss=loss: loss(lo)[0]))(lora)).count("pallas_call")
        assert (kernel_calls >= 2) == (backend == KERNEL), (backend, kernel_calls)
    shapes = {s for s, *_ in ran}
    assert shapes == {tuple(s) for s in config.linear_shapes().values()}  # every projection, fused ones too
    assert {(f, b) for _, f, b in ran} == {(KERNEL, KERNEL)}
    got, want = (valid(out[b][0], mask) for b in (KERNEL, "xla"))
    # Each product differs from XLA's by at most the kernel tests' bound (the test above); over the
    # layers that is the bf16 test's few ulps of the largest logit. (On the CPUs tried the two are
    # bitwise equal: at these sizes the kernel's tiles add the same K terms in the same order as
    # XLA's dot. The bound leaves room for a tiling that splits K.)
    np.testing.assert_allclose(got, want, rtol=0, atol=bf16_logit_tolerance(config, hf[f"{name}/logits_f32"]))
    for a, b in zip(jax.tree.leaves(out[KERNEL][1]), jax.tree.leaves(out["xla"][1]), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        # As the logits: a few bf16 ulps of the largest entry, accrued over the layers.
        assert np.abs(a - b).max() <= 0.03 * np.abs(b).max(), (np.abs(a - b).max(), np.abs(b).max())


# Each family's chat template as its published tokenizer_config.json has it (Qwen3's without its
# tool-calling branches), with its special tokens.
CHAT_TEMPLATES = {
    "qwen3": (
        "{%- if messages[0].role == 'system' %}"
        "{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
        "{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message.role == 'user' %}"
        "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
        "{%- elif message.role == 'assistant' %}"
        "{%- set content = message.content.split('</think>')[-1].lstrip('\n') %}"
        "{{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|im_start|>assistant\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}"
        "{{- '<think>\n\n</think>\n\n' }}"
        "{%- endif %}"
        "{%- endif %}"
    ),
    "gemma2": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
        "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
    ),
    "gemma3": (
        "{{ bos_token }}\n"
        "{%- if messages[0]['role'] == 'system' -%}\n"
        "    {%- if messages[0]['content'] is string -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
        "    {%- else -%}\n"
        "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
        "    {%- endif -%}\n"
        "    {%- set loop_messages = messages[1:] -%}\n"
        "{%- else -%}\n"
        "    {%- set first_user_prefix = \"\" -%}\n"
        "    {%- set loop_messages = messages -%}\n"
        "{%- endif -%}\n"
        "{%- for message in loop_messages -%}\n"
        "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
        "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
        "    {%- endif -%}\n"
        "    {%- if (message['role'] == 'assistant') -%}\n"
        "        {%- set role = \"model\" -%}\n"
        "    {%- else -%}\n"
        "        {%- set role = message['role'] -%}\n"
        "    {%- endif -%}\n"
        "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
        "    {%- if message['content'] is string -%}\n"
        "        {{ message['content'] | trim }}\n"
        "    {%- elif message['content'] is iterable -%}\n"
        "        {%- for item in message['content'] -%}\n"
        "            {%- if item['type'] == 'image' -%}\n"
        "                {{ '<start_of_image>' }}\n"
        "            {%- elif item['type'] == 'text' -%}\n"
        "                {{ item['text'] | trim }}\n"
        "            {%- endif -%}\n"
        "        {%- endfor -%}\n"
        "    {%- else -%}\n"
        "        {{ raise_exception(\"Invalid content type\") }}\n"
        "    {%- endif -%}\n"
        "    {{ '<end_of_turn>\\n' }}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}\n"
        "    {{'<start_of_turn>model\\n'}}\n"
        "{%- endif -%}\n"
    ),
    "phi3": (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
        "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
        "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
    ),
}
# Special tokens per family: (tokens added to the SmolLM2 vocabulary, bos, eos, pad).
SPECIAL_TOKENS = {
    "qwen3": ((), None, "<|im_end|>", "<|endoftext|>"),
    "gemma2": (("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", "<pad>"),
    "gemma3": (("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", "<pad>"),
    "phi3": (("<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"), "<s>", "<|endoftext|>", "<|endoftext|>"),
}
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "<think>\nadding\n</think>\n\n Four. "},
    {"role": "user", "content": "And 3+3? <|im_end|> <end_of_turn> <|end|>"},  # special tokens in the text
]


def write_family_tokenizer(folder: pathlib.Path, name: str) -> None:
    """The embedded SmolLM2 tokenizer with the family's special tokens, and a tokenizer_config.json
    with the family's chat template and tokens: what a model folder of the family ships."""
    from tokenizers import AddedToken

    from qlora_jax.model import load_tokenizer

    added, bos, eos, pad = SPECIAL_TOKENS[name]
    hf_tokenizer = load_tokenizer("embedded").hf
    hf_tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    hf_tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": pad,
              "add_bos_token": bos is not None, "chat_template": CHAT_TEMPLATES[name]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


@pytest.mark.parametrize("name", list(MODELS))
def test_chat_template_and_tokens_match_transformers(oracle, hf, workdir, name):
    """The family's folder: our tokenizer renders its chat template and tokenizes the result as
    transformers' AutoTokenizer.apply_chat_template does (with and without the generation prompt)."""
    from qlora_jax.model import load_tokenizer

    folder = workdir / name
    write_family_tokenizer(folder, name)
    # Gemma 2's template refuses a system message (in both): its conversations start at the user.
    conversation = CONVERSATION[1:] if name == "gemma2" else CONVERSATION
    cases = [{"messages": messages, "chat_template": None, "add_generation_prompt": prompt}
             for messages in (conversation, conversation[-1:]) for prompt in (False, True)]
    out = oracle.run("hf_tokenizer.py", {}, {"dir": str(folder), "gguf_file": None, "cases": cases,
                                             "texts": [CONVERSATION[3]["content"]]})
    tokenizer = load_tokenizer(folder)
    assert tokenizer.chat_template == CHAT_TEMPLATES[name]
    marker = {"qwen3": "<|im_end|>", "gemma2": "<end_of_turn>", "gemma3": "<end_of_turn>", "phi3": "<|end|>"}[name]
    full = str(out["rendered_0"])
    assert full.count(marker) >= 3, full  # the turns' ends (Gemma 3 folds the system message into the user's)
    if name == "qwen3":
        assert "adding" not in full, full  # Qwen3's template drops the assistant's reasoning from the history
    for i, case in enumerate(cases):
        rendered = tokenizer.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"])
        assert rendered == str(out[f"rendered_{i}"]), (name, case)
        np.testing.assert_array_equal(np.asarray(tokenizer.encode(rendered, add_bos=False)), out[f"ids_{i}"])
    # The family's turn markers are single special tokens in both.
    text_ids = tokenizer.encode(CONVERSATION[3]["content"], add_bos=False)
    np.testing.assert_array_equal(np.asarray(text_ids), out["text_ids_0"])
    assert tokenizer.token_id(marker) in text_ids


@pytest.mark.parametrize("name", list(MODELS))
def test_save_quantized_round_trip(hf, workdir, inputs, name):
    """Our own checkpoint of a new family reads back byte for byte, config and adapters included."""
    ids, mask = inputs
    config, base, _ = ours(workdir / name, quant="nf4")
    lora_config = LoraConfig(r=4, alpha=8.0, dtype="float32")
    lora = init_lora_params(jax.random.key(2), ModelSpec(config, lora_config))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.ndim), x.shape, x.dtype), lora)
    save_quantized(workdir / f"{name}_orbax", base, config=config, lora=lora, lora_config=lora_config)
    saved = load_quantized(workdir / f"{name}_orbax")
    assert saved.config == config
    for a, b in zip(jax.tree.leaves(saved.base), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(run(saved.config, saved.base, ids, mask, saved.lora, saved.lora_config),
                                  run(config, base, ids, mask, lora, lora_config))


def test_peft_module_names_match_peft(oracle):
    """all-linear and named targets select PEFT's modules in each family (Phi-3: the fused ones)."""
    targets = ["all-linear", ["o_proj", "down_proj"], r".*\.(qkv_proj|q_proj)"]
    cases = [dict(name=name, op="peft_targets", model_type=model_type, config=config, targets=targets)
             for name, (model_type, config) in MODELS.items()]
    out = oracle.run("hf_models.py", {}, {"cases": cases})
    for name, (model_type, config) in MODELS.items():
        ours_config = LlamaConfig.from_hf_dict({"model_type": model_type, **config})
        for i, target in enumerate(targets):
            expected = sorted(out[f"{name}/matched_{i}"].tolist())
            lora_config = LoraConfig(target_modules=target if isinstance(target, str) else tuple(target))
            chosen = layout.lora_targets(lora_config, ours_config)
            got = sorted(layout.hf_module(layer, n) for layer in range(ours_config.num_hidden_layers) for n in chosen)
            assert got == expected, (name, target)


def test_gemma3_default_layer_pattern_is_transformers(workdir, hf):
    """Without layer_types (transformers 4 files), Gemma 3's layers are 5 local : 1 global."""
    cfg = json.loads((workdir / "gemma3" / "config.json").read_text())
    cfg.pop("layer_types")
    cfg["num_hidden_layers"] = 12
    config = LlamaConfig.from_hf_dict(cfg)
    assert config.sliding_layers == tuple((i + 1) % 6 != 0 for i in range(12))


@pytest.mark.parametrize("field, value, message", [
    ("rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}, "'yarn'"),
    ("use_sliding_window", True, "use_sliding_window"),
])
def test_unsupported_setting_is_refused_by_name(workdir, hf, field, value, message):
    cfg = json.loads((workdir / "qwen3" / "config.json").read_text())
    cfg[field] = value
    with pytest.raises((UnsupportedArchitectureError, ValueError), match=message):
        read_config(cfg)


def test_unknown_family_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitectureError, match="gemma2.*phi3|phi3.*gemma2"):
        read_config({"model_type": "falcon", "architectures": ["FalconForCausalLM"], "vocab_size": 8,
                     "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1})


def test_family_found_from_architectures_alone(workdir, hf):
    cfg = json.loads((workdir / "phi3" / "config.json").read_text())
    cfg.pop("model_type")
    assert LlamaConfig.from_hf_dict(cfg).model_type == "phi3"


def test_memory_presets_have_the_published_parameter_counts(oracle):
    """gemma-2-9b, qwen3-8b and phi-3-mini: our tensor table counts what transformers builds."""
    presets = {"gemma-2-9b": "gemma2", "qwen3-8b": "qwen3", "phi-3-mini": "phi3"}
    cases = [dict(name=n, op="num_params", model_type=t, config={
        k: v for k, v in KNOWN_MODELS[n].to_hf_dict().items() if k not in ("architectures", "model_type")})
        for n, t in presets.items()]
    out = oracle.run("hf_models.py", {}, {"cases": cases})
    for name in presets:
        assert KNOWN_MODELS[name].num_parameters() == int(out[f"{name}/count"]), name
        plan = plan_memory(KNOWN_MODELS[name], seq_len=512, batch=1)
        assert plan.device_peak_bytes > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_finetune_recipe_runs_and_learns(oracle, tmp_path, name):
    """The launcher's recipe on a new family: a random model with the embedded tokenizer trains,
    evaluates, samples and saves (the finetune of ``make finetune ARGS=--model=<folder>``)."""
    from helpers import small_finetune_config

    from qlora_jax.finetune import run as run_finetune
    from qlora_jax.model import load_tokenizer

    tokenizer = load_tokenizer("embedded")
    model_type, config = MODELS[name]
    config = dict(config, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                  eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    folder = tmp_path / name
    oracle.run("hf_models.py", {"m/input_ids": np.zeros((1, 2), np.int32)}, {"cases": [
        dict(name="m", op="make_model", model_type=model_type, config=config, seed=5, dir=str(folder))]})
    tokenizer.save(folder)
    result = run_finetune(small_finetune_config(folder, tmp_path / "out", max_steps=12, eval_steps=6, save_steps=6),
                          progress=False)
    assert result.final_step == 12
    assert result.final_eval_loss < result.first_eval_loss


@pytest.mark.parametrize("name", list(MODELS))
def test_synthetic_base_has_the_loaded_layout(hf, workdir, inputs, name):
    """random_base (benchmarks, memory measurements) builds the same pytree the loader does, from the
    same tensor table, and it runs."""
    from qlora_jax.synthetic import random_base

    config, loaded, _ = ours(workdir / name, quant="nf4")
    synthetic = random_base(config, jax.random.key(0), dtype=jnp.float32)
    assert jax.tree.structure(synthetic) == jax.tree.structure(loaded)
    for a, b in zip(jax.tree.leaves(synthetic), jax.tree.leaves(loaded), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert np.isfinite(run(config, synthetic, *inputs)).all()
