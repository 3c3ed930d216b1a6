"""Helpers shared by test modules (import them from here, never from another test module)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qlora_jax.checkpoints.load import _Stacker
from qlora_jax.models import layout
from qlora_jax.models.config import LlamaConfig
from qlora_jax.quant import quantize


def random_quantized_base(config: LlamaConfig, rng: np.random.Generator) -> dict:
    """A ``base`` pytree with random NF4+DQ linear weights (std 1/sqrt(in)) and bf16 embeddings (std 0.5)."""
    d = config.hidden_size
    stacker = _Stacker(config.num_hidden_layers)
    for layer in range(config.num_hidden_layers):
        for norm in layout.LAYER_NORMS:
            stacker.put(norm, layer, jnp.ones(d, jnp.bfloat16))
        for name, shape in config.linear_shapes().items():
            stacker.put(name, layer, quantize((rng.normal(size=shape) * shape[1] ** -0.5).astype(np.float32)))
    return layout.assemble_base(
        embed_tokens=jnp.asarray(rng.normal(size=(config.vocab_size, d)) * 0.5, jnp.bfloat16),
        norm=jnp.ones(d, jnp.bfloat16),
        layer_norms={n: stacker.buffers[n] for n in layout.LAYER_NORMS},
        linears={n: {"weight": stacker.buffers[n]} for n in layout.LINEAR_LAYERS},
    )
