"""GGUF files (llama.cpp's format) of the LLaMA, Qwen3 and Phi-3 architectures, through the ``gguf`` package.

A GGUF file is read as if it were a Hugging Face folder: tensors under transformers' key names,
dequantized to float32 (whatever GGML type they are stored in), a transformers-style config, and
a ``tokenizers`` tokenizer rebuilt from the vocabulary and merges in the file's metadata.

llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` of a LLaMA for its
interleaved rotary embedding; they are permuted back here to transformers' ``rotate_half`` layout
(Qwen3 and Phi-3 are stored unpermuted). Qwen3 adds ``attn_q_norm``/``attn_k_norm``; Phi-3 keeps
its fused ``attn_qkv`` and its ``ffn_up``, which is the fused ``gate_up_proj``.

Gemma 2 and Gemma 3 GGUF files are refused: transformers' GGUF reader, the oracle every format
here is tested against, reads neither their soft-caps, ``query_pre_attn_scalar`` nor Gemma 3's
local RoPE base from the metadata (it takes its config defaults), so no reading of ours could be
checked against it.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from qlora_jax.checkpoints.errors import CheckpointError
from qlora_jax.models import layout

__all__ = ["GGUFCheckpoint", "unpermute_rotary_rows"]

# GGUF tensor names -> qlora_jax.models.layout's layer names, and the global names of layout.hf_global_key.
_LAYER_NAMES = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_output": "o_proj",
    "ffn_gate": "gate_proj",
    "ffn_up": "up_proj",
    "ffn_down": "down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head"}
# GGUF general.architecture -> (transformers model_type and class, tensor names of its layers).
_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", _LAYER_NAMES),
    "qwen3": ("qwen3", "Qwen3ForCausalLM",
              {**_LAYER_NAMES, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}),
    "phi3": ("phi3", "Phi3ForCausalLM",
             {"attn_qkv": "qkv_proj", "attn_output": "o_proj", "ffn_up": "gate_up_proj", "ffn_down": "down_proj",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}),
}
_NO_ORACLE = ("gemma2", "gemma3")
_SHOWN = {"llama": "LLaMA", "qwen3": "Qwen3", "phi3": "Phi-3"}


def unpermute_rotary_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation: interleaved pairs back to rotate_half halves.

    Args:
      w: a q_proj or k_proj weight ``[num_heads * head_dim, ...]`` as llama.cpp stores it.
      num_heads: the projection's heads (key-value heads for k_proj).

    Returns:
      ``w`` with each head's rows in Hugging Face's order, same shape and dtype.
    """
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_key(name: str, path: pathlib.Path, arch: str = "llama") -> str:
    layer_names = _ARCHITECTURES[arch][2]
    base, _, suffix = name.rpartition(".")
    if base.startswith("blk."):
        _, layer, kind = base.split(".", 2)
        if kind in layer_names and layer.isdigit():
            return layout.hf_key(int(layer), layer_names[kind], suffix)
    elif base in _GLOBAL_NAMES and suffix == "weight":
        return layout.hf_global_key(_GLOBAL_NAMES[base])
    raise CheckpointError(f"GGUF file {path} holds tensor {name!r}, which a {_SHOWN[arch]} model has no use for "
                          f"(expected blk.N.{{{','.join(layer_names)}}}.weight or {', '.join(_GLOBAL_NAMES)}); "
                          "nothing in a checkpoint is ignored")


def _open_reader(path: pathlib.Path):
    """``gguf.GGUFReader`` of ``path``, with a truncated file reported as such before any tensor is mapped.

    The reader's own failure on a truncated file is a numpy reshape error; here the bytes the
    tensor infos need are compared with the file size first.
    """
    import gguf

    size = path.stat().st_size

    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            ends = []
            for field in fields:
                _, name, _, dims, raw_type, offset = field.parts
                try:
                    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
                except (ValueError, KeyError):
                    raise CheckpointError(f"GGUF file {path}: tensor {bytes(name).decode(errors='replace')!r} has "
                                          f"unknown GGML type {int(raw_type[0])}") from None
                n_bytes = int(np.prod(dims.astype(np.int64))) * type_size // block
                ends.append((int(start_offs) + int(offset[0]) + n_bytes, bytes(name).decode(errors="replace")))
            if ends and max(ends)[0] > size:
                end, name = max(ends)
                beyond = sum(e > size for e, _ in ends)
                raise CheckpointError(
                    f"GGUF file {path} is truncated: its tensor table needs {end} bytes but the file has {size} "
                    f"({beyond} of {len(ends)} tensors end past it, e.g. {name!r}); re-download or re-convert it")
            super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(path)
    except CheckpointError:
        raise
    except Exception as err:  # the reader raises ValueError, IndexError, struct errors ... on a bad header
        raise CheckpointError(f"cannot read GGUF file {path} ({size} bytes): {type(err).__name__}: {err} "
                              "(truncated or corrupt header?)") from err


class GGUFCheckpoint:
    """Tensors (transformers key names, float32 numpy), config and tokenizer of a GGUF file.

    Args:
        path: the ``.gguf`` file (architecture ``llama``, ``qwen3`` or ``phi3``).
    """

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"no GGUF file at {self.path}")
        self._reader = _open_reader(self.path)
        self.metadata = {name: field.contents() for name, field in self._reader.fields.items()}
        arch = self.metadata.get("general.architecture")
        if arch not in _ARCHITECTURES:
            from qlora_jax.models.config import UnsupportedArchitectureError

            why = (" (transformers' GGUF reader, our oracle, ignores the Gemma soft-caps, query_pre_attn_scalar and "
                   "local RoPE base in its metadata, so a Gemma GGUF cannot be checked; convert the Hugging Face "
                   "folder instead)") if arch in _NO_ORACLE else ""
            raise UnsupportedArchitectureError(
                f"GGUF architecture {arch!r} in {self.path} is not supported{why}: qlora-jax reads "
                f"{', '.join(repr(a) for a in _ARCHITECTURES)} GGUF files")
        self.arch: str = arch
        self._tensors = {_hf_key(t.name, self.path, arch): t for t in self._reader.tensors}

    def _meta_number(self, key: str, kind: type, default: Any = None) -> Any:
        value = self._meta(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise CheckpointError(f"GGUF file {self.path}: metadata {key!r} is {value!r:.60}; expected "
                                  f"{'an integer' if kind is int else 'a number'}")
        return kind(value)

    def _meta(self, key: str, default: Any = None) -> Any:
        value = self.metadata.get(key, default)
        if value is None:
            raise CheckpointError(f"GGUF file {self.path} lacks metadata {key!r}")
        return value

    def config_dict(self) -> dict[str, Any]:
        """A transformers ``config.json`` dict for the model in the file (metadata types checked)."""
        arch = self.arch
        model_type, architecture, _ = _ARCHITECTURES[arch]
        heads = self._meta_number(f"{arch}.attention.head_count", int)
        hidden = self._meta_number(f"{arch}.embedding_length", int)
        vocab = (self._meta_number(f"{arch}.vocab_size", int) if f"{arch}.vocab_size" in self.metadata
                 else len(self._meta("tokenizer.ggml.tokens")))
        # llama.cpp writes a head size other than hidden / heads as attention.key_length (Qwen3's
        # 128 at any width); LLaMA files carry it as the rotary dimension.
        head_dim = hidden // max(heads, 1)
        if f"{arch}.attention.key_length" in self.metadata:
            head_dim = self._meta_number(f"{arch}.attention.key_length", int)
        elif arch == "llama":
            head_dim = self._meta_number("llama.rope.dimension_count", int, head_dim)
        rotary = self._meta_number(f"{arch}.rope.dimension_count", int, head_dim)
        if rotary != head_dim:
            raise CheckpointError(f"GGUF file {self.path}: metadata '{arch}.rope.dimension_count' is {rotary}, a "
                                  f"rotary embedding over part of the {head_dim}-wide heads, which qlora-jax does "
                                  "not read from GGUF (nor does transformers' GGUF reader)")
        config = {
            "architectures": [architecture],
            "model_type": model_type,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self._meta_number(f"{arch}.feed_forward_length", int),
            "num_hidden_layers": self._meta_number(f"{arch}.block_count", int),
            "num_attention_heads": heads,
            "num_key_value_heads": self._meta_number(f"{arch}.attention.head_count_kv", int, heads),
            "head_dim": head_dim,
            "rms_norm_eps": self._meta_number(f"{arch}.attention.layer_norm_rms_epsilon", float),
            "rope_theta": self._meta_number(f"{arch}.rope.freq_base", float, 10000.0),
            "max_position_embeddings": self._meta_number(f"{arch}.context_length", int, 2048),
            "tie_word_embeddings": layout.hf_global_key("lm_head") not in self._tensors,
            "bos_token_id": self.metadata.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": self.metadata.get("tokenizer.ggml.eos_token_id"),
            "pad_token_id": self.metadata.get("tokenizer.ggml.padding_token_id"),
            "hidden_act": "silu",
            "rope_scaling": self._rope_scaling(),
        }
        if arch == "phi3":
            config.pop("head_dim")  # Phi-3's config has none: hidden / heads
        return config

    def _rope_scaling(self) -> dict[str, Any] | None:
        """transformers' ``rope_scaling`` from llama.cpp's ``llama.rope.scaling.*`` metadata (none or linear)."""
        kind = self.metadata.get(f"{self.arch}.rope.scaling.type", "none")
        if kind == "none":
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": self._meta_number(f"{self.arch}.rope.scaling.factor", float)}
        raise CheckpointError(f"GGUF file {self.path}: metadata '{self.arch}.rope.scaling.type' is {kind!r}; "
                              "qlora-jax reads GGUF rotary scaling 'none' or 'linear'")

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
        try:
            values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError as err:
            raise CheckpointError(f"GGUF file {self.path}: tensor {tensor.name!r} is stored as "
                                  f"{tensor.tensor_type.name}, which gguf {err}") from err
        values = values.reshape(self.shape(key))
        if self.arch != "llama":  # only LlamaModel's converter permutes q/k
            return values
        heads = self._meta_number("llama.attention.head_count", int)
        if key.endswith("self_attn.q_proj.weight"):
            values = unpermute_rotary_rows(values, heads)
        elif key.endswith("self_attn.k_proj.weight"):
            values = unpermute_rotary_rows(values, self._meta_number("llama.attention.head_count_kv", int, heads))
        return values

    def tokenizer_json(self) -> str:
        """A Hugging Face ``tokenizer.json`` (byte-level BPE) rebuilt from the file's vocabulary."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        model = self._meta("tokenizer.ggml.model")
        if model != "gpt2":
            raise CheckpointError(f"GGUF tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' is)")
        tokens = list(self._meta("tokenizer.ggml.tokens"))
        types = list(self._meta("tokenizer.ggml.token_type"))
        if len(types) != len(tokens):
            raise CheckpointError(f"GGUF file {self.path}: metadata 'tokenizer.ggml.token_type' has {len(types)} "
                                  f"entries for {len(tokens)} tokens")
        merges = [tuple(m.split(" ", 1)) for m in self._meta("tokenizer.ggml.merges")]
        tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
        splitters = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if self.metadata.get("tokenizer.ggml.pre") in ("smollm", "default", None):
            # SmolLM's pre-tokenizer splits digits one by one before the GPT-2 regex.
            splitters.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splitters)
        tokenizer.decoder = decoders.ByteLevel()
        control = [t for t, kind in zip(tokens, types, strict=True) if kind == 3]  # GGML token type 3: control
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
