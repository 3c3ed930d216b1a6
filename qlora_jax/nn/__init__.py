"""QLoRA for any Flax model: NNX and Linen layers with a frozen quantized weight and LoRA adapters.

* :class:`QLoRALinear` / :class:`QLoRAEinsum` (NNX): a :class:`FrozenWeights` QuantizedTensor in
  bitsandbytes' ``[out, in]`` layout, an optional bias, ``nnx.LoRAParam`` ``lora_A [r, in]`` and
  ``lora_B [out, r]`` (PEFT's names and orientation, those of the built-in LLaMA).
* :func:`apply_qlora` (NNX): converts the layers of an existing model in place, by rule.
* :mod:`qlora_jax.nn.linen`: ``QLoRADense`` in place of ``nn.Dense`` and the parameter-tree converter.

Train a converted NNX model with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``.
"""

from qlora_jax.nn.layers import (
    EinsumLayout,
    FrozenWeights,
    QLoRAEinsum,
    QLoRALinear,
    leading_shape,
    pack_weight,
    weight_shape,
)
from qlora_jax.nn.surgery import (
    ConvertedLayer,
    QLoRAConversionError,
    QLoRAReport,
    QLoRARule,
    apply_qlora,
    as_rules,
    ragged_blocks_reason,
    set_kernel_backend,
)

__all__ = [
    "ConvertedLayer",
    "EinsumLayout",
    "FrozenWeights",
    "QLoRAConversionError",
    "QLoRAEinsum",
    "QLoRALinear",
    "QLoRAReport",
    "QLoRARule",
    "apply_qlora",
    "as_rules",
    "leading_shape",
    "pack_weight",
    "ragged_blocks_reason",
    "set_kernel_backend",
    "weight_shape",
]
