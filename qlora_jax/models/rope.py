"""Rotary position embeddings (RoPE) in the Hugging Face ``rotate_half`` convention.

Supports the default frequencies, linear scaling and Llama 3's frequency-dependent scaling.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["inverse_frequencies", "rotary_cos_sin", "apply_rotary"]


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> np.ndarray:
    """RoPE's inverse frequencies, as transformers computes them in float32.

    Args:
      head_dim: elements per head.
      theta: RoPE's base.
      scaling: None, or ``{"rope_type": "default"|"linear"|"llama3", ...}`` and its parameters.

    Returns:
      float32 ``[head_dim // 2]``.

    Raises:
      ValueError: an unsupported scaling type.

    References:
      Su et al., `RoFormer: Enhanced Transformer with Rotary Position Embedding
      <https://arxiv.org/abs/2104.09864>`_, 2021.
    """
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return (inv_freq / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = (2 * math.pi / inv_freq).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
        smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
        smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope scaling type {rope_type!r}: expected default, linear or llama3")


def rotary_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin for integer ``positions``.

    Args:
      positions: int ``[..., T]``.
      inv_freq: float32 ``[head_dim // 2]`` (:func:`inverse_frequencies`).

    Returns:
      ``(cos, sin)``, float32 ``[..., T, head_dim]`` each.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x`` by cos/sin (transformers' rotate_half convention).

    Args:
      x: ``[B, T, heads, head_dim]``.
      cos: ``[B, T, head_dim]`` (:func:`rotary_cos_sin`).
      sin: ``[B, T, head_dim]``.

    Returns:
      The rotated ``x``, same shape and dtype.

    References:
      Su et al., `RoFormer: Enhanced Transformer with Rotary Position Embedding
      <https://arxiv.org/abs/2104.09864>`_, 2021.
    """
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x.dtype)
