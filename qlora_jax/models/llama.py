"""The decoder of every family, as pure functions over explicit pytrees.

It is the LLaMA block, with the switches of the model's
:class:`~qlora_jax.models.family.Family` (sandwich norms, (1 + w) norms, q/k norms, GeGLU,
embedding scaling, fused projections) and of its config (soft-caps, per-layer sliding windows
and RoPE bases).

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

from qlora_jax.linear import base_matmul, einsum_f32_accumulate, qlora_linear
from qlora_jax.models import moe, rope
from qlora_jax.models.config import LlamaConfig
from qlora_jax.models.layout import ALL_LINEAR_LAYERS
from qlora_jax.models.spec import ModelSpec

__all__ = ["KVCache", "init_kv_cache", "forward", "hidden_states", "hidden_states_and_router_logits",
           "logits_from_hidden", "output_head", "rms_norm"]

_NEG_INF = -1e30


class KVCache(NamedTuple):
    """Keys and values of every layer, and the next slot.

    Attributes:
      k: keys ``[L, B, S_max, kv_heads, head_dim]``.
      v: values, likewise.
      index: int32 scalar, the next slot to write.
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array  # int32 scalar: number of slots already written


def init_kv_cache(config: LlamaConfig, batch: int, max_len: int, dtype: Any = jnp.bfloat16) -> KVCache:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens.

    Args:
      config: the model config (layers, key-value heads, head size).
      batch: sequences.
      max_len: slots per sequence, in tokens.
      dtype: the cache's dtype.

    Returns:
      A zero :class:`KVCache` at slot 0.
    """
    shape = (config.num_hidden_layers, batch, max_len, config.num_key_value_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 0.0) -> jax.Array:
    """RMSNorm over the last axis, in float32, returned in ``x.dtype``.

    Args:
      x: ``[..., D]``.
      weight: ``[D]``.
      eps: added to the mean square.
      offset: 0: transformers' LlamaRMSNorm (``w * normed``, normed rounded to ``x.dtype`` first);
        1: Gemma's RMSNorm (``(1 + w) * normed``, all in float32).

    Returns:
      ``[..., D]`` in ``x.dtype``.

    References:
      Zhang and Sennrich, `Root Mean Square Layer Normalization
      <https://arxiv.org/abs/1910.07467>`_, 2019.
    """
    with jax.named_scope("norm"):  # the scopes name ops for experiments.step_profile
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
        if offset:
            return (normed * (offset + weight.astype(jnp.float32))).astype(x.dtype)
        return (weight.astype(jnp.float32) * normed.astype(x.dtype).astype(jnp.float32)).astype(x.dtype)


def soft_cap(x: jax.Array, cap: float | None) -> jax.Array:
    """Gemma 2's soft-capping ``cap * tanh(x / cap)`` (identity for ``cap`` None)."""
    return x if cap is None else jnp.tanh(x / cap) * cap


def _attention(q, k, v, mask, scale: float, softcap: float | None):
    """Grouped-query attention. q ``[B, T, H, hd]``, k/v ``[B, S, KV, hd]``, mask ``[B, T, S]``."""
    with jax.named_scope("attention"):
        b, t, h, hd = q.shape
        kv = k.shape[2]
        q = q.reshape(b, t, kv, h // kv, hd)
        scores = einsum_f32_accumulate("btkgd,bskd->bkgts", q, k) * jnp.float32(scale)
        scores = soft_cap(scores, softcap)
        scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = einsum_f32_accumulate("bkgts,bskd->btkgd", probs, v)
        return out.reshape(b, t, h * hd).astype(v.dtype)


def _linear(x, base_group, lora_group, name, spec: ModelSpec, dropout_key):
    params = base_group[name]
    lora = None if lora_group is None else lora_group.get(name)
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, ALL_LINEAR_LAYERS.index(name))
    lora_config = spec.lora_config
    scaling = lora_config.scaling if lora_config is not None else 1.0
    dropout = lora_config.dropout if lora_config is not None else 0.0
    return qlora_linear(x, params["weight"], lora, params.get("bias"), scaling=scaling, dropout_rate=dropout,
                        dropout_key=key, backend=spec.kernel_backend)


def _activation(name: str, x: jax.Array) -> jax.Array:
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.silu(x)


def _layer(spec: ModelSpec, h, layer_base, layer_lora, cache_kv, *, cos, sin, mask, cache_index, dropout_key):
    config = spec.config
    family = config.family
    b, t, _ = h.shape
    attn_base, mlp_base = layer_base["self_attn"], layer_base["mlp"]
    attn_lora = None if layer_lora is None else layer_lora.get("self_attn")
    mlp_lora = None if layer_lora is None else layer_lora.get("mlp")
    lin = functools.partial(_linear, spec=spec, dropout_key=dropout_key)
    norm = functools.partial(rms_norm, eps=config.rms_norm_eps, offset=family.norm_offset)
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim

    x = norm(h, layer_base["input_layernorm"])
    if family.fused_qkv:  # Phi-3: one [q + 2 kv, D] projection, split as transformers does
        qkv = lin(x, attn_base, attn_lora, "qkv_proj")
        q, k, v = jnp.split(qkv, [config.q_size, config.q_size + config.kv_size], axis=-1)
    else:
        q, k, v = (lin(x, attn_base, attn_lora, name) for name in ("q_proj", "k_proj", "v_proj"))
    q, k, v = q.reshape(b, t, heads, hd), k.reshape(b, t, kv_heads, hd), v.reshape(b, t, kv_heads, hd)
    if family.qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head, before RoPE
        q, k = norm(q, attn_base["q_norm"]), norm(k, attn_base["k_norm"])
    q = rope.apply_rotary(q, cos, sin)
    k = rope.apply_rotary(k, cos, sin)
    if cache_kv is not None:
        k_all = jax.lax.dynamic_update_slice_in_dim(cache_kv[0], k.astype(cache_kv[0].dtype), cache_index, axis=1)
        v_all = jax.lax.dynamic_update_slice_in_dim(cache_kv[1], v.astype(cache_kv[1].dtype), cache_index, axis=1)
        new_cache = (k_all, v_all)
        k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
    else:
        new_cache = None
    attn = _attention(q, k, v, mask, config.attention_scale, config.attn_logit_softcapping)
    attn = lin(attn, attn_base, attn_lora, "o_proj")
    if family.sandwich_norms:  # Gemma 2/3: the branch output is normalised too
        h = h + norm(attn, layer_base["post_attention_layernorm"])
        x = norm(h, layer_base["pre_feedforward_layernorm"])
    else:
        h = h + attn
        x = norm(h, layer_base["post_attention_layernorm"])
    router_logits = None
    if config.is_moe:  # Mixtral, Qwen3-MoE: the sparse block, 4-bit experts, per-expert adapters
        out, router_logits = _moe_mlp(spec, x, mlp_base, mlp_lora, dropout_key)
    else:
        if family.fused_gate_up:  # Phi-3: gate first, then up, in one [2 F, D] projection
            gate, up = jnp.split(lin(x, mlp_base, mlp_lora, "gate_up_proj"), 2, axis=-1)
        else:
            gate, up = lin(x, mlp_base, mlp_lora, "gate_proj"), lin(x, mlp_base, mlp_lora, "up_proj")
        out = lin(_activation(family.activation, gate) * up, mlp_base, mlp_lora, "down_proj")
    if family.sandwich_norms:
        out = norm(out, layer_base["post_feedforward_layernorm"])
    return h + out, new_cache, router_logits


def _moe_mlp(spec: ModelSpec, x, mlp_base, mlp_lora, dropout_key):
    """The MoE block of a layer: ``(output, router logits [B*T, E])``."""
    config = spec.config
    # A trained router (modules_to_save=["gate"]) replaces the frozen one, which is then not read.
    router = mlp_lora.get("gate") if spec.train_router and mlp_lora else None
    if spec.train_router and router is None:
        raise ValueError("the spec trains the MoE router (LoRA modules_to_save=['gate']) but the adapters hold no "
                         "router: make them with init_lora_params(key, spec, base=base)")
    params = {"gate": (mlp_base["gate"] if router is None else router)["weight"],
              "experts": {name: mlp_base[name]["weight"] for name in moe.EXPERT_MATRICES}}
    lora = {name: mlp_lora[name] for name in moe.EXPERT_MATRICES if name in mlp_lora} if mlp_lora else None
    lora_config = spec.lora_config
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, len(ALL_LINEAR_LAYERS))
    res = moe.moe_block(params, x, config.moe, lora=lora or None,
                        lora_scaling=lora_config.scaling if lora_config is not None else 1.0,
                        dropout_rate=lora_config.dropout if lora_config is not None else 0.0, dropout_key=key,
                        mesh=spec.expert_mesh)
    return res.hidden, res.router_logits


def _attention_mask(attention_mask, b, t, s, cache_index, window):
    """``[B, T, S]`` booleans: causal over slots, the padding mask, and a sliding window (None: none)."""
    query_slot = cache_index + jnp.arange(t)[:, None]
    key_slot = jnp.arange(s)[None, :]
    allowed = key_slot <= query_slot
    if window is not None:
        allowed = allowed & (query_slot - key_slot < window)
    allowed = jnp.broadcast_to(allowed, (b, t, s))
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :].astype(bool)
    return allowed


def _embed(config: Any, base: dict[str, Any], input_ids: jax.Array, compute_dtype: Any) -> jax.Array:
    """The token embeddings ``[B, T, D]`` in the compute dtype (Gemma: times sqrt(hidden), that factor
    rounded to the compute dtype as transformers does)."""
    h = base["embed_tokens"][input_ids].astype(compute_dtype)
    if config.embed_multiplier is not None:
        h = h * jnp.asarray(config.embed_multiplier, compute_dtype)
    return h


# The decoder's attention and its mask under public names, for code that rebuilds the decoder
# from other layers around them (experiments/bench_decoder.py).
grouped_query_attention, make_attention_mask = _attention, _attention_mask


def hidden_states_and_router_logits(
    spec: ModelSpec,
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    input_ids: jax.Array,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, KVCache | None, jax.Array | None]:
    """:func:`hidden_states`, and the router logits of every layer of an MoE model.

    Args:
      spec: what runs (:class:`~qlora_jax.models.spec.ModelSpec`).
      base: the frozen base pytree.
      lora: the adapters' pytree, or None.
      input_ids: int ``[B, T]``.
      attention_mask: ``[B, S]``, 1 for real tokens, over the key slots (as :func:`hidden_states`).
      positions: rotary positions ``[B, T]`` (default: the slot index).
      cache: a :class:`KVCache` to extend, or None.
      dropout_key: PRNG key enabling LoRA dropout, or None.

    Returns:
      ``(hidden [B, T, D], cache or None, router_logits)``: ``router_logits`` is ``[L, B*T, E]``
      in the compute dtype (the input of :func:`qlora_jax.models.moe.load_balancing_loss`), None
      for dense families.
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

    def mask_and_rope(local: bool):
        mask = _attention_mask(attention_mask, b, t, s, cache_index, config.sliding_window if local else None)
        theta, scaling = config.rope_of(local)
        cos, sin = rope.rotary_cos_sin(positions, rope.inverse_frequencies(config.head_dim, theta, scaling))
        return mask, cos, sin

    # Local (sliding-window) and global layers may differ in mask and RoPE (Gemma 2/3). The scan
    # compiles one layer, so a model that mixes them picks each layer's by a per-layer flag.
    sliding = config.sliding_layers
    if len(set(sliding)) > 1:
        single, local_mrs, global_mrs, flags = None, mask_and_rope(True), mask_and_rope(False), jnp.asarray(sliding)
    else:
        single, flags = mask_and_rope(sliding[0]), None

    h = _embed(config, base, input_ids, compute_dtype)
    layer_lora = None if lora is None else lora.get("layers")
    num_layers = config.num_hidden_layers
    keys = None if dropout_key is None else jax.random.split(dropout_key, num_layers)

    def body(carry, xs):
        layer_base, layer_lora_i, cache_kv, key, flag = xs
        if flag is None:
            mask, cos, sin = single
        else:
            mask, cos, sin = (jnp.where(flag, loc, glo) for loc, glo in zip(local_mrs, global_mrs, strict=True))
        out, new_cache, router_logits = _layer(spec, carry, layer_base, layer_lora_i, cache_kv, cos=cos, sin=sin,
                                               mask=mask, cache_index=cache_index, dropout_key=key)
        return out, (new_cache, router_logits)

    if spec.remat:
        body = jax.checkpoint(body, prevent_cse=False)
    cache_kv = None if cache is None else (cache.k, cache.v)
    h, (new_kv, router_logits) = jax.lax.scan(body, h, (base["layers"], layer_lora, cache_kv, keys, flags))
    h = rms_norm(h, base["norm"], config.rms_norm_eps, config.family.norm_offset)
    new_cache = None if cache is None else KVCache(new_kv[0], new_kv[1], cache.index + t)
    return h, new_cache, router_logits


def hidden_states(
    spec: ModelSpec,
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    input_ids: jax.Array,
    **kwargs: Any,
) -> tuple[jax.Array, KVCache | None]:
    """Final normalised hidden states and the updated cache.

    Args:
      spec: the model's spec (architecture, adapters, dtypes, kernels).
      base: the base pytree (:func:`~qlora_jax.models.layout.assemble_base`'s layout).
      lora: the adapters, or None.
      input_ids: int ``[B, T]``.
      **kwargs: :func:`hidden_states_and_router_logits`'s: ``attention_mask`` ``[B, S]`` with 1 for
        real tokens, over the key slots (``S = T`` without a cache, the cache length with one);
        ``positions`` ``[B, T]`` (default: the slot index; pass ``cumsum(mask) - 1`` for
        left-padded batches); ``cache``; ``dropout_key`` (enables LoRA dropout at
        ``spec.lora_config.dropout``).

    Returns:
      ``(h, cache)``: ``[B, T, D]`` in ``spec.compute_dtype`` and the updated cache (None without one).

    Raises:
      ValueError: an ``attention_mask`` of another shape than ``[B, S]``.
    """
    h, cache, _ = hidden_states_and_router_logits(spec, base, lora, input_ids, **kwargs)
    return h, cache


def output_head(config: LlamaConfig, base: dict[str, Any]) -> Any:
    """The output projection.

    Args:
      config: the model config.
      base: the base pytree.

    Returns:
      ``[V, D]``: ``embed_tokens`` for tied heads, else ``lm_head`` (possibly quantized).
    """
    return base["embed_tokens"] if config.tie_word_embeddings else base["lm_head"]


def logits_from_hidden(spec: ModelSpec, base: dict[str, Any], h: jax.Array) -> jax.Array:
    """Logits from hidden states, through the (possibly tied) head and the final soft-cap (Gemma 2).

    Args:
      spec: the model's spec.
      base: the base pytree.
      h: hidden states ``[..., D]``.

    Returns:
      float32 logits ``[..., V]``.
    """
    logits = base_matmul(h, output_head(spec.config, base), backend=spec.kernel_backend).astype(jnp.float32)
    return soft_cap(logits, spec.config.final_logit_softcapping)


def forward(
    spec: ModelSpec,
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    input_ids: jax.Array,
    **kwargs: Any,
) -> tuple[jax.Array, KVCache | None]:
    """Logits and the updated cache.

    Args:
      spec: the model's spec.
      base: the base pytree.
      lora: the adapters, or None.
      input_ids: int ``[B, T]``.
      **kwargs: :func:`hidden_states`' keyword arguments.

    Returns:
      ``(logits, cache)``: float32 ``[B, T, V]`` and the updated cache (None without one).
    """
    h, cache = hidden_states(spec, base, lora, input_ids, **kwargs)
    return logits_from_hidden(spec, base, h), cache
