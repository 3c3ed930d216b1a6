"""LLaMA-family models and checkpoints against transformers, PEFT and bitsandbytes on CPU."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.load import load_base_params, open_checkpoint, read_config
from qlora_jax.lora import LoraConfig
from qlora_jax.merge import export_merged
from qlora_jax.model import FrozenWeights, init_lora_params, load_pretrained
from qlora_jax.models import llama
from qlora_jax.models.config import UnsupportedArchitectureError
from qlora_jax.models.spec import ModelSpec
from qlora_jax.peft_io import load_peft_adapter, save_peft_adapter
from qlora_jax.quant import QuantConfig

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5)
MODELS = {
    "llama": ("llama", dict(BASE)),
    "llama_gqa_llama3_tied": ("llama", dict(BASE, num_key_value_heads=2, tie_word_embeddings=True,
                                            rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 16})),
    "qwen2_bias": ("qwen2", dict(BASE, num_key_value_heads=2)),
    "mistral_window": ("mistral", dict(BASE, num_key_value_heads=2, sliding_window=6, head_dim=16)),
    "llama_sharded": ("llama", dict(BASE)),
}
SEQ = 16


@pytest.fixture(scope="module")
def hf(oracle, workdir, inputs):
    """Random transformers models saved with save_pretrained, their logits, and 4-bit variants."""
    ids, mask = inputs
    arrays, cases = {}, []
    for i, (name, (model_type, config)) in enumerate(MODELS.items()):
        arrays[f"{name}/input_ids"], arrays[f"{name}/attention_mask"] = ids, mask
        cases.append(dict(name=name, op="make_model", model_type=model_type, config=config, seed=100 + i,
                          dir=str(workdir / name), max_shard_size="40KB" if name.endswith("sharded") else None))
    for name in ("llama", "qwen2_bias"):
        for quant_type in ("nf4", "fp4"):
            case = f"{name}_{quant_type}"
            arrays[f"{case}/input_ids"], arrays[f"{case}/attention_mask"] = ids, mask
            cases.append(dict(name=case, op="bnb4", dir=str(workdir / name), quant_type=quant_type,
                              double_quant=True, save_dir=str(workdir / f"{case}_saved")))
    return oracle.run("hf_models.py", arrays, {"cases": cases})


def valid(logits, mask):
    return logits[mask.astype(bool)]


def ours(path, quant="float32", compute_dtype="float32", bnb_backend="cuda", lora=None, lora_params=None):
    source, cfg = open_checkpoint(path)
    config = read_config(cfg)
    base, stats = load_base_params(source, config, QuantConfig(quant=quant, dtype="float32" if quant != "bf16"
                                                                else "bfloat16", bnb_backend=bnb_backend))
    return config, base, stats


def run(config, base, ids, mask, lora=None, lora_config=None, compute_dtype="float32"):
    spec = ModelSpec(config, lora_config, compute_dtype=compute_dtype)
    logits, _ = llama.forward(spec, base, lora, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    return np.asarray(logits)


@pytest.mark.parametrize("name", list(MODELS))
def test_float32_logits_match_transformers(hf, workdir, inputs, name):
    ids, mask = inputs
    config, base, _ = ours(workdir / name)
    expected = hf[f"{name}/logits_f32"]
    np.testing.assert_allclose(valid(run(config, base, ids, mask), mask), valid(expected, mask), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_logits_match_transformers_within_bf16_tolerance(hf, workdir, inputs, name):
    ids, mask = inputs
    config, base, _ = ours(workdir / name, quant="bf16")
    got = valid(run(config, base, ids, mask, compute_dtype="bfloat16"), mask)
    expected = valid(hf[f"{name}/logits_bf16"], mask)
    scale = np.abs(hf[f"{name}/logits_f32"]).max()
    # bf16 has 8 bits of mantissa: a few ulps of the largest logit, accumulated over two layers.
    np.testing.assert_allclose(got, expected, atol=0.03 * scale)
    # The same top token wherever transformers' top two logits are further apart than a few bf16
    # ulps of the largest logit (a tiny random model has near ties, which bf16 may break either way).
    top2 = np.sort(expected, -1)[..., -2:]
    decisive = top2[..., 1] - top2[..., 0] > 4 * 2.0**-8 * scale
    assert decisive.mean() > 0.5, decisive.mean()
    np.testing.assert_array_equal(np.argmax(got, -1)[decisive], np.argmax(expected, -1)[decisive])


@pytest.mark.parametrize("name", ["llama", "qwen2_bias"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_logits_match_transformers_bitsandbytes(hf, workdir, inputs, name, quant_type):
    ids, mask = inputs
    config, base, stats = ours(workdir / name, quant=quant_type, bnb_backend="cpu")
    assert stats.requantized == 14
    np.testing.assert_allclose(valid(run(config, base, ids, mask), mask),
                               valid(hf[f"{name}_{quant_type}/logits"], mask),
                               atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["llama", "qwen2_bias"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_checkpoint_loads_without_requantization(hf, workdir, inputs, name, quant_type):
    ids, mask = inputs
    saved = workdir / f"{name}_{quant_type}_saved"
    keys = list(load_file(saved / "model.safetensors"))
    assert any(k.endswith(f"quant_state.bitsandbytes__{quant_type}") for k in keys)
    assert any(k.endswith("weight.nested_absmax") for k in keys)  # double quantization kept
    config, base, stats = ours(saved, quant=quant_type)
    assert stats.prequantized == 14 and stats.requantized == 0
    np.testing.assert_allclose(valid(run(config, base, ids, mask), mask),
                               valid(hf[f"{name}_{quant_type}/logits"], mask),
                               atol=2e-4, rtol=1e-4)


def test_peft_adapters_both_ways(oracle, hf, workdir, inputs):
    ids, mask = inputs
    targets = ["q_proj", "v_proj", "gate_proj", "down_proj"]
    peft_dir, ours_dir = workdir / "peft_adapter", workdir / "our_adapter"
    # Our adapter, with non-zero B, for the second half of the round trip.
    config, base, _ = ours(workdir / "llama")
    lora_config = LoraConfig(r=4, alpha=8.0, target_modules=tuple(targets), dtype="float32")
    lora = init_lora_params(jax.random.key(7), ModelSpec(config, lora_config))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.size), x.shape, x.dtype), lora)
    save_peft_adapter(ours_dir, lora, lora_config, config)
    arrays = {f"{c}/{k}": v for c in ("peft", "back") for k, v in (("input_ids", ids), ("attention_mask", mask))}
    out = oracle.run("hf_models.py", arrays, {"cases": [
        dict(name="peft", op="peft_random", dir=str(workdir / "llama"), r=8, alpha=16, targets=targets, seed=3,
             save_dir=str(peft_dir)),
        dict(name="back", op="peft_load", dir=str(workdir / "llama"), adapter_dir=str(ours_dir)),
    ]})
    # PEFT's adapter, loaded here.
    peft_lora, peft_config = load_peft_adapter(peft_dir, config)
    assert peft_config.r == 8 and peft_config.scaling == 2.0 and set(peft_config.target_modules) == set(targets)
    assert float(jnp.abs(peft_lora["layers"]["self_attn"]["q_proj"]["lora_B"]).max()) > 0
    got = run(config, base, ids, mask, peft_lora, peft_config)
    np.testing.assert_allclose(valid(got, mask), valid(out["peft/logits"], mask), atol=2e-4, rtol=1e-4)
    assert np.abs(valid(got, mask) - valid(hf["llama/logits_f32"], mask)).max() > 1e-2  # the adapter matters
    # Ours, loaded in PEFT.
    np.testing.assert_allclose(valid(run(config, base, ids, mask, lora, lora_config), mask),
                               valid(out["back/logits"], mask), atol=2e-4, rtol=1e-4)


def test_merged_export_reloads_in_transformers(oracle, workdir, inputs):
    ids, mask = inputs
    for name in ("llama_gqa_llama3_tied", "qwen2_bias"):
        config, base, _ = ours(workdir / name)
        lora_config = LoraConfig(r=4, alpha=8.0, dtype="float32")
        lora = init_lora_params(jax.random.key(1), ModelSpec(config, lora_config))
        lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(x.ndim), x.shape, x.dtype), lora)
        expected = run(config, base, ids, mask, lora, lora_config)
        export_merged(workdir / f"{name}_merged", config, base, lora, lora_config, dtype="float32")
        report = export_merged(workdir / f"{name}_merged_nf4", config, base, lora, lora_config, dtype="float32",
                               quantize_to="nf4")
        assert 0.01 < report.requantization_relative_rmse < 0.2
        # Our own reading of the 4-bit export: the reference for transformers' 4-bit logits.
        qconfig, qbase, qstats = ours(workdir / f"{name}_merged_nf4", quant="nf4")
        assert qstats.prequantized == 14
        expected_nf4 = run(qconfig, qbase, ids, mask)
        arrays = {f"{c}/{k}": v for c in ("m", "q") for k, v in (("input_ids", ids), ("attention_mask", mask))}
        out = oracle.run("hf_models.py", arrays, {"cases": [
            dict(name="m", op="logits", dir=str(workdir / f"{name}_merged")),
            dict(name="q", op="logits", dir=str(workdir / f"{name}_merged_nf4")),
        ]})
        np.testing.assert_allclose(valid(out["m/logits"], mask), valid(expected, mask), atol=2e-4, rtol=1e-4)
        np.testing.assert_allclose(valid(out["q/logits"], mask), valid(expected_nf4, mask), atol=2e-4, rtol=1e-4)


def test_causal_lm_module_and_load_pretrained(hf, workdir, inputs):
    ids, mask = inputs
    model, tokenizer = load_pretrained(workdir / "llama", QuantConfig("float32", dtype="float32"), lora=LoraConfig(r=4),
                                       compute_dtype="float32")
    assert tokenizer is None  # the random test models come without a tokenizer
    logits = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert logits.shape == (2, SEQ, BASE["vocab_size"])
    # A fresh adapter (B = 0) changes nothing.
    np.testing.assert_allclose(valid(logits, mask), valid(hf["llama/logits_f32"], mask), atol=2e-4, rtol=1e-4)
    from flax import nnx

    lora_state = nnx.state(model, nnx.LoRAParam)
    assert len(jax.tree.leaves(lora_state)) == 14  # 7 linears x (A, B), stacked over layers
    # The frozen base is no Param: Param filters (which include LoRAParam) see the adapters only.
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 14
    assert len(jax.tree.leaves(nnx.state(model, FrozenWeights))) == len(jax.tree.leaves(model.base_params))


# ---------------------------------------------------------------------------- bad checkpoints


def _copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_tensor_is_named(hf, workdir):
    bad = _copy(workdir / "llama", workdir / "bad_missing")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        ours(bad, quant="nf4")


def test_shape_disagreeing_with_config_is_named(hf, workdir):
    bad = _copy(workdir / "llama", workdir / "bad_shape")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError,
                       match=r"gate_proj\.weight' has shape \[128, 64\] but config\.json implies \[192, 64\]"):
        ours(bad, quant="nf4")


def test_unsupported_architecture_is_refused(hf, workdir):
    bad = _copy(workdir / "llama", workdir / "bad_arch")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="gpt2"):
        load_pretrained(bad)


def test_truncated_safetensors_is_named(hf, workdir):
    bad = _copy(workdir / "llama", workdir / "bad_truncated")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        ours(bad, quant="nf4")


def test_prequantized_with_wrong_shape_is_named(hf, workdir):
    bad = _copy(workdir / "llama_nf4_saved", workdir / "bad_bnb")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_size"], cfg["head_dim"] = 128, 32
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="config.json implies"):
        ours(bad, quant="nf4")


# ---------------------------------------------------------------------------- the embedded model


def test_embedded_smollm2_answers_paris():
    from qlora_jax.generate import chat

    model, tokenizer = load_pretrained("embedded", quant="nf4", lora=None)
    reply = chat(model, tokenizer, "What is the capital of France?", max_new_tokens=16)
    assert "Paris" in reply, reply
