"""A GGUF file written as llama.cpp's converter writes it, read by our loader and by transformers' own.

The file is made with the ``gguf`` package's writer, its tensor names from the package's own
``TensorNameMap`` (what convert_hf_to_gguf.py uses), the q/k rows in llama.cpp's rotary order. Our
loader and transformers' GGUF reader (.venv-oracle) must both give back every tensor exactly.
"""

from __future__ import annotations

import numpy as np

from qlora_jax.checkpoints.load import load_base_params, open_checkpoint, read_config
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
