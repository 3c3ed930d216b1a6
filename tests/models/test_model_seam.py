"""The model seam: ModelSpec, the LLaMA layout module and LoRA target selection (against PEFT)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_quantized_base

from qlora_jax.lora import LoraConfig
from qlora_jax.model import init_lora_params
from qlora_jax.models import layout, llama
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.spec import ModelSpec

HF_CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)
CONFIG = LlamaConfig(**HF_CONFIG, head_dim=16)

# target_modules values as users write them for PEFT: lists of names, and regexes over module names.
PEFT_TARGETS = [
    ["q_proj", "v_proj"],
    ["down_proj"],
    r".*\.(q_proj|k_proj|v_proj|o_proj)",
    r"model\.layers\.\d+\.mlp\.(gate|up)_proj",
    r".*_proj",
]


def test_lora_targets_select_what_peft_selects(oracle):
    out = oracle.run("hf_models.py", {}, {"cases": [
        dict(name="t", op="peft_targets", model_type="llama", config=HF_CONFIG, targets=PEFT_TARGETS)]})
    for i, targets in enumerate(PEFT_TARGETS):
        peft_modules = sorted(out[f"t/matched_{i}"].tolist())
        ours = layout.lora_targets(LoraConfig(target_modules=targets if isinstance(targets, str) else tuple(targets)),
                                   CONFIG)
        expected = sorted(layout.hf_module(layer, name) for layer in range(CONFIG.num_hidden_layers) for name in ours)
        assert peft_modules == expected, targets


def test_target_selection_errors_name_what_went_wrong():
    with pytest.raises(ValueError, match="some layers only"):
        layout.lora_targets(LoraConfig(target_modules=r"model\.layers\.0\..*q_proj"), CONFIG)
    with pytest.raises(ValueError, match="lm_head"):
        layout.lora_targets(LoraConfig(target_modules=r".*(q_proj|lm_head)"), CONFIG)
    with pytest.raises(ValueError, match="matches no module"):
        layout.lora_targets(LoraConfig(target_modules=r".*\.qkv_proj"), CONFIG)
    with pytest.raises(ValueError, match=r"\['qproj'\].*nearest.*q_proj"):
        layout.lora_targets(LoraConfig(target_modules=("qproj", "v_proj")), CONFIG)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        LoraConfig(target_modules=r".*(q_proj")
    # A comma list in one string (the launcher's flag) is a list of names, not a regex.
    assert layout.lora_targets(LoraConfig(target_modules="v_proj, q_proj"), CONFIG) == ("q_proj", "v_proj")
    with pytest.raises(ValueError, match="some layers only"):
        ModelSpec(CONFIG, LoraConfig(target_modules=r"model\.layers\.1\..*"))  # checked when the spec is made


def test_hf_keys_and_assembled_base_agree_with_the_decoder(rng):
    assert layout.hf_key(3, "up_proj") == "model.layers.3.mlp.up_proj.weight"
    assert layout.hf_key(0, "input_layernorm") == "model.layers.0.input_layernorm.weight"
    assert layout.hf_key(2, "q_proj", "lora_A.weight", prefix="base_model.model.model.") == \
        "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    base = random_quantized_base(CONFIG, rng)
    assert list(layout.linear_entries(base)) == list(layout.LINEAR_LAYERS)
    with pytest.raises(ValueError, match="missing \\['down_proj'\\]"):
        layout.assemble_base(embed_tokens=base["embed_tokens"], norm=base["norm"],
                             layer_norms={n: base["layers"][n] for n in layout.LAYER_NORMS},
                             linears={n: e for n, e in layout.linear_entries(base).items() if n != "down_proj"})


@pytest.mark.parametrize("compute_dtype,lora_dtype,expected", [
    ("bfloat16", None, jnp.bfloat16), ("float32", None, jnp.float32), ("bfloat16", "float32", jnp.float32)])
def test_adapters_follow_the_compute_dtype_unless_asked(compute_dtype, lora_dtype, expected):
    spec = ModelSpec(CONFIG, LoraConfig(r=4, dtype=lora_dtype), compute_dtype=compute_dtype)
    lora = init_lora_params(jax.random.key(0), spec)
    assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype(expected)}


def test_kernel_backend_reaches_the_quantized_matmuls(rng):
    config = dataclasses.replace(CONFIG, tie_word_embeddings=True)
    base = random_quantized_base(config, rng)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (1, 8)), jnp.int32)
    xla, _ = llama.forward(ModelSpec(config, compute_dtype="bfloat16", kernel_backend="xla"), base, None, ids)
    auto, _ = llama.forward(ModelSpec(config, compute_dtype="bfloat16"), base, None, ids)  # XLA on CPU too
    np.testing.assert_array_equal(np.asarray(xla), np.asarray(auto))
    # A GPU kernel asked for on CPU (without the interpreter) is refused: the choice got through.
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        llama.forward(ModelSpec(config, compute_dtype="bfloat16", kernel_backend="pallas_triton"), base, None, ids)
    with pytest.raises(ValueError, match="kernel_backend"):
        ModelSpec(CONFIG, kernel_backend="cublas")


def test_quant_imports_no_framework():
    code = ("import sys, qlora_jax.quant, qlora_jax.kernels; "
            "print(sorted(m for m in ('flax', 'safetensors', 'tokenizers', 'optax', 'orbax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
