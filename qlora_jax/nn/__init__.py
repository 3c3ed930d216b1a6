"""QLoRA for any Flax model: NNX and Linen layers with a frozen quantized weight and LoRA adapters.

* :class:`QLoRALinear` / :class:`QLoRAEinsum` (NNX): a :class:`FrozenWeights` QuantizedTensor in
  bitsandbytes' ``[out, in]`` layout, an optional bias, ``nnx.LoRAParam`` ``lora_A [r, in]`` and
  ``lora_B [out, r]`` (PEFT's names and orientation, those of the built-in LLaMA).
* :func:`apply_qlora` (NNX): converts an existing model in place, by rule. Given example inputs it
  converts every weight a contraction consumes in the traced forward pass, whatever module holds it
  (:mod:`qlora_jax.nn.traced`, :mod:`qlora_jax.nn.dataflow`); without, the ``nnx.Linear``/``nnx.Einsum`` layers.
* :mod:`qlora_jax.nn.linen`: ``QLoRADense`` in place of ``nn.Dense`` and the parameter-tree converter;
  ``convert_variables``/``apply_converted`` for an unedited Linen model.

Train a converted NNX model with ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)``.
"""

from qlora_jax.nn.dataflow import WeightLayout
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
    LeftWeight,
    QLoRAConversionError,
    QLoRAReport,
    QLoRARule,
    apply_qlora,
    as_rules,
    ragged_blocks_reason,
    set_kernel_backend,
)
from qlora_jax.nn.traced import PackedWeight, QLoRAWeight, state_shardings

__all__ = [
    "ConvertedLayer",
    "EinsumLayout",
    "FrozenWeights",
    "LeftWeight",
    "PackedWeight",
    "QLoRAConversionError",
    "QLoRAEinsum",
    "QLoRALinear",
    "QLoRAWeight",
    "QLoRAReport",
    "QLoRARule",
    "apply_qlora",
    "as_rules",
    "leading_shape",
    "pack_weight",
    "ragged_blocks_reason",
    "set_kernel_backend",
    "state_shardings",
    "weight_shape",
    "WeightLayout",
]
