"""The QLoRA linear layer as pure functions: frozen (quantized or not) base plus a LoRA adapter.

``qlora_linear(x, weight, lora)`` computes ``x @ W.T + bias + scaling * dropout(x) @ A.T @ B.T``.
``weight`` is a :class:`~qlora_jax.quant.QuantizedTensor` (the frozen 4-bit or 8-bit base), or a
plain ``[out, in]`` array (a bf16 base, or a trainable weight for full finetuning).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from qlora_jax.kernels import quantized_matmul
from qlora_jax.quant import QuantizedTensor

__all__ = ["base_matmul", "einsum_f32_accumulate", "lora_delta", "qlora_linear"]


def base_matmul(x: jax.Array, weight: Any, *, backend: str = "auto") -> jax.Array:
    """``x @ W.T`` for ``x: [..., in]`` and ``W: [out, in]`` (quantized or not), in ``x.dtype``.

    Quantized weights go through :func:`qlora_jax.kernels.quantized_matmul` with ``backend``,
    whose custom VJP keeps only the packed weight for the backward pass (the input gradient
    re-dequantizes it).

    Args:
      x: activations ``[..., in]`` (bfloat16, float16 or float32).
      weight: ``[out, in]``, a :class:`~qlora_jax.quant.QuantizedTensor` or a dense array (cast to
        ``x.dtype``; the product accumulates in float32).
      backend: kernel backend of a quantized weight (see :func:`qlora_jax.kernels.resolve_backend`).

    Returns:
      ``[..., out]`` in ``x.dtype``.
    """
    if isinstance(weight, QuantizedTensor):
        return quantized_matmul(x, weight, backend=backend)
    with jax.named_scope("base_matmul"):  # the scopes name ops for experiments.step_profile
        return _matmul_nt(x, weight.astype(x.dtype)).astype(x.dtype)


def lora_delta(
    x: jax.Array,
    lora_a: jax.Array,
    lora_b: jax.Array,
    scaling: float,
    *,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """``scaling * dropout(x) @ A.T @ B.T`` for ``A: [r, in]``, ``B: [out, r]``, in ``x.dtype``.

    Args:
      x: activations ``[..., in]``.
      lora_a: LoRA ``A``, ``[r, in]`` (any float dtype; cast to ``x.dtype``).
      lora_b: LoRA ``B``, ``[out, r]`` (cast to ``x.dtype``).
      scaling: the adapter's scale, ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
      dropout_rate: probability of zeroing an input element (inverted dropout); applied only with
        ``dropout_key``.
      dropout_key: PRNG key for dropout; ``None`` disables it.

    Returns:
      ``[..., out]`` in ``x.dtype`` (both matmuls accumulate in float32).

    References:
      Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
      <https://arxiv.org/abs/2106.09685>`_, 2021.
    """
    with jax.named_scope("lora"):
        if dropout_rate > 0.0 and dropout_key is not None:
            keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout_rate), 0).astype(x.dtype)
        h = _matmul_nt(x, lora_a.astype(x.dtype)).astype(x.dtype)
        out = _matmul_nt(h, lora_b.astype(x.dtype))
        return (out * scaling).astype(x.dtype)


@jax.custom_vjp
def _matmul_nt(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w.T`` (``x: [..., k]``, ``w: [n, k]``, the same dtype) accumulated and returned in float32.

    The backward pass computes in the operands' dtype with float32 accumulation, as the forward
    does. Autodiff would multiply the float32 cotangent with the (upcast) bfloat16 operand, a
    float32 matmul at half bfloat16's speed; the cotangent is rounded to the operands' dtype
    instead. That rounding is exact where the output is rounded to that dtype next (the cotangent
    is then a converted value of that dtype), and one rounding of the compute dtype otherwise
    (the LoRA scale), as in a bfloat16 torch backward.
    """
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _matmul_nt_fwd(x, w):
    return _matmul_nt(x, w), (x, w)


def _matmul_nt_bwd(residuals, g):
    x, w = residuals
    g = g.astype(x.dtype)
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    tokens = tuple(range(x.ndim - 1))
    if x.shape[-1] <= g.shape[-1]:
        # dw as (x^T @ g)^T with the transpose kept apart by a barrier, so that XLA:CPU transposes
        # the narrower x, not the [tokens, n] g: for g^T @ x (autodiff's form; XLA rewrites
        # transpose(x^T @ g) back into it) it copied g transposed in every layer, at 3x the dot's
        # own time (LoRA B's gradient, n = out_features, k = r).
        dw = jax.lax.optimization_barrier(
            jax.lax.dot_general(x, g, ((tokens, tokens), ((), ())), preferred_element_type=jnp.float32)).T
    else:
        dw = jax.lax.dot_general(g, x, ((tokens, tokens), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_matmul_nt.defvjp(_matmul_nt_fwd, _matmul_nt_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32_accumulate(subscripts: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """``jnp.einsum(subscripts, x, y)`` accumulated and returned in float32, with a backward pass in
    the operands' dtype.

    As :func:`base_matmul`'s dense product: the gradients' products take the cotangent rounded to
    ``x.dtype`` and accumulate in float32 (autodiff would upcast the bfloat16 operand and multiply
    in float32, at half the speed).

    Args:
      subscripts: ``"X,Y->Z"``, two operands; every index of ``X`` appears in ``Y`` or ``Z`` and
        every index of ``Y`` in ``X`` or ``Z`` (so that ``"Z,Y->X"`` and ``"Z,X->Y"`` are the
        gradients).
      x: the first operand.
      y: the second operand, of ``x``'s dtype.

    Returns:
      The float32 product.
    """
    return jnp.einsum(subscripts, x, y, preferred_element_type=jnp.float32)


def _einsum_fwd(subscripts, x, y):
    return einsum_f32_accumulate(subscripts, x, y), (x, y)


def _einsum_bwd(subscripts, residuals, g):
    x, y = residuals
    inputs, z = subscripts.replace(" ", "").split("->")
    xs, ys = inputs.split(",")
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{z},{ys}->{xs}", g, y, preferred_element_type=jnp.float32)
    dy = jnp.einsum(f"{z},{xs}->{ys}", g, x, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dy.astype(y.dtype)


einsum_f32_accumulate.defvjp(_einsum_fwd, _einsum_bwd)


def qlora_linear(
    x: jax.Array,
    weight: Any,
    lora: dict[str, jax.Array] | None = None,
    bias: jax.Array | None = None,
    *,
    scaling: float = 1.0,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
    backend: str = "auto",
) -> jax.Array:
    """A linear layer with an optional LoRA adapter ``{"lora_A": [r, in], "lora_B": [out, r]}``.

    ``x: [..., in]`` -> ``[..., out]`` in ``x.dtype``; ``backend``: the quantized matmul's kernel
    backend (see :func:`qlora_jax.kernels.resolve_backend`).

    Args:
      x: activations ``[..., in]``.
      weight: ``[out, in]``, quantized (:class:`~qlora_jax.quant.QuantizedTensor`) or dense.
      lora: ``{"lora_A": [r, in], "lora_B": [out, r]}`` or ``None`` (no adapter).
      bias: ``[out]`` or ``None``; added in the output dtype.
      scaling: the adapter's scale (``LoraConfig.scaling``).
      dropout_rate: LoRA dropout on the adapter's input (only with ``dropout_key``).
      dropout_key: PRNG key for LoRA dropout; ``None`` disables it.
      backend: the quantized matmul's kernel backend.

    Returns:
      ``[..., out]`` in ``x.dtype``.

    References:
      Dettmers et al., `QLoRA: Efficient Finetuning of Quantized LLMs
      <https://arxiv.org/abs/2305.14314>`_, 2023.
    """
    y = base_matmul(x, weight, backend=backend)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if lora is not None:
        y = y + lora_delta(x, lora["lora_A"], lora["lora_B"], scaling, dropout_rate=dropout_rate,
                           dropout_key=dropout_key)
    return y
