"""How frozen linear weights are stored: :class:`QuantConfig`, the one declaration of its settings
and defaults that the loaders (``checkpoints/``), the layers (``nn/``), the model API and the
recipe all read.
"""

from __future__ import annotations

import dataclasses

__all__ = ["BNB_BACKENDS", "QUANT_MODES", "QUANTIZED_MODES", "QuantConfig", "as_quant_config"]

# Blockwise quantized storage (packed codes + absmax per block), then the unquantized storages of
# the paper's 16-bit baselines and of full finetuning.
QUANTIZED_MODES = ("nf4", "fp4", "int8")
QUANT_MODES = (*QUANTIZED_MODES, "bf16", "float16", "float32")
# Whose double-quant scale encoding (and FP4 rounding near zero) to reproduce byte for byte.
BNB_BACKENDS = ("cuda", "cpu")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How the frozen linear weights are stored (QLoRA, arXiv 2305.14314: NF4, double quantization).

    Embeddings, norms and ``lm_head`` stay in ``dtype``, as bitsandbytes leaves them.

    Args:
      quant: "nf4", "fp4", "int8" (blockwise absmax quantized) or "bf16"/"float16"/"float32"
        (unquantized, for the paper's 16-bit baselines and full finetuning).
      double_quant: quantize the float32 absmax scales to 8 bits per block of 256 (quantized
        modes only).
      blocksize: weights per absmax block (quantized modes only).
      dtype: storage of the unquantized tensors: "bfloat16", "float16" or "float32".
      bnb_backend: whose bytes quantization reproduces where bitsandbytes' backends differ
        (double-quant scale codes, FP4 near zero): "cuda" (nearly every published checkpoint) or
        "cpu".

    Raises:
      ValueError: ``quant`` or ``bnb_backend`` is not one of the accepted values (the message
        lists them).

    References:
      QLoRA: Efficient Finetuning of Quantized LLMs, https://arxiv.org/abs/2305.14314
    """

    quant: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    dtype: str = "bfloat16"
    bnb_backend: str = "cuda"

    def __post_init__(self):
        if self.quant not in QUANT_MODES:
            raise ValueError(f"unsupported quant {self.quant!r}: expected one of {QUANT_MODES}")
        if self.bnb_backend not in BNB_BACKENDS:
            raise ValueError(f"unsupported bnb_backend {self.bnb_backend!r}: expected one of {BNB_BACKENDS} "
                             "(whose bitsandbytes double-quant encoding to reproduce)")

    @property
    def quantized(self) -> bool:
        """Whether the weights are blockwise quantized (``quant`` in :data:`QUANTIZED_MODES`)."""
        return self.quant in QUANTIZED_MODES


def as_quant_config(quant: QuantConfig | str) -> QuantConfig:
    """``quant`` itself, or for a string the :class:`QuantConfig` of that mode with every other
    setting at its default (``"nf4"`` is ``QuantConfig("nf4")``).

    Args:
      quant: a :class:`QuantConfig`, or one of :data:`QUANT_MODES`.

    Returns:
      The :class:`QuantConfig`.

    Raises:
      ValueError: an unknown mode string (the message lists the accepted ones).
      TypeError: neither a string nor a :class:`QuantConfig`.
    """
    if isinstance(quant, QuantConfig):
        return quant
    if isinstance(quant, str):
        return QuantConfig(quant=quant)
    raise TypeError(f"quant must be a QuantConfig or one of {QUANT_MODES}, got {type(quant).__name__}")
