"""Text generation with a KV cache: greedy, temperature and top-p (nucleus) sampling, stop tokens.

The whole loop (prefill, then one token per step under ``lax.while_loop``) is one compiled
function for a given batch size, prompt length and budget. Prompts of different lengths are
left-padded; rotary positions follow each sequence's own token count.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qlora_jax.models import llama
from qlora_jax.models.spec import ModelSpec

__all__ = ["SamplingConfig", "generate_padded", "generate_tokens", "generate", "chat"]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to decode: ``temperature`` 0 means greedy decoding; ``top_p`` < 1 samples from the nucleus.

    Attributes:
      max_new_tokens: tokens to generate at most per prompt (positive).
      temperature: softmax temperature (>= 0); 0 is greedy (argmax, ties to the lowest id).
      top_p: nucleus sampling's probability mass, in ``(0, 1]``; 1 samples from the whole vocabulary.
      stop_token_ids: token ids that end a sequence (not included in the output).

    Raises:
      ValueError: a non-positive ``max_new_tokens``, a negative ``temperature`` or ``top_p``
        outside ``(0, 1]``.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def _sample(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token ids ``[B]`` from float32 logits ``[B, V]``."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_p < 1.0:
        # Ranks break ties by token id, as argmax does, so that equal logits at the cutoff do not
        # all stay: a nucleus below the top token's mass is exactly greedy decoding.
        order = jnp.argsort(-logits, axis=-1, stable=True)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
        # Keep the smallest set of tokens whose mass reaches top_p (the first token always stays).
        keep_ranked = jnp.cumsum(probs, axis=-1) - probs < top_p
        keep = jnp.take_along_axis(keep_ranked, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("spec", "sampling", "pad_id"))
def generate_padded(spec: ModelSpec, base: dict[str, Any], lora: dict[str, Any] | None, prompt_ids: jax.Array,
                    prompt_mask: jax.Array, key: jax.Array, *, sampling: SamplingConfig,
                    pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Decodes a left-padded batch with a KV cache, in one compiled ``while_loop``.

    Args:
      spec: the model's :class:`~qlora_jax.models.spec.ModelSpec` (static).
      base: the (quantized) base parameters' pytree.
      lora: the adapters' pytree, or ``None`` for the base model alone.
      prompt_ids: int32 ``[B, P]`` token ids, left-padded.
      prompt_mask: int32 ``[B, P]``, 1 on prompt tokens, 0 on the left padding.
      key: PRNG key for sampling (unused when greedy).
      sampling: decoding settings (:class:`SamplingConfig`, static).
      pad_id: token id written after a row stops (static).

    Returns:
      ``(tokens, done)``: int32 ``[B, max_new_tokens]`` generated ids (stop token included,
      ``pad_id`` after it) and bool ``[B]``, whether each row reached a stop token.
    """
    b, p = prompt_ids.shape
    total = p + sampling.max_new_tokens
    cache = llama.init_kv_cache(spec.config, b, total, jnp.dtype(spec.compute_dtype))
    mask = jnp.concatenate([prompt_mask, jnp.zeros((b, sampling.max_new_tokens), jnp.int32)], axis=1)
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    forward = functools.partial(llama.forward, spec, base, lora)
    logits, cache = forward(prompt_ids, attention_mask=mask, positions=positions, cache=cache)
    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)
    out = jnp.full((b, sampling.max_new_tokens), pad_id, jnp.int32)
    next_pos = jnp.sum(prompt_mask, axis=1).astype(jnp.int32)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < sampling.max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, last_logits, cache, mask, done, out, key = state
        key, sub = jax.random.split(key)
        token = _sample(last_logits, sub, sampling.temperature, sampling.top_p)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, stop_ids)
        mask = jax.lax.dynamic_update_slice_in_dim(mask, jnp.ones((b, 1), jnp.int32), p + step, axis=1)
        logits, cache = forward(token[:, None], attention_mask=mask, positions=(next_pos + step)[:, None],
                                cache=cache)
        return step + 1, logits[:, -1], cache, mask, done, out, key

    state = (jnp.zeros((), jnp.int32), logits[:, -1], cache, mask, jnp.zeros((b,), bool), out, key)
    _, _, _, _, done, out, _ = jax.lax.while_loop(cond, body, state)
    return out, done


def generate_tokens(
    spec: ModelSpec,
    base: dict[str, Any],
    lora: dict[str, Any] | None,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig = SamplingConfig(),
    *,
    key: jax.Array | None = None,
    pad_id: int = 0,
) -> list[list[int]]:
    """Generated token ids for each prompt (token id lists), without the stop token.

    ``spec`` describes the model (:class:`~qlora_jax.models.spec.ModelSpec`); ``base``/``lora`` are
    its pytrees (``lora`` None for the base alone); ``key`` seeds sampling (ignored when greedy).

    Prompts are left-padded with ``pad_id`` to the longest and decoded together with a KV cache.

    Args:
      spec: the model's :class:`~qlora_jax.models.spec.ModelSpec`.
      base: the (quantized) base parameters' pytree.
      lora: the adapters' pytree, or ``None`` for the base model alone.
      prompts: one list of token ids per sequence, none empty.
      sampling: decoding settings (:class:`SamplingConfig`).
      key: PRNG key for sampling; ``None`` uses ``jax.random.key(0)``.
      pad_id: token id of the left padding.

    Returns:
      One list of generated token ids (Python ints) per prompt, cut before the first stop token.

    Raises:
      ValueError: no prompt or an empty one, or a prompt plus ``max_new_tokens`` longer than the
        model's ``max_position_embeddings``.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one non-empty prompt")
    config = spec.config
    longest = max(len(p) for p in prompts)
    if longest + sampling.max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({longest} tokens) + max_new_tokens ({sampling.max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({config.max_position_embeddings})"
        )
    ids = np.full((len(prompts), longest), pad_id, np.int32)
    mask = np.zeros((len(prompts), longest), np.int32)
    for i, prompt in enumerate(prompts):
        ids[i, longest - len(prompt):] = prompt
        mask[i, longest - len(prompt):] = 1
    key = jax.random.key(0) if key is None else key
    out, _ = generate_padded(spec, base, lora, jnp.asarray(ids), jnp.asarray(mask), key, sampling=sampling,
                             pad_id=pad_id)
    results = []
    stops = set(sampling.stop_token_ids)
    for row in np.asarray(out).tolist():
        cut = next((i for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:cut])
    return results


def generate(model, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(), *,
             key: jax.Array | None = None, pad_id: int = 0) -> list[list[int]]:
    """:func:`generate_tokens` for a :class:`qlora_jax.model.CausalLM`.

    Args:
      model: the model; its spec, base and LoRA parameters are used.
      prompts: one list of token ids per sequence, none empty.
      sampling: decoding settings (:class:`SamplingConfig`).
      key: PRNG key for sampling; ``None`` uses ``jax.random.key(0)``.
      pad_id: token id of the left padding.

    Returns:
      One list of generated token ids per prompt, cut before the first stop token.

    Raises:
      ValueError: as :func:`generate_tokens`.
    """
    return generate_tokens(model.spec, model.base_params, model.lora_params, prompts, sampling, key=key, pad_id=pad_id)


def chat(model, tokenizer, messages: Sequence[dict[str, str]] | str, *, max_new_tokens: int = 128,
         temperature: float = 0.0, top_p: float = 1.0, key: jax.Array | None = None,
         template: str | None = None) -> str:
    """The assistant's reply to a conversation (or to one user message given as a string).

    The conversation goes through the tokenizer's chat template; decoding stops at the model's
    stop tokens or the tokenizer's end-of-sequence token.

    Args:
      model: a :class:`qlora_jax.model.CausalLM`.
      tokenizer: its tokenizer (``encode``, ``decode``, ``apply_chat_template``, ``eos_id``,
        ``pad_id``).
      messages: ``[{"role": ..., "content": ...}, ...]``, or one user message as a string.
      max_new_tokens: tokens to generate at most.
      temperature: softmax temperature; 0 is greedy.
      top_p: nucleus sampling's probability mass, in ``(0, 1]``.
      key: PRNG key for sampling; ``None`` uses ``jax.random.key(0)``.
      template: a chat template overriding the tokenizer's, or ``None``.

    Returns:
      The decoded reply (``str``).
    """
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True, template=template))
    stops = tuple(sorted({*model.config.stop_token_ids, *([tokenizer.eos_id] if tokenizer.eos_id is not None else [])}))
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop_token_ids=stops)
    (reply,) = generate(model, [prompt], sampling, key=key, pad_id=tokenizer.pad_id)
    return tokenizer.decode(reply)
