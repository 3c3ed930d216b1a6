"""qlora-jax: QLoRA (4-bit NormalFloat base, double quantization, LoRA adapters) in JAX.

``qlora_jax.load_pretrained(path, quant="nf4", double_quant=True)`` gives a model and its
tokenizer; every stage (``quant``, ``kernels``, ``models``, ``optim``, ``data``, ``train``,
``checkpointing``, ``distributed``) is importable on its own.
"""

from qlora_jax.model import CausalLM, load_pretrained
from qlora_jax.quant import QuantizationError, QuantizedTensor, dequantize, quantize

__version__ = "0.1.0"

__all__ = ["CausalLM", "QuantizationError", "QuantizedTensor", "dequantize", "load_pretrained", "quantize",
           "__version__"]
