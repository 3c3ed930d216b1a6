"""Model families: each a small declaration of how its decoder layer differs from LLaMA's.

The LLaMA block is: ``h += o_proj(attn(rope(q_proj(rms(h))), rope(k_proj(...)), v_proj(...)))``,
then ``h += down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))``, a final RMSNorm and a head.
A :class:`Family` says only what a family changes in that block; the decoder
(:mod:`qlora_jax.models.llama`) reads these switches, and the one tensor table
(:func:`qlora_jax.models.layout.tensor_table`) that loaders, Orbax checks, the synthetic base,
adapter shapes, the memory planner and the PEFT names read is derived from them.

Settings that vary *within* a family (soft-cap values, window sizes, RoPE bases, which layers are
local) come from ``config.json`` into :class:`~qlora_jax.models.config.LlamaConfig`; a family
says which of those ``config.json`` fields it reads (``config_fields``) and which it refuses
(``refused``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["Family", "FAMILIES", "family_of", "detect_family", "supported_model_types"]


@dataclasses.dataclass(frozen=True)
class Family:
    """How one model family's decoder differs from the LLaMA block.

    Attributes:
      name: the family's name.
      model_types: the ``config.json`` ``model_type`` values it reads.
      architecture: the transformers class written into exported ``config.json`` files.
      sandwich_norms: Gemma 2/3's RMSNorm on each branch's output as well as its input
        (``input_layernorm`` -> attn -> ``post_attention_layernorm``, ``pre_feedforward_layernorm``
        -> MLP -> ``post_feedforward_layernorm``); without it ``post_attention_layernorm`` is the
        MLP's input norm, as in LLaMA.
      norm_offset: RMSNorm scales by ``(norm_offset + w)`` (Gemma: 1.0, computed in float32).
      qk_norm: RMSNorm over each head of q and k before RoPE (``self_attn.q_norm``/``k_norm``,
        ``[head_dim]``).
      activation: the MLP gate's ("silu" or "gelu_tanh").
      embed_scale: embeddings multiplied by ``sqrt(hidden_size)`` (in the compute dtype).
      fused_qkv: Phi-3's ``qkv_proj`` ``[q + 2 kv, D]`` is one weight (one quantized tensor, one
        LoRA adapter).
      fused_gate_up: Phi-3's ``gate_up_proj`` ``[2 F, D]`` likewise.
      default_layer_types: for ``config.json`` files without ``layer_types``, which layers are
        ``"sliding_attention"`` (the rest ``"full_attention"``), from the config dict and layer count.
      refused: ``(config.json field, predicate, reason)`` of settings this library does not
        implement; a field whose predicate is true on its value is refused by name.
      moe: a mixture-of-experts family: the routing of :mod:`qlora_jax.models.moe` ("mixtral" or
        "qwen3_moe"); every layer's MLP is then the sparse MoE block (a router ``{moe_module}.gate``
        ``[E, D]`` kept 16-bit, and ``E`` experts whose ``gate_proj``/``up_proj``/``down_proj``
        are stored on disk as ``{moe_module}.experts.{e}.{expert_names[i]}``); None: dense.
      moe_module: the MoE block's module name in a layer (``mlp``; Mixtral: ``block_sparse_moe``).
      expert_names: the on-disk names of an expert's gate, up and down matrices (Mixtral:
        ``w1``/``w3``/``w2``).
    """

    name: str
    model_types: tuple[str, ...]
    architecture: str
    sandwich_norms: bool = False
    norm_offset: float = 0.0
    qk_norm: bool = False
    activation: str = "silu"
    embed_scale: bool = False
    fused_qkv: bool = False
    fused_gate_up: bool = False
    default_layer_types: Callable[[Mapping[str, Any], int], tuple[str, ...]] | None = None
    refused: tuple[tuple[str, Callable[[Any], bool], str], ...] = ()
    moe: str | None = None
    moe_module: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    @property
    def layer_norms(self) -> tuple[str, ...]:
        """The RMSNorms of one decoder layer, as module paths under ``model.layers.{i}``, in use order."""
        norms = ("input_layernorm",)
        if self.qk_norm:
            norms += ("self_attn.q_norm", "self_attn.k_norm")
        norms += ("post_attention_layernorm",)
        if self.sandwich_norms:
            norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
        return norms

    @property
    def attention_layers(self) -> tuple[str, ...]:
        return ("qkv_proj", "o_proj") if self.fused_qkv else ("q_proj", "k_proj", "v_proj", "o_proj")

    @property
    def mlp_layers(self) -> tuple[str, ...]:
        return ("gate_up_proj", "down_proj") if self.fused_gate_up else ("gate_proj", "up_proj", "down_proj")

    @property
    def linear_layers(self) -> tuple[str, ...]:
        """The linear layers of one decoder layer (PEFT's module names), in the order they are applied."""
        return self.attention_layers + self.mlp_layers


def _every_other_local(cfg: Mapping[str, Any], layers: int) -> tuple[str, ...]:
    # Gemma 2 before transformers' layer_types: even layers local, odd layers global.
    return tuple("sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers))


def _gemma3_pattern(cfg: Mapping[str, Any], layers: int) -> tuple[str, ...]:
    # Gemma 3 before layer_types: every sliding_window_pattern-th layer global (5 local : 1 global).
    period = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
    return tuple("full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(layers))


def _truthy(value: Any) -> bool:
    return bool(value)


LLAMA = Family("llama", ("llama", "mistral", "qwen2"), "LlamaForCausalLM")
QWEN3 = Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", qk_norm=True,
               # Qwen3's sliding window applies to layers past max_window_layers only; not implemented.
               refused=(("use_sliding_window", _truthy, "sliding-window Qwen3 layers are not implemented"),))
GEMMA2 = Family("gemma2", ("gemma2",), "Gemma2ForCausalLM", sandwich_norms=True, norm_offset=1.0,
                activation="gelu_tanh", embed_scale=True, default_layer_types=_every_other_local)
GEMMA3 = Family("gemma3_text", ("gemma3_text",), "Gemma3ForCausalLM", sandwich_norms=True, norm_offset=1.0,
                qk_norm=True, activation="gelu_tanh", embed_scale=True, default_layer_types=_gemma3_pattern,
                refused=(("use_bidirectional_attention", _truthy, "bidirectional attention is not implemented"),))
PHI3 = Family("phi3", ("phi3",), "Phi3ForCausalLM", fused_qkv=True, fused_gate_up=True,
              refused=(("partial_rotary_factor", lambda v: v not in (None, 1, 1.0),
                        "partial rotary embeddings are not implemented"),))

# Mixture of experts. Qwen3-MoE's dense layers (decoder_sparse_step > 1, mlp_only_layers) would need
# a second layer kind in the scanned decoder; they are refused rather than run as MoE layers.
MIXTRAL = Family("mixtral", ("mixtral",), "MixtralForCausalLM", moe="mixtral", moe_module="block_sparse_moe",
                 expert_names=("w1", "w3", "w2"),
                 refused=(("router_jitter_noise", _truthy, "router jitter noise is not implemented"),))
QWEN3_MOE = Family("qwen3_moe", ("qwen3_moe",), "Qwen3MoeForCausalLM", qk_norm=True, moe="qwen3_moe",
                   refused=(("use_sliding_window", _truthy, "sliding-window Qwen3 layers are not implemented"),
                            ("decoder_sparse_step", lambda v: v not in (None, 1),
                             "dense layers between MoE layers are not implemented (decoder_sparse_step must be 1)"),
                            ("mlp_only_layers", _truthy,
                             "dense layers between MoE layers are not implemented (mlp_only_layers must be empty)")))

FAMILIES: tuple[Family, ...] = (LLAMA, QWEN3, GEMMA2, GEMMA3, PHI3, MIXTRAL, QWEN3_MOE)
_BY_TYPE = {t: f for f in FAMILIES for t in f.model_types}
# transformers' class names, for config.json files that name the architecture but not model_type.
_BY_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
            "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3_text",
            "Phi3ForCausalLM": "phi3", "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
ARCHITECTURES = {t: arch for arch, t in _BY_ARCH.items()}


def supported_model_types() -> tuple[str, ...]:
    """Every ``model_type`` some family reads.

    Returns:
      The ``model_type`` values, in registration order.
    """
    return tuple(_BY_TYPE)


def family_of(model_type: str) -> Family:
    """The family of a ``model_type``.

    Args:
      model_type: ``config.json``'s ``model_type``.

    Returns:
      Its :class:`Family`.

    Raises:
      ValueError: an unsupported ``model_type``, listing the supported ones.
    """
    try:
        return _BY_TYPE[model_type]
    except KeyError:
        raise ValueError(f"unsupported model_type {model_type!r}: qlora-jax implements "
                         f"{supported_model_types()}") from None


def detect_family(cfg: Mapping[str, Any]) -> str | None:
    """The ``model_type`` of a transformers config dict: its ``model_type``, else its ``architectures``.

    Args:
      cfg: the ``config.json`` dict.

    Returns:
      The ``model_type``, or None when neither names a supported family (the caller reports it with
      the supported list).
    """
    model_type = cfg.get("model_type")
    if model_type in _BY_TYPE:
        return model_type
    if model_type is None:
        for arch in cfg.get("architectures") or ():
            if arch in _BY_ARCH:
                return _BY_ARCH[arch]
    return None
