"""LLaMA-family decoder as pure functions over explicit pytrees.

Two pytrees hold the model, both keyed by Hugging Face module names so that every leaf maps to a
checkpoint key (``model.layers.{i}.<path>``):

* ``base`` (frozen): ``{"embed_tokens": [V, D], "norm": [D], "lm_head": [V, D] (untied only),
  "layers": {"input_layernorm": [L, D], "post_attention_layernorm": [L, D],
  "self_attn": {"q_proj": {"weight": W, "bias"?: [L, out]}, ...}, "mlp": {...}}}``. The layer
  leaves are stacked over a leading layer axis ``L``; a linear ``weight`` is a
  :class:`~qlora_jax.quant.QuantizedTensor` whose arrays carry that leading axis (its metadata
  describes one layer) or a ``[L, out, in]`` array.
* ``lora`` (trainable): ``{"layers": {"self_attn": {"q_proj": {"lora_A": [L, r, in],
  "lora_B": [L, out, r]}, ...}, "mlp": {...}}}`` for the targeted layers only. For full
  finetuning the trainable pytree is the base itself.

Layers run under ``jax.lax.scan`` (one compiled layer, whatever the depth), optionally
rematerialised per layer. ``forward`` gives logits ``[B, T, V]``; ``hidden_states`` gives the
final normalised hidden states for memory-frugal losses. Both take a
:class:`~qlora_jax.models.spec.ModelSpec`, the static description of what runs (architecture,
adapters, compute dtype, remat, kernel backend). Names and the pytree layout come from
:mod:`qlora_jax.models.layout`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from qlora_jax.linear import base_matmul, qlora_linear
from qlora_jax.models import rope
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.layout import LINEAR_LAYERS
from qlora_jax.models.spec import ModelSpec

__all__ = ["KVCache", "init_kv_cache", "forward", "hidden_states", "logits_from_hidden", "output_head", "rms_norm"]

_NEG_INF = -1e30


class KVCache(NamedTuple):
    """Keys and values of every layer, ``[L, B, S_max, kv_heads, head_dim]``, and the next slot."""

    k: jax.Array
    v: jax.Array
    index: jax.Array  # int32 scalar: number of slots already written


def init_kv_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens."""
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm in float32, as transformers' LlamaRMSNorm, returned in ``x.dtype``."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * normed.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def _attention(q, k, v, mask):
    """Grouped-query attention. q ``[B, T, H, hd]``, k/v ``[B, S, KV, hd]``, mask ``[B, T, S]``."""
    b, t, h, hd = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(hd)
    )
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h * hd).astype(v.dtype)


def _linear(x, base_group, lora_group, name, spec: ModelSpec, dropout_key):
    params = base_group[name]
    lora = None if lora_group is None else lora_group.get(name)
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, LINEAR_LAYERS.index(name))
    lora_config = spec.lora_config
    scaling = lora_config.scaling if lora_config is not None else 1.0
    dropout = lora_config.dropout if lora_config is not None else 0.0
    return qlora_linear(x, params["weight"], lora, params.get("bias"), scaling=scaling, dropout_rate=dropout,
                        dropout_key=key, backend=spec.kernel_backend)


def _layer(spec: ModelSpec, h, layer_base, layer_lora, cache_kv, *, cos, sin, mask, cache_index, dropout_key):
    config = spec.config
    b, t, _ = h.shape
    attn_base, mlp_base = layer_base["self_attn"], layer_base["mlp"]
    attn_lora = None if layer_lora is None else layer_lora.get("self_attn")
    mlp_lora = None if layer_lora is None else layer_lora.get("mlp")
    lin = functools.partial(_linear, spec=spec, dropout_key=dropout_key)

    x = rms_norm(h, layer_base["input_layernorm"], config.rms_norm_eps)
    q = lin(x, attn_base, attn_lora, "q_proj").reshape(b, t, config.num_attention_heads, config.head_dim)
    k = lin(x, attn_base, attn_lora, "k_proj").reshape(b, t, config.num_key_value_heads, config.head_dim)
    v = lin(x, attn_base, attn_lora, "v_proj").reshape(b, t, config.num_key_value_heads, config.head_dim)
    q = rope.apply_rotary(q, cos, sin)
    k = rope.apply_rotary(k, cos, sin)
    if cache_kv is not None:
        k_all = jax.lax.dynamic_update_slice_in_dim(cache_kv[0], k.astype(cache_kv[0].dtype), cache_index, axis=1)
        v_all = jax.lax.dynamic_update_slice_in_dim(cache_kv[1], v.astype(cache_kv[1].dtype), cache_index, axis=1)
        new_cache = (k_all, v_all)
        k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
    else:
        new_cache = None
    attn = _attention(q, k, v, mask)
    h = h + lin(attn, attn_base, attn_lora, "o_proj")

    x = rms_norm(h, layer_base["post_attention_layernorm"], config.rms_norm_eps)
    gate = lin(x, mlp_base, mlp_lora, "gate_proj")
    up = lin(x, mlp_base, mlp_lora, "up_proj")
    h = h + lin(jax.nn.silu(gate) * up, mlp_base, mlp_lora, "down_proj")
    return h, new_cache


def _attention_mask(config, attention_mask, b, t, s, cache_index):
    """``[B, T, S]`` booleans: causal over slots, the padding mask, and Mistral's sliding window."""
    query_slot = cache_index + jnp.arange(t)[:, None]
    key_slot = jnp.arange(s)[None, :]
    allowed = key_slot <= query_slot
    if config.sliding_window is not None:
        allowed = allowed & (query_slot - key_slot < config.sliding_window)
    allowed = jnp.broadcast_to(allowed, (b, t, s))
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :].astype(bool)
    return allowed


def hidden_states(
    spec: ModelSpec,
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    input_ids: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Final normalised hidden states ``[B, T, D]`` (``spec.compute_dtype``) and the updated cache.

    ``input_ids``: int ``[B, T]``. ``attention_mask``: ``[B, S]`` with 1 for real tokens, over the
    key slots (``S = T`` without a cache, the cache length with one). ``positions``: rotary
    positions ``[B, T]`` (default: the slot index; pass ``cumsum(mask) - 1`` for left-padded
    batches). ``dropout_key`` enables LoRA dropout (at ``spec.lora_config.dropout``).
    """
    config = spec.config
    compute_dtype = jnp.dtype(spec.compute_dtype)
    b, t = input_ids.shape
    cache_index = jnp.zeros((), jnp.int32) if cache is None else cache.index
    if positions is None:
        positions = jnp.broadcast_to(cache_index + jnp.arange(t, dtype=jnp.int32), (b, t))
    s = t if cache is None else cache.k.shape[2]
    if attention_mask is not None and attention_mask.shape != (b, s):
        raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(b, s)} (batch, key slots)")
    mask = _attention_mask(config, attention_mask, b, t, s, cache_index)
    inv_freq = rope.inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling_dict)
    cos, sin = rope.rotary_cos_sin(positions, inv_freq)

    h = base["embed_tokens"][input_ids].astype(compute_dtype)
    layer_lora = None if lora is None else lora.get("layers")
    num_layers = config.num_hidden_layers
    keys = None if dropout_key is None else jax.random.split(dropout_key, num_layers)

    def body(carry, xs):
        layer_base, layer_lora_i, cache_kv, key = xs
        out, new_cache = _layer(spec, carry, layer_base, layer_lora_i, cache_kv, cos=cos, sin=sin, mask=mask,
                                cache_index=cache_index, dropout_key=key)
        return out, new_cache

    if spec.remat:
        body = jax.checkpoint(body, prevent_cse=False)
    cache_kv = None if cache is None else (cache.k, cache.v)
    h, new_kv = jax.lax.scan(body, h, (base["layers"], layer_lora, cache_kv, keys))
    h = rms_norm(h, base["norm"], config.rms_norm_eps)
    new_cache = None if cache is None else KVCache(new_kv[0], new_kv[1], cache.index + t)
    return h, new_cache


def output_head(config: LlamaConfig, base: dict[str, Any]) -> Any:
    """The output projection ``[V, D]``: ``embed_tokens`` for tied heads, else ``lm_head``."""
    return base["embed_tokens"] if config.tie_word_embeddings else base["lm_head"]


def logits_from_hidden(spec: ModelSpec, base: dict[str, Any], h: jax.Array) -> jax.Array:
    """float32 logits ``[..., V]`` from hidden states ``[..., D]``, through the (possibly tied) head."""
    return base_matmul(h, output_head(spec.config, base), backend=spec.kernel_backend).astype(jnp.float32)


def forward(
    spec: ModelSpec,
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    input_ids: jax.Array,
    **kwargs: Any,
) -> tuple[jax.Array, KVCache | None]:
    """Logits ``[B, T, V]`` (float32) and the updated cache; arguments as :func:`hidden_states`."""
    h, cache = hidden_states(spec, base, lora, input_ids, **kwargs)
    return logits_from_hidden(spec, base, h), cache
