"""Every tensor and ``config.json`` field read from a checkpoint is checked (``checkpoints/validate.py``).

A small float32 folder (the ``good`` fixture of conftest.py) with one thing corrupted: a NaN or
Inf in any tensor, layers beyond ``num_hidden_layers``, a missing or stray tensor, a derived
rotary buffer that disagrees with the config, an integer weight, a wrong shape, a bad
``config.json`` field. Each gives an early :class:`CheckpointError` that names the file, the
tensor or field, and what was expected. Part of the fault campaign (``pytest -m faults``).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import CONFIG, load, random_tensors, variant, with_value, write_folder

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.models.rope import inverse_frequencies


@pytest.mark.faults
@pytest.mark.parametrize("key, index, value", [
    ("model.embed_tokens.weight", (3, 5), np.nan),
    ("lm_head.weight", (0, 0), np.inf),
    ("model.norm.weight", 7, -np.inf),
    ("model.layers.1.input_layernorm.weight", 0, np.nan),
    ("model.layers.0.post_attention_layernorm.weight", 63, np.nan),
    ("model.layers.1.self_attn.o_proj.weight", (2, 3), np.nan),
])
def test_non_finite_value_in_any_tensor_is_named(tmp_path, good, key, index, value):
    bad = variant(tmp_path, good, add=with_value(good, key, index, value))
    where = re.escape(f"{bad / 'model.safetensors'}: tensor '{key}' holds 1 NaN or Inf")
    with pytest.raises(CheckpointError, match=where):
        load(bad)


@pytest.mark.faults
def test_non_finite_bias_is_named(tmp_path, rng):
    cfg = {**CONFIG, "attention_bias": True}
    tensors = random_tensors(rng, cfg)
    tensors["model.layers.0.self_attn.k_proj.bias"][4] = np.nan
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.bias' holds 1 NaN"):
        load(write_folder(tmp_path / "bias", cfg, tensors))


@pytest.mark.faults
def test_extra_layers_are_refused_by_name(tmp_path, good, rng):
    extra = random_tensors(rng, {**CONFIG, "num_hidden_layers": 4}, layers=range(2, 4))
    bad = variant(tmp_path, good, add=extra)
    with pytest.raises(CheckpointError, match=r"holds 18 tensor\(s\) that a model with this config does not use: "
                                              r"'model\.layers\.2\..*layer\(s\) 2-3 are beyond num_hidden_layers=2"):
        load(bad)


@pytest.mark.faults
def test_missing_tensor_is_named_before_anything_is_read(tmp_path, good):
    bad = variant(tmp_path, good, drop=("model.layers.1.mlp.up_proj.weight",))
    with pytest.raises(CheckpointError, match=r"is missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load(bad)


@pytest.mark.faults
def test_fewer_layers_than_config_lists_the_missing(tmp_path, good):
    bad = variant(tmp_path, good, cfg={"num_hidden_layers": 3})
    with pytest.raises(CheckpointError, match=r"is missing 9 tensors: 'model\.layers\.2\.input_layernorm\.weight'"):
        load(bad)


@pytest.mark.faults
@pytest.mark.parametrize("key", ["model.foo.weight", "model.layers.0.mlp.up_proj.weight.SCB", "lm_head.bias"])
def test_stray_tensor_is_refused(tmp_path, good, key):
    bad = variant(tmp_path, good, add={key: np.zeros(4, np.float32)})
    with pytest.raises(CheckpointError, match=rf"does not use: '{key}'"):
        load(bad)


@pytest.mark.faults
def test_rotary_buffers_are_checked_against_the_config(tmp_path, good):
    freqs = inverse_frequencies(16, 10000.0, None)
    buffers = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": freqs for i in range(2)}
    load(variant(tmp_path / "ok", good, add=buffers))  # the documented derived buffer: read, compared, accepted
    half = {k: v.astype(np.float16) for k, v in buffers.items()}
    load(variant(tmp_path / "f16", good, add=half))  # saved in the model's 16-bit dtype
    wrong = {k: inverse_frequencies(16, 500000.0, None) for k in buffers}
    with pytest.raises(CheckpointError, match=r"rotary_emb\.inv_freq' \(rotary inverse frequencies.*disagrees with "
                                              r"config\.json"):
        load(variant(tmp_path / "wrong", good, add=wrong))


@pytest.mark.faults
@pytest.mark.parametrize("dtype, hint", [(np.int8, "8-bit"), (np.uint8, "quant_state.bitsandbytes__nf4"),
                                         (np.int32, "")])
def test_integer_weight_is_refused_with_what_it_probably_is(tmp_path, good, dtype, hint):
    key = "model.layers.0.mlp.gate_proj.weight"
    bad = variant(tmp_path, good, add={key: np.ones((128, 64), dtype)})
    with pytest.raises(CheckpointError, match=rf"'{key}' is {np.dtype(dtype).name}\[128, 64\]; expected "
                                              rf"floating-point.*{hint}"):
        load(bad)


@pytest.mark.faults
@pytest.mark.parametrize("key, shape", [("model.norm.weight", (1, 64)),
                                        ("model.layers.1.mlp.up_proj.weight", (64, 128)),
                                        ("model.embed_tokens.weight", (65, 64))])
def test_wrong_shape_or_rank_is_named_before_reading(tmp_path, good, key, shape):
    bad = variant(tmp_path, good, add={key: np.zeros(shape, np.float32)})
    with pytest.raises(CheckpointError, match=rf"'{key}' has shape {list(shape)}".replace("[", r"\[")):
        load(bad)


@pytest.mark.faults
@pytest.mark.parametrize("edit, match", [
    (lambda c: "{not json", r"config\.json is not valid JSON"),
    (lambda c: [c], r"config\.json: expected a JSON object of model settings, got list"),
    (lambda c: {k: v for k, v in c.items() if k != "hidden_size"}, r"missing field 'hidden_size' \(expected a "
                                                                    r"positive"),
    (lambda c: {**c, "hidden_size": "64"}, r"field 'hidden_size' is '64' \(str\); expected a positive integer"),
    (lambda c: {**c, "num_hidden_layers": 0}, r"field 'num_hidden_layers' is 0 .*positive integer"),
    (lambda c: {**c, "rms_norm_eps": float("nan")}, r"field 'rms_norm_eps' is nan .*positive finite number"),
    (lambda c: {**c, "tie_word_embeddings": "yes"}, r"field 'tie_word_embeddings' is 'yes' .*true or false"),
    (lambda c: {**c, "num_key_value_heads": 3}, r"'num_attention_heads' \(4\) must be a multiple of "
                                                r"'num_key_value_heads' \(3\)"),
    (lambda c: {**c, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope_type 'yarn'; the decoder "
                                                                            r"implements default, linear, llama3"),
    (lambda c: {**c, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"'rope_scaling\.low_freq_factor' is "
                                                                              r"None"),
    (lambda c: {**c, "rope_scaling": [1, 2]}, r"field 'rope_scaling' is \[1, 2\] \(list\); expected a JSON object"),
    (lambda c: {**c, "quantization_config": {"quant_method": "gptq", "bits": 4}}, r"describes 'gptq'"),
    (lambda c: {**c, "eos_token_id": "</s>"}, r"field 'eos_token_id' is '</s>'.*token id"),
])
def test_bad_config_json_names_the_file_and_field(tmp_path, good, edit, match):
    bad = variant(tmp_path, good)
    value = edit(dict(CONFIG))
    (bad / "config.json").write_text(value if isinstance(value, str) else json.dumps(value))
    with pytest.raises(CheckpointError, match=match) as error:
        load(bad)
    assert str(bad / "config.json") in str(error.value)
