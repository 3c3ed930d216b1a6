"""Quantized data types: NF4, FP4 and Int8 blockwise absmax, with double quantization."""

from qlora_jax.quant.codebooks import DYNAMIC_MAP_SIGNED, DYNAMIC_MAP_UNSIGNED, FP4_CODE, NF4_CODE, codebook
from qlora_jax.quant.config import BNB_BACKENDS, QUANT_MODES, QUANTIZED_MODES, QuantConfig, as_quant_config
from qlora_jax.quant.tensor import (
    SUPPORTED_BLOCKSIZES,
    QuantizationError,
    QuantizedTensor,
    QuantType,
    decode_scales,
    dequantize,
    double_quantize,
    quantize,
)

__all__ = [
    "BNB_BACKENDS",
    "QUANT_MODES",
    "QUANTIZED_MODES",
    "QuantConfig",
    "as_quant_config",
    "DYNAMIC_MAP_SIGNED",
    "DYNAMIC_MAP_UNSIGNED",
    "FP4_CODE",
    "NF4_CODE",
    "SUPPORTED_BLOCKSIZES",
    "QuantizationError",
    "QuantizedTensor",
    "QuantType",
    "codebook",
    "decode_scales",
    "dequantize",
    "double_quantize",
    "quantize",
]
