"""``load_pretrained`` (``model.py``): its ``quant`` argument, and bitsandbytes' CPU bytes from the
loader with ``bnb_backend="cpu"``. Part of the fault campaign (``pytest -m faults``); the models
against transformers are ``models/test_models.py``.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import CONFIG, random_tensors, write_folder

from qlora_jax.model import load_pretrained
from qlora_jax.models import layout
from qlora_jax.quant import QuantConfig, quantize


@pytest.mark.faults
def test_load_pretrained_bnb_backend_cpu_reproduces_bitsandbytes_cpu(tmp_path, oracle, rng):
    """SmolLM2-sized 576 x 576 layers (5184 scales each), quantized by bitsandbytes' CPU backend."""
    cfg = {**CONFIG, "vocab_size": 8, "hidden_size": 576, "intermediate_size": 64, "num_hidden_layers": 1,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}
    tensors = random_tensors(rng, cfg)
    names = ("q_proj", "o_proj")
    for name in names:  # heavy-tailed rows, like trained weights
        tensors[layout.hf_key(0, name)] *= np.exp(rng.normal(0, 0.5, (576, 1))).astype(np.float32)
    model, _ = load_pretrained(write_folder(tmp_path / "m", cfg, tensors),
                               QuantConfig("nf4", dtype="float32", bnb_backend="cpu"), lora=None)
    out = oracle.run("bnb_quant.py", {f"{n}/w": tensors[layout.hf_key(0, n)] for n in names}, {"cases": [
        {"name": n, "op": "quantize_4bit", "blocksize": 64, "double_quant": True, "quant_type": "nf4"} for n in names]})
    cuda_differs = 0
    for name in names:
        qt = jax.tree.map(lambda x: x[0], model.base_params["layers"]["self_attn"][name]["weight"])
        np.testing.assert_array_equal(np.asarray(qt.codes).reshape(-1), out[f"{name}/packed"].reshape(-1))
        np.testing.assert_array_equal(np.asarray(qt.scales).reshape(-1), out[f"{name}/absmax"], err_msg=name)
        np.testing.assert_allclose(np.asarray(qt.nested_scales), out[f"{name}/nested_absmax"], rtol=1e-6)
        assert abs(int(np.asarray(qt.offset).view(np.int32)) - int(out[f"{name}/offset"].view(np.int32))) <= 2
        cuda = quantize(tensors[layout.hf_key(0, name)], "nf4", bnb_backend="cuda")  # the loader's default
        ours_cuda, theirs_cpu = np.asarray(cuda.scales).reshape(-1).astype(int), out[f"{name}/absmax"].astype(int)
        cuda_differs += int((ours_cuda != theirs_cpu).sum())
        # Where the two backends disagree, it is a rounding tie broken the other way: one code apart.
        assert np.abs(ours_cuda - theirs_cpu).max() <= 1, name
    # bitsandbytes' CUDA kernels round a few scale codes the other way (14 of 5184 on SmolLM2's first
    # q_proj), which is why the loader's bnb_backend matters.
    assert cuda_differs > 0
    with pytest.raises(ValueError, match="unsupported bnb_backend 'tpu'"):
        QuantConfig(bnb_backend="tpu")


@pytest.mark.faults
def test_load_pretrained_quant_is_a_config_or_a_mode_name(good):
    # "fp4" is shorthand for QuantConfig("fp4") with every other setting at its default: the same
    # bytes; anything else fails before a tensor is read, naming what it accepts.
    folder, _ = good
    by_name, _ = load_pretrained(folder, "fp4", lora=None)
    by_config, _ = load_pretrained(folder, QuantConfig("fp4", double_quant=True, blocksize=64, dtype="bfloat16",
                                                       bnb_backend="cuda"), lora=None)
    assert jax.tree.structure(by_name.base_params) == jax.tree.structure(by_config.base_params)
    for a, b in zip(jax.tree.leaves(by_name.base_params), jax.tree.leaves(by_config.base_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match=r"unsupported quant 'nf5': expected one of \('nf4', 'fp4', 'int8'"):
        load_pretrained(folder, "nf5")
    with pytest.raises(TypeError, match="quant must be a QuantConfig or one of"):
        load_pretrained(folder, 4)
