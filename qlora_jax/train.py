"""The training step: masked next-token loss, gradient accumulation, an optax update.

Pure functions over explicit pytrees, built once and compiled with ``jax.jit``:

* ``trainable``: the LoRA adapters (``{"layers": ...}``), or for full finetuning the base itself;
* ``frozen``: the frozen base (``None`` for full finetuning);
* ``batch``: ``{"input_ids", "attention_mask", "loss_mask"}``, each ``[accum, B, T]`` (the
  micro-batches of one optimizer step). Position ``t`` of ``loss_mask`` says whether token ``t``
  is a target, predicted from tokens ``< t``.

The loss is the mean over all target tokens of the step (micro-batches are weighted by their
token counts, so accumulation gives exactly the gradient of the big batch). A step whose loss or
gradients are not finite is reported in ``metrics["finite"]``: the caller must stop before saving
anything, so that the last good checkpoint stays the latest (the launcher does).

Mixture-of-experts models (Mixtral, Qwen3-MoE) train on ``loss + router_aux_loss_coef *
aux_loss``, as ``MixtralForCausalLM`` with ``output_router_logits=True``: ``aux_loss`` is the
load-balancing loss of each micro-batch (:func:`qlora_jax.models.moe.load_balancing_loss`,
padding excluded), weighted by its target tokens like the loss, and reported as
``metrics["aux_loss"]``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qlora_jax.kernels.ops import zero_cotangent
from qlora_jax.linear import base_matmul
from qlora_jax.models import llama, moe
from qlora_jax.models.spec import ModelSpec

__all__ = ["chunked_cross_entropy", "loss_and_count", "loss_count_and_aux", "make_train_step", "make_eval_step",
           "NonFiniteLossError"]


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients became NaN or Inf."""


def chunked_cross_entropy(
    hidden: jax.Array, head: Any, targets: jax.Array, mask: jax.Array, chunk: int, *, backend: str = "auto",
    softcap: float | None = None, head_frozen: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Sum of masked next-token cross-entropy (nats, float32) and the number of masked tokens.

    ``hidden``: ``[N, D]``, ``targets``/``mask``: ``[N]``. The vocabulary projection runs ``chunk``
    tokens at a time and is recomputed in the backward pass, so ``[N, V]`` logits never exist.
    ``backend``: the kernel backend of a quantized ``head``. ``softcap``: the final logit
    soft-cap (Gemma 2's ``final_logit_softcapping``; None: none).

    Args:
      hidden: final hidden states ``[N, D]`` (the model's compute dtype).
      head: output projection ``[V, D]``, quantized (:class:`~qlora_jax.quant.QuantizedTensor`) or
        dense.
      targets: int32 ``[N]``, the token each hidden state predicts.
      mask: ``[N]``, 1 where the token counts in the loss, 0 elsewhere (any numeric dtype).
      chunk: tokens per chunk of the vocabulary projection (``N`` is zero-padded to a multiple).
      backend: kernel backend of a quantized ``head``.
      softcap: the final logit soft-cap ``c`` (logits become ``c·tanh(logits / c)``), or None.
      head_frozen: the caller never differentiates with respect to ``head`` (QLoRA: the head is
        part of the frozen base). Then each chunk's gradient with respect to ``hidden`` is computed
        in the forward pass, while its logits exist, and the backward pass only scales it: the
        chunk's logits are not recomputed (one head matmul and one softmax fewer per token).
        ``head``'s cotangent is then zero, whatever the caller does with it.

    Returns:
      ``(loss_sum, count)``: float32 scalars, the summed cross-entropy in nats over the masked
      tokens and their number.

    References:
      Chen et al., `Training Deep Nets with Sublinear Memory Cost
      <https://arxiv.org/abs/1604.06174>`_, 2016 (the recomputation per chunk).
    """
    n = hidden.shape[0]
    pad = (-n) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        mask = jnp.pad(mask, (0, pad))
    hidden = hidden.reshape(-1, chunk, hidden.shape[-1])
    targets = targets.reshape(-1, chunk)
    mask = mask.reshape(-1, chunk).astype(jnp.float32)

    with jax.named_scope("head_and_loss"):  # the scopes name ops for experiments.step_profile
        if head_frozen:
            total = _frozen_head_loss(hidden, head, targets, mask, backend, softcap)
        else:
            one_chunk = jax.checkpoint(functools.partial(_chunk_loss, head=head, backend=backend, softcap=softcap))

            def body(total, xs):
                return total + one_chunk(*xs), None

            total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, targets, mask))
    return total, jnp.sum(mask)


def _chunk_logits(h, head, backend, softcap):
    """``(logits, raw)`` of one chunk in float32: soft-capped and as the head computed them."""
    raw = base_matmul(h, head, backend=backend).astype(jnp.float32)
    return (raw if softcap is None else jnp.tanh(raw / softcap) * softcap), raw


def _chunk_loss(h, t, m, *, head, backend, softcap):
    logits, _ = _chunk_logits(h, head, backend, softcap)
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
    return jnp.sum((logz - target_logit) * m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _frozen_head_loss(hidden, head, targets, mask, backend, softcap):
    """Summed masked cross-entropy over ``[n, chunk, D]`` chunks; the gradient as ``chunked_cross_entropy`` says."""

    def body(total, xs):
        return total + _chunk_loss(*xs, head=head, backend=backend, softcap=softcap), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, targets, mask))[0]


def _frozen_head_loss_fwd(hidden, head, targets, mask, backend, softcap):
    def body(total, xs):
        h, t, m = xs
        (logits, raw), head_vjp = jax.vjp(lambda h: _chunk_logits(h, head, backend, softcap), h)
        logz = jax.nn.logsumexp(logits, axis=-1)
        target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        # d(sum of masked losses)/d logits: (softmax - one_hot(target)) per counted token.
        dlogits = (jnp.exp(logits - logz[:, None]) - jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32))
        (dh,) = head_vjp((dlogits * m[:, None], jnp.zeros_like(raw)))
        return total + jnp.sum((logz - target_logit) * m), dh

    total, dhidden = jax.lax.scan(body, jnp.zeros((), jnp.float32), (hidden, targets, mask))
    return total, (dhidden, head, targets, mask)


def _frozen_head_loss_bwd(backend, softcap, residuals, g):
    dhidden, head, targets, mask = residuals
    return (g * dhidden).astype(dhidden.dtype), zero_cotangent(head), zero_cotangent(targets), jnp.zeros_like(mask)


_frozen_head_loss.defvjp(_frozen_head_loss_fwd, _frozen_head_loss_bwd)


def loss_and_count(
    spec: ModelSpec,
    trainable: Any,
    frozen: Any,
    batch: dict[str, jax.Array],
    dropout_key: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Summed target-token loss and target count for one micro-batch ``[B, T]``.

    Hidden state ``t`` predicts token ``t + 1``; a token counts where both ``loss_mask`` and
    ``attention_mask`` are 1.

    Args:
      spec: the model (config, compute dtype, loss chunk, kernel backend, full finetune or not).
      trainable: the LoRA adapters' pytree (the base parameters when ``spec.full_finetune``).
      frozen: the frozen (quantized) base parameters (unused when ``spec.full_finetune``).
      batch: ``{"input_ids": int32 [B, T], "attention_mask": [B, T], "loss_mask": [B, T]}``.
      dropout_key: PRNG key for LoRA dropout, or ``None`` (no dropout).

    Returns:
      ``(loss_sum, count)``: float32 scalars, summed cross-entropy (nats) and target tokens.
    """
    loss_sum, count, _ = loss_count_and_aux(spec, trainable, frozen, batch, dropout_key)
    return loss_sum, count


def loss_count_and_aux(
    spec: ModelSpec,
    trainable: Any,
    frozen: Any,
    batch: dict[str, jax.Array],
    dropout_key: jax.Array | None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """:func:`loss_and_count`, and the load-balancing loss of an MoE model's routers.

    Args:
      spec: the model (as :func:`loss_and_count`).
      trainable: the LoRA adapters' pytree (the base parameters when ``spec.full_finetune``).
      frozen: the frozen (quantized) base parameters (unused when ``spec.full_finetune``).
      batch: ``{"input_ids": int32 [B, T], "attention_mask": [B, T], "loss_mask": [B, T]}``.
      dropout_key: PRNG key for LoRA dropout, or ``None`` (no dropout).

    Returns:
      ``(loss_sum, count, aux_loss)``: ``aux_loss`` is transformers' ``aux_loss`` of the
      micro-batch (over every layer's router and the unpadded tokens; the coefficient not
      applied), a float32 scalar; None for dense models.
    """
    base, lora = (trainable, None) if spec.full_finetune else (frozen, trainable)
    hidden, _, router_logits = llama.hidden_states_and_router_logits(
        spec, base, lora, batch["input_ids"], attention_mask=batch["attention_mask"], dropout_key=dropout_key)
    head = llama.output_head(spec.config, base)
    # Hidden state t predicts token t + 1.
    targets = batch["input_ids"][:, 1:]
    mask = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).astype(jnp.float32)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    loss_sum, count = chunked_cross_entropy(h, head, targets.reshape(-1), mask.reshape(-1), spec.loss_chunk,
                                            backend=spec.kernel_backend,
                                            softcap=spec.config.final_logit_softcapping,
                                            head_frozen=not spec.full_finetune)
    aux = None
    if router_logits is not None:
        config = spec.config
        aux = moe.load_balancing_loss(list(router_logits), config.num_experts, config.num_experts_per_tok,
                                      batch["attention_mask"])
    return loss_sum, count, aux


def _accumulate(spec, trainable, frozen, batch, key, with_grad: bool):
    """Sums over the micro-batches: ``(objective, tokens, aux, grads)`` with gradients, else ``(loss, tokens)``.

    ``objective``: the summed loss plus, for MoE models, ``router_aux_loss_coef * aux_loss``
    weighted by the micro-batch's target tokens; ``aux``: the token-weighted sum of ``aux_loss``.
    """
    accum = batch["input_ids"].shape[0]
    keys = None if key is None else jax.random.split(key, accum)
    coef = spec.config.router_aux_loss_coef if spec.config.is_moe else 0.0

    def micro(trainable, micro_batch, micro_key):
        loss_sum, count, aux = loss_count_and_aux(spec, trainable, frozen, micro_batch, micro_key)
        aux_sum = jnp.zeros((), jnp.float32) if aux is None else aux * count
        return loss_sum + jnp.float32(coef) * aux_sum, (count, aux_sum)

    def body(carry, xs):
        micro_batch, micro_key = xs
        if with_grad:
            (objective, (count, aux_sum)), grads = jax.value_and_grad(micro, has_aux=True)(
                trainable, micro_batch, micro_key)
            total, tokens, aux_total, grad_sum = carry
            grad_sum = jax.tree.map(jnp.add, grad_sum, grads)
            return (total + objective, tokens + count, aux_total + aux_sum, grad_sum), None
        loss_sum, count = loss_and_count(spec, trainable, frozen, micro_batch, micro_key)
        total, tokens = carry
        return (total + loss_sum, tokens + count), None

    zero = jnp.zeros((), jnp.float32)
    init = ((zero, zero, zero, jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)) if with_grad
            else (zero, zero))
    out, _ = jax.lax.scan(body, init, (batch, keys))
    return out


def make_train_step(spec: ModelSpec, optimizer: optax.GradientTransformation) -> Callable:
    """``step(trainable, opt_state, frozen, batch, key) -> (trainable, opt_state, metrics)``.

    ``key`` drives LoRA dropout (None: no dropout). ``metrics``: loss (mean nats per target
    token; for MoE models with ``router_aux_loss_coef`` times aux_loss), aux_loss (MoE models only:
    the routers' load-balancing loss), tokens, grad_norm (before clipping), finite (bool). Not jitted: wrap it in
    ``jax.jit`` with the shardings and donation you need (see :mod:`qlora_jax.optim`).

    The step accumulates gradients over the leading ``accum`` axis of ``batch`` (``[accum, B, T]``
    arrays, keys as in :func:`loss_and_count`), divides by the number of target tokens, casts them
    to the parameters' dtypes and applies ``optimizer``.

    Args:
      spec: the model's :class:`~qlora_jax.models.spec.ModelSpec`.
      optimizer: the optax transformation for the trainable pytree (e.g.
        :func:`qlora_jax.optim.make_optimizer`).

    Returns:
      The (unjitted) step function. Its metrics are float32 scalars but ``finite`` (bool).
    """

    def step(trainable, opt_state, frozen, batch, key):
        total, tokens, aux_total, grad_sum = _accumulate(spec, trainable, frozen, batch, key, with_grad=True)
        denom = jnp.maximum(tokens, 1.0)
        loss = total / denom
        grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, trainable)
        with jax.named_scope("optimizer"):
            grad_norm = optax.tree.norm(grads)
            finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
            updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
            new_trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "tokens": tokens, "grad_norm": grad_norm, "finite": finite}
        if spec.config.is_moe:  # the load-balancing loss (its coefficient times it is part of "loss")
            metrics["aux_loss"] = aux_total / denom
        return new_trainable, new_opt_state, metrics

    return step


def make_eval_step(spec: ModelSpec) -> Callable:
    """``eval_step(trainable, frozen, batch) -> (loss_sum, tokens)`` over ``[accum, B, T]`` batches.

    Args:
      spec: the model's :class:`~qlora_jax.models.spec.ModelSpec`.

    Returns:
      The (unjitted) eval function; ``loss_sum`` (nats) and ``tokens`` are float32 scalars, summed
      over every micro-batch, without dropout.
    """

    def eval_step(trainable, frozen, batch):
        total, tokens = _accumulate(spec, trainable, frozen, batch, None, with_grad=False)
        return total, tokens

    return eval_step
