"""qlora-jax: QLoRA (4-bit NormalFloat base, double quantization, LoRA adapters) in JAX."""

from qlora_jax.quant import QuantizationError, QuantizedTensor, dequantize, quantize

__version__ = "0.1.0"

__all__ = ["QuantizationError", "QuantizedTensor", "dequantize", "quantize", "__version__"]
