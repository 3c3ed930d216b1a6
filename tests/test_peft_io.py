"""PEFT adapters (``peft_io.py``): a round trip, then corrupted tensors and ``adapter_config.json``
fields, each refused naming the file and what was expected. Part of the fault campaign
(``pytest -m faults``); the comparison with PEFT itself is ``models/test_models.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import CONFIG, random_adapter
from safetensors.numpy import load_file, save_file

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.models.config import LlamaConfig
from qlora_jax.peft_io import load_peft_adapter, peft_key, save_peft_adapter


@pytest.mark.faults
def test_adapter_round_trip_then_corruptions(tmp_path, rng):
    config, lora, lora_config = random_adapter(rng)
    path = save_peft_adapter(tmp_path / "ok", lora, lora_config, config)
    loaded, loaded_config = load_peft_adapter(path, config)
    np.testing.assert_array_equal(np.asarray(loaded["layers"]["mlp"]["down_proj"]["lora_B"]),
                                  np.asarray(lora["layers"]["mlp"]["down_proj"]["lora_B"]))
    assert loaded_config.target_modules == ("q_proj", "v_proj", "down_proj")
    tensors = load_file(path / "adapter_model.safetensors")
    adapter_cfg = json.loads((path / "adapter_config.json").read_text())

    def corrupt(name, tensors=tensors, cfg=adapter_cfg):
        bad = tmp_path / name
        bad.mkdir()
        save_file(tensors, str(bad / "adapter_model.safetensors"))
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
        return bad

    key = peft_key(1, "v_proj", "lora_B")
    nan = dict(tensors, **{key: np.where(np.arange(tensors[key].size).reshape(tensors[key].shape) == 3, np.nan,
                                         tensors[key]).astype(np.float32)})
    with pytest.raises(CheckpointError, match=rf"'{key}' holds 1 NaN or Inf"):
        load_peft_adapter(corrupt("nan", nan), config)
    _, extra_layers, _ = random_adapter(rng, layers=3)
    deep = save_peft_adapter(tmp_path / "deep", extra_layers, lora_config,
                             LlamaConfig.from_hf_dict({**CONFIG, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"6 tensor\(s\) that a model with this config does not use.*layer\(s\) "
                                              r"2 are beyond num_hidden_layers=2"):
        load_peft_adapter(deep, config)
    other = dict(tensors, **{peft_key(0, "up_proj", "lora_A"): np.zeros((4, 64), np.float32)})
    with pytest.raises(CheckpointError, match=r"does not use: 'base_model\.model\.model\.layers\.0\.mlp\.up_proj"):
        load_peft_adapter(corrupt("other_module", other), config)
    head = dict(tensors, **{"base_model.model.lm_head.lora_A.weight": np.zeros((4, 64), np.float32)})
    with pytest.raises(CheckpointError, match=r"does not use: 'base_model\.model\.lm_head\.lora_A\.weight'"):
        load_peft_adapter(corrupt("head", head), config)
    partial = {k: v for k, v in tensors.items() if k != peft_key(0, "q_proj", "lora_A")}
    with pytest.raises(CheckpointError, match=r"is missing tensor 'base_model\.model\.model\.layers\.0\.self_attn\."
                                              r"q_proj\.lora_A\.weight'"):
        load_peft_adapter(corrupt("partial", partial), config)
    with pytest.raises(CheckpointError, match=r"lora_A\.weight' has shape \[4, 64\] but adapter_config\.json "
                                              r"\(r=8\) with the model's config implies \[8, 64\]"):
        load_peft_adapter(corrupt("rank", cfg=dict(adapter_cfg, r=8)), config)
    ints = dict(tensors, **{key: tensors[key].astype(np.int32)})
    with pytest.raises(CheckpointError, match=rf"'{key}' is int32"):
        load_peft_adapter(corrupt("int", ints), config)
    fewer = dict(adapter_cfg, target_modules=["q_proj", "v_proj"])
    with pytest.raises(CheckpointError, match=r"does not use: .*down_proj"):
        load_peft_adapter(corrupt("targets", cfg=fewer), config)


@pytest.mark.faults
@pytest.mark.parametrize("edit, match", [
    (lambda c: "{", r"adapter_config\.json is not valid JSON"),
    (lambda c: {k: v for k, v in c.items() if k != "r"}, r"field 'r' is None; expected a positive integer"),
    (lambda c: {**c, "r": "4"}, r"field 'r' is '4'; expected a positive integer"),
    (lambda c: {**c, "lora_alpha": float("inf")}, r"field 'lora_alpha' is inf; expected a finite number"),
    (lambda c: {**c, "target_modules": 5}, r"field 'target_modules' is 5"),
    (lambda c: {**c, "peft_type": "IA3"}, r"field 'peft_type' is 'IA3'; expected 'LORA'"),
    (lambda c: {**c, "use_dora": True}, r"field 'use_dora' is True; qlora-jax implements plain LoRA only"),
    (lambda c: {**c, "modules_to_save": ["lm_head"]}, r"field 'modules_to_save' is \['lm_head'\]"),
    (lambda c: {**c, "rank_pattern": {"q_proj": 8}}, r"field 'rank_pattern'"),
    (lambda c: {**c, "bias": "all"}, r"field 'bias' is 'all'"),
    (lambda c: {**c, "target_modules": r"model\.layers\.0\..*"}, r"selects some layers only"),
])
def test_bad_adapter_config_names_the_file_and_field(tmp_path, rng, edit, match):
    config, lora, lora_config = random_adapter(rng)
    path = save_peft_adapter(tmp_path / "a", lora, lora_config, config)
    value = edit(json.loads((path / "adapter_config.json").read_text()))
    (path / "adapter_config.json").write_text(value if isinstance(value, str) else json.dumps(value))
    with pytest.raises(CheckpointError, match=match) as error:
        load_peft_adapter(path, config)
    assert "adapter_config.json" in str(error.value)
