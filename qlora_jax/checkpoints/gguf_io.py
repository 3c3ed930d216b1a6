"""GGUF files (llama.cpp's format) of LLaMA-architecture models, through the ``gguf`` package.

A GGUF file is read as if it were a Hugging Face folder: tensors under transformers' key names,
dequantized to float32 (whatever GGML type they are stored in), a transformers-style config, and
a ``tokenizers`` tokenizer rebuilt from the vocabulary and merges in the file's metadata.

llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` for its interleaved rotary
embedding; they are permuted back here to transformers' ``rotate_half`` layout.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from qlora_jax.checkpoints.errors import CheckpointError

__all__ = ["GGUFCheckpoint", "unpermute_rotary_rows"]

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def unpermute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation: interleaved pairs back to rotate_half halves."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_key(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        if kind not in _LAYER_NAMES:
            raise CheckpointError(f"unexpected GGUF tensor {name!r}")
        return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"
    if base not in _GLOBAL_NAMES:
        raise CheckpointError(f"unexpected GGUF tensor {name!r}")
    return f"{_GLOBAL_NAMES[base]}.{suffix}"


class GGUFCheckpoint:
    """Tensors (transformers key names, float32 numpy), config and tokenizer of a GGUF file."""

    def __init__(self, path: str | pathlib.Path):
        import gguf

        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"no GGUF file at {self.path}")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as err:  # the reader raises ValueError, struct.error, ... on a bad file
            raise CheckpointError(f"cannot read GGUF file {self.path}: {err}") from err
        self.metadata = {name: field.contents() for name, field in self._reader.fields.items()}
        arch = self.metadata.get("general.architecture")
        if arch != "llama":
            from qlora_jax.models.config import UnsupportedArchitectureError

            raise UnsupportedArchitectureError(
                f"GGUF architecture {arch!r} in {self.path} is not supported: qlora-jax reads 'llama' GGUF files"
            )
        self._tensors = {_hf_key(t.name): t for t in self._reader.tensors}

    def _meta(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(key, default)
        if value is None:
            raise CheckpointError(f"GGUF file {self.path} lacks metadata {key!r}")
        return value

    def config_dict(self) -> dict[str, Any]:
        """A transformers ``config.json`` dict for the model in the file."""
        heads = int(self._meta("llama.attention.head_count"))
        hidden = int(self._meta("llama.embedding_length"))
        vocab = self.metadata.get("llama.vocab_size") or len(self._meta("tokenizer.ggml.tokens"))
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": int(vocab),
            "hidden_size": hidden,
            "intermediate_size": int(self._meta("llama.feed_forward_length")),
            "num_hidden_layers": int(self._meta("llama.block_count")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(self.metadata.get("llama.attention.head_count_kv", heads)),
            "head_dim": int(self.metadata.get("llama.rope.dimension_count", hidden // heads)),
            "rms_norm_eps": float(self._meta("llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(self.metadata.get("llama.rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self.metadata.get("llama.context_length", 2048)),
            "tie_word_embeddings": "lm_head.weight" not in self._tensors,
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.metadata.get("tokenizer.ggml.padding_token_id"),
            "hidden_act": "silu",
        }

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self._tensors:
            raise CheckpointError(f"GGUF file {self.path} is missing tensor {key!r}")
        # GGML lists dimensions fastest-first; transformers lists them slowest-first.
        return tuple(int(d) for d in reversed(self._tensors[key].shape))

    def get(self, key: str) -> np.ndarray:
        """The tensor under its transformers name, float32, Q/K rows in rotate_half order."""
        from gguf.quants import dequantize

        if key not in self._tensors:
            raise CheckpointError(f"GGUF file {self.path} is missing tensor {key!r}")
        tensor = self._tensors[key]
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        values = values.reshape(self.shape(key))
        if key.endswith("self_attn.q_proj.weight"):
            values = unpermute_rotary_rows(values, int(self._meta("llama.attention.head_count")))
        elif key.endswith("self_attn.k_proj.weight"):
            heads = self.metadata.get("llama.attention.head_count_kv", self._meta("llama.attention.head_count"))
            values = unpermute_rotary_rows(values, int(heads))
        return values

    def tokenizer_json(self) -> str:
        """A Hugging Face ``tokenizer.json`` (byte-level BPE) rebuilt from the file's vocabulary."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        model = self._meta("tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"GGUF tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' is)")
        tokens = list(self._meta("tokenizer.ggml.tokens"))
        types = list(self._meta("tokenizer.ggml.token_type"))
        merges = [tuple(m.split(" ", 1)) for m in self._meta("tokenizer.ggml.merges")]
        tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        splitters = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if self.metadata.get("tokenizer.ggml.pre") in ("smollm", "default", None):
            # SmolLM's pre-tokenizer splits digits one by one before the GPT-2 regex.
            splitters.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splitters)
        tokenizer.decoder = decoders.ByteLevel()
        control = [t for t, kind in zip(tokens, types) if kind == 3]  # GGML token type 3: control
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        return tokenizer.to_str()

    def tokenizer_config(self) -> dict[str, Any]:
        """transformers-style ``tokenizer_config.json`` fields: special tokens and chat template."""
        tokens = self._meta("tokenizer.ggml.tokens")

        def token(key):
            idx = self.metadata.get(key)
            return None if idx is None else tokens[int(idx)]

        return {
            "bos_token": token("tokenizer.ggml.bos_token_id"),
            "eos_token": token("tokenizer.ggml.eos_token_id"),
            "pad_token": token("tokenizer.ggml.padding_token_id"),
            "unk_token": token("tokenizer.ggml.unknown_token_id"),
            "add_bos_token": bool(self.metadata.get("tokenizer.ggml.add_bos_token", False)),
            "chat_template": self.metadata.get("tokenizer.chat_template"),
        }
