"""Random frozen bases made directly on the devices: 7B- or 65B-shaped QLoRA steps without a checkpoint.

The packed codes, double-quantized scales and 16-bit embeddings are generated in place, leaf by
leaf, with the shardings asked for, so that nothing larger than one leaf ever exists unsharded
and nothing passes through host memory. The weights are meaningless (uniform codes, scales of a
``weight_std``-wide layer) but have the real shapes, dtypes and layout, which is all that speed
and memory measurements need.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from qlora_jax.models import layout
from qlora_jax.models.config import LlamaConfig
from qlora_jax.quant import QuantizedTensor
from qlora_jax.quant.tensor import codes_shape, double_quantize, scales_shape

__all__ = ["random_base", "abstract_base"]


def _make(fn, sharding):
    """``fn()`` computed on the devices, born with ``sharding`` (never gathered on one device)."""
    return jax.jit(fn, out_shardings=sharding)() if sharding is not None else jax.jit(fn)()


def _random_linear(key, layers: int | tuple[int, ...], shape: tuple[int, int], quant: str, double_quant: bool,
                   blocksize: int, weight_std: float, dtype, sharding) -> Any:
    # layers: the leading dims, (L,) or (L, E) for MoE experts (each expert quantized on its own).
    lead = (layers,) if isinstance(layers, int) else tuple(layers)
    count = math.prod(lead)
    if quant not in ("nf4", "fp4", "int8"):
        return _make(lambda: (jax.random.normal(key, (*lead, *shape), jnp.float32) * weight_std).astype(dtype),
                     sharding)
    k_codes, k_scales = jax.random.split(key)
    codes_dtype = jnp.int8 if quant == "int8" else jnp.uint8
    per_layer_codes = codes_shape(shape, quant)
    codes = _make(lambda: jax.random.bits(k_codes, (*lead, *per_layer_codes), jnp.uint8).view(codes_dtype),
                  None if sharding is None else sharding.codes)
    per_layer_scales = scales_shape(shape, blocksize)
    # absmax of a block of a normal layer: about 2.5 standard deviations, with some spread.
    absmax_fn = lambda: weight_std * (2.5 + 0.5 * jax.random.uniform(k_scales, (*lead, *per_layer_scales)))  # noqa: E731
    if not double_quant:
        scales = _make(absmax_fn, None if sharding is None else sharding.scales)
        return QuantizedTensor(codes, scales, None, None, shape, jnp.dtype(dtype).name, quant, blocksize)

    def dq():
        absmax = absmax_fn()
        nested = jax.vmap(functools.partial(double_quantize, nested_blocksize=256))(absmax.reshape(count, -1))
        return (nested[0].reshape(*lead, *per_layer_scales), nested[1].reshape(*lead, *nested[1].shape[1:]),
                nested[2].reshape(lead))

    out_shardings = None if sharding is None else (sharding.scales, sharding.nested_scales, sharding.offset)
    scales, nested, offset = jax.jit(dq, out_shardings=out_shardings)()
    return QuantizedTensor(codes, scales, nested, offset, shape, jnp.dtype(dtype).name, quant, blocksize)


def random_base(
    config: LlamaConfig,
    key: jax.Array,
    *,
    quant: str = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    dtype: Any = jnp.bfloat16,
    weight_std: float = 0.02,
    shardings: Any = None,
) -> dict[str, Any]:
    """A ``base`` pytree (see :mod:`qlora_jax.models.llama`) of random weights, made on the devices.

    ``shardings``: None (default device), or a pytree of shardings with the base's structure,
    e.g. ``qlora_jax.distributed.param_shardings(jax.eval_shape(lambda: random_base(...)), mesh)``
    (see :func:`abstract_base`).
    """
    layers = config.num_hidden_layers
    keys = iter(jax.random.split(key, len(layout.tensor_table(config))))

    def sharding_of(*path):
        node = shardings
        for p in path:
            if node is None:
                return None
            node = node[p]
        return node

    layered_dims = (layers,)
    # Norm weights that leave the activations' scale alone: 1, or 0 where the norm scales by (1 + w).
    norm_value = 1.0 - config.family.norm_offset
    values: dict[str, Any] = {}
    for spec in layout.tensor_table(config):
        sharding = sharding_of(*spec.path)
        lead = layered_dims if spec.layered else ()
        key = next(keys)
        if spec.linear:
            values[spec.slot] = _random_linear(key, (layers, *spec.stack), spec.shape, quant, double_quant, blocksize,
                                               weight_std, dtype, sharding)
        elif spec.module in ("embed_tokens", "lm_head"):
            values[spec.slot] = _make(lambda k=key, s=spec.shape: (jax.random.normal(k, s) * weight_std)
                                      .astype(dtype), sharding)
        elif spec.module.endswith(".gate"):  # an MoE router (16-bit): random, so tokens spread over experts
            values[spec.slot] = _make(lambda k=key, s=(*lead, *spec.shape): (jax.random.normal(k, s) * weight_std)
                                      .astype(dtype), sharding)
        elif spec.tensor == "bias":
            values[spec.slot] = _make(lambda s=(*lead, *spec.shape): jnp.zeros(s, dtype), sharding)
        else:  # a norm
            values[spec.slot] = _make(lambda s=(*lead, *spec.shape): jnp.full(s, norm_value, dtype), sharding)
    return layout.base_from_table(config, values)


def abstract_base(config: LlamaConfig, **kwargs: Any) -> Any:
    """Shapes and dtypes of :func:`random_base` without allocating anything."""
    return jax.eval_shape(lambda: random_base(config, jax.random.key(0), **kwargs))
