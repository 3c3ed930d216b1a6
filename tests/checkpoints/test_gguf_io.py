"""A GGUF file written as llama.cpp's converter writes it, read by our loader and by transformers' own.

The file is made with the ``gguf`` package's writer, its tensor names from the package's own
``TensorNameMap`` (what convert_hf_to_gguf.py uses), the q/k rows in llama.cpp's rotary order. Our
loader and transformers' GGUF reader (.venv-oracle) must both give back every tensor exactly.
The new families' files (Qwen3, Phi-3) are written from a random transformers model the same way,
and both readers' models give the same logits. Gemma 2/3 GGUF files are refused by name.

Faults (``pytest -m faults``): a GGUF of the ``good`` folder's tensors loads as the folder does, then
truncated files, NaN weights, stray tensors, bad metadata and unsupported rotary scaling are refused
by name, at open where they can be.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load, with_value
from safetensors.numpy import load_file

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.checkpoints.gguf_io import GGUFCheckpoint
from qlora_jax.checkpoints.load import load_base_params, open_checkpoint, read_config
from qlora_jax.models import llama
from qlora_jax.models.config import UnsupportedArchitectureError
from qlora_jax.models.spec import ModelSpec
from qlora_jax.quant import QuantConfig

LAYERS, D, F, HEADS, KV_HEADS, VOCAB = 2, 64, 128, 4, 2, 96


def _hf_tensors(rng) -> dict[str, np.ndarray]:
    kv = D // HEADS * KV_HEADS
    shapes = {"self_attn.q_proj": (D, D), "self_attn.k_proj": (kv, D), "self_attn.v_proj": (kv, D),
              "self_attn.o_proj": (D, D), "mlp.gate_proj": (F, D), "mlp.up_proj": (F, D), "mlp.down_proj": (D, F),
              "input_layernorm": (D,), "post_attention_layernorm": (D,)}
    tensors = {"model.embed_tokens.weight": rng.normal(size=(VOCAB, D)), "model.norm.weight": rng.normal(size=D),
               "lm_head.weight": rng.normal(size=(VOCAB, D))}
    for i in range(LAYERS):
        for name, shape in shapes.items():
            tensors[f"model.layers.{i}.{name}.weight"] = rng.normal(size=shape)
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def _llama_cpp_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    # convert_hf_to_gguf.py, LlamaModel.permute: each head's rotary halves interleaved.
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _write_gguf(path, tensors: dict[str, np.ndarray]) -> None:
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(D // HEADS)
    writer.add_vocab_size(VOCAB)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in tensors.items():
        module, suffix = key.rsplit(".", 1)
        if module.endswith("q_proj"):
            value = _llama_cpp_permute(value, HEADS)
        elif module.endswith("k_proj"):
            value = _llama_cpp_permute(value, KV_HEADS)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_every_tensor_of_a_llama_cpp_style_gguf_reads_back(tmp_path, rng, oracle):
    tensors = _hf_tensors(rng)
    path = tmp_path / "tiny.gguf"
    _write_gguf(path, tensors)
    reference = oracle.run("hf_gguf.py", {}, {"dir": str(tmp_path), "gguf_file": path.name})
    assert set(reference) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(reference[key], value, err_msg=f"transformers: {key}")
    source, cfg = open_checkpoint(path)
    config = read_config(cfg)
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (LAYERS, D, KV_HEADS)
    base, _ = load_base_params(source, config, QuantConfig(quant="float32", dtype="float32"))
    layers = base["layers"]
    np.testing.assert_array_equal(np.asarray(base["embed_tokens"]), tensors["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(base["lm_head"]), tensors["lm_head.weight"])
    np.testing.assert_array_equal(np.asarray(base["norm"]), tensors["model.norm.weight"])
    for i in range(LAYERS):
        for group in ("self_attn", "mlp"):
            for name, entry in layers[group].items():
                np.testing.assert_array_equal(np.asarray(entry["weight"][i]),
                                              tensors[f"model.layers.{i}.{group}.{name}.weight"], err_msg=f"{i}.{name}")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            np.testing.assert_array_equal(np.asarray(layers[norm][i]), tensors[f"model.layers.{i}.{norm}.weight"])


# The families llama.cpp and transformers' GGUF reader share, as a tiny random transformers model:
# GQA, Qwen3's q/k norms with its head size (transformers' GGUF reader takes Qwen3's default
# head_dim, 128, whatever the file says), Phi-3's fused qkv_proj and gate_up_proj, an untied head.
FAMILY_CONFIGS = {
    "qwen3": dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=128, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "phi3": dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def _write_family_gguf(path, arch: str, config: dict, tensors: dict[str, np.ndarray]) -> None:
    """As convert_hf_to_gguf.py's Qwen3Model / Phi3MiniModel: metadata, names from TensorNameMap, no permutation."""
    import gguf

    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim", config["hidden_size"] // heads)
    names = gguf.get_tensor_name_map({"qwen3": gguf.MODEL_ARCH.QWEN3, "phi3": gguf.MODEL_ARCH.PHI3}[arch], layers)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    if "head_dim" in config:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    # The converter writes the special tokens' ids (tokenizer.ggml.*) from the model's tokenizer.
    for field, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                       ("pad_token_id", writer.add_pad_token_id)):
        if field in config:
            add(config[field])
    for key, value in tensors.items():
        module, suffix = key.rsplit(".", 1)
        writer.add_tensor(f"{names.get_name(module)}.{suffix}", np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("arch", list(FAMILY_CONFIGS))
def test_family_gguf_reads_as_transformers_reads_it(tmp_path, rng, oracle, arch):
    config = FAMILY_CONFIGS[arch]
    ids = rng.integers(0, config["vocab_size"], size=(2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    oracle.run("hf_models.py", {"m/input_ids": ids}, {"cases": [
        dict(name="m", op="make_model", model_type=arch, config=config, seed=31, dir=str(tmp_path / "hf"))]})
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    path = tmp_path / f"{arch}.gguf"
    _write_family_gguf(path, arch, config, tensors)
    reference = oracle.run("hf_gguf.py", {"input_ids": ids, "attention_mask": mask},
                           {"dir": str(tmp_path), "gguf_file": path.name})
    for key, value in tensors.items():  # transformers gives back every tensor exactly
        np.testing.assert_array_equal(reference[key], value, err_msg=f"transformers: {key}")

    source, cfg = open_checkpoint(path)
    ours_config = read_config(cfg)
    assert ours_config.model_type == arch and ours_config.head_dim == config.get("head_dim", 16)
    folder_config = read_config(open_checkpoint(tmp_path / "hf")[1])
    # GGUF stores the epsilon as float32; everything else is the folder's config exactly.
    assert ours_config.rms_norm_eps == pytest.approx(folder_config.rms_norm_eps, rel=1e-7)
    assert dataclasses.replace(ours_config, rms_norm_eps=folder_config.rms_norm_eps) == folder_config
    base, _ = load_base_params(source, ours_config, QuantConfig(quant="float32", dtype="float32"))
    spec = ModelSpec(ours_config, None, compute_dtype="float32")
    logits, _ = llama.forward(spec, base, None, jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    valid = mask.astype(bool)
    # Tolerance of tests/models/test_models.py: float32 on both sides, so differences are summation order.
    np.testing.assert_allclose(np.asarray(logits)[valid], reference["logits"][valid], atol=2e-4, rtol=1e-4)
    # The same file as transformers' folder: our loader reads the folder's tensors exactly.
    hf_base, _ = load_base_params(open_checkpoint(tmp_path / "hf")[0], folder_config,
                                  QuantConfig(quant="float32", dtype="float32"))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(hf_base), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_gemma_gguf_is_refused_by_name(tmp_path, arch):
    import gguf

    path = tmp_path / f"{arch}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match=rf"GGUF architecture '{arch}'.*soft-caps.*'llama', "
                                                           r"'qwen3', 'phi3'"):
        open_checkpoint(path)


# ---------------------------------------------------------------- faults

GGUF_METADATA = {"llama.block_count": 2, "llama.context_length": 128, "llama.embedding_length": 64,
                 "llama.feed_forward_length": 128, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                 "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 64,
                 "llama.rope.dimension_count": 16}


# llama.cpp's tensor names (convert_hf_to_gguf.py), written here independently of the reader's table.
LLAMA_CPP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
                   "q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                   "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
                   "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_file(path: pathlib.Path, tensors: dict[str, np.ndarray], *, extra=None, **metadata) -> pathlib.Path:
    """A llama GGUF file of transformers ``tensors`` (float32), as llama.cpp's converter names and orders them."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {**GGUF_METADATA, **{k.replace("__", "."): v for k, v in metadata.items()}}.items():
        {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}[type(value)](key, value)
    for key, value in tensors.items():
        match = re.fullmatch(r"model\.layers\.(\d+)\.(?:self_attn\.|mlp\.)?(\w+)\.(weight|bias)", key)
        if match:
            layer, name, suffix = match.groups()
            heads = {"q_proj": 4, "k_proj": 2}.get(name)
            if heads:  # llama.cpp's interleaved rotary row order
                value = value.reshape(heads, 2, value.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(value.shape)
            name = f"blk.{layer}.{LLAMA_CPP_NAMES[name]}.{suffix}"
        else:
            base, suffix = key.rsplit(".", 1)
            name = f"{LLAMA_CPP_NAMES[base]}.{suffix}"
        writer.add_tensor(name, np.ascontiguousarray(value))
    for name, value in (extra or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.faults
def test_gguf_loads_like_the_folder_then_faults(tmp_path, good):
    path = gguf_file(tmp_path / "ok.gguf", good[1])
    base, _ = load(path)
    np.testing.assert_array_equal(np.asarray(base["layers"]["self_attn"]["k_proj"]["weight"][1]),
                                  good[1]["model.layers.1.self_attn.k_proj.weight"])

    size = path.stat().st_size
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[: size - 1000])
    with pytest.raises(CheckpointError, match=rf"GGUF file {re.escape(str(truncated))} is truncated: its tensor table "
                                              rf"needs \d+ bytes but the file has {size - 1000}"):
        GGUFCheckpoint(truncated)  # at open, before any tensor is read
    header = tmp_path / "header.gguf"
    header.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=r"GGUF file .*(is truncated|\(300 bytes\).*truncated or corrupt)"):
        GGUFCheckpoint(header)

    nan = dict(good[1], **with_value(good, "model.layers.0.mlp.up_proj.weight", (1, 1), np.nan))
    with pytest.raises(CheckpointError, match=r"nan\.gguf: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' holds 1 "
                                              "NaN or Inf"):
        load(gguf_file(tmp_path / "nan.gguf", nan))
    with pytest.raises(CheckpointError, match=r"holds tensor 'rope_freqs\.weight', which a LLaMA model has no use for"):
        open_checkpoint(gguf_file(tmp_path / "rope.gguf", good[1], extra={"rope_freqs.weight": np.ones(8, np.float32)}))
    with pytest.raises(CheckpointError, match=r"is missing 9 tensors: 'model\.layers\.2\."):
        load(gguf_file(tmp_path / "blocks.gguf", good[1], llama__block_count=3))
    with pytest.raises(CheckpointError, match=r"metadata 'llama\.attention\.head_count' is '4'; expected an integer"):
        open_checkpoint(gguf_file(tmp_path / "meta.gguf", good[1], llama__attention__head_count="4"))
    with pytest.raises(CheckpointError, match=r"'llama\.rope\.scaling\.type' is 'yarn'; qlora-jax reads GGUF rotary "
                                              r"scaling 'none' or 'linear'"):
        open_checkpoint(gguf_file(tmp_path / "yarn.gguf", good[1], llama__rope__scaling__type="yarn"))
    _, cfg = open_checkpoint(gguf_file(tmp_path / "linear.gguf", good[1], llama__rope__scaling__type="linear",
                                       llama__rope__scaling__factor=4.0))
    assert read_config(cfg).rope_scaling_dict == {"rope_type": "linear", "factor": 4.0}  # not silently dropped
