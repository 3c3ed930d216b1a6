"""Configuration of LLaMA-family decoders (Llama 2/3, Mistral, Qwen2, SmolLM2, TinyLlama).

Read from a Hugging Face ``config.json`` in either the transformers 4 spelling (``rope_theta`` and
``rope_scaling``) or the transformers 5 one (``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

__all__ = ["LlamaConfig", "UnsupportedArchitectureError", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture is not a LLaMA-family decoder this library implements."""


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a LLaMA-family decoder. Sizes are counts; ``head_dim`` in elements."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or "rope_type" ("default", "linear", "llama3") and its parameters, as sorted
    # (key, value) pairs so that the config stays hashable (it is a static argument of jit).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q, k, v (not o); Llama with attention_bias: on all four
    o_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral-style local attention window, in tokens
    hidden_act: str = "silu"
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"unsupported model_type {self.model_type!r}: qlora-jax implements {SUPPORTED_MODEL_TYPES}"
            )
        if self.hidden_act not in ("silu", "swish"):
            raise UnsupportedArchitectureError(f"unsupported hidden_act {self.hidden_act!r}: expected 'silu'")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``[out, in]`` of every linear layer of one decoder layer, by Hugging Face name."""
        d, f = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (self.q_size, d),
            "k_proj": (self.kv_size, d),
            "v_proj": (self.kv_size, d),
            "o_proj": (d, self.q_size),
            "gate_proj": (f, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
        }

    def linear_has_bias(self, name: str) -> bool:
        if name in ("q_proj", "k_proj", "v_proj"):
            return self.attention_bias
        if name == "o_proj":
            return self.o_proj_bias
        return self.mlp_bias

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        if eos is None:
            return ()
        return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)

    def num_parameters(self) -> int:
        """Parameter count of the whole model (embeddings, layers, norms, untied head)."""
        per_layer = sum(o * i for o, i in self.linear_shapes().values()) + 2 * self.hidden_size
        per_layer += sum(o for name, (o, _) in self.linear_shapes().items() if self.linear_has_bias(name))
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.num_hidden_layers * per_layer + self.hidden_size + head

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers ``config.json`` dict for this model (used when exporting merged weights)."""
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        out = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": self.hidden_act,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            out.update(use_sliding_window=False, sliding_window=None)
        return out

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> LlamaConfig:
        """Reads a transformers config dict (``config.json``); unknown architectures are refused."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures")
            raise UnsupportedArchitectureError(
                f"unsupported architecture model_type={model_type!r} (architectures={archs}): qlora-jax "
                f"loads LLaMA-family decoders {SUPPORTED_MODEL_TYPES}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or {})
            theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            scaling = cfg.get("rope_scaling") or (rope or None)
            if scaling is not None:
                scaling = dict(scaling)
                scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type", "default"))
                if scaling["rope_type"] == "default" and len(scaling) == 1:
                    scaling = None
            attention_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
            sliding = cfg.get("sliding_window")
            if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
                sliding = None
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=attention_bias,
                o_proj_bias=bool(cfg.get("attention_bias", False)) and model_type == "llama",
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=int(sliding) if sliding else None,
                hidden_act=str(cfg.get("hidden_act", "silu")),
                model_type=model_type,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                pad_token_id=cfg.get("pad_token_id"),
            )
        except KeyError as err:
            raise ValueError(f"config.json is missing the field {err.args[0]!r}") from err

    @classmethod
    def from_json_file(cls, path: str | pathlib.Path) -> LlamaConfig:
        """Reads ``config.json``."""
        path = pathlib.Path(path)
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        return cls.from_hf_dict(cfg)
