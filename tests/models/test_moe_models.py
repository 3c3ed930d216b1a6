"""Mixtral and Qwen3-MoE models (4-bit experts) against transformers and bitsandbytes on CPU.

Tiny random models made by transformers 5 in the oracle environment (4 experts, top-2, 2 layers),
saved with ``save_pretrained`` (which writes the per-expert tensors ``...experts.{e}.w1.weight`` /
``...experts.{e}.gate_proj.weight``), loaded by our loader and run by our decoder:

* float32 and bfloat16 logits against transformers' own model (tests/oracles/hf_models.py);
* NF4 logits against the same model with every decoder linear weight and every expert matrix
  replaced by bitsandbytes' CPU quantize/dequantize of it (tests/oracles/hf_moe.py ``bnb_model``:
  what per-expert ``Linear4bit`` layers compute on bitsandbytes' exact CPU path; transformers 5
  leaves its fused experts unquantized under ``BitsAndBytesConfig``);
* the load-balancing loss against transformers' ``aux_loss`` (``output_router_logits=True``).
* the merged export (per-expert tensors, the router as is): float32 logits in transformers and
  through load_pretrained against ours unmerged; the NF4 export's bytes against bitsandbytes.
* trained routers (PEFT's modules_to_save=["gate"], --train_router): five AdamW steps against
  transformers + PEFT in float64 (losses and routers), the adapter both ways with PEFT, Orbax and
  merged export, refusals.

Tolerances are those of tests/test_families.py: float32 on both sides, so differences are
summation order (the routing itself is compared exactly by the block tests, tests/test_moe.py).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.load import QuantConfig, load_base_params, open_checkpoint, read_config
from qlora_jax.checkpoints.orbax_format import load_quantized, save_quantized
from qlora_jax.lora import LoraConfig
from qlora_jax.model import init_lora_params
from qlora_jax.models import layout, llama, moe
from qlora_jax.models.config import UnsupportedArchitectureError
from qlora_jax.models.spec import ModelSpec

# hidden, head_dim * heads and the expert intermediate size are >= 64: bitsandbytes 0.50's CPU
# dequantize_4bit is wrong for rows shorter than a block (see tests/test_moe.py).
BASE = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=2, eos_token_id=1, pad_token_id=0,
            num_hidden_layers=2, num_experts_per_tok=2, tie_word_embeddings=False, router_aux_loss_coef=0.02)
MODELS = {
    "mixtral": ("mixtral", dict(BASE, intermediate_size=64, num_local_experts=4)),
    "qwen3_moe": ("qwen3_moe", dict(BASE, intermediate_size=96, moe_intermediate_size=64, num_experts=4,
                                    norm_topk_prob=True)),
}
EXPERTS = 4
SEQ = 16
LOWEST_ID = 3  # ids 0-2 are the configs' pad, eos and bos tokens
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def hf(oracle, workdir, inputs):
    """Per family: the random model's folder, its float32 and bf16 logits, its NF4 (bitsandbytes,
    per expert) logits and transformers' aux_loss."""
    ids, mask = inputs
    arrays, make, after = {}, [], []
    for i, (name, (model_type, config)) in enumerate(MODELS.items()):
        for case in (name, f"{name}_nf4", f"{name}_aux"):
            arrays[f"{case}/input_ids"], arrays[f"{case}/attention_mask"] = ids, mask
        arrays[f"{name}_gen/input_ids"] = ids[:1, :8]
        make += [dict(name=name, op="make_model", model_type=model_type, config=config, seed=300 + i,
                      dir=str(workdir / name)),
                 dict(name=f"{name}_gen", op="generate", dir=str(workdir / name), max_new_tokens=NEW_TOKENS)]
        after += [dict(name=f"{name}_nf4", op="bnb_model", dir=str(workdir / name), quant_type="nf4",
                       double_quant=True, save_dir=str(workdir / f"{name}_bnb")),
                  dict(name=f"{name}_aux", op="folder_aux", dir=str(workdir / name))]
    out = oracle.run("hf_models.py", arrays, {"cases": make})
    out.update(oracle.run("hf_moe.py", arrays, {"cases": after}))
    return out


def valid(logits, mask):
    return logits[mask.astype(bool)]


def ours(path, quant="float32", bnb_backend="cuda"):
    source, cfg = open_checkpoint(path)
    config = read_config(cfg)
    base, stats = load_base_params(source, config, QuantConfig(quant=quant, dtype="float32",
                                                               bnb_backend=bnb_backend))
    return config, base, stats


def run(config, base, ids, mask, lora=None, lora_config=None, dtype="float32"):
    spec = ModelSpec(config, lora_config, compute_dtype=dtype)
    logits, _ = llama.forward(spec, base, lora, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    return np.asarray(logits)


def test_config_reads_the_moe_fields(hf, workdir):
    for name, (model_type, _) in MODELS.items():
        ours_config = read_config(json.loads((workdir / name / "config.json").read_text()))
        assert ours_config.family.moe == model_type
        assert (ours_config.num_experts, ours_config.num_experts_per_tok) == (EXPERTS, 2)
        assert ours_config.router_aux_loss_coef == 0.02
        assert ours_config.expert_intermediate_size == 64 and ours_config.norm_topk_prob
        assert ours_config.moe.routing == model_type
        # Every tensor of the file, once: config.num_parameters counts what transformers saved.
        count = sum(v.size for v in load_file(workdir / name / "model.safetensors").values())
        assert ours_config.num_parameters() == count


@pytest.mark.parametrize("name", list(MODELS))
def test_float32_logits_match_transformers(hf, workdir, inputs, name):
    ids, mask = inputs
    config, base, _ = ours(workdir / name)
    mlp = base["layers"]["mlp"]
    assert mlp["gate"]["weight"].shape == (2, EXPERTS, 64) and mlp["up_proj"]["weight"].shape == (2, EXPERTS, 64, 64)
    np.testing.assert_allclose(valid(run(config, base, ids, mask), mask), valid(hf[f"{name}/logits_f32"], mask),
                               atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_logits_match_transformers_within_bf16_tolerance(hf, workdir, inputs, name):
    ids, mask = inputs
    source, cfg = open_checkpoint(workdir / name)
    config = read_config(cfg)
    base, _ = load_base_params(source, config, QuantConfig(quant="bf16", dtype="bfloat16"))
    got = valid(run(config, base, ids, mask, dtype="bfloat16"), mask)
    expected = valid(hf[f"{name}/logits_bf16"], mask)
    scale = np.abs(hf[f"{name}/logits_f32"]).max()
    # As tests/test_families.py: bf16's 8-bit mantissa, a few ulps of the largest logit over the layers.
    np.testing.assert_allclose(got, expected, atol=0.03 * scale)


@pytest.mark.parametrize("name", list(MODELS))
def test_nf4_experts_match_bitsandbytes(hf, workdir, inputs, name):
    ids, mask = inputs
    config, base, stats = ours(workdir / name, quant="nf4", bnb_backend="cpu")
    # Attention: one 4-bit tensor per layer and projection; experts: one per expert and matrix.
    assert stats.requantized == config.num_hidden_layers * (4 + 3 * EXPERTS)
    up = base["layers"]["mlp"]["up_proj"]["weight"]
    assert up.codes.shape[:2] == (2, EXPERTS) and up.offset.shape == (2, EXPERTS)  # per-expert DQ offsets
    assert base["layers"]["mlp"]["gate"]["weight"].dtype == jnp.float32  # the router stays 16/32-bit
    got = valid(run(config, base, ids, mask), mask)
    np.testing.assert_allclose(got, valid(hf[f"{name}_nf4/logits"], mask), atol=2e-4, rtol=1e-4)
    assert np.abs(got - valid(hf[f"{name}/logits_f32"], mask)).max() > 1e-3  # the quantization matters


@pytest.mark.parametrize("name", list(MODELS))
def test_bitsandbytes_per_expert_checkpoint_loads_without_requantization(hf, workdir, inputs, name):
    """Experts stored as per-expert bitsandbytes 4-bit tensors (transformers 4's Linear4bit per expert) are
    taken as stored, byte for byte, and give bitsandbytes' logits."""
    ids, mask = inputs
    saved = workdir / f"{name}_bnb"
    block, theirs = ("block_sparse_moe", "w2") if name == "mixtral" else ("mlp", "down_proj")
    key = f"model.layers.1.{block}.experts.3.{theirs}.weight"
    stored = load_file(saved / "model.safetensors")
    assert stored[key].dtype == np.uint8 and f"{key}.quant_state.bitsandbytes__nf4" in stored
    config, base, stats = ours(saved, quant="nf4")
    assert stats.prequantized == config.num_hidden_layers * (4 + 3 * EXPERTS) and stats.requantized == 0
    down = base["layers"]["mlp"]["down_proj"]["weight"]
    np.testing.assert_array_equal(np.asarray(down.codes[1, 3]).reshape(-1), stored[key].reshape(-1))
    np.testing.assert_allclose(valid(run(config, base, ids, mask), mask), valid(hf[f"{name}_nf4/logits"], mask),
                               atol=2e-4, rtol=1e-4)


def _fused_copy(src: pathlib.Path, dst: pathlib.Path, name: str) -> pathlib.Path:
    """The folder with transformers 5's in-memory MoE names: mlp.gate, mlp.experts.gate_up_proj [E, 2I, D]
    (gate rows, then up rows: tests/test_moe.py checks that order against the module) and
    mlp.experts.down_proj [E, D, I]."""
    block, (w_gate, w_up, w_down) = (("block_sparse_moe", ("w1", "w3", "w2")) if name == "mixtral"
                                     else ("mlp", ("gate_proj", "up_proj", "down_proj")))

    def fuse(tensors):
        for layer in range(BASE["num_hidden_layers"]):
            pre = f"model.layers.{layer}"

            def take(w, pre=pre):
                return np.stack([tensors.pop(f"{pre}.{block}.experts.{e}.{w}.weight") for e in range(EXPERTS)])

            gate = tensors.pop(f"{pre}.{block}.gate.weight")
            tensors[f"{pre}.mlp.experts.gate_up_proj"] = np.concatenate([take(w_gate), take(w_up)], axis=1)
            tensors[f"{pre}.mlp.experts.down_proj"] = take(w_down)
            tensors[f"{pre}.mlp.gate.weight"] = gate

    return _edited_copy(src, dst, edit_tensors=fuse)


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_expert_layout_loads(hf, workdir, inputs, tmp_path, name):
    ids, mask = inputs
    path = _fused_copy(workdir / name, tmp_path / "fused", name)
    config, base, _ = ours(path)
    np.testing.assert_allclose(valid(run(config, base, ids, mask), mask), valid(hf[f"{name}/logits_f32"], mask),
                               atol=2e-4, rtol=1e-4)
    # 4-bit: the same bytes as from the per-expert files, one quantized tensor per expert matrix.
    _, fused_nf4, stats = ours(path, quant="nf4")
    _, per_expert_nf4, _ = ours(workdir / name, quant="nf4")
    assert stats.requantized == config.num_hidden_layers * (4 + 3 * EXPERTS)
    for a, b in zip(jax.tree.leaves(fused_nf4), jax.tree.leaves(per_expert_nf4), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # An expert count that disagrees with the tensors names the first one read (the router, then the experts).
    fewer = _edited_copy(path, tmp_path / "fewer", edit_config=lambda c: c.update(
        {k: 3 for k in ("num_local_experts", "num_experts") if k in c}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.gate\.weight' has shape \[4, 64\] but "
                                              r"config.json implies \[3, 64\]"):
        _load(fewer)
    gate_up = "model.layers.1.mlp.experts.gate_up_proj"
    narrow = _edited_copy(path, tmp_path / "narrow", edit_tensors=lambda t: t.update({gate_up: t[gate_up][:3]}))
    with pytest.raises(CheckpointError, match=rf"'{gate_up}' has shape \[3, 128, 64\] but .* implies \[4, 128, 64\]"):
        _load(narrow)


@pytest.mark.parametrize("name", list(MODELS))
def test_save_quantized_round_trip(hf, workdir, inputs, name):
    """Our own checkpoint of an MoE model (4-bit experts, per-expert adapters) reads back byte for byte."""
    ids, mask = inputs
    config, base, _ = ours(workdir / name, quant="nf4")
    lora_config = LoraConfig(r=4, alpha=8.0, target_modules="all-linear", dtype="float32")
    lora = init_lora_params(jax.random.key(2), ModelSpec(config, lora_config))
    assert lora["layers"]["mlp"]["down_proj"]["lora_B"].shape == (2, EXPERTS, 64, 4)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.ndim), x.shape, x.dtype), lora)
    save_quantized(workdir / f"{name}_orbax", base, config=config, lora=lora, lora_config=lora_config)
    saved = load_quantized(workdir / f"{name}_orbax")
    assert saved.config == config
    for a, b in zip(jax.tree.leaves(saved.base), jax.tree.leaves(base), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(run(saved.config, saved.base, ids, mask, saved.lora, saved.lora_config),
                                  run(config, base, ids, mask, lora, lora_config))


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_decode_matches_transformers(hf, workdir, inputs, name):
    """KV-cache decoding routes each new token through the experts as transformers does."""
    from qlora_jax.generate import SamplingConfig, generate_tokens

    ids, _ = inputs
    config, base, _ = ours(workdir / name)
    spec = ModelSpec(config, None, compute_dtype="float32")
    (tokens,) = generate_tokens(spec, base, None, [ids[0, :8].tolist()], SamplingConfig(max_new_tokens=NEW_TOKENS))
    assert tokens == hf[f"{name}_gen/tokens"][0].tolist()


def test_synthetic_base_has_the_loaded_layout(hf, workdir, inputs):
    from qlora_jax.synthetic import random_base

    for name in MODELS:
        config, loaded, _ = ours(workdir / name, quant="nf4")
        synthetic = random_base(config, jax.random.key(0), dtype=jnp.float32)
        assert jax.tree.structure(synthetic) == jax.tree.structure(loaded)
        for a, b in zip(jax.tree.leaves(synthetic), jax.tree.leaves(loaded), strict=True):
            assert (a.shape, a.dtype) == (b.shape, b.dtype)
        assert np.isfinite(run(config, synthetic, *inputs)).all()


# ------------------------------------------------------------------------------------------ bad input


def _edited_copy(src: pathlib.Path, dst: pathlib.Path, edit_tensors=None, edit_config=None) -> pathlib.Path:
    shutil.copytree(src, dst)
    if edit_tensors is not None:
        tensors = load_file(dst / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _load(path):
    source, cfg = open_checkpoint(path)
    return load_base_params(source, read_config(cfg), QuantConfig(quant="nf4", dtype="float32"))


def test_missing_or_extra_expert_and_bad_router_are_named(hf, workdir, tmp_path):
    src = workdir / "mixtral"
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    path = _edited_copy(src, tmp_path / "missing", edit_tensors=lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=rf"missing tensor '{key}'"):
        _load(path)
    # config.json says 3 experts, the files hold 4.
    path = _edited_copy(src, tmp_path / "fewer", edit_config=lambda c: c.update(num_local_experts=3))
    with pytest.raises(CheckpointError, match=r"experts\.3\.w\d\.weight' exists but config.json has "
                                              r"num_local_experts = 3"):
        _load(path)
    # config.json says 5 experts: expert 4's tensors are missing.
    path = _edited_copy(src, tmp_path / "more", edit_config=lambda c: c.update(num_local_experts=5))
    with pytest.raises(CheckpointError, match=r"missing 6 tensors:.*block_sparse_moe\.experts\.4\.w1\.weight"):
        _load(path)
    # A router of the wrong shape.
    gate = "model.layers.0.block_sparse_moe.gate.weight"
    path = _edited_copy(src, tmp_path / "router", edit_tensors=lambda t: t.update({gate: t[gate][:, :32].copy()}))
    with pytest.raises(CheckpointError, match=rf"'{gate}' has shape \[4, 32\] but .* implies \[4, 64\]"):
        _load(path)
    # top-k larger than the expert count.
    path = _edited_copy(src, tmp_path / "topk", edit_config=lambda c: c.update(num_experts_per_tok=5))
    with pytest.raises((CheckpointError, ValueError),
                       match=r"num_experts_per_tok = 5 must be in \[1, num_experts = 4\]"):
        _load(path)


@pytest.mark.parametrize("field, value", [("decoder_sparse_step", 2), ("mlp_only_layers", [1]),
                                          ("use_sliding_window", True)])
def test_unsupported_qwen3_moe_settings_are_refused_by_name(hf, workdir, field, value):
    cfg = json.loads((workdir / "qwen3_moe" / "config.json").read_text())
    cfg[field] = value
    with pytest.raises(UnsupportedArchitectureError, match=field):
        read_config(cfg)


def test_moe_layout_names(hf, workdir):
    config = read_config(json.loads((workdir / "mixtral" / "config.json").read_text()))
    table = {spec.slot: spec for spec in layout.tensor_table(config)}
    router = table["layers/mlp/gate/weight"]
    assert not router.linear and router.hf_key(0) == "model.layers.0.block_sparse_moe.gate.weight"
    w3 = table["layers/mlp/up_proj/weight"]
    assert w3.linear and w3.stack == (EXPERTS,) and w3.shape == (64, 64)
    assert w3.expert_keys(1)[2] == "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    assert config.moe == moe.MoeConfig(EXPERTS, 2, "mixtral", True, 0.02)


# ------------------------------------------------------------------------------------------ training


def _log_softmax_ce(logits, ids, mask):
    """float64 mean next-token cross-entropy over the unpadded targets (the reference of the step's loss)."""
    logits = logits.astype(np.float64)[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    target = np.take_along_axis(logits, ids[:, 1:, None].astype(np.int64), axis=-1)[..., 0]
    m = mask[:, 1:].astype(bool)
    return float((logz - target)[m].mean())


@pytest.mark.parametrize("name", list(MODELS))
def test_aux_loss_equals_transformers(hf, workdir, inputs, name):
    ids, mask = inputs
    config, base, _ = ours(workdir / name)
    spec = ModelSpec(config, None, compute_dtype="float32")
    _, _, router_logits = llama.hidden_states_and_router_logits(spec, base, None, jnp.asarray(ids),
                                                                attention_mask=jnp.asarray(mask))
    assert router_logits.shape == (2, ids.size, EXPERTS)
    aux = moe.load_balancing_loss(list(router_logits), EXPERTS, 2, jnp.asarray(mask))
    np.testing.assert_allclose(float(aux), float(hf[f"{name}_aux/aux_loss"]), rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_train_step_adds_the_aux_loss_and_trains_expert_adapters(hf, workdir, inputs, name):
    """One step under all-linear: the loss is transformers' loss plus router_aux_loss_coef * aux_loss (as
    MixtralForCausalLM with output_router_logits=True), aux_loss is reported, and the per-expert
    adapters get gradients."""
    import optax

    from qlora_jax.train import make_train_step

    ids, mask = inputs
    config, base, _ = ours(workdir / name, quant="float32")
    lora_config = LoraConfig(r=4, alpha=8.0, target_modules="all-linear", dtype="float32")
    spec = ModelSpec(config, lora_config, compute_dtype="float32")
    assert spec.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    lora = init_lora_params(jax.random.key(0), spec)  # B = 0: the model is the base
    batch = {"input_ids": jnp.asarray(ids)[None], "attention_mask": jnp.asarray(mask)[None],
             "loss_mask": jnp.ones_like(jnp.asarray(ids))[None]}
    new_lora, _, metrics = jax.jit(make_train_step(spec, optax.sgd(1.0)))(lora, optax.sgd(1.0).init(lora), base,
                                                                          batch, None)
    aux = float(hf[f"{name}_aux/aux_loss"])
    np.testing.assert_allclose(float(metrics["aux_loss"]), aux, rtol=1e-5)
    expected = _log_softmax_ce(hf[f"{name}/logits_f32"], ids, mask) + config.router_aux_loss_coef * aux
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    for m in ("gate_proj", "up_proj", "down_proj"):
        moved = np.abs(np.asarray(new_lora["layers"]["mlp"][m]["lora_B"])).max(axis=(0, 2, 3))
        assert moved.shape == (EXPERTS,) and (moved > 0).sum() >= 2, m  # experts that got tokens learn


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_finetune_recipe_runs_and_learns(oracle, tmp_path, name):
    """The launcher's recipe on an MoE folder (the finetune of ``make finetune ARGS=--model=<folder>``):
    4-bit experts with per-expert adapters train, evaluate, sample and save; aux_loss is logged.
    Qwen3-MoE's run exports with ``peft_expert_format="fused"`` (PEFT's target_parameters), Mixtral's
    with the default per-expert modules; each reads back with the trained expert adapters."""
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
    out = tmp_path / "out"
    expert_format = "fused" if name == "qwen3_moe" else "per_expert"
    result = run_finetune(small_finetune_config(folder, out, max_steps=12, eval_steps=6, save_steps=6,
                                                peft_expert_format=expert_format), progress=False)
    assert result.final_step == 12
    assert result.final_eval_loss < result.first_eval_loss
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    aux = [r["aux_loss"] for r in rows if r["kind"] == "train"]
    assert aux and all(np.isfinite(aux)) and min(aux) > 0
    exported = json.loads((out / "adapter" / "adapter_config.json").read_text())
    fused = sorted(exported.get("target_parameters") or [])
    assert fused == (sorted(FUSED_PARAMS) if expert_format == "fused" else []), exported
    from qlora_jax.peft_io import load_peft_adapter

    config = read_config(json.loads((folder / "config.json").read_text()))
    lora, _ = load_peft_adapter(out / "adapter", config, dtype="float32")
    mlp = lora["layers"]["mlp"]
    assert {"gate_proj", "up_proj", "down_proj"} <= set(mlp)
    # Trained: every expert's B moved from its zero initialisation.
    assert all(np.abs(np.asarray(mlp[m]["lora_B"])).reshape(config.num_hidden_layers, EXPERTS, -1).max(-1).min()
               > 0 for m in ("gate_proj", "up_proj", "down_proj"))


# ------------------------------------------------------------------------------------------ PEFT


@pytest.mark.parametrize("name", list(MODELS))
def test_peft_adapters_with_expert_adapters_both_ways(oracle, hf, workdir, inputs, name):
    """A PEFT adapter with one adapter per expert (transformers 4's module names, which PEFT 0.21 converts
    to transformers 5's fused experts) gives PEFT's logits here; ours, exported, gives ours in PEFT."""
    from qlora_jax.peft_io import load_peft_adapter, save_peft_adapter

    ids, mask = inputs
    config, base, _ = ours(workdir / name)
    experts = ["w1", "w2", "w3"] if name == "mixtral" else ["gate_proj", "up_proj", "down_proj"]
    peft_dir, ours_dir = workdir / f"{name}_peft_v4", workdir / f"{name}_our_adapter"
    lora_config = LoraConfig(r=4, alpha=8.0, target_modules="all-linear", dtype="float32")
    lora = init_lora_params(jax.random.key(7), ModelSpec(config, lora_config))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), lora)
    save_peft_adapter(ours_dir, lora, lora_config, config)
    written = load_file(ours_dir / "adapter_model.safetensors")
    assert written[f"base_model.model.model.layers.1.{'block_sparse_moe' if name == 'mixtral' else 'mlp'}.experts.3."
                   f"{experts[2]}.lora_B.weight"].shape == (64, 4)
    assert sorted(json.loads((ours_dir / "adapter_config.json").read_text())["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", *experts])
    arrays = {f"{c}/{k}": v for c in ("peft", "back") for k, v in (("input_ids", ids), ("attention_mask", mask))}
    out = oracle.run("hf_moe.py", arrays, {"cases": [
        dict(name="peft", op="peft_v4", dir=str(workdir / name), r=8, alpha=16,
             targets=["q_proj", "v_proj", *experts], seed=3, save_dir=str(peft_dir)),
        dict(name="back", op="peft_load", dir=str(workdir / name), adapter_dir=str(ours_dir)),
    ]})
    peft_lora, peft_config = load_peft_adapter(peft_dir, config)
    assert peft_config.target_modules == ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    assert peft_lora["layers"]["mlp"]["up_proj"]["lora_A"].shape == (2, EXPERTS, 8, 64)
    got = run(config, base, ids, mask, peft_lora, peft_config)
    np.testing.assert_allclose(valid(got, mask), valid(out["peft/logits"], mask), atol=2e-4, rtol=1e-4)
    assert np.abs(valid(got, mask) - valid(hf[f"{name}/logits_f32"], mask)).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(valid(run(config, base, ids, mask, lora, lora_config), mask),
                               valid(out["back/logits"], mask), atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------ merged export


HELD_OUT = "mixtral"  # the family whose 4-bit merged export also measures held-out losses


def _expert_adapter(config):
    """Random adapters (non-zero A and B) on attention and every expert, float32."""
    lora_config = LoraConfig(r=4, alpha=8.0, target_modules="all-linear", dtype="float32")
    lora = init_lora_params(jax.random.key(11), ModelSpec(config, lora_config))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), lora)
    return lora, lora_config


def _moe_names(name):
    """The MoE block's module and the down matrix's on-disk name."""
    return ("block_sparse_moe", "w2") if name == "mixtral" else ("mlp", "down_proj")


def test_merged_export_loads_in_transformers_and_here(oracle, hf, workdir, inputs):
    """export_merged of an MoE model with random adapters on attention and every expert: the float32
    folder (per-expert names, the router as it was) gives, in transformers (which fuses the experts
    on load) and through our load_pretrained, the logits of our model with the unmerged adapters
    (so does, for Qwen3-MoE, the float32 export of the same adapters on the NF4 base); each expert
    tensor is float64 W_e + scaling * B_e @ A_e to float32 rounding, and has its own report row.

    Tolerances: those of the logits tests above (float32 on both sides: summation order, and one
    float32 rounding of each merged weight against the unmerged W x + s B (A x)).
    """
    from qlora_jax.merge import export_merged
    from qlora_jax.model import load_pretrained
    from qlora_jax.quant import QuantConfig as Quant

    ids, mask = inputs
    arrays = {f"{name}{s}/{k}": v for name in MODELS for s in ("", "_from_nf4")
              for k, v in (("input_ids", ids), ("attention_mask", mask))}
    expected, logits_cases = {}, []
    for name in MODELS:
        config, base, _ = ours(workdir / name)
        lora, lora_config = _expert_adapter(config)
        expected[name] = run(config, base, ids, mask, lora, lora_config)
        folder = workdir / f"{name}_merged"
        report = export_merged(folder, config, base, lora, lora_config, dtype="float32")

        # The tensors, against float64 numpy: expert 3's down matrix of layer 1 and the router.
        block, down = _moe_names(name)
        stored = load_file(folder / "model.safetensors")
        pair = {k: np.asarray(v[1, 3], np.float64) for k, v in lora["layers"]["mlp"]["down_proj"].items()}
        delta = lora_config.scaling * pair["lora_B"] @ pair["lora_A"]
        want = np.asarray(base["layers"]["mlp"]["down_proj"]["weight"][1, 3], np.float64) + delta
        # float32: the r-term product B @ A, the scaling, the sum and its rounding, each within a unit
        # roundoff of what it adds (r + 2 roundings of |s| |B| @ |A|, one of |W + ΔW|).
        bound = U32 * (np.abs(want) + (lora_config.r + 2) * lora_config.scaling
                       * (np.abs(pair["lora_B"]) @ np.abs(pair["lora_A"])))
        got = stored[f"model.layers.1.{block}.experts.3.{down}.weight"]
        assert got.dtype == np.float32 and np.all(np.abs(got - want) <= bound)
        np.testing.assert_array_equal(stored[f"model.layers.1.{block}.gate.weight"],
                                      np.asarray(base["layers"]["mlp"]["gate"]["weight"][1]))
        # The same tensor names as transformers' own save_pretrained of the model.
        assert set(stored) == set(load_file(workdir / name / "model.safetensors"))

        # One report row per layer, attention projection and expert matrix, named by the expert.
        assert len(report.layers) == config.num_hidden_layers * (4 + 3 * EXPERTS)
        row = next(r for r in report.layers if r.layer == 1 and r.expert == 3 and r.module.endswith(down))
        assert row.module == f"{block}.experts.3.{down}"
        np.testing.assert_allclose(row.delta_norm, np.linalg.norm(delta), rtol=1e-5)
        # A float32 export of float32 merged weights: the export's rounding is the identity (error_ratio 0)
        # and the update kept is ΔW but for the float32 rounding of W + ΔW (u ||W + ΔW|| / ||ΔW||, < 1e-5 here).
        assert report.error_ratio == 0 and abs(report.kept_fraction - 1) < 1e-5 and not report.lossy

        # Ours, through load_pretrained, without adapters.
        model, _ = load_pretrained(folder, Quant("float32", dtype="float32"), lora=None, compute_dtype="float32")
        np.testing.assert_allclose(valid(np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))), mask),
                                   valid(expected[name], mask), atol=2e-4, rtol=1e-4)
        logits_cases.append(dict(name=name, op="logits", dir=str(folder)))

        if name != HELD_OUT:  # QLoRA's case, for one family: the base in NF4, each expert dequantized alone
            _, base4, _ = ours(workdir / name, quant="nf4")
            expected[f"{name}_from_nf4"] = run(config, base4, ids, mask, lora, lora_config)
            export_merged(workdir / f"{name}_merged_from_nf4", config, base4, lora, lora_config, dtype="float32")
            logits_cases.append(dict(name=f"{name}_from_nf4", op="logits",
                                     dir=str(workdir / f"{name}_merged_from_nf4")))
    out = oracle.run("hf_models.py", arrays, {"cases": logits_cases})
    for case in expected:
        np.testing.assert_allclose(valid(out[f"{case}/logits"], mask), valid(expected[case], mask),
                                   atol=2e-4, rtol=1e-4, err_msg=case)
    for name in MODELS:
        assert np.abs(valid(expected[name] - hf[f"{name}/logits_f32"], mask)).max() > 1e-2  # the adapters matter


def test_merged_nf4_export_is_read_as_stored(oracle, hf, workdir, inputs, tmp_path, caplog):
    """A quantize_to="nf4" merged export of an MoE model: every attention projection and expert matrix a
    bitsandbytes NF4 tensor (the router 16-bit), read back by our loader without re-quantization; its
    expert codes are bitsandbytes' quantize_4bit codes of the float32 merged weights, and bitsandbytes
    reads its 4-bit states (QuantState.from_dict, dequantize_4bit) as the values our loader holds. With
    held-out batches, the merged model is assembled from the stored 4-bit experts and the router."""
    from qlora_jax.merge import export_merged
    from qlora_jax.quant import dequantize

    ids, mask = inputs
    arrays, bnb_cases, held = {}, [], {}
    for name in MODELS:
        config, base, _ = ours(workdir / name)
        lora, lora_config = _expert_adapter(config)
        block, _ = _moe_names(name)
        float32 = load_file(export_merged(tmp_path / name, config, base, lora, lora_config,
                                          dtype="float32").path / "model.safetensors")
        nf4 = tmp_path / f"{name}_nf4"
        held_out = [{"input_ids": ids, "attention_mask": mask, "loss_mask": np.ones_like(mask)}]
        with caplog.at_level("WARNING", logger="qlora_jax.merge"):
            report = export_merged(nf4, config, base, lora, lora_config, dtype="float32", quantize_to="nf4",
                                   allow_lossy=True, eval_batches=held_out if name == HELD_OUT else None)
        # transformers 5 refuses per-expert 4-bit tensors (it fuses the experts): said, not left to be found.
        assert "transformers 5 does not load 4-bit experts" in caplog.text
        assert 0.01 < report.requantization_relative_rmse < 0.2
        assert len(report.layers) == config.num_hidden_layers * (4 + 3 * EXPERTS)
        assert json.loads((nf4 / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"] == [
            "lm_head", f"{block}.gate"]
        qconfig, qbase, qstats = ours(nf4, quant="nf4")
        assert qstats.prequantized == config.num_hidden_layers * (4 + 3 * EXPERTS) and qstats.requantized == 0
        assert qbase["layers"]["mlp"]["gate"]["weight"].dtype == jnp.float32
        written = load_file(nf4 / "model.safetensors")
        for theirs, ours_name in zip(config.family.expert_names, config.family.mlp_layers, strict=True):
            key, case = f"model.layers.1.{block}.experts.3.{theirs}.weight", f"{name}_{theirs}"
            qt = jax.tree.map(lambda x: x[1, 3], qbase["layers"]["mlp"][ours_name]["weight"])
            np.testing.assert_array_equal(np.asarray(qt.codes).reshape(-1), written[key].reshape(-1))
            arrays[f"{case}_q/w"] = float32[key]
            bnb_cases.append(dict(name=f"{case}_q", op="quantize_4bit", quant_type="nf4", blocksize=64,
                                  double_quant=True))
            arrays.update({f"{case}_d/state/{k[len(key) - len('weight'):]}": v for k, v in written.items()
                           if k.startswith(key)})
            bnb_cases.append(dict(name=f"{case}_d", op="dequantize_state"))
            held[case] = (written[key], np.asarray(dequantize(qt, jnp.float32)))
        if name == HELD_OUT:
            # The held-out losses: of transformers' base model, of ours with the unmerged adapters, of our
            # reading of the export. A loss moves by at most twice the largest logit difference (logsumexp
            # and the target logit are 1-Lipschitz in the max norm): twice the logits' tolerance.
            logits = (hf[f"{name}/logits_f32"], run(config, base, ids, mask, lora, lora_config),
                      run(qconfig, qbase, ids, mask))
            scale = np.abs(valid(logits[0], mask)).max()
            np.testing.assert_allclose((report.base_loss, report.unmerged_loss, report.merged_loss),
                                       [_log_softmax_ce(x, ids, mask) for x in logits], rtol=0,
                                       atol=2 * (2e-4 + 1e-4 * scale))
        else:
            assert report.merged_loss is None
    out = oracle.run("bnb_quant.py", arrays, {"cases": bnb_cases})
    for case, (packed, values) in held.items():
        np.testing.assert_array_equal(out[f"{case}_q/packed"].reshape(-1), packed.reshape(-1), err_msg=case)
        np.testing.assert_array_equal(out[f"{case}_d/dequantized"].reshape(values.shape), values, err_msg=case)


def test_router_targets_are_refused_by_name(hf, workdir):
    config = read_config(json.loads((workdir / "mixtral" / "config.json").read_text()))
    with pytest.raises(ValueError, match=r"MoE router 'model\.layers\.0\.block_sparse_moe\.gate'"):
        layout.lora_targets(LoraConfig(target_modules=("q_proj", "gate")), config)
    with pytest.raises(ValueError, match=r"some layers only, or some experts"):
        layout.lora_targets(LoraConfig(target_modules=r".*experts\.0\.w1"), config)
    # Our own names and Mixtral's on-disk names select the same experts.
    assert layout.lora_targets(LoraConfig(target_modules=("w1", "w2")), config) == ("gate_proj", "down_proj")
    assert layout.lora_targets(LoraConfig(target_modules=("gate_proj", "down_proj")), config) == (
        "gate_proj", "down_proj")


# ------------------------------------------------------------------------------------------ memory planner


def test_memory_presets_have_the_published_parameter_counts(oracle):
    """mixtral-8x7b (46.7 B) and qwen3-30b-a3b (30.5 B): our tensor table counts what transformers builds
    from the same config (on the meta device), and their 4-bit bases are the sizes the issue quotes."""
    from qlora_jax.memory import KNOWN_MODELS, plan_memory

    presets = {"mixtral-8x7b": "mixtral", "qwen3-30b-a3b": "qwen3_moe"}
    cases = [dict(name=n, op="num_params", model_type=t, config={
        k: v for k, v in KNOWN_MODELS[n].to_hf_dict().items() if k not in ("architectures", "model_type")})
        for n, t in presets.items()]
    out = oracle.run("hf_models.py", {}, {"cases": cases})
    for name, published in (("mixtral-8x7b", 46.7e9), ("qwen3-30b-a3b", 30.5e9)):
        count = KNOWN_MODELS[name].num_parameters()
        assert count == int(out[f"{name}/count"]), name
        assert abs(count - published) < 0.05e9, name
        plan = plan_memory(KNOWN_MODELS[name], seq_len=512, batch=1)
        base = plan.base_linear_codes + plan.base_quant_constants + plan.embeddings_norms_head
        # NF4 + double quantization: 4.127 bits per expert/attention weight, 16-bit embeddings and routers.
        assert 0.25 * count * 2 * 0.98 < base < 0.29 * count * 2, (name, base)


def _dense_mixtral(workdir):
    """The tiny Mixtral's config declared a dense Mistral: the same shapes without experts."""
    mixtral = json.loads((workdir / "mixtral" / "config.json").read_text())
    return read_config(dict(mixtral, model_type="mistral", architectures=["MistralForCausalLM"]))


def test_memory_plan_counts_what_router_training_allocates(hf, workdir):
    """With and without ``train_router``, the planner's adapters are the bytes ``init_lora_params``
    allocates (expert pairs, attention pairs, and the routers' trainable copies ``[L, E, hidden]``)
    and its on-device AdamW state is the bytes of optax's two moments over them."""
    import optax

    from qlora_jax.memory import plan_memory

    config = read_config(json.loads((workdir / "mixtral" / "config.json").read_text()))
    router = jnp.zeros((config.num_hidden_layers, config.num_experts, config.hidden_size), jnp.float32)
    base = {"layers": {"mlp": {"gate": {"weight": router}}}}  # all init_lora_params reads of it
    adapters = {}
    for train_router in (False, True):
        lora_config = LoraConfig(r=4, target_modules="all-linear", dtype="float32",
                                 modules_to_save=("gate",) if train_router else ())
        spec = ModelSpec(config, lora_config)
        lora = init_lora_params(jax.random.key(0), spec, base=base)
        assert ("gate" in lora["layers"]["mlp"]) == train_router
        moments = [x for x in jax.tree.leaves(optax.adamw(1e-3).init(lora)) if x.ndim > 0]
        plan = plan_memory(config, seq_len=16, batch=1, lora_r=4, lora_targets=spec.lora_targets, lora_dtype="float32",
                           optim="adamw", train_router=train_router)
        assert plan.adapters == sum(x.nbytes for x in jax.tree.leaves(lora)), train_router
        assert plan.optimizer_device == sum(x.nbytes for x in moments), train_router
        adapters[train_router] = plan.adapters
    assert adapters[True] - adapters[False] == router.nbytes
    with pytest.raises(ValueError, match="train_router: model_type 'mistral' has no MoE routers"):
        plan_memory(_dense_mixtral(workdir), seq_len=16, batch=1, train_router=True)


def test_lora_dropout_reaches_the_expert_adapters(hf, workdir, inputs):
    """PEFT's lora_dropout on the expert adapters' inputs: with only expert adapters, a dropout key changes
    the output (the same key, the same output); with fresh adapters (B = 0) it changes nothing."""
    ids, mask = inputs
    config, base, _ = ours(workdir / "mixtral")
    lora_config = LoraConfig(r=4, alpha=8.0, target_modules=("w1", "w2", "w3"), dropout=0.5, dtype="float32")
    spec = ModelSpec(config, lora_config, compute_dtype="float32")
    fresh = init_lora_params(jax.random.key(0), spec)
    assert set(fresh["layers"]) == {"mlp"}
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), fresh)

    def logits(adapters, key):
        return np.asarray(llama.forward(spec, base, adapters, jnp.asarray(ids), attention_mask=jnp.asarray(mask),
                                        dropout_key=key)[0])

    plain, dropped = logits(lora, None), logits(lora, jax.random.key(1))
    assert np.abs(plain - dropped).max() > 1e-3
    np.testing.assert_array_equal(dropped, logits(lora, jax.random.key(1)))
    np.testing.assert_allclose(logits(fresh, jax.random.key(1)), logits(fresh, None), atol=1e-6)


# data=2,fsdp=2,tensor=2 is left out for now: on XLA:CPU (jaxlib 0.11.2, 8 host devices) its MoE
# step sometimes deadlocks in a collective: the device threads wait at a rendezvous with no CPU
# used until XLA aborts the process (a CI worker was lost that way on 2026-12-06; run alone it
# passed several times). A known gap (CONTRIBUTING.md), not a passing test; the same mesh is
# checked for the dense families and the sharded recipe.
_DEADLOCKS_ON_XLA_CPU = pytest.mark.skip(reason="an intermittent XLA:CPU collective deadlock on this mesh (a known "
                                                "gap in CONTRIBUTING.md)")


@pytest.mark.parametrize("mesh_spec", ["data=2,fsdp=4",
                                       pytest.param("data=2,fsdp=2,tensor=2", marks=_DEADLOCKS_ON_XLA_CPU),
                                       "data=2,fsdp=2,expert=2", "data=4,expert=2"])
def test_sharded_step_matches_single_device(hf, workdir, inputs, mesh_spec):
    """The recipe's FSDP/tensor shardings (tests/distributed/test_sharding.py) on 4-bit experts: the parameter
    axes split the expert axis of codes, scales and per-expert adapters; one step equals the single-device one.
    With an ``expert`` axis (expert parallelism, as the recipe's ``--mesh=...,expert=2`` sets it up through
    load_pretrained): the expert axis of the base and adapters splits over it and the decoder's MoE blocks
    compute each device's own experts (ModelSpec.expert_mesh); the step still equals the single-device one."""
    import dataclasses

    import optax

    from qlora_jax.distributed import make_mesh, param_shardings, shard_batch, shard_tree
    from qlora_jax.train import make_train_step

    ids, mask = inputs
    config, base, _ = ours(workdir / "qwen3_moe", quant="nf4")
    lora_config = LoraConfig(r=4, alpha=8.0, target_modules="all-linear", dtype="float32")
    spec = ModelSpec(config, lora_config, compute_dtype="float32")
    lora = init_lora_params(jax.random.key(3), spec)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), lora)
    rows = np.concatenate([ids, ids[:, ::-1]] * 2)  # 8 rows: the batch splits over data and fsdp
    batch = {"input_ids": rows[None], "attention_mask": np.concatenate([mask] * 4)[None],
             "loss_mask": np.ones_like(rows)[None]}
    sgd = optax.sgd(1000.0)  # SGD is linear in the gradients (as tests/test_distributed.py)
    step = jax.jit(make_train_step(spec, sgd))
    ref_lora, _, ref = step(lora, sgd.init(lora), base, {k: jnp.asarray(v) for k, v in batch.items()}, None)
    mesh = make_mesh(mesh_spec)
    shardings = param_shardings(base, mesh)
    expert_split = shardings["layers"]["mlp"]["up_proj"]["weight"].codes.spec[1]
    assert expert_split is not None  # the expert axis is split
    if mesh.shape["expert"] > 1:
        assert "expert" in expert_split
        assert "expert" in param_shardings(lora, mesh)["layers"]["mlp"]["down_proj"]["lora_B"].spec[1]
        step = jax.jit(make_train_step(dataclasses.replace(spec, expert_mesh=mesh), sgd))
    new_lora, _, metrics = step(shard_tree(lora, param_shardings(lora, mesh)), sgd.init(lora),
                                shard_tree(base, shardings), shard_batch(batch, mesh), None)
    for key in ("loss", "aux_loss"):
        np.testing.assert_allclose(float(metrics[key]), float(ref[key]), rtol=1e-5)
    for old, a, b in zip(jax.tree.leaves(lora), jax.tree.leaves(new_lora), jax.tree.leaves(ref_lora), strict=True):
        got, want = np.asarray(a) - np.asarray(old), np.asarray(b) - np.asarray(old)
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want) + 1e-12


# ------------------------------------------------------------------------------------------ AdamW against PEFT

# tests/models/test_families.py's five AdamW steps (torch.optim.AdamW's settings, clipping at QLoRA's 0.3,
# a decay of 1.0 so that the test sees it), on the MoE objective.
ADAMW = dict(steps=5, lr=1e-3, betas=[0.9, 0.999], eps=1e-8, weight_decay=1.0, max_grad_norm=0.3)
PROMPT = 3  # the first tokens of each row are a prompt, not targets
# As tests/models/test_families.py (same sizes: hidden 64, expert intermediate 64, vocab 256, K = 256):
# float32 rounding over ~20 dependent stages of K-term sums, 4x for the tails.
U32, K = float(np.finfo(np.float32).eps) / 2, 256
ROUNDING = 80 * K**0.5 * U32  # relative, of a loss; of a gradient entry, relative to the largest


@pytest.fixture(scope="module")
def adamw_reference(oracle, hf, workdir, inputs):
    """Per family: a random PEFT adapter on attention and every expert (transformers 4's per-expert
    names, which PEFT converts to transformers 5's fused experts; lora_B non-zero, so every adapter
    matrix has a gradient) and the losses of five AdamW steps from it by transformers + PEFT +
    torch.optim.AdamW in float64 (tests/oracles/hf_train.py with "moe": output_router_logits=True,
    so transformers computes aux_loss and the objective is loss + router_aux_loss_coef * aux_loss,
    what our train step optimises)."""
    ids, mask = inputs
    loss_mask = np.ones_like(mask)
    loss_mask[:, :PROMPT] = 0
    arrays = {f"{case}/{k}": v for name in MODELS for case in (name, f"{name}_init") for k, v in
              (("input_ids", ids), ("attention_mask", mask), ("loss_mask", loss_mask))}
    init = []
    for i, name in enumerate(MODELS):
        experts = ["w1", "w2", "w3"] if name == "mixtral" else ["gate_proj", "up_proj", "down_proj"]
        init.append(dict(name=f"{name}_init", op="peft_v4", dir=str(workdir / name), r=4, alpha=8,
                         targets=["q_proj", "k_proj", "v_proj", "o_proj", *experts], seed=60 + i,
                         save_dir=str(workdir / f"{name}_adamw_init")))
    oracle.run("hf_moe.py", arrays, {"cases": init})
    out = oracle.run("hf_train.py", arrays, {"cases": [
        dict(name=name, dir=str(workdir / name), adapter_dir=str(workdir / f"{name}_adamw_init"), adamw=ADAMW,
             moe=True) for name in MODELS]})
    return out, {"input_ids": ids[None], "attention_mask": mask[None], "loss_mask": loss_mask[None]}


def _adamw_losses(spec, base, lora, batch, weight_decay):
    """The losses of our train step over ADAMW["steps"] steps, then after the last update."""
    from qlora_jax.optim import make_optimizer
    from qlora_jax.train import make_train_step

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


def _adamw_tolerance(want: np.ndarray, grad_max: np.ndarray, lora) -> np.ndarray:
    """Per-step loss tolerance of our float32 AdamW steps against PEFT's float64 ones
    (tests/models/test_families.py's derivation): ROUNDING·|loss| + k·16·sqrt(n)·lr·delta after k
    steps, with n the trained values and delta = ROUNDING·max|g|."""
    n = sum(leaf.size for leaf in jax.tree.leaves(lora))
    delta = ROUNDING * grad_max.max()
    steps = np.arange(ADAMW["steps"] + 1)
    return ROUNDING * np.abs(want) + steps * 16 * n**0.5 * ADAMW["lr"] * delta


@pytest.mark.parametrize("name", list(MODELS))
def test_five_adamw_steps_follow_peft(adamw_reference, workdir, name):
    """Our train step with make_optimizer("adamw"), expert adapters included, follows PEFT's losses
    (cross-entropy + router_aux_loss_coef * aux_loss) step by step.

    Tolerance: tests/models/test_families.py's derivation (float32 here against float64 there):
    after k steps, ROUNDING·|loss| + k·16·sqrt(n)·lr·delta with delta = ROUNDING·max|g|. The routing
    is discrete, but top-2 choices of float32 and float64 router logits agree unless two logits are
    within ~1e-6 of each other, which these random models do not have (the step-by-step agreement
    would break by far more than the tolerance if one token changed experts).
    """
    from qlora_jax.peft_io import load_peft_adapter

    out, batch = adamw_reference
    config, base, _ = ours(workdir / name)
    lora, lora_config = load_peft_adapter(workdir / f"{name}_adamw_init", config, dtype="float32")
    assert lora["layers"]["mlp"]["down_proj"]["lora_B"].shape == (2, EXPERTS, 64, 4)  # expert adapters
    assert set(lora["layers"]["self_attn"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    spec = ModelSpec(config, lora_config, compute_dtype="float32")
    losses = _adamw_losses(spec, base, lora, batch, ADAMW["weight_decay"])
    want = out[f"{name}/losses"]
    tolerance = _adamw_tolerance(want, out[f"{name}/grad_max"], lora)
    assert np.all(np.abs(losses - want) <= tolerance), (losses.tolist(), want.tolist(), tolerance.tolist())
    assert want[0] - want[-1] > 20 * tolerance[-1], "the steps must move the loss far beyond the tolerance"
    without_decay = _adamw_losses(spec, base, lora, batch, 0.0)
    assert np.any(np.abs(without_decay - want) > tolerance), "the tolerance must see the weight decay"


def test_expert_mesh_is_refused_where_it_cannot_apply(hf, workdir):
    """An ``expert`` mesh axis on a dense model, or on experts it does not divide, is a clear error
    when the spec is made; LoRA dropout is accepted (moe_block draws the single-device masks)."""
    import dataclasses

    from qlora_jax.distributed import make_mesh

    config = read_config(json.loads((workdir / "mixtral" / "config.json").read_text()))
    mesh = make_mesh("data=4,expert=2")
    ModelSpec(config, expert_mesh=mesh)  # accepted
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        ModelSpec(_dense_mixtral(workdir), expert_mesh=mesh)
    with pytest.raises(ValueError, match=r"num_experts = 4 is not divisible by the 'expert' mesh axis \(8"):
        ModelSpec(config, expert_mesh=make_mesh("expert=8"))
    assert ModelSpec(config, LoraConfig(r=4, dropout=0.1), expert_mesh=mesh).lora_config.dropout == 0.1
    assert dataclasses.replace(ModelSpec(config), expert_mesh=mesh).expert_mesh is mesh


# --- PEFT's transformers 5 format: target_parameters on the fused experts (qlora_jax/peft_io.py) ---

FUSED_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _random_lora(config, lora_config, seed):
    lora = init_lora_params(jax.random.key(seed), ModelSpec(config, lora_config))
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(seed + x.size), x.shape, x.dtype), lora)


@pytest.mark.parametrize("name", list(MODELS))
def test_peft_fused_expert_adapters_both_ways(oracle, hf, workdir, inputs, name):
    """(a) A PEFT adapter made on transformers 5's fused experts (target_parameters, rank r: one A per
    expert for gate and up) with attention target_modules gives PEFT's logits here, and its unfolded
    gate/up adapters give PEFT's own delta of gate_up_proj; (b) ours written with
    expert_format="fused" (gate and up at rank 2r, plain and rsLoRA) give ours in PEFT and read back
    unchanged."""
    from qlora_jax.peft_io import load_peft_adapter, save_peft_adapter

    ids, mask = inputs
    config, base, _ = ours(workdir / name)
    peft_dir = workdir / f"{name}_peft_fused"
    lora_configs = {"plain": LoraConfig(r=4, alpha=8.0, target_modules="all-linear", dtype="float32"),
                    "rs": LoraConfig(r=4, alpha=8.0, target_modules=("k_proj", "gate_proj", "up_proj", "down_proj"),
                                     use_rslora=True, dtype="float32"),
                    # a lone half of gate_up_proj, and no target_modules at all
                    "up": LoraConfig(r=4, alpha=8.0, target_modules=("up_proj",), dtype="float32")}
    loras = {k: _random_lora(config, c, 11 + i) for i, (k, c) in enumerate(lora_configs.items())}
    for k in loras:
        save_peft_adapter(workdir / f"{name}_ours_fused_{k}", loras[k], lora_configs[k], config, expert_format="fused")
    written = load_file(workdir / f"{name}_ours_fused_plain" / "adapter_model.safetensors")
    assert written["base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"].shape == (EXPERTS * 8, 64)
    assert written["base_model.model.model.layers.1.mlp.experts.lora_B.weight"].shape == (64, EXPERTS * 4)
    written_config = json.loads((workdir / f"{name}_ours_fused_plain" / "adapter_config.json").read_text())
    assert written_config["target_parameters"] == FUSED_PARAMS
    assert written_config["rank_pattern"] == {"mlp.experts.gate_up_proj": 8}
    up_config = json.loads((workdir / f"{name}_ours_fused_up" / "adapter_config.json").read_text())
    assert up_config["target_modules"] is None and up_config["target_parameters"] == FUSED_PARAMS[:1]
    assert "rank_pattern" not in up_config
    cases = ["peft", *(f"back_{k}" for k in loras)]
    arrays = {f"{c}/{k}": v for c in cases for k, v in (("input_ids", ids), ("attention_mask", mask))}
    out = oracle.run("hf_moe.py", arrays, {"cases": [
        dict(name="peft", op="peft_fused", dir=str(workdir / name), r=4, alpha=16, target_modules=["q_proj", "v_proj"],
             target_parameters=FUSED_PARAMS, seed=5, save_dir=str(peft_dir)),
        *(dict(name=f"back_{k}", op="peft_load", dir=str(workdir / name),
               adapter_dir=str(workdir / f"{name}_ours_fused_{k}")) for k in loras),
    ]})
    # (a)
    assert json.loads((peft_dir / "adapter_config.json").read_text())["target_parameters"]
    peft_lora, peft_config = load_peft_adapter(peft_dir, config)
    assert peft_config.target_modules == ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")
    gate, up = (peft_lora["layers"]["mlp"][n] for n in ("gate_proj", "up_proj"))
    assert gate["lora_A"].shape == (2, EXPERTS, 4, 64)
    delta = [peft_config.scaling * np.einsum("eor,eri->eoi", np.asarray(p["lora_B"][0], np.float64),
                                             np.asarray(p["lora_A"][0], np.float64)) for p in (gate, up)]
    np.testing.assert_allclose(np.concatenate(delta, axis=1), out["peft/delta_gate_up"], atol=1e-6, rtol=1e-5)
    got = run(config, base, ids, mask, peft_lora, peft_config)
    np.testing.assert_allclose(valid(got, mask), valid(out["peft/logits"], mask), atol=2e-4, rtol=1e-4)
    assert np.abs(valid(got, mask) - valid(hf[f"{name}/logits_f32"], mask)).max() > 1e-2  # the adapter matters
    # (b)
    for k, lora in loras.items():
        np.testing.assert_allclose(valid(run(config, base, ids, mask, lora, lora_configs[k]), mask),
                                   valid(out[f"back_{k}/logits"], mask), atol=2e-4, rtol=1e-4)
        back, back_config = load_peft_adapter(workdir / f"{name}_ours_fused_{k}", config)
        assert back_config.scaling == lora_configs[k].scaling
        if k == "up":  # read back as gate and up with one A, gate's B zero
            assert back_config.target_modules == ("gate_proj", "up_proj")
            gate, up = back["layers"]["mlp"]["gate_proj"], back["layers"]["mlp"]["up_proj"]
            assert not np.any(gate["lora_B"])
            np.testing.assert_array_equal(gate["lora_A"], up["lora_A"])
            back = {"layers": {"mlp": {"up_proj": up}}}
        else:
            assert back_config.target_modules == layout.lora_targets(lora_configs[k], config)
        jax.tree.map(np.testing.assert_array_equal, back, lora)


def _fused_case(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors:
        tensors = load_file(dst / "adapter_model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    if edit_config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        edit_config(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def test_unrepresentable_or_corrupt_fused_adapters_are_refused_by_name(hf, workdir, tmp_path):
    """A fused gate_up_proj of rank 2r whose gate rows use the up half's rank components (not two
    independent rank-r adapters), wrong fused shapes, missing wrappers, other rank/alpha patterns
    and target_parameters we cannot place are refused, naming the file and the key or field."""
    import re

    from qlora_jax.peft_io import load_peft_adapter, save_peft_adapter

    config = read_config(json.loads((workdir / "mixtral" / "config.json").read_text()))
    lora_config = LoraConfig(r=4, alpha=8.0, target_modules=("q_proj", "gate_proj", "up_proj", "down_proj"))
    good = save_peft_adapter(tmp_path / "good", _random_lora(config, lora_config, 3), lora_config, config,
                             expert_format="fused")
    load_peft_adapter(good, config)  # accepted as written
    gate_up_b = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"
    down_a = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"

    def mix(t):  # gate row 0 takes up's rank component 0 of expert 2 (B column k*E + e)
        t[gate_up_b] = t[gate_up_b].copy()
        t[gate_up_b][0, 4 * EXPERTS + 2] = 0.5

    def set_(field, value):
        return lambda cfg: cfg.__setitem__(field, value)

    cases = [
        (dict(edit_tensors=mix), rf"{re.escape(gate_up_b)}.*non-zero gate rows.*not independent rank-4"),
        (dict(edit_tensors=lambda t: t.__setitem__(down_a, t[down_a][:-1])), re.escape(down_a)),
        # down_proj's A saved without its wrapper's nesting (as the inner, gate_up_proj's, key would be)
        (dict(edit_tensors=lambda t: t.__setitem__(down_a.replace("experts.", "experts.base_layer.base_layer."),
                                                   t.pop(down_a))),
         rf"missing tensor '{re.escape(down_a)}'"),
        (dict(edit_config=set_("rank_pattern", {"mlp.experts.down_proj": 8})), r"field 'rank_pattern'"),
        (dict(edit_config=set_("rank_pattern", {"mlp.experts.gate_up_proj": 12})),
         r"gate_up_proj rank 12.*r=4.*2r=8"),
        (dict(edit_config=set_("rank_pattern", {"mlp.experts.gate_up_proj": 8.0})), r"gate_up_proj rank 8\.0"),
        (dict(edit_config=set_("alpha_pattern", {"mlp.experts.gate_up_proj": 8.0})),
         r"gate_up_proj's scaling \(lora_alpha 8.0 at rank 8\) differs"),
        (dict(edit_config=set_("target_parameters", ["mlp.gate.weight"])),
         r"'target_parameters' entry 'mlp\.gate\.weight' matches no fused expert parameter"),
        (dict(edit_config=set_("target_parameters", ["model.layers.0.mlp.experts.gate_up_proj",
                                                     "mlp.experts.down_proj"])),
         r"leaves gate_up_proj of layers \[1\] unadapted"),
        (dict(edit_config=set_("target_modules", ["q_proj", "w1"])),
         r"\['gate_proj'\] are adapted both by 'target_modules'"),
        (dict(edit_config=set_("target_parameters", "mlp.experts.down_proj")), r"field 'target_parameters' is"),
    ]
    for i, (edits, message) in enumerate(cases):
        bad = _fused_case(good, tmp_path / f"bad{i}", **edits)
        with pytest.raises(CheckpointError) as err:
            load_peft_adapter(bad, config)
        assert str(bad) in str(err.value) and re.search(message, str(err.value)), (i, str(err.value))
    with pytest.raises(ValueError, match=r"expert_format='fused' needs lora_config\.dropout == 0"):
        save_peft_adapter(tmp_path / "y", _random_lora(config, lora_config, 3),
                          LoraConfig(r=4, alpha=8.0, dropout=0.1, target_modules=lora_config.target_modules), config,
                          expert_format="fused")
    with pytest.raises(ValueError, match="expert_format is 'v5'"):
        save_peft_adapter(tmp_path / "x", _random_lora(config, lora_config, 3), lora_config, config,
                          expert_format="v5")


# ------------------------------------------------------------------------------------------ trained routers
# PEFT's modules_to_save=["gate"] (LoraConfig.modules_to_save, --train_router): full copies of the MoE
# routers train with the adapters, and the adapter folder carries them (mlp.gate.weight per layer).

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@pytest.fixture(scope="module")
def router_reference(oracle, adamw_reference, workdir):
    """Per family, from adamw_reference's random adapters with trainable routers added (the base's
    routers, modules_to_save=["gate"], written by our save_peft_adapter, so PEFT reads our export):
    five AdamW steps by transformers + PEFT + torch.optim.AdamW in float64 with (1) the attention and
    expert adapters (losses and trained routers) and (2) the attention adapters only, whose trained
    adapter PEFT saves (save_pretrained: PEFT 0.21 writes fused expert adapters in a format we do
    not read, so the saved case has none)."""
    from qlora_jax.peft_io import load_peft_adapter, save_peft_adapter

    _, batch = adamw_reference
    arrays = {f"{case}/{k}": v[0] for name in MODELS for case in (f"{name}_router", f"{name}_router_attn")
              for k, v in batch.items()}
    cases = []
    for name in MODELS:
        config, base, _ = ours(workdir / name)
        lora, lora_config = load_peft_adapter(workdir / f"{name}_adamw_init", config, dtype="float32")
        lora_config = dataclasses.replace(lora_config, modules_to_save=("gate",))
        lora["layers"]["mlp"]["gate"] = {"weight": base["layers"]["mlp"]["gate"]["weight"]}
        save_peft_adapter(workdir / f"{name}_router_init", lora, lora_config, config)
        attn = {"layers": {"self_attn": lora["layers"]["self_attn"], "mlp": {"gate": lora["layers"]["mlp"]["gate"]}}}
        save_peft_adapter(workdir / f"{name}_router_attn_init", attn,
                          dataclasses.replace(lora_config, target_modules=ATTENTION), config)
        for case, init, save in ((f"{name}_router", "router_init", None),
                                 (f"{name}_router_attn", "router_attn_init", str(workdir / f"{name}_router_peft"))):
            cases.append(dict(name=case, dir=str(workdir / name), adapter_dir=str(workdir / f"{name}_{init}"),
                              adamw=ADAMW, moe=True, **({"save_dir": save} if save else {})))
    return oracle.run("hf_train.py", arrays, {"cases": cases}), batch


def _adamw_trained(spec, base, lora, batch):
    """``(losses, trained)``: :func:`_adamw_losses` and the trainable pytree after the last update."""
    from qlora_jax.optim import make_optimizer
    from qlora_jax.train import make_train_step

    optimizer = make_optimizer("adamw", ADAMW["lr"], b1=ADAMW["betas"][0], b2=ADAMW["betas"][1], eps=ADAMW["eps"],
                               weight_decay=ADAMW["weight_decay"], max_grad_norm=ADAMW["max_grad_norm"])
    step = jax.jit(make_train_step(spec, optimizer))
    state, batch, losses = optimizer.init(lora), jax.tree.map(jnp.asarray, batch), []
    for i in range(ADAMW["steps"] + 1):
        new, state, metrics = step(lora, state, base, batch, None)
        losses.append(float(metrics["loss"]))
        lora = new if i < ADAMW["steps"] else lora
    return np.array(losses), lora


@pytest.mark.parametrize("name", list(MODELS))
def test_router_training_follows_peft_modules_to_save(router_reference, workdir, name):
    """With modules_to_save=["gate"], the routers are in the trainable pytree (float32 adapters: float32
    routers, copied from the base), and five AdamW steps follow PEFT's losses and PEFT's trained routers.

    Losses: test_five_adamw_steps_follow_peft's tolerance. Routers: each AdamW step moves an entry by
    lr * m / (sqrt(v) + eps) plus the decay lr * wd * w (the same on both sides to float32 rounding of
    w); float32 gradients (absolute error delta = ROUNDING * max|g|, so relative delta / |g|) change
    m / sqrt(v), at most about 1 in size, by at most 2 delta / |g|. Over k steps an entry whose
    gradients stay above RHO * max|g| is off by at most k * lr * 2 * ROUNDING / RHO; in norm over the
    m router entries, sqrt(m) times that (RHO = 1e-2: router gradients of these random models are
    within two orders of magnitude of the largest). Adam moves every entry by about lr per step, so
    the routers' movement, about k * lr * sqrt(m), must be far larger.
    """
    from qlora_jax.peft_io import load_peft_adapter

    out, batch = router_reference
    config, base, _ = ours(workdir / name)
    lora, lora_config = load_peft_adapter(workdir / f"{name}_router_init", config, dtype="float32")
    assert lora_config.modules_to_save == ("gate",)
    spec = ModelSpec(config, lora_config, compute_dtype="float32")
    assert spec.train_router and lora["layers"]["mlp"]["gate"]["weight"].shape == (2, EXPERTS, 64)
    fresh = init_lora_params(jax.random.key(0), spec, base=base)  # the initialisation: the base's routers
    np.testing.assert_array_equal(fresh["layers"]["mlp"]["gate"]["weight"], base["layers"]["mlp"]["gate"]["weight"])
    losses, trained = _adamw_trained(spec, base, lora, batch)
    want = out[f"{name}_router/losses"]
    tolerance = _adamw_tolerance(want, out[f"{name}_router/grad_max"], lora)
    assert np.all(np.abs(losses - want) <= tolerance), (losses.tolist(), want.tolist(), tolerance.tolist())
    # The routers' training matters to the losses: without it, they leave PEFT's.
    frozen_router = dataclasses.replace(lora_config, modules_to_save=())
    plain = {"layers": {**lora["layers"], "mlp": {k: v for k, v in lora["layers"]["mlp"].items() if k != "gate"}}}
    without, _ = _adamw_trained(ModelSpec(config, frozen_router, compute_dtype="float32"), base, plain, batch)
    assert np.any(np.abs(without - want) > tolerance), "the tolerance must see the routers' training"
    start = np.asarray(base["layers"]["mlp"]["gate"]["weight"], np.float64)
    got = np.asarray(trained["layers"]["mlp"]["gate"]["weight"], np.float64) - start
    peft = out[f"{name}_router/routers"] - start
    k, m, rho = ADAMW["steps"], start.size, 1e-2
    bound = m**0.5 * k * ADAMW["lr"] * 2 * ROUNDING / rho
    assert np.linalg.norm(got - peft) <= bound, (np.linalg.norm(got - peft), bound)
    assert np.linalg.norm(peft) > 20 * bound, "the routers must move far beyond the tolerance"


@pytest.mark.parametrize("name", list(MODELS))
def test_trained_routers_exchange_with_peft(oracle, router_reference, workdir, inputs, name):
    """Our trained adapter with routers, exported, gives our logits in PEFT (PeftModel.from_pretrained);
    the adapter PEFT trained and saved (modules_to_save=["gate"]) gives PEFT's logits here."""
    from qlora_jax.peft_io import load_peft_adapter, router_key, save_peft_adapter

    ids, mask = inputs
    _, batch = router_reference
    config, base, _ = ours(workdir / name)
    lora, lora_config = load_peft_adapter(workdir / f"{name}_router_init", config, dtype="float32")
    spec = ModelSpec(config, lora_config, compute_dtype="float32")
    _, trained = _adamw_trained(spec, base, lora, batch)
    ours_dir = workdir / f"{name}_router_trained"
    save_peft_adapter(ours_dir, trained, lora_config, config)
    written = load_file(ours_dir / "adapter_model.safetensors")
    assert router_key(1) == "base_model.model.model.layers.1.mlp.gate.weight"
    np.testing.assert_array_equal(written[router_key(1)], np.asarray(trained["layers"]["mlp"]["gate"]["weight"][1]))
    assert json.loads((ours_dir / "adapter_config.json").read_text())["modules_to_save"] == ["gate"]
    peft_dir = workdir / f"{name}_router_peft"
    peft_lora, peft_config = load_peft_adapter(peft_dir, config, dtype="float32")
    assert peft_config.modules_to_save == ("gate",) and peft_config.target_modules == ATTENTION
    arrays = {f"{c}/{k}": v for c in ("ours", "peft") for k, v in (("input_ids", ids), ("attention_mask", mask))}
    out = oracle.run("hf_moe.py", arrays, {"cases": [
        dict(name="ours", op="peft_load", dir=str(workdir / name), adapter_dir=str(ours_dir)),
        dict(name="peft", op="peft_load", dir=str(workdir / name), adapter_dir=str(peft_dir))]})
    got = run(config, base, ids, mask, trained, lora_config)
    np.testing.assert_allclose(valid(got, mask), valid(out["ours/logits"], mask), atol=2e-4, rtol=1e-4)
    got = run(config, base, ids, mask, peft_lora, peft_config)
    np.testing.assert_allclose(valid(got, mask), valid(out["peft/logits"], mask), atol=2e-4, rtol=1e-4)
    # The routers matter: the same adapters with the base's routers give other logits.
    base_routers = {"layers": {**peft_lora["layers"], "mlp": {}}}
    other = run(config, base, ids, mask, base_routers, dataclasses.replace(peft_config, modules_to_save=()))
    assert np.abs(valid(other, mask) - valid(out["peft/logits"], mask)).max() > 1e-3


def test_router_training_is_refused_where_it_cannot_apply(hf, workdir, tmp_path):
    """modules_to_save on a dense model, or naming another module, is refused by name; so is an adapter
    folder whose modules_to_save names another module."""
    from qlora_jax.peft_io import load_peft_adapter, save_peft_adapter
    from qlora_jax.recipe.config import ConfigError, FinetuneConfig

    dense = _dense_mixtral(workdir)
    with pytest.raises(ValueError, match=r"modules_to_save=\['gate'\] trains the MoE router, but this model "
                                         r"\(model_type 'mistral'\) has no mixture-of-experts layers"):
        ModelSpec(dense, LoraConfig(r=4, modules_to_save=("gate",)))
    with pytest.raises(ValueError, match=r"modules_to_save=\['lm_head'\]: qlora-jax trains in full only the MoE "
                                         r"router \['gate'\]"):
        LoraConfig(r=4, modules_to_save=("lm_head",))
    with pytest.raises(ConfigError, match="train_router: a full finetune"):
        FinetuneConfig(train_router=True, full_finetune=True, bits=16)
    assert FinetuneConfig(train_router=True).lora_config().modules_to_save == ("gate",)
    # The trainable router needs the base to start from.
    config = read_config(json.loads((workdir / "mixtral" / "config.json").read_text()))
    with pytest.raises(ValueError, match="pass base= to init_lora_params"):
        init_lora_params(jax.random.key(0), ModelSpec(config, LoraConfig(r=4, modules_to_save=("gate",))))
    # An adapter folder with modules_to_save naming another module is refused, naming the field.
    lora_config = LoraConfig(r=4, target_modules=ATTENTION, dtype="float32")
    spec = ModelSpec(config, lora_config)
    folder = save_peft_adapter(tmp_path / "adapter", init_lora_params(jax.random.key(0), spec), lora_config, config)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(cfg, modules_to_save=["lm_head"])))
    with pytest.raises(CheckpointError, match=r"field 'modules_to_save' is \['lm_head'\]"):
        load_peft_adapter(folder, config)
    # modules_to_save=["gate"] without the routers' tensors: the missing tensor is named.
    (folder / "adapter_config.json").write_text(json.dumps(dict(cfg, modules_to_save=["gate"])))
    with pytest.raises(CheckpointError, match=r"base_model\.model\.model\.layers\.0\.mlp\.gate\.weight"):
        load_peft_adapter(folder, config)


@pytest.mark.parametrize("name", list(MODELS))
def test_trained_routers_in_save_quantized_and_merged_export(hf, workdir, inputs, tmp_path, name):
    """Trained routers travel with the adapters through save_quantized / load_quantized (byte for byte)
    and replace the base's routers in the merged export (the float32 folder's router tensors are
    them, and transformers' loader reads the folder: its own logits are checked by
    test_merged_export_loads_in_transformers_and_here)."""
    from qlora_jax.merge import export_merged

    ids, mask = inputs
    config, base, _ = ours(workdir / name)
    lora_config = LoraConfig(r=4, alpha=8.0, target_modules=ATTENTION, dtype="float32", modules_to_save=("gate",))
    spec = ModelSpec(config, lora_config, compute_dtype="float32")
    lora = init_lora_params(jax.random.key(3), spec, base=base)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), lora)
    save_quantized(tmp_path / "orbax", base, config=config, lora=lora, lora_config=lora_config)
    saved = load_quantized(tmp_path / "orbax")
    assert saved.lora_config.modules_to_save == ("gate",)
    for a, b in zip(jax.tree.leaves(saved.lora), jax.tree.leaves(lora), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(run(saved.config, saved.base, ids, mask, saved.lora, saved.lora_config),
                                  run(config, base, ids, mask, lora, lora_config))
    export_merged(tmp_path / "merged", config, base, lora, lora_config, dtype="float32")
    stored = load_file(tmp_path / "merged" / "model.safetensors")
    block, _ = _moe_names(name)
    for layer in range(config.num_hidden_layers):
        np.testing.assert_array_equal(stored[f"model.layers.{layer}.{block}.gate.weight"],
                                      np.asarray(lora["layers"]["mlp"]["gate"]["weight"][layer]))
    merged_config, merged_base, _ = ours(tmp_path / "merged")
    np.testing.assert_allclose(valid(run(merged_config, merged_base, ids, mask), mask),
                               valid(run(config, base, ids, mask, lora, lora_config), mask), atol=2e-4, rtol=1e-4)


def test_train_router_is_a_setting_resume_checks():
    """--train_router is declared once (a FinetuneConfig setting, so a flag) and may not change on --resume."""
    from qlora_jax.recipe.config import FinetuneConfig

    assert FinetuneConfig.field_default("train_router") is False
    assert "train_router" not in FinetuneConfig.resume_may_change()


@pytest.mark.slow
def test_finetune_recipe_trains_the_router_and_resumes(oracle, tmp_path):
    """``--train_router`` in the recipe on a Qwen3-MoE folder, on an ``expert`` mesh with LoRA dropout
    (``--mesh=data=2,expert=4``: each device holds one expert, the batch splits over data): the
    routers train (the exported PEFT adapter holds them, moved from the base's, with
    modules_to_save=["gate"]), the run resumes from its Orbax checkpoint with them, and a resume
    that drops --train_router is refused by name."""
    from helpers import small_finetune_config

    from qlora_jax.finetune import run as run_finetune
    from qlora_jax.model import load_tokenizer
    from qlora_jax.peft_io import router_key
    from qlora_jax.recipe.config import ConfigError

    tokenizer = load_tokenizer("embedded")
    model_type, config = MODELS["qwen3_moe"]
    config = dict(config, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_id,
                  eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    folder = tmp_path / "qwen3_moe"
    oracle.run("hf_models.py", {"m/input_ids": np.zeros((1, 2), np.int32)}, {"cases": [
        dict(name="m", op="make_model", model_type=model_type, config=config, seed=5, dir=str(folder))]})
    tokenizer.save(folder)
    out = tmp_path / "out"
    common = dict(eval_steps=3, save_steps=3, train_router=True, lora_dtype="float32", mesh="data=2,expert=4",
                  lora_dropout=0.05)
    assert run_finetune(small_finetune_config(folder, out, max_steps=3, **common), progress=False).final_step == 3
    result = run_finetune(small_finetune_config(folder, out, max_steps=6, resume=True, **common), progress=False)
    assert result.final_step == 6
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["gate"]
    trained = load_file(adapter / "adapter_model.safetensors")
    original = load_file(folder / "model.safetensors")
    for layer in range(BASE["num_hidden_layers"]):
        moved = trained[router_key(layer)] - original[f"model.layers.{layer}.mlp.gate.weight"]
        assert np.abs(moved).max() > 1e-3, layer
    with pytest.raises(ConfigError, match="train_router: True -> False"):
        run_finetune(small_finetune_config(folder, out, max_steps=9, resume=True,
                                           **dict(common, train_router=False)), progress=False)


def test_train_router_flag_on_a_dense_model_is_refused(tmp_path):
    """--train_router on the embedded (dense, LLaMA) model is refused naming the flag, before any weight loads."""
    from qlora_jax.recipe.config import ConfigError, FinetuneConfig
    from qlora_jax.recipe.steps import setup_model

    with pytest.raises(ConfigError, match=r"train_router=True: trains the routers of a mixture-of-experts model .*"
                                          r"model_type 'llama'"):
        setup_model(FinetuneConfig(train_router=True, output_dir=str(tmp_path)))
