"""Configuration of the decoders qlora-jax runs: the LLaMA family (Llama 2/3, Mistral, Qwen2,
SmolLM2, TinyLlama) and the families of :mod:`qlora_jax.models.family` (Qwen3, Gemma 2, Gemma 3
text, Phi-3), which differ from it by a declaration.

Read from a Hugging Face ``config.json`` in either the transformers 4 spelling (``rope_theta`` and
``rope_scaling``) or the transformers 5 one (``rope_parameters``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

from qlora_jax.models.family import ARCHITECTURES, Family, detect_family, family_of, supported_model_types

__all__ = ["LlamaConfig", "ModelConfig", "UnsupportedArchitectureError", "SUPPORTED_MODEL_TYPES"]

SUPPORTED_MODEL_TYPES = supported_model_types()
LAYER_TYPES = ("full_attention", "sliding_attention")
# config.json activation names -> the decoder's.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's architecture is not a LLaMA-family decoder this library implements."""


def _family_of_config(cfg: dict[str, Any]) -> tuple[str, Any]:
    """``(model_type, Family)`` of a ``config.json`` dict; an unknown family, or a setting the family
    declares unimplemented (:attr:`Family.refused`), is refused by name."""
    model_type = detect_family(cfg)
    if model_type is None:
        archs = cfg.get("architectures")
        raise UnsupportedArchitectureError(
            f"unsupported architecture model_type={cfg.get('model_type')!r} (architectures={archs}): qlora-jax "
            f"loads the families {SUPPORTED_MODEL_TYPES}"
        )
    family = family_of(model_type)
    for field, refuse, why in family.refused:
        if field in cfg and refuse(cfg[field]):
            raise UnsupportedArchitectureError(f"{model_type}: field {field!r} is {cfg[field]!r}: {why}")
    return model_type, family


def _rope_fields(cfg: dict[str, Any], model_type: str) -> tuple[float, Any, float | None, Any]:
    """``(rope_theta, rope_scaling, local theta, local scaling)`` of a ``config.json`` dict, from
    transformers 5's ``rope_parameters`` (per layer type for Gemma 3) or transformers 4's fields."""
    rope = dict(cfg.get("rope_parameters") or {})
    local_theta = local_scaling = None
    if set(rope) & set(LAYER_TYPES):  # transformers 5: one RoPE per layer type (Gemma 3)
        unknown = sorted(set(rope) - set(LAYER_TYPES))
        if unknown:
            raise ValueError(f"rope_parameters has keys {unknown}; expected {LAYER_TYPES} or RoPE fields")
        local = dict(rope.get("sliding_attention") or {})
        rope = dict(rope.get("full_attention") or {})
        local_theta = float(local.pop("rope_theta", 10000.0))
        local_scaling = _rope_scaling(None, local)
    elif "rope_local_base_freq" in cfg:  # transformers 4's Gemma 3: local layers unscaled
        local_theta = float(cfg["rope_local_base_freq"])
    theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = rope.pop("partial_rotary_factor", None)  # Phi-3 (transformers 5 spelling)
    if partial not in (None, 1, 1.0):
        raise UnsupportedArchitectureError(f"{model_type}: field 'rope_parameters.partial_rotary_factor' is "
                                           f"{partial!r}: partial rotary embeddings are not implemented")
    return theta, _rope_scaling(cfg.get("rope_scaling"), rope), local_theta, local_scaling


def _layer_types(cfg: dict[str, Any], family: Any, model_type: str, layers: int,
                 sliding: Any) -> list[str] | tuple[str, ...] | None:
    """Each layer's ``"full_attention"``/``"sliding_attention"`` (None: all alike, by ``sliding_window``)."""
    layer_types = cfg.get("layer_types")
    if family.default_layer_types is None:
        if layer_types is not None and set(layer_types) != {"full_attention"} and sliding is None:
            raise ValueError(f"layer_types {layer_types} has sliding layers but no sliding_window")
        if layer_types is not None and sliding is not None and "full_attention" in layer_types:
            raise ValueError(f"{model_type}: layer_types mixing local and global layers is not implemented")
        return None
    return family.default_layer_types(cfg, layers) if layer_types is None else layer_types


def _moe_fields(cfg: dict[str, Any], family: Any, model_type: str) -> dict[str, Any]:
    """The MoE fields of :class:`LlamaConfig` from ``config.json`` (empty for a dense family)."""
    if family.moe is None:
        return {}
    # transformers 5 writes Qwen3-MoE's num_experts as num_local_experts (an attribute alias).
    experts = cfg.get("num_local_experts", cfg.get("num_experts"))
    if None not in (cfg.get("num_local_experts"), cfg.get("num_experts")) and (
            cfg["num_local_experts"] != cfg["num_experts"]):
        raise ValueError(f"{model_type}: num_local_experts = {cfg['num_local_experts']} and num_experts = "
                         f"{cfg['num_experts']} disagree (one field, two spellings)")
    if experts is None:
        raise KeyError("num_local_experts" if model_type == "mixtral" else "num_experts")
    return dict(num_experts=int(experts), num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                norm_topk_prob=True if family.moe == "mixtral" else bool(cfg.get("norm_topk_prob", False)),
                router_aux_loss_coef=float(cfg.get("router_aux_loss_coef", 0.001)),
                moe_intermediate_size=None if cfg.get("moe_intermediate_size") is None
                else int(cfg["moe_intermediate_size"]))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of a LLaMA-family decoder (transformers' ``config.json`` fields of the same names).

    Attributes:
      vocab_size: tokens in the vocabulary (``V``).
      hidden_size: the residual stream's width (``D``).
      intermediate_size: the MLP's hidden width (``F``).
      num_hidden_layers: decoder layers (``L``).
      num_attention_heads: query heads.
      num_key_value_heads: key/value heads (divides ``num_attention_heads``; grouped-query attention).
      head_dim: elements per head.
      rms_norm_eps: RMSNorm's epsilon.
      rope_theta: RoPE's base.
      rope_scaling: None, or ``"rope_type"`` ("default", "linear", "llama3") and its parameters, as
        sorted (key, value) pairs so that the config stays hashable (a dict is converted).
      max_position_embeddings: the longest sequence the model was trained for, in tokens.
      tie_word_embeddings: the output head is ``embed_tokens``.
      attention_bias: Qwen2: bias on q, k, v (not o); Llama with attention_bias: on all four.
      o_proj_bias: bias on o_proj.
      mlp_bias: bias on the MLP's linear layers.
      sliding_window: Mistral-style local attention window, in tokens (None: none).
      hidden_act: the MLP gate's activation (the family's: "silu", or "gelu_pytorch_tanh" for Gemma).
      model_type: the family (``config.json``'s ``model_type``).
      layer_types: per layer, "full_attention" or "sliding_attention" (None: every layer local if
        ``sliding_window`` is set, else global); Gemma 2/3 mix them.
      attn_logit_softcapping: Gemma 2: scores -> cap * tanh(scores / cap) (None: none).
      final_logit_softcapping: Gemma 2: logits -> cap * tanh(logits / cap) (None: none).
      query_pre_attn_scalar: the attention scale is its -1/2 power (None: ``head_dim``).
      rope_local_theta: RoPE base of the sliding-window layers where it differs (Gemma 3).
      rope_local_scaling: their rotary scaling, likewise.
      bos_token_id: the beginning-of-sequence token (None: none).
      eos_token_id: the end-of-sequence token or tokens (a list is stored as a tuple).
      pad_token_id: the padding token (None: none).
      num_experts: an MoE model's experts per layer (Mixtral's ``num_local_experts``, Qwen3-MoE's
        ``num_experts``); 0 for a dense model.
      num_experts_per_tok: the experts each token is routed to (top-k).
      norm_topk_prob: Qwen3-MoE renormalises the top-k routing weights to sum to one (Mixtral
        always does).
      router_aux_loss_coef: the load-balancing loss's weight in the training loss.
      moe_intermediate_size: an expert's intermediate size (Qwen3-MoE; Mixtral's is
        ``intermediate_size``).

    Raises:
      UnsupportedArchitectureError: an unsupported ``model_type`` or ``hidden_act``.
      ValueError: inconsistent sizes (heads that do not divide, bad ``layer_types``).
    """

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
    # Per layer, "full_attention" or "sliding_attention" (None: every layer local if sliding_window
    # is set, else global). Gemma 2/3 mix them.
    layer_types: tuple[str, ...] | None = None
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits -> cap * tanh(logits / cap)
    query_pre_attn_scalar: int | float | None = None  # attention scale is its -1/2 power (default head_dim)
    # RoPE of the sliding-window layers where it differs from the global layers' (Gemma 3).
    rope_local_theta: float | None = None
    rope_local_scaling: tuple[tuple[str, Any], ...] | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Mixture of experts (families with Family.moe): E experts (Mixtral's num_local_experts,
    # Qwen3-MoE's num_experts), k of them per token, each with moe_intermediate_size (Mixtral:
    # intermediate_size); the router's top-k weights renormalised (Mixtral always); the weight of
    # the load-balancing loss in the training objective.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0
    moe_intermediate_size: int | None = None

    def __post_init__(self):
        for name in ("rope_scaling", "rope_local_scaling"):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, tuple(sorted(getattr(self, name).items())))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(
                f"unsupported model_type {self.model_type!r}: qlora-jax implements {SUPPORTED_MODEL_TYPES}"
            )
        activation = _ACTIVATIONS.get(self.hidden_act)
        if activation != self.family.activation:
            expected = [k for k, v in _ACTIVATIONS.items() if v == self.family.activation]
            raise UnsupportedArchitectureError(f"unsupported hidden_act {self.hidden_act!r} for {self.model_type}: "
                                               f"expected one of {expected}")
        if self.layer_types is not None:
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if bad or len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types must list {self.num_hidden_layers} of {LAYER_TYPES}, got "
                                 f"{list(self.layer_types)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
        if self.family.moe is not None:
            if self.num_experts <= 0:
                raise ValueError(f"{self.model_type}: num_experts (config.json num_local_experts / num_experts) must "
                                 f"be positive, got {self.num_experts}")
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"{self.model_type}: num_experts_per_tok = {self.num_experts_per_tok} must be in "
                                 f"[1, num_experts = {self.num_experts}]")
            if self.family.moe == "mixtral" and not self.norm_topk_prob:
                raise ValueError("mixtral: norm_topk_prob=False; Mixtral always renormalises the top-k weights")
        elif self.num_experts:
            raise ValueError(f"{self.model_type} is not a mixture-of-experts family, but num_experts = "
                             f"{self.num_experts}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def family(self) -> Family:
        """The :class:`~qlora_jax.models.family.Family` declaration of ``model_type``."""
        return family_of(self.model_type)

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer, whether its attention is limited to ``sliding_window`` tokens."""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.num_hidden_layers
        return tuple(t == "sliding_attention" for t in self.layer_types)

    def rope_of(self, local: bool) -> tuple[float, dict[str, Any] | None]:
        """``(theta, scaling dict or None)`` of the RoPE of local (sliding-window) or global layers."""
        if local and self.rope_local_theta is not None:
            return self.rope_local_theta, None if self.rope_local_scaling is None else dict(self.rope_local_scaling)
        return self.rope_theta, self.rope_scaling_dict

    @property
    def attention_scale(self) -> float:
        """What q.k is multiplied by: ``query_pre_attn_scalar ** -0.5`` (Gemma), else ``head_dim ** -0.5``."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embed_multiplier(self) -> float | None:
        """sqrt(hidden_size) for families that scale embeddings (Gemma), else None."""
        return math.sqrt(self.hidden_size) if self.family.embed_scale else None

    @property
    def is_moe(self) -> bool:
        """Whether every layer's MLP is a sparse mixture-of-experts block."""
        return self.family.moe is not None

    @property
    def moe(self) -> Any:
        """The :class:`~qlora_jax.models.moe.MoeConfig` of the MoE layers (None for dense families)."""
        if not self.is_moe:
            return None
        from qlora_jax.models.moe import MoeConfig  # lazily: moe imports the LoRA and quant packages

        return MoeConfig(num_experts=self.num_experts, top_k=self.num_experts_per_tok, routing=self.family.moe,
                         norm_topk_prob=self.norm_topk_prob, router_aux_loss_coef=self.router_aux_loss_coef,
                         hidden_act=_ACTIVATIONS[self.hidden_act])

    @property
    def expert_intermediate_size(self) -> int:
        """The intermediate size of one expert (MoE families), else of the dense MLP."""
        return self.moe_intermediate_size or self.intermediate_size

    def expert_stack(self, name: str) -> tuple[int, ...]:
        """``(num_experts,)`` for a linear layer stacked over experts (an MoE layer's MLP), else ``()``.

        Those layers' weights and adapters carry this axis after the layer axis; :meth:`linear_shapes`
        gives one expert's ``[out, in]``.
        """
        if self.is_moe and name in self.family.mlp_layers:
            return (self.num_experts,)
        return ()

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``[out, in]`` of every linear layer of one decoder layer, by Hugging Face name (of one expert,
        for expert matrices: see :meth:`expert_stack`)."""
        d, f = self.hidden_size, self.expert_intermediate_size
        family = self.family
        shapes = {}
        if family.fused_qkv:
            shapes["qkv_proj"] = (self.q_size + 2 * self.kv_size, d)
        else:
            shapes.update(q_proj=(self.q_size, d), k_proj=(self.kv_size, d), v_proj=(self.kv_size, d))
        shapes["o_proj"] = (d, self.q_size)
        if family.fused_gate_up:
            shapes["gate_up_proj"] = (2 * f, d)
        else:
            shapes.update(gate_proj=(f, d), up_proj=(f, d))
        shapes["down_proj"] = (d, f)
        return shapes

    def layer_norm_shapes(self) -> dict[str, tuple[int]]:
        """Shape of every RMSNorm weight of one decoder layer, by module path (``self_attn.q_norm``, ...)."""
        return {name: (self.head_dim,) if name.startswith("self_attn.") else (self.hidden_size,)
                for name in self.family.layer_norms}

    def linear_has_bias(self, name: str) -> bool:
        if name in ("q_proj", "k_proj", "v_proj", "qkv_proj"):
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
        per_layer = sum(math.prod(self.expert_stack(n)) * o * i for n, (o, i) in self.linear_shapes().items())
        per_layer += self.num_experts * self.hidden_size if self.is_moe else 0  # the router
        per_layer += sum(shape[0] for shape in self.layer_norm_shapes().values())
        per_layer += sum(o for name, (o, _) in self.linear_shapes().items() if self.linear_has_bias(name))
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.vocab_size * self.hidden_size + self.num_hidden_layers * per_layer + self.hidden_size + head

    def to_hf_dict(self) -> dict[str, Any]:
        """A transformers ``config.json`` dict for this model (used when exporting merged weights)."""
        out = {
            "architectures": [ARCHITECTURES[self.model_type]],
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
        if self.model_type in ("qwen2", "qwen3"):
            out.update(use_sliding_window=False, sliding_window=None)
        if self.model_type in ("gemma2", "gemma3_text"):
            out.update(hidden_activation=self.hidden_act, sliding_window=self.sliding_window,
                       layer_types=list(self.layer_types or ()), query_pre_attn_scalar=self.query_pre_attn_scalar,
                       attn_logit_softcapping=self.attn_logit_softcapping,
                       final_logit_softcapping=self.final_logit_softcapping)
        if self.model_type == "mixtral":
            out.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       router_aux_loss_coef=self.router_aux_loss_coef, sliding_window=self.sliding_window)
        if self.model_type == "qwen3_moe":
            out.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                       norm_topk_prob=self.norm_topk_prob, router_aux_loss_coef=self.router_aux_loss_coef,
                       moe_intermediate_size=self.expert_intermediate_size, decoder_sparse_step=1, mlp_only_layers=[],
                       use_sliding_window=False, sliding_window=None, attention_bias=self.attention_bias)
        if self.model_type == "gemma3_text":
            local_theta, local_scaling = self.rope_of(local=True)
            global_theta, global_scaling = self.rope_of(local=False)
            out.pop("rope_scaling")
            out.pop("rope_theta")
            out["rope_parameters"] = {
                "sliding_attention": {"rope_type": "default", "rope_theta": local_theta, **(local_scaling or {})},
                "full_attention": {"rope_type": "default", "rope_theta": global_theta, **(global_scaling or {})}}
        return out

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> LlamaConfig:
        """Reads a transformers config dict (``config.json``).

        The family comes from ``model_type`` (else ``architectures``); an unknown one, and a setting
        the family declares unimplemented (:attr:`Family.refused`), are refused by name.
        """
        model_type, family = _family_of_config(cfg)
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            layers = int(cfg["num_hidden_layers"])
            theta, scaling, local_theta, local_scaling = _rope_fields(cfg, model_type)
            attention_bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
            sliding = cfg.get("sliding_window")
            if model_type in ("qwen2", "qwen3", "qwen3_moe") and not cfg.get("use_sliding_window", False):
                sliding = None
            layer_types = _layer_types(cfg, family, model_type, layers, sliding)
            act = cfg.get("hidden_activation") or cfg.get("hidden_act") or (
                "gelu_pytorch_tanh" if family.activation == "gelu_tanh" else "silu")

            def optional_float(name):
                return None if cfg.get(name) is None else float(cfg[name])

            moe = _moe_fields(cfg, family, model_type)
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", family.embed_scale)),
                attention_bias=attention_bias,
                o_proj_bias=bool(cfg.get("attention_bias", False)) and model_type == "llama",
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                sliding_window=int(sliding) if sliding else None,
                hidden_act=str(act),
                model_type=model_type,
                layer_types=None if layer_types is None else tuple(layer_types),
                attn_logit_softcapping=optional_float("attn_logit_softcapping"),
                final_logit_softcapping=optional_float("final_logit_softcapping"),
                # int in transformers' config classes (which refuse 24.0): kept as written.
                query_pre_attn_scalar=cfg.get("query_pre_attn_scalar"),
                rope_local_theta=local_theta,
                rope_local_scaling=local_scaling,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
                pad_token_id=cfg.get("pad_token_id"),
                **moe,
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


def _rope_scaling(scaling: dict[str, Any] | None, rope_parameters: dict[str, Any]) -> dict[str, Any] | None:
    """The RoPE scaling dict (``rope_type`` and its parameters), or None for the default frequencies."""
    scaling = scaling or (rope_parameters or None)
    if scaling is None:
        return None
    scaling = dict(scaling)
    scaling.pop("rope_theta", None)
    scaling["rope_type"] = scaling.pop("type", scaling.get("rope_type", "default"))
    if scaling["rope_type"] == "default" and len(scaling) == 1:
        return None
    return scaling


# The configuration of any family (the class kept its first family's name).
ModelConfig = LlamaConfig
